"""tessera.tools.compare and `tessera compare`: a zoo model compares clean; a wrong kernel
injected at a known node is found with its source line; dumps round-trip and a perturbed
tensor is found; the CLI's exit codes; bad input."""

from __future__ import annotations

import inspect
import json
import linecache
import shutil
from pathlib import Path
from typing import Any

import pytest
import torch

from tessera.bench import zoo
from tessera.graph import interpreter
from tessera.graph.ir import Node
from tessera.ops import registry
from tessera.tools.compare import CompareError, Row, _check, compare, compare_dumps, tolerance


@pytest.fixture(scope="module")
def moe_lm() -> Any:
    """The MoE LM (tiny), compiled by the tessera backend, and its clean comparison."""
    z = zoo.build("moe_lm")
    inputs = z.inputs(2, 6)  # tests/graph/test_zoo's prompt: kernels from the cache
    compiled = torch.compile(z.model, backend="tessera")
    return compiled, inputs, compare(compiled, inputs)


@pytest.mark.slow  # the MoE LM's compile: ~10 s
def test_zoo_model_compares_clean(moe_lm: Any) -> None:
    _, _, result = moe_lm
    assert result.ok and result.first_bad is None, result.summary()
    compared = [r for r in result.rows if r.ok is not None]
    assert len(compared) > 50
    ops = {r.op for r in compared}
    assert "fused_moe" in ops and "scaled_dot_product_attention" in ops
    assert any(op.startswith("fused:") for op in ops)
    assert max(r.max_rel for r in compared) < 1e-5
    # every kernel came from a line of the model's source (fused_moe: the MoE block's
    # call, not the compiler's own code dynamo traced in its place)
    for r in compared:
        if not r.op.startswith("view:"):
            assert Path(r.file).name == "zoo.py", r.describe()
            assert linecache.getline(r.file, r.line).strip() == r.code


def _inject(monkeypatch: pytest.MonkeyPatch, target: Node) -> None:
    """Make the graph interpreter run a wrong kernel for the node standing for the same
    FX nodes as `target` (in whatever graph object compiling makes again): its first
    output off by 1% of its largest magnitude."""
    right = interpreter.node_function

    def injected(node: Node) -> Any:
        fn = right(node)
        if (node.op, node.origin) != (target.op, target.origin):
            return fn

        def wrong(args: dict[str, Any]) -> Any:
            out = fn(args)
            first = out[0] if isinstance(out, (list, tuple)) else out
            bad = first + 0.01 * first.abs().max()
            return [bad, *out[1:]] if isinstance(out, (list, tuple)) else bad
        return wrong
    monkeypatch.setattr(interpreter, "node_function", injected)


@pytest.mark.slow  # (shares the compile)
def test_wrong_kernel_is_found(moe_lm: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    compiled, inputs, clean = moe_lm
    graph = clean.graphs[0].graph
    # a generated kernel of the second layer (the first layer's are fine)
    fused = [i for i, n in enumerate(graph.nodes) if n.op.startswith("fused:")]
    index = fused[len(fused) // 2 + 1]
    node = graph.nodes[index]
    _inject(monkeypatch, node)
    result = compare(compiled, inputs)
    bad = result.first_bad
    assert bad is not None and not result.ok
    assert (bad.graph, bad.node, bad.op, bad.value) == (0, index, node.op,
                                                        node.outputs[0].name)
    assert bad.where == node.where and Path(bad.file).name == "zoo.py"
    assert linecache.getline(bad.file, bad.line).strip() == bad.code
    assert bad.max_rel > 5e-3 and "out of tolerance" in bad.note
    assert f"zoo.py:{bad.line}" in result.summary()
    before = [r for r in result.rows if (r.graph, r.node) < (0, index)]
    assert all(r.ok is not False for r in before)


class Small(torch.nn.Module):
    """A GEMM with an epilogue, a norm and softmax: registry ops and a generated kernel."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.fc = torch.nn.Linear(32, 48)
        self.norm = torch.nn.LayerNorm(48)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = torch.nn.functional.gelu(self.fc(x))
        return torch.softmax(self.norm(y) * 2.0, dim=-1)


def test_dumps_round_trip_and_find_a_perturbed_tensor(tmp_path: Path) -> None:
    x = torch.randn(4, 32, generator=torch.Generator().manual_seed(1))
    result = compare(Small().eval(), x, dump=tmp_path / "a")
    assert result.ok, result.summary()
    index = json.loads((tmp_path / "a" / "index.json").read_text())
    (graph,) = index["graphs"]
    tensors = torch.load(tmp_path / "a" / graph["file"], weights_only=True)
    assert [e["key"] for e in graph["entries"]] == list(tensors)
    assert all(list(tensors[e["key"]].shape) == e["shape"] for e in graph["entries"])
    assert {e["op"] for e in graph["entries"]} >= {"linear"}
    same = compare_dumps(tmp_path / "a", tmp_path / "a")
    assert same.ok and all(r.max_abs == 0 for r in same.rows if r.ok is not None)

    shutil.copytree(tmp_path / "a", tmp_path / "b")
    entry = next(e for e in graph["entries"] if e["op"] == "linear")
    tensors[entry["key"]][1, 3] += 0.5
    torch.save(tensors, tmp_path / "b" / graph["file"])
    result = compare_dumps(tmp_path / "a", tmp_path / "b")
    assert result.first_bad is not None
    assert (result.first_bad.origin, result.first_bad.node) == (entry["key"], entry["node"])
    assert result.first_bad.max_abs == pytest.approx(0.5, rel=1e-3)


def test_metrics() -> None:
    """Integers must be equal (no cosine rounding), NaNs where the reference has them,
    float errors are relative to the reference's largest magnitude; shapes must agree."""
    def check(got: torch.Tensor, ref: torch.Tensor) -> Row:
        row = Row(0, 0, "op", "v", "", "")
        _check(row, got, ref, tolerance(ref.dtype))
        return row
    ids = torch.arange(16).view(2, 8) * 37 + 5
    assert check(ids, ids.clone()).ok
    assert check(ids + (ids == 5), ids).ok is False
    x = torch.tensor([1000.0, -2.0, float("nan"), 0.0])
    close = check(x + torch.tensor([0.0, 0.0, 0.0, 1e-5]), x)
    assert close.ok and close.max_abs == pytest.approx(1e-5) and close.max_rel < 1e-7
    assert check(x.nan_to_num(), x).ok is False
    assert check(x * 1.001, x).ok is False
    wrong = check(ids[:1], ids)
    assert wrong.ok is False and wrong.note == "shape differs"


def test_bad_input(tmp_path: Path) -> None:
    with pytest.raises(CompareError, match=r"torch\.nn\.Module"):
        compare(lambda x: x, torch.ones(2))  # type: ignore[arg-type]
    eager_only = torch.compile(Small(), backend="eager")
    with pytest.raises(CompareError, match="ran no graph compiled by Tessera"):
        compare(eager_only, torch.ones(2, 32))
    with pytest.raises(CompareError, match="not a dump"):
        compare_dumps(tmp_path, tmp_path)
    compare(Small().eval(), torch.randn(4, 32), dump=tmp_path / "four")
    compare(Small().eval(), torch.randn(3, 32), dump=tmp_path / "three")
    with pytest.raises(CompareError, match="different graphs or inputs"):
        compare_dumps(tmp_path / "four", tmp_path / "three")


_SCRIPT = """
import sys
import torch

sys.path.insert(0, {tests!r})
from test_compare import Small  # the model the other tests compile: kernels cached

model = torch.compile(Small().eval(), backend="tessera")
for _ in range(2):
    model(torch.randn(4, 32))
print("script done")
"""


def test_cli_exit_codes(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from typer.testing import CliRunner

    from tessera.cli import app

    script = tmp_path / "net.py"
    script.write_text(_SCRIPT.format(tests=str(Path(__file__).parent)))
    clean = CliRunner().invoke(app, ["compare", str(script)])
    assert clean.exit_code == 0, clean.output
    assert "script done" in clean.output and "0 out of tolerance" in clean.output

    linear = registry.get("linear")  # a linear kernel off by one in its first element
    right = linear.impl

    def wrong(*args: Any, **kwargs: Any) -> Any:
        out = right(*args, **kwargs)
        out.view(-1)[0] += 1.0
        return out
    monkeypatch.setattr(linear, "impl", wrong)
    bad = CliRunner().invoke(app, ["compare", str(script), "--rows", "0"])
    assert bad.exit_code == 1, bad.output
    assert "script done" in bad.output and "BAD" in bad.output
    lines, first = inspect.getsourcelines(Small.forward)
    line = first + next(i for i, text in enumerate(lines) if "self.fc(x)" in text)
    assert f"{__file__}:{line}" in bad.output
    assert linecache.getline(__file__, line).strip() in bad.output
