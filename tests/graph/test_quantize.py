"""options={"quantize": "int8"|"int4"}: linear layers run on the quantized GEMM templates,
the first call reports the accuracy change against float, and replays stay exact."""

from __future__ import annotations

import pytest
import torch

from tessera.errors import TesseraError
from tessera.graph import Graph, compiled
from tessera.graph.compiler import compile_graph


def _mlp() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(128, 256), torch.nn.GELU(),
                               torch.nn.Linear(256, 64)).eval()


@pytest.mark.parametrize(("mode", "cosine"), [("int8", 0.9999), ("int4", 0.99)])
def test_linear_layers_are_quantized_and_the_error_reported(mode: str, cosine: float
                                                             ) -> None:
    model, x = _mlp(), torch.randn(6, 128)
    torch._dynamo.reset()
    before = {id(e) for e in compiled()}
    f = torch.compile(model, backend="tessera", options={"quantize": mode})
    with torch.no_grad():
        want = model(x)
        outs = [f(x) for _ in range(4)]  # compared, interpreted, recorded, replayed
    ex = next(e for e in compiled() if id(e) not in before and e.quantization)
    assert [n.op for n in ex.graph.nodes].count("quantized_linear") == 2
    assert ex.quantization["cosine"] > cosine
    for y in outs[1:]:
        torch.testing.assert_close(y, outs[0], rtol=0, atol=0)  # every path agrees
    err = (outs[0] - want).norm() / want.norm()
    assert err == pytest.approx(ex.quantization["rel_error"], rel=1e-3)
    assert ex.plans and all(p is not None for p in ex.plans.values())


def test_unknown_mode_is_an_error() -> None:
    with pytest.raises(TesseraError, match="quantize='int3'; it is None, 'int8' or 'int4'"):
        compile_graph(Graph(), {"quantize": "int3"})
