"""The compiled-graph cache: a graph compiled again (same ops, weights and options; also
in another process) skips the passes and computes the same; other weights, options or
compiler code miss; unchanged weights are not stored twice; a damaged entry is compiled again."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from typing import Any

import pytest
import torch
import torch.nn.functional as F

from tessera.graph import cache, passes
from tessera.graph.compiler import compile_graph
from tessera.graph.frontend import from_fx
from tessera.runtime.cache import default_cache


class Net(torch.nn.Module):
    """A GEMM with a fused epilogue and a pointwise/row chain (generated kernels)."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = torch.nn.Linear(32, 32)
        self.norm = torch.nn.LayerNorm(32)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.softmax(F.gelu(self.norm(self.fc(x))) * 1.5 + x, dim=-1)


def _graph(model: torch.nn.Module, x: torch.Tensor) -> Any:
    """The lowered graph of `model` with its parameters frozen (a fresh copy per call)."""
    ep = torch.export.export(model, (x,))
    params = dict(model.named_parameters())
    frozen = {i: params[s.target].detach() for i, s in
              enumerate(ep.graph_signature.input_specs) if s.target in params}
    return from_fx(ep.run_decompositions().graph_module, frozen)


@pytest.fixture
def passes_run(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    calls: list[int] = []
    run = passes.run

    def counted(g: Any, options: Any = None) -> Any:
        calls.append(1)
        return run(g, options)
    monkeypatch.setattr(passes, "run", counted)
    return calls


def test_second_compile_skips_the_passes(passes_run: list[int]) -> None:
    model, x = Net().eval(), torch.randn(3, 32)
    first = compile_graph(_graph(model, x))
    assert any(n.op.startswith("fused:") for n in first.graph.nodes)
    again = compile_graph(_graph(model, x))
    assert len(passes_run) == 1, "the second compile ran the passes"
    with torch.no_grad():
        want = model(x)
        for ex in (first, again):
            torch.testing.assert_close(ex(x)[0], want, rtol=1e-5, atol=1e-6)
    # weights the passes left alone are the model's own tensors, not stored copies
    fc = model.fc.weight.data_ptr()
    assert any(v.data.data_ptr() == fc for v in again.graph.constants)


def test_moved_source_lines_hit_and_show_where_they_are_now(passes_run: list[int]) -> None:
    """Editing the model's file around it (lines move) does not recompile; the cached
    graph's nodes name today's lines."""
    model, x = Net().eval(), torch.randn(3, 32)
    compile_graph(_graph(model, x))
    moved = _graph(model, x)
    for node in moved.nodes:
        node.where = node.where.replace(":", ":1", 1) if node.where else ""
    again = compile_graph(moved)
    assert len(passes_run) == 1, "moved source lines missed the cache"
    lines = {n.where for n in moved.nodes if n.where}
    assert lines and all(n.where in lines for n in again.graph.nodes if n.where)
    assert any(n.where for n in again.graph.nodes)


def test_other_weights_options_or_compiler_miss(passes_run: list[int],
                                                monkeypatch: pytest.MonkeyPatch) -> None:
    model, x = Net().eval(), torch.randn(3, 32)
    compile_graph(_graph(model, x))
    with torch.no_grad():
        model.fc.weight[0, 0] += 1.0
    ex = compile_graph(_graph(model, x))
    compile_graph(_graph(model, x), {"fusion": False})
    monkeypatch.setattr(cache, "_code", lambda: "a changed pass")
    compile_graph(_graph(model, x))
    assert len(passes_run) == 4
    with torch.no_grad():
        torch.testing.assert_close(ex(x)[0], model(x), rtol=1e-5, atol=1e-6)


def test_cache_off(passes_run: list[int], monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TESSERA_GRAPH_CACHE", "0")
    model, x = Net().eval(), torch.randn(3, 32)
    for _ in range(2):
        compile_graph(_graph(model, x))
    assert len(passes_run) == 2


def test_damaged_entry_is_compiled_again(passes_run: list[int],
                                         monkeypatch: pytest.MonkeyPatch) -> None:
    model, x = Net().eval(), torch.randn(3, 32)
    compile_graph(_graph(model, x))
    key = cache.key(_graph(model, x), {})
    entry = default_cache().entry_dir(cache.KIND, key) / "graph.pt"
    entry.write_bytes(b"not a graph")  # the manifest's checksum no longer matches
    ex = compile_graph(_graph(model, x))
    assert len(passes_run) == 2
    # a well-formed entry of an unreadable layout: logged, compiled again, replaced
    default_cache().put(cache.KIND, key, lambda d: (torch.save({"format": 0}, d / "graph.pt"),
                                                    {})[1])
    logged: list[str] = []
    monkeypatch.setattr(cache._log, "warning", lambda msg, *a: logged.append(msg % a))
    ex = compile_graph(_graph(model, x))
    assert len(passes_run) == 3 and "unreadable" in logged[0]
    with torch.no_grad():
        torch.testing.assert_close(ex(x)[0], model(x), rtol=1e-5, atol=1e-6)
    compile_graph(_graph(model, x))
    assert len(passes_run) == 3


_CHILD = textwrap.dedent("""
    import sys, torch
    from tessera.graph import passes
    sys.path.insert(0, {tests!r})
    from test_cache import Net, _graph
    from tessera.graph.compiler import compile_graph
    torch.manual_seed(7)
    model, x = Net().eval(), torch.randn(3, 32)
    ran = []
    run = passes.run
    passes.run = lambda g, o=None: ran.append(1) or run(g, o)
    ex = compile_graph(_graph(model, x))
    with torch.no_grad():
        torch.testing.assert_close(ex(x)[0], model(x), rtol=1e-5, atol=1e-6)
    print(len(ran))
""")


def test_a_second_process_starts_warm() -> None:
    import os
    code = _CHILD.format(tests=os.path.dirname(__file__))
    ran = [subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=300, check=True).stdout.split()[-1] for _ in range(2)]
    assert ran[1] == "0", f"passes ran in the second process: {ran}"
