"""The graph viewer (tessera.tools.view, `tessera view`): pages of zoo models hold every
node, the fused groups around their members, the memory plan; layouts do not overlap and
draw edges downward; a profile's times land on their nodes; the CLI; bad input."""

from __future__ import annotations

import json
from html.parser import HTMLParser
from pathlib import Path
from typing import Any

import pytest
import torch
from typer.testing import CliRunner

import tessera
from tessera.bench import zoo
from tessera.cli import app
from tessera.graph import api
from tessera.graph.compiler import stages
from tessera.tools.layout import Box, LayoutError, layered
from tessera.tools.view import ViewError, kernels, member_names, node_timings, render, run_script


class _Page(HTMLParser):
    """What a test reads of a page: node and group boxes by element id, edges, table rows'
    text by node id, buffer ids, all text."""

    def __init__(self, text: str) -> None:
        super().__init__()
        self.boxes: dict[str, Box] = {}
        self.groups: dict[str, Box] = {}
        self.edges: list[tuple[str, str]] = []
        self.rows: dict[str, str] = {}
        self.buffers: set[str] = set()
        self.text: list[str] = []
        self.ids: list[str] = []
        self._in: tuple[str, str] | None = None  # ("node" | "group", id) of an open <g>
        self._row: str | None = None
        self.feed(text)
        self.close()

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        a = dict(attrs)
        cls = (a.get("class") or "").split()
        if a.get("id"):
            self.ids.append(a["id"] or "")
        if tag == "g" and ("node" in cls or "group" in cls):
            self._in = ("node" if "node" in cls else "group", a["id"] or "")
        elif tag == "rect" and self._in is not None:
            kind, ident = self._in
            box = Box(*(float(a[k] or 0) for k in ("x", "y", "width", "height")))
            (self.boxes if kind == "node" else self.groups)[ident] = box
            self._in = None
        elif tag == "rect" and "buffer" in cls:
            self.buffers.add(a["id"] or "")
        elif tag == "path" and "edge" in cls:
            self.edges.append((a["data-from"] or "", a["data-to"] or ""))
        elif tag == "tr" and a.get("data-node"):
            self._row = a["data-node"]
            self.rows[self._row] = ""

    def handle_endtag(self, tag: str) -> None:
        if tag == "tr":
            self._row = None

    def handle_data(self, data: str) -> None:
        self.text.append(data)
        if self._row is not None:
            self.rows[self._row] += data + " "


def _compiled(name: str) -> tuple[Any, Any]:
    z = zoo.build(name, "tiny")
    model = torch.compile(z.model, backend="tessera")
    inputs = z.inputs(2, 16)
    with torch.no_grad():
        for _ in range(2):  # the second call records the memory plan
            model(*inputs)
    return model, api.executables(model)[-1]


@pytest.fixture(scope="module")
def bert() -> tuple[Any, Any]:
    return _compiled("bert")


@pytest.fixture(scope="module")
def moe_lm() -> tuple[Any, Any]:
    return _compiled("moe_lm")


@pytest.mark.parametrize("which", ["bert", pytest.param("moe_lm", marks=pytest.mark.slow)])
def test_page_shows_nodes_groups_and_memory(which: str, request: pytest.FixtureRequest
                                            ) -> None:
    model, ex = request.getfixturevalue(which)
    page = _Page(render(ex))
    g = ex.graph
    for i, n in enumerate(g.nodes):
        assert f"g0-f-n{i}" in page.boxes, f"node {i} ({n.op}) not drawn"
        assert n.op in page.rows[f"g0-f-n{i}"]
        for k in kernels(n):
            assert k in page.rows[f"g0-f-n{i}"]
        for v in n.outputs:
            assert f"%{v.name}:" in page.rows[f"g0-f-n{i}"]
    # before fusion: each fused group is a box holding exactly the nodes it replaced
    before = stages(ex)["optimized"]
    assert not any(n.kind == "fused" for n in before.nodes)
    fused = [i for i, n in enumerate(g.nodes) if n.kind == "fused"]
    assert fused, "the zoo model should have fused kernels"
    for i in fused:
        names = member_names(g.nodes[i])
        members = [k for k, n in enumerate(before.nodes)
                   if names.intersection(v.name for v in n.outputs)]
        assert len(members) >= 2
        box = page.groups[f"g0-o-g{i}"]
        for k, n in enumerate(before.nodes):
            b = page.boxes[f"g0-o-n{k}"]
            inside = box.x <= b.x and b.x + b.w <= box.x + box.w and box.y <= b.y and \
                b.bottom <= box.bottom
            assert inside == (k in members), f"node {k} ({n.op}) and group {i}"
        for name in names:
            assert f"%{name}" in page.rows[f"g0-f-n{i}"]
    # the memory plan: every buffer of the recorded plan, and the arena
    plan = next(p for p in ex.plans.values() if p is not None)
    assert {f"g0-p0-b{k}" for k in range(len(plan.memory.buffers))} <= page.buffers
    assert f"{plan.memory.arena_bytes} B" in "".join(page.text)
    # the model finds the same executable
    assert any(e is ex for e in api.executables(model))


@pytest.mark.parametrize("which", ["bert", pytest.param("moe_lm", marks=pytest.mark.slow)])
def test_layout_has_no_overlaps_and_edges_go_down(which: str,
                                                  request: pytest.FixtureRequest) -> None:
    _, ex = request.getfixturevalue(which)
    page = _Page(render(ex))
    for stage in ("f", "o"):
        boxes = [(k, b) for k, b in page.boxes.items() if k.startswith(f"g0-{stage}-")]
        assert len(boxes) >= len(ex.graph.nodes)
        for i, (k, a) in enumerate(boxes):
            for j, b in boxes[:i]:
                assert not a.overlaps(b), f"{k} overlaps {j}"
    assert page.edges
    for u, v in page.edges:
        assert page.boxes[u].bottom < page.boxes[v].y, f"edge {u} -> {v} goes up"


def test_long_edges_pass_between_nodes() -> None:
    # a chain 0 -> 1 -> ... -> 5 with side nodes in each layer, and 0 -> 5 around them
    edges = [(k, k + 1) for k in range(5)] + [(k, 6 + k) for k in range(4)] + [(0, 5)]
    layout = layered([(80, 30)] * 10, edges)
    boxes = layout.boxes
    points = layout.routes[(0, 5)]
    assert len(points) == 2 * 4  # in and out of each of the 4 layers between
    for (x0, y0), (x1, y1) in zip(points[::2], points[1::2], strict=True):
        assert x0 == x1 and y0 < y1
        assert not any(b.x <= x0 <= b.x + b.w and b.y < y1 and y0 < b.bottom for b in boxes)
    assert (0, 1) not in layout.routes  # neighbouring layers: a direct edge


def test_layout_refuses_a_cycle() -> None:
    with pytest.raises(LayoutError):
        layered([(10, 10)] * 3, [(0, 1), (1, 2), (2, 0)])


def _trace(tmp_path: Path, events: list[dict[str, Any]]) -> Path:
    path = tmp_path / "trace.json"
    path.write_text(json.dumps({"traceEvents": events, "displayTimeUnit": "ms"}))
    return path


def test_profile_times_land_on_their_nodes(bert: tuple[Any, Any], tmp_path: Path) -> None:
    _, ex = bert
    g = ex.graph
    ops = [i for i, n in enumerate(g.nodes) if n.kind in ("op", "fused")][:2]
    label = getattr(ex, "label", None)

    def event(cat: str, name: str, ts: float, dur: float, node: int) -> dict[str, Any]:
        args = {"node": node, "op": g.nodes[node].op}
        if label is not None:
            args["graph"] = label
        return {"ph": "X", "cat": cat, "name": name, "ts": ts, "dur": dur, "pid": 1,
                "tid": 1, "args": args}

    a, b = ops
    trace = _trace(tmp_path, [
        {"ph": "X", "cat": "graph", "name": "graph", "ts": 0, "dur": 1000, "pid": 1, "tid": 1},
        event("op", g.nodes[a].op, 10, 300, a), event("kernel", "gemm_a", 20, 250, a),
        event("kernel", "kernel_b", 400, 100, b), event("kernel", "kernel_b", 600, 100, b)])
    page = _Page(render(ex, profile=trace))
    row_a, row_b = page.rows[f"g0-f-n{a}"], page.rows[f"g0-f-n{b}"]
    assert "300.0" in row_a and "gemm_a x1" in row_a  # the nested kernel adds no time
    assert "200.0" in row_b and "kernel_b x2" in row_b
    others = [r for k, r in page.rows.items() if k not in (f"g0-f-n{a}", f"g0-f-n{b}")]
    assert not any("launched" in r for r in others)
    # events of another graph only: they fit none
    stray = _trace(tmp_path, [{**event("kernel", "k", 0, 5, a),
                               "args": {"graph": "0000", "node": a, "op": g.nodes[a].op}}])
    with pytest.raises(ViewError, match="fit none"):
        render(ex, profile=stray)


def test_unlabeled_events_match_by_op(bert: tuple[Any, Any]) -> None:
    _, ex = bert
    g = ex.graph
    i = next(i for i, n in enumerate(g.nodes) if n.kind == "fused")
    j = next(j for j, n in enumerate(g.nodes) if n.op != g.nodes[i].op)
    good = {"ph": "X", "cat": "kernel", "name": "k", "ts": 0, "dur": 7, "tid": 1,
            "args": {"node": i, "op": g.nodes[i].op}}
    per, notes = node_timings([good], [(None, g)])
    assert per[0][i].us == 7 and "matched by op" in notes[0]
    wrong = {**good, "args": {"node": j, "op": g.nodes[i].op}}
    with pytest.raises(ViewError):
        node_timings([wrong], [(None, g)])


class _Mlp(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = torch.nn.Linear(32, 32)
        self.norm = torch.nn.LayerNorm(32)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.softmax(torch.nn.functional.gelu(self.norm(self.fc(x))) * 1.5 + x, -1)


_SCRIPT = """
import torch
from test_model import Mlp
torch.manual_seed(0)
models = [torch.compile(Mlp().eval(), backend="tessera") for _ in range(2)]
x = torch.randn(4, 32)
with torch.no_grad():
    for model in models:
        model(x)
        model(x)
"""


def test_cli_on_a_script_and_a_saved_model(tmp_path: Path) -> None:
    import inspect
    source = inspect.getsource(_Mlp).replace("class _Mlp", "class Mlp")
    (tmp_path / "test_model.py").write_text("import torch\n\n\n" + source)
    (tmp_path / "script.py").write_text(_SCRIPT)
    runner = CliRunner()
    out = tmp_path / "graph.html"
    result = runner.invoke(app, ["view", str(tmp_path / "script.py"), "-o", str(out), "--svg"])
    assert result.exit_code == 0, result.output
    page = _Page(out.read_text())
    for k in (0, 1):  # a graph per model, each its own section
        assert f"g{k}-f-n0" in page.boxes and f"g{k}-o-n0" in page.boxes
        assert f'<option value="g{k}">' in out.read_text()
    assert page.groups and page.buffers
    assert len(page.ids) == len(set(page.ids)), "element ids repeat"
    assert "layer_norm" in " ".join(page.rows.values())
    assert "test_model.py:" in " ".join(page.rows.values())  # the model's source lines
    svg = (tmp_path / "graph.0.fused.svg").read_text()
    assert svg.startswith("<svg") and 'xmlns="http://www.w3.org/2000/svg"' in svg
    assert (tmp_path / "graph.0.optimized.svg").is_file()

    torch.manual_seed(0)
    compiled = tessera.compile(_Mlp().eval(), (torch.randn(4, 32),))
    compiled.save(tmp_path / "mlp.pt")
    result = runner.invoke(app, ["view", str(tmp_path / "mlp.pt"), "-o",
                                 str(tmp_path / "saved.html")])
    assert result.exit_code == 0, result.output
    saved = _Page((tmp_path / "saved.html").read_text())
    assert len([k for k in saved.boxes if k.startswith("g0-f-n")]) == \
        len(compiled.graph.nodes)
    assert saved.groups  # fused groups of a loaded model: from the fused nodes' sources


def test_bad_input_is_a_tessera_error(bert: tuple[Any, Any], tmp_path: Path) -> None:
    _, ex = bert
    junk = tmp_path / "junk.pt"
    junk.write_text("not a model")
    with pytest.raises(tessera.TesseraError):
        render(junk)
    result = CliRunner().invoke(app, ["view", str(junk), "-o", str(tmp_path / "x.html")])
    assert isinstance(result.exception, tessera.TesseraError)
    with pytest.raises(ViewError, match="not a Chrome-trace JSON"):
        render(ex, profile=junk)
    (tmp_path / "other.json").write_text(json.dumps({"hello": 1}))
    with pytest.raises(ViewError, match="not a Chrome trace"):
        render(ex, profile=tmp_path / "other.json")
    with pytest.raises(ViewError):
        render(42)
    with pytest.raises(ViewError, match="no Python script"):
        run_script(tmp_path / "missing.py")
