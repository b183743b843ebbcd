"""The model zoo end to end: every model compiled with torch.compile(backend="tessera")
matches eager in float32, language models over several greedy decode steps against a
growing KV cache; decode stops compiling once its shapes are dynamic; recorded plans
replay natively; what falls back to torch is what the zoo is known to need, named in the
warning."""

from __future__ import annotations

import re
import warnings
from typing import Any

import pytest
import torch

from tessera.bench import zoo
from tessera.graph import compiled
from tessera.graph.executable import Executable

pytest.importorskip("transformers")

# aten ops each model may leave to torch: a padding mask's fancy indexing, and positions
# (arange) of a decode step whose cache length is symbolic; with static sizes creation
# ops are constants. Anything else falling back is a lowering regression.
FALLBACKS = {
    "bert": {"index.Tensor"},
    "gpt2": {"arange.default"},
    "resnet": set(),
    "moe_lm": {"arange.start"},
    "mixtral": {"arange.default"},
}
RTOL, ATOL = 1e-4, 1e-4  # float32; bigger than one op's rounding: a model is many ops
DECODE_STEPS = 5


# transformers' models take dynamo the longest to trace: out of make test-quick
SLOW = {"bert", "gpt2", "mixtral"}


@pytest.fixture(scope="module", params=[
    pytest.param(name, marks=pytest.mark.slow) if name in SLOW else name
    for name in sorted(zoo.MODELS)])
def model(request: pytest.FixtureRequest) -> zoo.ZooModel:
    return zoo.build(request.param)


def _tensors(out: Any) -> list[torch.Tensor]:
    return list(out) if isinstance(out, (tuple, list)) else [out]


def _fallbacks(caught: list[warnings.WarningMessage]) -> set[str]:
    names: set[str] = set()
    for w in caught:
        m = re.search(r"no lowering for (.*): these run", str(w.message))
        if m:
            names.update(re.sub(r" \(x\d+\)$", "", n) for n in m.group(1).split(", "))
    return names


def _compile(z: zoo.ZooModel) -> tuple[Any, set[int]]:
    torch._dynamo.reset()
    before = {id(e) for e in compiled()}
    return torch.compile(z.model, backend="tessera"), before


def _new(before: set[int]) -> list[Executable]:
    return [e for e in compiled() if id(e) not in before]


def _close(got: Any, want: Any) -> None:
    for g, w in zip(_tensors(got), _tensors(want), strict=True):
        torch.testing.assert_close(g, w, rtol=RTOL, atol=ATOL)


def test_matches_eager(model: zoo.ZooModel) -> None:
    """One compiled model per test (dynamo tracing dominates its time): a forward called
    twice (the second call records and replays a native plan); a language model decodes
    greedily, each step checked against eager, then decodes again (replaying the plans it
    recorded) to the same tokens."""
    with warnings.catch_warnings(record=True) as caught, torch.no_grad():
        warnings.simplefilter("always")
        f, before = _compile(model)
        graphs: list[int] = []

        def checked(*args: Any) -> Any:
            got = f(*args)
            _close(got, model.model(*args))
            graphs.append(len(_new(before)))
            return got

        if model.is_lm:
            prompt = model.inputs(2, 6)[0]
            tokens = zoo.greedy_decode(checked, model, prompt, DECODE_STEPS)
            assert torch.equal(tokens, zoo.greedy_decode(f, model, prompt, DECODE_STEPS))
        else:
            args = model.inputs(2, 8)
            for _ in range(2):
                checked(*args)
    new = _new(before)
    assert all(p is not None for e in new for p in e.plans.values()), \
        "a native plan did not reproduce its recorded run"
    unexpected = _fallbacks(caught) - FALLBACKS[model.name]
    assert not unexpected, f"{model.name}: new torch fallbacks {sorted(unexpected)}"
    if model.is_lm:
        # prefill, the first decode step, then one graph with a dynamic cache length
        assert graphs[-1] == graphs[2] <= 3, f"graphs after each step: {graphs}"
        # the dynamic graph's second length recorded its generic plan, which ran the
        # lengths after it in both decodes
        assert sum(e.calls["generic"] for e in new) >= DECODE_STEPS - 1
        # up to 16 tokens, fused_moe reads nothing back on the host: it replays natively
        plans = [p for e in new for p in (*e.plans.values(), e.generic) if p is not None]
        assert not [s.node for p in plans for s in p.steps
                    if s.node is not None and s.node.op == "fused_moe"]
    else:
        assert sum(e.recordings for e in new) >= 1


def test_zoo_rejects_bad_requests() -> None:
    with pytest.raises(zoo.ZooError, match="no zoo model 'vgg'"):
        zoo.build("vgg")
    with pytest.raises(zoo.ZooError, match="no zoo size 'huge'"):
        zoo.build("resnet", "huge")
    resnet = zoo.build("resnet")
    with pytest.raises(zoo.ZooError, match="resnet is not a language model"):
        zoo.greedy_decode(resnet.model, resnet, torch.zeros(1, 1, dtype=torch.long), 1)
    with pytest.raises(zoo.ZooError, match="resnet is not a language model"):
        resnet.decode(1, 4)
    with pytest.raises(zoo.ZooError, match="resnet: inputs for batch 0"):
        resnet.inputs(0, 8)
    gpt2 = zoo.build("gpt2")
    with pytest.raises(zoo.ZooError, match="gpt2: decode for batch 1 and 513 tokens"):
        gpt2.decode(1, 512)
    with pytest.raises(zoo.ZooError, match="gpt2: greedy_decode for batch 1 and 513"):
        zoo.greedy_decode(gpt2.model, gpt2, torch.zeros(1, 500, dtype=torch.long), 14)


def test_peak_activation_counts_live_outputs_only() -> None:
    """The models suite's eager memory: op outputs while alive, not inputs or weights."""
    from tessera.bench.models import peak_activation_bytes
    x = torch.randn(1000)
    # x + 1 and (x + 1) * 2 are alive together (4000 bytes each); the sum comes after the
    # first is freed
    assert peak_activation_bytes(lambda x: ((x + 1) * 2).sum(), (x,)) == 8000
    assert peak_activation_bytes(torch.nn.Linear(1000, 10), (x[None],)) == 40
