"""tessera.profile(): events from eager ops, compiled graphs, compiles, memory and
collectives; the table's numbers; the Chrome trace; the CLI; nothing recorded when off."""

from __future__ import annotations

import json
import uuid
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

import tessera
from tessera import ops
from tessera.bench import zoo
from tessera.graph import compiled
from tessera.ops import _fastpath
from tessera.runtime import profiling
from tessera.tools import roofline
from tessera.tools.profiler import CATEGORIES, Profile


@pytest.fixture(scope="module", autouse=True)
def native_fast_path() -> None:
    _fastpath.wait()  # small ops on the C++ fast path, as in a warm process


def _inside(inner: profiling.Event, outer: profiling.Event) -> bool:
    return inner.tid == outer.tid and outer.start <= inner.start and inner.end <= outer.end


def test_eager_ops_give_named_kernels_nested_in_ops() -> None:
    a, b = torch.randn(32, 48), torch.randn(48, 16)
    ops.softmax(ops.matmul(a, b))  # compiled outside the profile
    with tessera.profile() as p:
        y = ops.softmax(ops.matmul(a, b), dim=-1)
        ops.add(y, y)
    events = p.events
    op_events = {e.name: e for e in events if e.cat == "op"}
    assert set(op_events) == {"matmul", "softmax", "add"}
    assert op_events["matmul"].args["inputs"] == [((32, 48), "float32"), ((48, 16), "float32")]
    assert op_events["matmul"].args["outputs"] == [((32, 16), "float32")]
    kernels = [e for e in events if e.cat == "kernel"]
    assert kernels and not any(k.name.startswith("kernel@") for k in kernels)
    for name in ("matmul", "softmax", "add"):  # each op launched its own kernel(s)
        assert any(_inside(k, op_events[name]) for k in kernels), name
    assert all(any(_inside(k, o) for o in op_events.values()) for k in kernels)
    assert all(e.end >= e.start for e in events)


def test_template_entry_points_called_directly_are_kernels() -> None:
    from tessera.templates.gemm import batched_gemm
    a, b = torch.randn(3, 16, 32), torch.randn(3, 32, 8)
    batched_gemm(a, b)
    with tessera.profile() as p:
        got = batched_gemm(a, b)
    torch.testing.assert_close(torch.as_tensor(np.asarray(got)), a @ b, rtol=1e-4, atol=1e-4)
    assert [e.name for e in p.events if e.cat == "kernel"] == ["gemm:tsr_gemm_batched"]


def test_table_counts_flops_of_a_known_matmul() -> None:
    m, k, n = 64, 128, 32
    a, b = torch.randn(m, k), torch.randn(k, n)
    ops.matmul(a, b)
    with tessera.profile() as p:
        for _ in range(3):
            ops.matmul(a, b)
    stat = next(s for s in p.stats("op") if s.name == "matmul")
    assert stat.calls == 3
    assert stat.flops == 3 * 2 * m * n * k
    assert stat.nbytes == 3 * 4 * (m * k + k * n + m * n)
    assert stat.gflops == pytest.approx(stat.flops / stat.total_ns)
    roof = p.peaks()
    intensity = 2 * m * n * k / (4 * (m * k + k * n + m * n))
    assert stat.intensity == pytest.approx(intensity)
    assert stat.bound == ("compute" if intensity >= roof.ridge else "memory")
    assert stat.attained == pytest.approx(
        stat.gflops / min(roof.gflops, intensity * roof.gbs))
    gemm = p.stats("kernel")[0]  # the matmul's only kernel inherits its counts
    assert gemm.calls == 3 and gemm.flops == stat.flops
    text = p.table()
    assert "matmul" in text and "GFLOPS" in text and f"{roof.gflops:.1f} GFLOPS" in text
    assert str(p) == text


def test_flop_counts_of_gemm_like_ops() -> None:
    f32 = "float32"
    assert roofline.op_flops("linear", [((8, 16), f32), ((4, 16), f32)], [((8, 4), f32)]) \
        == 2 * 8 * 4 * 16
    assert roofline.op_flops("torch:aten.addmm.default",
                             [((4,), f32), ((8, 16), f32), ((16, 4), f32)],
                             [((8, 4), f32)]) == 2 * 8 * 4 * 16
    assert roofline.op_flops("conv2d", [((1, 3, 8, 8), f32), ((6, 3, 3, 3), f32)],
                             [((1, 6, 6, 6), f32)]) == 2 * 6 * 36 * 27
    q, kv = ((2, 4, 8, 16), f32), ((2, 4, 10, 16), f32)
    assert roofline.op_flops("scaled_dot_product_attention", [q, kv, kv], [q]) \
        == 2 * 2 * 4 * 8 * 10 * 32
    assert roofline.op_flops("fused_moe", [((5, 8), f32), ((5, 4), f32), ((4, 8, 12), f32),
                                           ((4, 6, 8), f32)], [((5, 8), f32)],
                             {"top_k": 2}) == 2 * 5 * 2 * 3 * 8 * 6
    assert roofline.op_flops("add", [((4,), f32)] * 2, [((4,), f32)]) is None
    assert roofline.op_bytes([((4, 2), "float16")], [((3,), "int64")]) == 16 + 24


@pytest.fixture(scope="module")
def small_graph() -> tuple[Profile, Any]:
    """A small MLP compiled; its second call (recording the plan) and third (replaying
    it) profiled."""
    model = torch.nn.Sequential(torch.nn.Linear(32, 64), torch.nn.GELU(),
                                torch.nn.Linear(64, 32), torch.nn.LayerNorm(32)).eval()
    x = torch.randn(4, 32)
    before = {id(e) for e in compiled()}
    compiled_model = torch.compile(model, backend="tessera")
    with torch.no_grad():
        compiled_model(x)
        with tessera.profile() as p:
            compiled_model(x)
            compiled_model(x)
    (executable,) = [e for e in compiled() if id(e) not in before]
    return p, executable


def test_small_graph_recorded_and_replayed(small_graph: tuple[Profile, Any]) -> None:
    p, executable = small_graph
    calls = [e for e in p.events if e.cat == "graph"]
    assert [e.args["ran"] for e in calls] == ["record", "plan"]
    nodes = executable.graph.nodes
    for call in calls:
        kernels = [e for e in p.events if e.cat == "kernel" and _inside(e, call)]
        assert kernels and all(e.args["graph"] == executable.label for e in kernels)
        assert all(nodes[e.args["node"]].op == e.args["op"] for e in kernels)
        ops_in = {e.args["node"] for e in p.events if e.cat == "op" and _inside(e, call)}
        assert {e.args["node"] for e in kernels} <= ops_in
    arena = [e for e in p.events if e.cat == "memory" and e.name == "arena"]
    assert len(arena) == 1 and arena[0].args["graph"] == executable.label
    linear = next(s for s in p.stats("op") if s.name == "linear")
    # two layers; recording runs them, then replays the new plan once to check it
    assert linear.calls == 2 * 3 and linear.flops == 6 * (2 * 4 * 64 * 32)


def test_chrome_trace_is_valid(small_graph: tuple[Profile, Any], tmp_path: Path) -> None:
    p, executable = small_graph
    events = _check_trace(p, executable.label, tmp_path)
    assert any(e["ph"] == "C" and e["name"] == "memory: graph arenas" for e in events)


def _check_trace(p: Profile, label: str, tmp_path: Path) -> list[dict[str, Any]]:
    """The exported trace's events, checked: required keys, categories, non-negative
    times, metadata, graph kernels, and events of one thread nesting."""
    path = p.export_chrome_trace(tmp_path / "trace.json")
    data = json.loads(path.read_text())
    assert data["displayTimeUnit"] == "ms"
    events = data["traceEvents"]
    complete = [e for e in events if e["ph"] == "X"]
    assert len(complete) == len(p.events)
    for e in complete:
        assert {"name", "cat", "ts", "dur", "pid", "tid", "args"} <= set(e)
        assert e["cat"] in CATEGORIES and e["dur"] >= 0 and e["ts"] >= 0
    assert {e["name"] for e in events if e["ph"] == "M"} >= {"process_name", "thread_name"}
    assert any(e["ph"] == "X" and e["args"].get("graph") == label and e["cat"] == "kernel"
               for e in events)
    assert any(e["ph"] == "X" and e["cat"] == "memory" and e["name"] == "outputs"
               for e in events)  # each call's output buffers
    by_tid: dict[int, list[tuple[float, float]]] = {}
    for e in complete:
        by_tid.setdefault(e["tid"], []).append((e["ts"], e["ts"] + e["dur"]))
    for spans in by_tid.values():  # none starts inside another and ends after it
        stack: list[float] = []
        for start, end in sorted(spans, key=lambda s: (s[0], -s[1])):
            while stack and stack[-1] <= start:
                stack.pop()
            assert not stack or end <= stack[-1] + 1e-3, (start, end, stack[-1])
            stack.append(end)
    return events


@pytest.fixture(scope="module")
def bert_profile() -> tuple[Profile, Any]:
    """Tiny BERT compiled; two calls profiled after its plan is recorded."""
    z = zoo.build("bert", "tiny")
    inputs = z.inputs(1, 8)
    torch._dynamo.reset()
    before = {id(e) for e in compiled()}
    model = torch.compile(z.model, backend="tessera")
    with torch.no_grad():
        for _ in range(3):  # interpreter, record, plan
            model(*inputs)
        with tessera.profile() as p:
            model(*inputs)
            model(*inputs)
    (executable,) = [e for e in compiled() if id(e) not in before]
    return p, executable


@pytest.mark.slow
def test_compiled_graph_calls_and_kernels(bert_profile: tuple[Profile, Any]) -> None:
    p, executable = bert_profile
    label = executable.label
    assert label.startswith("g") and len(label) == 11
    calls = [e for e in p.events if e.cat == "graph"]
    assert len(calls) == 2
    assert all(e.args["graph"] == label and e.args["ran"] == "plan" for e in calls)
    nodes = executable.graph.nodes
    kernels = [e for e in p.events if e.cat == "kernel" and (e.args or {}).get("graph") == label]
    assert len(kernels) >= 2 * 5
    for k in kernels:
        assert 0 <= k.args["node"] < len(nodes)
        assert nodes[k.args["node"]].op == k.args["op"]
        assert any(_inside(k, c) for c in calls)
        assert not k.name.startswith("kernel@")
    # every kernel sits in the op event of its node
    node_ops = [e for e in p.events if e.cat == "op" and e.args.get("graph") == label]
    for k in kernels:
        assert any(_inside(k, o) and o.args["node"] == k.args["node"] for o in node_ops)
    # the linear layers' flops are counted from the recorded shapes
    linear = [s for s in p.stats("op") if s.name == "linear"]
    assert linear and linear[0].flops > 0


@pytest.mark.slow
def test_bert_trace_is_valid(bert_profile: tuple[Profile, Any], tmp_path: Path) -> None:
    p, executable = bert_profile
    _check_trace(p, executable.label, tmp_path)


def test_compile_miss_is_an_event() -> None:
    from tessera.runtime.toolchain import compile_c

    source = f"/* {uuid.uuid4()} */\nint profiled_answer(void) {{ return 42; }}\n"
    with tessera.profile() as p:
        compile_c(source, name="profiled_answer")
    (event,) = [e for e in p.events if e.cat == "compile"]
    assert event.name == "profiled_answer" and event.args["cache"] == "miss"
    assert event.end > event.start


def test_memory_and_collective_events() -> None:
    import tessera.dist as dist
    from tessera.dist import comm

    world = dist.init()
    x = np.ones(256, np.float32)
    try:
        with tessera.profile() as p:
            t = tessera.empty((1000,))
            world.allreduce(x)
            del t
    finally:
        dist.finalize()
    (coll,) = [e for e in p.events if e.cat == "collective"]
    assert coll.name == "allreduce"
    assert coll.args == {"bytes": 1024, "rank": 0, "ranks": 1, "async": False}
    mem = [e for e in p.events if e.cat == "memory"]
    assert [e.name for e in mem] == ["alloc", "free"]
    assert mem[0].args["bytes"] >= 4000 and mem[1].args["bytes"] == -mem[0].args["bytes"]
    counters = [e for e in p.chrome_trace()["traceEvents"] if e["ph"] == "C"]
    assert [e["args"]["bytes"] for e in counters] == [mem[0].args["bytes"], 0]
    assert counters[0]["name"] == "memory: allocator cpu"
    assert comm.Communicator.allreduce is comm._PLAIN["allreduce"]  # restored


def test_off_records_nothing() -> None:
    a = torch.randn(16, 16)
    with tessera.profile() as p:
        ops.softmax(a)
    n = len(p.events)
    assert n and profiling.active is None
    assert ops.softmax.__globals__["_prof"] is False
    ops.softmax(a)  # the launchers' timers are unset: nothing reaches the stopped session
    ops.matmul(a, a)
    tessera.empty((10,))
    assert len(p.events) == n
    with pytest.raises(profiling.ProfilerError):
        p.start()  # a profile records once
    with tessera.profile(), pytest.raises(profiling.ProfilerError):
        tessera.profile().start()  # profiles do not nest
    assert profiling.active is None


def test_roofline_plot(tmp_path: Path) -> None:
    a = torch.randn(64, 64)
    ops.matmul(a, a)
    with tessera.profile() as p:
        ops.matmul(a, a)
    with pytest.raises(roofline.RooflineError):
        p.roofline(tmp_path / "plot.txt")
    pytest.importorskip("matplotlib")
    path = p.roofline(tmp_path / "plot.svg")
    assert path.read_text().lstrip().startswith("<?xml") and "matmul" in path.read_text()


def test_cli_profiles_a_script(tmp_path: Path) -> None:
    from tessera.cli import app

    script = tmp_path / "work.py"
    script.write_text("import sys, torch\nfrom tessera import ops\n"
                      "assert sys.argv[1:] == ['--n', '3'], sys.argv\n"
                      "a = torch.randn(32, 32)\n"
                      "for _ in range(int(sys.argv[2])):\n    ops.matmul(a, a)\n")
    trace = tmp_path / "trace.json"
    result = CliRunner().invoke(app, ["profile", str(script), "--n", "3", "--out", str(trace),
                                      "--top", "3"])
    assert result.exit_code == 0, result.output
    assert "Ops" in result.output and "matmul" in result.output
    events = json.loads(trace.read_text())["traceEvents"]
    assert sum(e["ph"] == "X" and e["name"] == "matmul" for e in events) == 3
    missing = CliRunner().invoke(app, ["profile", str(tmp_path / "absent.py")])
    assert missing.exit_code != 0 and isinstance(missing.exception, tessera.TesseraError)
