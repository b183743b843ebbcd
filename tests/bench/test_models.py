"""The models suite and the demo time torch.compile's backends side by side in one process:
after another backend compiled the same model (and graph-broke in it), the tessera-compiled
model still runs its one graph, and the other backend runs its own frames."""

from __future__ import annotations

import warnings

import pytest
import torch
from torch._dynamo.utils import counters

from tessera.bench import zoo
from tessera.bench.models import own_code
from tessera.graph import compiled


@pytest.mark.slow
def test_a_second_backend_leaves_tesseras_graph_alone() -> None:
    """Dynamo's eager backend graph-breaks in the MoE LM's loop over blocks like Inductor
    (and costs no compile): it marks that forward's code skipped for every backend, so
    had it compiled the model itself, Tessera would now compile the blocks one by one."""
    z = zoo.build("moe_lm")
    args = z.inputs(2, 6)  # test_zoo's prefill: its kernels and graph are cached
    torch._dynamo.reset()
    before = {id(e) for e in compiled()}
    ours = torch.compile(z.model, backend="tessera")
    other = own_code(z.model)
    assert type(other).forward.__code__ is not type(z.model).forward.__code__
    assert dict(other.named_parameters()) == dict(z.model.named_parameters())
    theirs = torch.compile(other, backend="eager")
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        want = z.model(*args)
        for _ in range(2):
            ours(*args)
        graphs = counters["stats"]["unique_graphs"]
        for _ in range(2):
            torch.testing.assert_close(theirs(*args), want)
        assert counters["stats"]["unique_graphs"] - graphs > 1  # it graph-broke
        for _ in range(3):
            torch.testing.assert_close(ours(*args), want, rtol=1e-4, atol=1e-4)
    assert len([e for e in compiled() if id(e) not in before]) == 1


def test_own_code_keeps_the_models_behaviour() -> None:
    z = zoo.build("resnet")
    args = z.inputs(1, 8)
    other = own_code(z.model)
    assert isinstance(other, type(z.model)) and type(other).__name__ == type(z.model).__name__
    with torch.no_grad():
        torch.testing.assert_close(other(*args), z.model(*args), rtol=0, atol=0)
    with pytest.raises(TypeError):
        other(*args, *args)
