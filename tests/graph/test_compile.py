"""torch.compile(model, backend="tessera"): results match eager, the native executable
replays a recorded launch sequence once per input signature, fallbacks warn and work."""

from __future__ import annotations

import warnings

import pytest
import torch
import torch.nn.functional as F

from tessera.errors import TesseraError
from tessera.graph import compiled, memplan
from tessera.graph.compiler import compile_graph
from tessera.graph.executable import Executable


class Block(torch.nn.Module):
    """Linear, LayerNorm, GELU, a residual and a softmax: every node a registry op."""

    def __init__(self, d: int = 32) -> None:
        super().__init__()
        self.fc = torch.nn.Linear(d, d)
        self.norm = torch.nn.LayerNorm(d)
        self.register_buffer("scale", torch.linspace(0.5, 1.5, d))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = F.gelu(self.norm(self.fc(x))) * self.scale + x
        return torch.softmax(h, dim=-1)


_BEFORE: set[int] = set()


def _compiled(model: torch.nn.Module, **options: object) -> torch.nn.Module:
    torch._dynamo.reset()
    _BEFORE.clear()
    _BEFORE.update(id(e) for e in compiled())
    return torch.compile(model, backend="tessera", dynamic=False,
                         options=options or None)


def _executables(fn: torch.nn.Module) -> list[Executable]:
    """The Executables compiled since the last _compiled()."""
    return [e for e in compiled() if id(e) not in _BEFORE]


@pytest.mark.parametrize("executor", ["native", "python"])
def test_block_matches_eager(executor: str) -> None:
    model = Block().eval()
    x = torch.randn(4, 7, 32)
    with torch.no_grad():
        got = _compiled(model, executor=executor)(x)
        torch.testing.assert_close(got, model(x), rtol=1e-5, atol=1e-6)


def test_one_recording_per_input_signature() -> None:
    model = Block().eval()
    f = _compiled(model)
    with torch.no_grad():
        for _ in range(3):
            x = torch.randn(2, 5, 32)
            torch.testing.assert_close(f(x), model(x), rtol=1e-5, atol=1e-6)
    (ex,) = _executables(f)
    assert ex.recordings == 1 and len(ex.plans) == 1
    plan = next(iter(ex.plans.values()))
    assert plan is not None, "the plan fell back to the interpreter"
    assert all(step.node is None for step in plan.steps), "a node ran from Python"
    assert plan.memory.arena_bytes <= plan.memory.total_bytes


def test_outputs_are_fresh_each_call() -> None:
    model = Block().eval()
    f = _compiled(model)
    with torch.no_grad():
        f(torch.randn(2, 3, 32))  # interpreted, then recorded: the next calls replay
        f(torch.randn(2, 3, 32))
        a = f(torch.randn(2, 3, 32))
        kept = a.clone()
        f(torch.randn(2, 3, 32))
    torch.testing.assert_close(a, kept, rtol=0, atol=0)


class WithFallback(torch.nn.Module):
    """cumsum has no Tessera lowering: it runs through torch between native segments."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = torch.nn.Linear(16, 16)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.fc(x))
        return torch.cumsum(h, dim=-1).sigmoid() + h.sum(-1, keepdim=True)


def test_fallback_warns_once_and_runs_between_native_segments() -> None:
    model = WithFallback().eval()
    x = torch.randn(3, 16)
    with warnings.catch_warnings(record=True) as caught, torch.no_grad():
        warnings.simplefilter("always")
        f = _compiled(model)
        for _ in range(3):
            torch.testing.assert_close(f(x), model(x), rtol=1e-5, atol=1e-5)
    messages = [str(w.message) for w in caught if "no lowering" in str(w.message)]
    assert len(messages) == 1 and "cumsum" in messages[0]
    (ex,) = _executables(f)
    plan = next(iter(ex.plans.values()))
    kinds = ["python" if s.node is not None else "native" for s in plan.steps]
    assert kinds == ["native", "python", "native"]


class Embedder(torch.nn.Module):
    """embedding reads its indices on the host (range checks): a Python step each call."""

    def __init__(self) -> None:
        super().__init__()
        self.emb = torch.nn.Embedding(50, 16)
        self.fc = torch.nn.Linear(16, 8)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.fc(self.emb(ids)).tanh()


def test_host_reading_ops_check_their_input_every_call() -> None:
    model = Embedder().eval()
    f = _compiled(model)
    with torch.no_grad():
        ids = torch.randint(0, 50, (2, 6))
        for _ in range(3):  # interpreted, recorded, replayed
            torch.testing.assert_close(f(ids), model(ids), rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(f(ids.flip(0)), model(ids.flip(0)), rtol=1e-5, atol=1e-6)
        with pytest.raises(TesseraError, match=r"embedding.*out of range"):
            f(torch.full((2, 6), 50))


def test_unknown_option_is_an_error() -> None:
    from tessera.graph.ir import Graph
    with pytest.raises(TesseraError, match="unknown graph compiler option"):
        compile_graph(Graph(), {"fuse_everything": True})
    with pytest.raises(TesseraError, match="executor='fast'"):
        compile_graph(Graph(), {"executor": "fast"})


def test_arena_alignment_constant() -> None:
    assert memplan.ALIGN == 64


class Pooled(torch.nn.Module):
    """A per-token part whose sizes follow the sequence and a pooled part whose do not."""

    def __init__(self, d: int = 32) -> None:
        super().__init__()
        self.fc = torch.nn.Linear(d, d)
        self.head = torch.nn.Linear(d, d)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        h = torch.softmax(self.fc(x), dim=-1)
        return h, F.gelu(self.head(h.mean(dim=1))).exp()


def test_dynamic_shapes_compile_once_and_replay_new_lengths() -> None:
    """Sequence length symbolic: one graph for every length. The first length runs on the
    interpreter, the second records the generic plan (the nodes whose sizes follow the
    length from Python, the rest native), new lengths after it replay it; a length seen
    often gets its own plan. A batch the generic plan holds fixed runs on the interpreter."""
    model = Pooled().eval()
    torch._dynamo.reset()
    before = {id(e) for e in compiled()}
    f = torch.compile(model, backend="tessera", dynamic=True)
    with torch.no_grad():
        for n in (3, 4, 5, 6, 6, 6, 6, 6):
            x = torch.randn(2, n, 32)
            torch.testing.assert_close(f(x), model(x), rtol=1e-5, atol=1e-6)
        (ex,) = [e for e in compiled() if id(e) not in before]
        assert any(v.symbolic for v in ex.graph.inputs)
        assert ex.calls == {"interpreter": 1, "record": 2, "generic": 4, "plan": 1}
        assert ex.generic is not None and len(ex.plans) == 1
        native = sum(s.last - s.first for s in ex.generic.steps if s.node is None)
        assert native > 0, "the generic plan replays nothing natively"
        x = torch.randn(3, 5, 32)
        torch.testing.assert_close(f(x), model(x), rtol=1e-5, atol=1e-6)
    assert ex.calls["interpreter"] == 2 and ex.calls["generic"] == 4


def test_generic_plan_turns_away_a_layout_it_did_not_record() -> None:
    """A Python-run node makes a view whose strides follow the symbol though its shape
    does not; the native launch reading it must not replay with the recorded strides."""
    from tessera.graph.ir import Graph, Node
    g = Graph()
    x = g.value("x", torch.float32, (4, "s0"), "input")
    y = g.value("y", torch.float32, (4, 1))
    g.add(Node("torch:first_column", {"args": [x], "kwargs": {}}, [y], lambda t: t[:, :1]))
    z = g.value("z", torch.float32, (4, 1))
    g.add(Node("exp", {"x": y}, [z]))
    g.outputs = [z]
    ex = compile_graph(g)
    for n in (3, 5, 6):
        t = torch.randn(4, n)
        torch.testing.assert_close(ex(t)[0], t[:, :1].exp())
    assert ex.generic is not None and ex.misses == 1
    assert ex.calls == {"interpreter": 2, "record": 1}


def _scratch_outside_torch(x: torch.Tensor) -> torch.Tensor:
    """Zeroes a numpy scratch buffer through the launcher: memory a replay would find
    freed, so no plan may point into it."""
    import numpy as np

    from tessera.graph.replay import builtins
    from tessera.runtime.cpu.launch import launcher
    scratch = np.ones(1024, np.float32)
    launcher()(builtins()["memset"], 1, 1, 1, scratch.ctypes.data, scratch.nbytes)
    assert not scratch.any()
    return x


def test_a_launch_into_memory_outside_torch_is_never_replayed() -> None:
    from tessera.graph.ir import Graph, Node
    g = Graph()
    x = g.value("x", torch.float32, (4,), "input")
    y = g.value("y", torch.float32, (4,))
    g.add(Node("torch:scratch", {"args": [x], "kwargs": {}}, [y], _scratch_outside_torch))
    z = g.value("z", torch.float32, (4,))
    g.add(Node("exp", {"x": y}, [z]))
    g.outputs = [z]
    ex = compile_graph(g)
    t = torch.randn(4)
    with pytest.warns(UserWarning, match="no buffer the plan knows"):
        for _ in range(3):
            torch.testing.assert_close(ex(t)[0], t.exp())
    assert list(ex.plans.values()) == [None]
    torch.testing.assert_close(ex(t)[0], t.exp())  # on the interpreter from then on


class Gather(torch.nn.Module):
    """nonzero: sizes after it depend on the data, so nothing past it may replay stale."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        idx = torch.nonzero(x > 0).squeeze(-1)
        return torch.zeros(4).index_add(0, idx % 4, x[idx].exp())


def test_data_dependent_sizes_are_never_replayed() -> None:
    model = Gather()
    torch._dynamo.reset()
    with torch._dynamo.config.patch(capture_dynamic_output_shape_ops=True), \
            warnings.catch_warnings():
        warnings.simplefilter("ignore")  # nonzero and indexing fall back to torch
        before = {id(e) for e in compiled()}
        f = torch.compile(model, backend="tessera", dynamic=False)
        with torch.no_grad():
            for _ in range(6):  # different counts of positives under one input signature
                x = torch.randn(8)
                torch.testing.assert_close(f(x), model(x))
    (ex,) = [e for e in compiled() if id(e) not in before]
    (plan,) = ex.plans.values()
    python = [s.node.op for s in plan.steps if s.node is not None]
    assert "exp" in python and "index_add" in python
