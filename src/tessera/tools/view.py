"""The graph viewer: a compiled graph before and after fusion as one self-contained HTML
page (inline CSS, JS and SVG: it opens offline), or as standalone SVG files.

For each graph: the graph that runs (every node with its op, output shapes and dtypes,
the kernels it launches, and with a profile its measured time), the graph before fusion
with each fused group drawn as a box around the nodes it was made of, a table of the
nodes, and every memory plan (the arena, and each buffer's offset, size and lifetime as an
offset-over-time chart). Layouts are layered DAG drawings (tools/layout.py).

Sources: an `Executable`, a `tessera.compile` result, a module compiled with
torch.compile(backend="tessera") after its first call, the path of a saved model
(`CompiledModel.save`), a list of those, or None for every live compiled graph.

A profile is a Chrome-trace JSON file (`tessera profile`, `Profile.export_chrome_trace`):
its events whose args name a node ({"graph": <Executable.label>, "node": <index in the
graph's nodes>, "op": <the node's op>}) are summed per node; an event nested in another
of the same node (a kernel inside its node's op event) adds its name, not its time. Events
without a graph label go to the graphs whose node at each index has the event's op."""

from __future__ import annotations

import html
import itertools
import json
import re
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tessera.errors import TesseraError
from tessera.tools.layout import Box, clustered, layered
from tessera.tools.script import run_as_main

__all__ = ["Timing", "ViewError", "kernels", "load_profile", "member_names", "node_timings",
           "render", "render_svg", "run_script", "view"]

_CHAR_W, _LINE_H, _MAX_CHARS = 6.7, 14.0, 44  # 11px monospace
_DTYPES = {"float32": "f32", "float16": "f16", "bfloat16": "bf16", "float64": "f64",
           "int64": "i64", "int32": "i32", "int16": "i16", "int8": "i8", "uint8": "u8",
           "bool": "b8"}
_MEMBER = re.compile(r"%([\w.]+): ")  # an output in a node's repr ("%name: f32[2, 3]")


class ViewError(TesseraError):
    """Something the viewer cannot show: a source that is no compiled graph, a file that
    is no Chrome trace, a profile that fits none of the graphs."""


# -- sources ------------------------------------------------------------------------------
def _executables(source: Any) -> tuple[list[Any], list[Any]]:
    """(the executables behind `source`, objects to keep alive while rendering)."""
    from tessera.graph import api, compiled
    from tessera.graph.executable import Executable

    if source is None:
        found = compiled()
        if not found:
            raise ViewError("no live compiled graph to show", hint="compile a model first "
                            "(tessera.compile or torch.compile(model, backend='tessera') "
                            "and one call), or pass it")
        return found, []
    if isinstance(source, Executable):
        return [source], []
    if isinstance(source, (str, Path)):
        path = Path(source)
        if not path.is_file():
            raise ViewError(f"{path}: no such file", hint="pass a file CompiledModel.save "
                            "wrote")
        model = api.load(path)
        return [model.executable], [model]
    if isinstance(source, (list, tuple)):
        out: list[Any] = []
        keep: list[Any] = []
        for s in source:
            found, held = _executables(s)
            out += [ex for ex in found if all(ex is not o for o in out)]
            keep += held
        return out, keep
    if isinstance(source, api.CompiledModel):
        return [source.executable], []
    import torch
    if isinstance(source, torch.nn.Module):
        return api.executables(source), []
    raise ViewError(f"cannot show a {type(source).__name__}", hint="pass an Executable, a "
                    "compiled model, a torch.compile'd module, or a saved model's path")


# -- profiles -----------------------------------------------------------------------------
def load_profile(path: str | Path) -> list[dict[str, Any]]:
    """The events of a Chrome-trace JSON file ({"traceEvents": [...]} or a bare list)."""
    try:
        data = json.loads(Path(path).read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ViewError(f"{path} is not a Chrome-trace JSON file: {e}",
                        hint="pass a trace `tessera profile --out` wrote") from e
    events = data.get("traceEvents") if isinstance(data, dict) else data
    if not isinstance(events, list) or not all(isinstance(e, dict) for e in events):
        raise ViewError(f"{path} is JSON but not a Chrome trace: it has no list of event "
                        "objects under 'traceEvents'")
    return events


@dataclass
class Timing:
    """A node's measured time in a profile: `us` summed over `calls` events (not nested),
    the kernels launched under it by name with their counts."""

    us: float = 0.0
    calls: int = 0
    kernels: Counter[str] = field(default_factory=Counter)


def node_timings(events: Sequence[dict[str, Any]], graphs: Sequence[tuple[str | None, Any]]
                 ) -> tuple[list[dict[int, Timing]], list[str]]:
    """Per graph ((label, Graph) pairs), its nodes' timings; and notes on what did not
    match. Raises ViewError when node events exist but fit no graph."""
    per_graph: list[dict[int, Timing]] = [{} for _ in graphs]
    notes: list[str] = []
    labels = {label: k for k, (label, _) in enumerate(graphs) if label is not None}
    mine = [e for e in events if isinstance(e.get("args"), dict)
            and isinstance(e["args"].get("node"), int) and "op" in e["args"]
            and isinstance(e.get("dur"), (int, float)) and isinstance(e.get("ts"), (int, float))]
    if not mine:
        return per_graph, ["the profile has no events of graph nodes"]
    assigned: dict[int, list[dict[str, Any]]] = {}
    stray, unlabeled = Counter[str](), []
    for e in mine:
        label = e["args"].get("graph")
        if label is None:
            unlabeled.append(e)
        elif label in labels:
            assigned.setdefault(labels[label], []).append(e)
        else:
            stray[str(label)] += 1
    if unlabeled:
        fits = [k for k, (_, g) in enumerate(graphs) if all(
            e["args"]["node"] < len(g.nodes) and g.nodes[e["args"]["node"]].op == e["args"]["op"]
            for e in unlabeled)]
        for k in fits:
            assigned.setdefault(k, []).extend(unlabeled)
        if fits:
            notes.append(f"{len(unlabeled)} events without a graph label matched by op to "
                         f"graph(s) {', '.join(str(k) for k in fits)}")
    if stray:
        notes.append(f"{sum(stray.values())} events of other graphs ("
                     f"{', '.join(sorted(stray))}) left out")
    if not assigned:
        raise ViewError("the profile's node events fit none of the graphs shown",
                        hint="view the graphs of the run that was profiled (same script "
                             "and inputs)")
    for k, evs in assigned.items():
        g = graphs[k][1]
        bad = sum(e["args"]["node"] >= len(g.nodes)
                  or g.nodes[e["args"]["node"]].op != e["args"]["op"] for e in evs)
        if bad:
            notes.append(f"graph {k}: {bad} events name a node whose op differs (another "
                         "version of the graph?); left out")
        open_until: dict[tuple[int, Any, Any], float] = {}
        for e in sorted(evs, key=lambda e: (e["ts"], -e["dur"])):
            node = e["args"]["node"]
            if node >= len(g.nodes) or g.nodes[node].op != e["args"]["op"]:
                continue
            t = per_graph[k].setdefault(node, Timing())
            if e.get("cat") == "kernel":
                t.kernels[str(e.get("name", "?"))] += 1
            key = (node, e.get("pid"), e.get("tid"))
            if e["ts"] < open_until.get(key, float("-inf")):
                continue  # inside an event of the same node counted already
            open_until[key] = e["ts"] + e["dur"]
            t.us += e["dur"]
            t.calls += 1
    return per_graph, notes


# -- what is drawn --------------------------------------------------------------------------
def _dtype(v: Any) -> str:
    name = str(v.dtype).removeprefix("torch.")
    return _DTYPES.get(name, name)


def _short(v: Any) -> str:
    return f"{_dtype(v)}[{','.join(map(str, v.shape))}]"


def _clip(s: str) -> str:
    return s if len(s) <= _MAX_CHARS else s[:_MAX_CHARS - 1] + "…"


def kernels(node: Any) -> list[str]:
    """What a node launches, from what it is: a registry op's kernels, a generated fused
    kernel, the GEMM template with a convolution's epilogue, a torch fallback, or nothing
    (a view)."""
    from tessera.graph.fusion import FusedKernel
    from tessera.ops import registry

    if node.kind == "view":
        return []
    if node.kind == "torch":
        return [f"torch fallback {getattr(node.fn, '__name__', node.op[6:])}"]
    if isinstance(node.fn, FusedKernel):
        group = "row" if node.fn.r else "pointwise"
        return [f"generated fused_kernel {node.fn.name} ({len(node.fn.program)} steps, "
                f"{group} group)"]
    if node.kind == "fused":
        kwargs = node.args.get("kwargs", {})
        extra = [f"activation {kwargs['activation']}"] if kwargs.get("activation") else []
        extra += ["residual add"] if kwargs.get("residual") is not None else []
        return [f"GEMM template {node.op[6:]}" + (f" + {', '.join(extra)}" if extra else "")]
    d = registry.get(node.op)
    return [f"{node.op} ({d.kind}{', native fast path' if d.fast else ''})"]


def member_names(node: Any) -> set[str]:
    """The output names of the nodes a fused node replaced (its `members`, or, for a
    graph loaded from a file or the cache, those its source lists)."""
    members = node.meta.get("members")
    if members is not None:
        return {v.name for m in members for v in m.outputs}
    return set(_MEMBER.findall(node.source.removeprefix("fused: ")))


@dataclass
class _Drawn:
    """A laid-out graph: element ids, text lines, CSS classes and boxes of its nodes (the
    graph's nodes, then its inputs), edges by index, cluster boxes by id."""

    prefix: str
    ids: list[str]
    lines: list[list[str]]
    classes: list[str]
    details: list[str]
    shares: list[float]  # of the profiled time (0: none)
    boxes: list[Box]
    edges: list[tuple[int, int]]
    routes: dict[tuple[int, int], list[tuple[float, float]]]
    groups: dict[int, tuple[Box, str]]


def _draw(graph: Any, prefix: str, timings: dict[int, Timing] | None,
          cluster: list[int | None] | None = None, titles: dict[int, str] | None = None
          ) -> _Drawn:
    total = sum(t.us for t in timings.values()) if timings else 0.0
    index = {v: len(graph.nodes) + k for k, v in enumerate(graph.inputs)}
    outputs = set(graph.outputs)
    ids, lines, classes, details, shares = [], [], [], [], []
    edges: set[tuple[int, int]] = set()
    for i, n in enumerate(graph.nodes):
        for v in n.outputs:
            index[v] = i
        ids.append(f"{prefix}n{i}")
        text = [f"#{i} {n.op}", ", ".join(_short(v) for v in n.outputs[:2])
                + (f" +{len(n.outputs) - 2}" if len(n.outputs) > 2 else "")]
        ks = kernels(n)
        t = timings.get(i) if timings else None
        shares.append(t.us / total if t is not None and total else 0.0)
        if t is not None and t.calls:
            text.append(f"{t.us / 1000:.3f} ms ({shares[-1]:.0%})")
        classes.append(f"node {n.kind}" + (" output" if outputs.intersection(n.outputs)
                                           else ""))
        args = sorted({f"%{v.name}" + (" (const)" if v.kind == "const" else "")
                       for v in n.inputs()})
        details.append("\n".join([
            f"node {i}: {n.op}", "outputs: " + ", ".join(map(repr, n.outputs)),
            "reads: " + ", ".join(args), "kernels: " + ("; ".join(ks) or "none (a view)"),
            *([f"time: {t.us:.1f} us in {t.calls} events; launched: " + ", ".join(
                f"{k} x{c}" for k, c in t.kernels.most_common())] if t else []),
            *([f"where: {n.where}"] if n.where else []), f"source: {n.source}"]))
        lines.append([_clip(s) for s in text])
    for k, v in enumerate(graph.inputs):
        ids.append(f"{prefix}i{k}")
        lines.append([_clip(f"input %{v.name}"), _short(v)])
        classes.append("node input")
        details.append(f"graph input {k}: {v!r}")
        shares.append(0.0)
    for i, n in enumerate(graph.nodes):
        edges.update((index[v], i) for v in n.inputs() if v in index and index[v] != i)
    sizes = [(max(map(len, ls)) * _CHAR_W + 14, len(ls) * _LINE_H + 10) for ls in lines]
    order = sorted(edges)
    if cluster is None:
        plain = layered(sizes, order)
        return _Drawn(prefix, ids, lines, classes, details, shares, plain.boxes, order,
                      plain.routes, {})
    drawn, groups = clustered(sizes, order, cluster + [None] * len(graph.inputs))
    return _Drawn(prefix, ids, lines, classes, details, shares, drawn.boxes, order,
                  drawn.routes,
                  {c: (b, (titles or {}).get(c, "")) for c, b in groups.items()})


def _svg(d: _Drawn, standalone: bool = False) -> str:
    width = max((b.x + b.w for b in d.boxes), default=0) + 20
    height = max((b.bottom for b in d.boxes), default=0) + 20
    out = [f'<svg class="graph" width="{width:.0f}" height="{height:.0f}" '
           f'viewBox="-10 -10 {width:.0f} {height:.0f}"'
           + (' xmlns="http://www.w3.org/2000/svg">' if standalone else ">")]
    if standalone:
        out.append(f"<style>{_SVG_CSS}</style>")
    arrow = f"arrow-{d.prefix}"  # (one per drawing: a hidden one's would not show)
    out.append(f'<defs><marker id="{arrow}" viewBox="0 0 8 8" refX="8" refY="4" '
               'markerWidth="6" markerHeight="6" orient="auto-start-reverse">'
               '<path d="M0,0 L8,4 L0,8 z" fill="#888"/></marker></defs>')
    for c, (b, title) in sorted(d.groups.items()):
        out.append(f'<g class="group" id="{d.prefix}g{c}">'
                   f'<rect x="{b.x:.1f}" y="{b.y:.1f}" width="{b.w:.1f}" height="{b.h:.1f}" '
                   f'rx="8"/><text x="{b.x + 8:.1f}" y="{b.y + 14:.1f}">'
                   f"{html.escape(_clip(title))}</text></g>")
    for u, v in d.edges:  # through the gaps kept for it; vertical at each point
        a, b = d.boxes[u], d.boxes[v]
        points = [(a.center, a.bottom), *d.routes.get((u, v), ()), (b.center, b.y)]
        path = f"M{points[0][0]:.1f},{points[0][1]:.1f}" + "".join(
            f" C{x0:.1f},{(y0 + y1) / 2:.1f} {x1:.1f},{(y0 + y1) / 2:.1f} {x1:.1f},{y1:.1f}"
            for (x0, y0), (x1, y1) in itertools.pairwise(points))
        out.append(f'<path class="edge" data-from="{d.ids[u]}" data-to="{d.ids[v]}" '
                   f'd="{path}" marker-end="url(#{arrow})"/>')
    for k, b in enumerate(d.boxes):
        search = html.escape(" ".join(d.lines[k]).lower() + " " + d.details[k].lower())
        out.append(f'<g class="{d.classes[k]}" id="{d.ids[k]}" data-search="{search}" '
                   f'data-detail="{html.escape(d.details[k])}"><title>'
                   f'{html.escape(d.details[k])}</title><rect x="{b.x:.1f}" y="{b.y:.1f}" '
                   f'width="{b.w:.1f}" height="{b.h:.1f}" rx="4"/>')
        for j, line in enumerate(d.lines[k]):
            head = ' class="head"' if j == 0 else ""
            out.append(f'<text x="{b.x + 7:.1f}" y="{b.y + 16 + j * _LINE_H:.1f}"{head}>'
                       f"{html.escape(line)}</text>")
        if d.shares[k]:  # a bar along the bottom: the node's share of the profiled time
            out.append(f'<rect class="share" x="{b.x:.1f}" y="{b.bottom - 4:.1f}" '
                       f'width="{b.w * d.shares[k]:.1f}" height="4"/>')
        out.append("</g>")
    out.append("</svg>")
    return "\n".join(out)


# -- one graph ------------------------------------------------------------------------------
@dataclass
class _GraphPage:
    """Everything the page shows of one executable."""

    number: int
    ex: Any
    label: str | None
    timings: dict[int, Timing] | None
    stages: dict[str, Any] = field(init=False)
    groups: dict[int, set[str]] = field(init=False)  # fused node index -> member outputs

    def __post_init__(self) -> None:
        from tessera.graph.compiler import stages
        found = stages(self.ex)
        self.stages = {"fused": found["fused"], "optimized": found["optimized"],
                       "lowered": found["lowered"]}
        self.groups = {i: member_names(n) for i, n in enumerate(self.ex.graph.nodes)
                       if n.kind == "fused"}

    @property
    def prefix(self) -> str:
        return f"g{self.number}-"

    def after(self) -> _Drawn:
        return _draw(self.ex.graph, self.prefix + "f-", self.timings)

    def before(self) -> _Drawn:
        g = self.stages["optimized"]
        owner = {name: i for i, names in self.groups.items() for name in names}
        cluster = [next((owner[v.name] for v in n.outputs if v.name in owner), None)
                   for n in g.nodes]
        final = self.ex.graph.nodes
        titles = {i: f"#{i} {final[i].op}" for i in self.groups}
        return _draw(g, self.prefix + "o-", None, cluster, titles)


def _memory(page: _GraphPage) -> str:
    """The memory plans of one executable: per plan, a summary, an offset-over-time chart
    of its arena and a table of its buffers."""
    ex = page.ex
    plans = [(f"inputs {_signature(key)}", p) for key, p in ex.plans.items() if p is not None]
    if getattr(ex, "generic", None) is not None:
        plans.append(("generic plan (sizes that vary run from Python)", ex.generic))
    if not plans:
        return ("<p>No memory plan yet: a plan is recorded on the second call with the same "
                "input shapes (and the executor must be native).</p>")
    out = []
    for j, (title, p) in enumerate(plans):
        m = p.memory
        where = _positions(p, len(ex.graph.nodes))
        out.append(f"<h4>{html.escape(title)}</h4><p class=summary>{html.escape(str(m))}; "
                   f"{len(where)} steps (kernel launches and nodes run from Python)</p>")
        out.append(_memory_chart(m, where, ex.graph, f"{page.prefix}p{j}-"))
        rows = []
        for k, (b, off) in enumerate(zip(m.buffers, m.offsets, strict=True)):
            rows.append(f"<tr><td>{k}</td><td>{b.nbytes}</td><td>{off}</td>"
                        f"<td>{b.first}-{b.last}</td><td>{_step_name(where, b.first, ex.graph)}"
                        f"</td><td>{_step_name(where, b.last, ex.graph)}</td></tr>")
        out.append("<table class=buffers><tr><th>buffer</th><th>bytes</th><th>offset</th>"
                   "<th>live (steps)</th><th>from</th><th>to</th></tr>" + "".join(rows)
                   + "</table>")
    return "\n".join(out)


def _signature(key: Any) -> str:
    """A plan's input signature, shortly: dtype[shape] of each tensor input."""
    parts = []
    for x in key:
        if isinstance(x, tuple) and len(x) == 4:
            parts.append(f"{_DTYPES.get(str(x[0]).removeprefix('torch.'), x[0])}"
                         f"[{','.join(map(str, x[1]))}]")
        else:
            parts.append(repr(x))
    return ", ".join(parts)


def _positions(plan: Any, n_nodes: int) -> list[tuple[int | None, bool]]:
    """For each step of a plan (the time axis of its buffers' lifetimes): the node it
    belongs to (None if the plan does not say) and whether it runs from Python."""
    launch_nodes = getattr(plan, "launch_nodes", None)
    out: list[tuple[int | None, bool]] = []
    index = {}
    for step in plan.steps:
        if step.node is not None:
            if not index:
                index = {id(n): i for i, n in enumerate(plan.graph.nodes)}
            out.append((index.get(id(step.node)), True))
        else:
            out += [(launch_nodes[j] if launch_nodes is not None and j < len(launch_nodes)
                     and launch_nodes[j] < n_nodes else None, False)
                    for j in range(step.first, step.last)]
    return out


def _step_name(where: list[tuple[int | None, bool]], pos: int, graph: Any) -> str:
    if pos >= len(where) or where[pos][0] is None:
        return f"step {pos}"
    node, python = where[pos]
    return html.escape(f"#{node} {graph.nodes[node].op}" + (" (Python)" if python else ""))


def _memory_chart(m: Any, where: list[tuple[int | None, bool]], graph: Any, prefix: str
                  ) -> str:
    """Offset (down) over steps (right): one rectangle per buffer (ids `<prefix>b<k>`)."""
    steps = max(len(where), max((b.last + 1 for b in m.buffers), default=1))
    width, height = 960.0, 320.0
    sx, sy = width / steps, height / max(m.arena_bytes, 1)
    out = [f'<svg class="memory" width="{width + 80:.0f}" height="{height + 40:.0f}" '
           f'viewBox="-70 -10 {width + 80:.0f} {height + 40:.0f}">',
           f'<rect class="arena" x="0" y="0" width="{width}" height="{height}"/>',
           f'<text x="-4" y="10" text-anchor="end">0</text><text x="-4" y="{height}" '
           f'text-anchor="end">{m.arena_bytes} B</text>',
           f'<text x="0" y="{height + 22}">steps 0-{steps - 1} (kernel launches and '
           "Python nodes) &#8594;</text>"]
    for pos, (_, python) in enumerate(where):
        if python:
            out.append(f'<line class="python" x1="{pos * sx:.1f}" x2="{pos * sx:.1f}" y1="0" '
                       f'y2="{height}"><title>{_step_name(where, pos, graph)}</title></line>')
    for k, (b, off) in enumerate(zip(m.buffers, m.offsets, strict=True)):
        tip = (f"buffer {k}: {b.nbytes} B at offset {off}, live steps {b.first}-{b.last} "
               f"({_step_name(where, b.first, graph)} to {_step_name(where, b.last, graph)})")
        out.append(f'<rect class="buffer" id="{prefix}b{k}" x="{b.first * sx:.1f}" '
                   f'y="{off * sy:.1f}" width="{max((b.last - b.first + 1) * sx, 1):.1f}" '
                   f'height="{max(b.nbytes * sy, 1):.1f}"><title>{tip}</title></rect>')
    out.append("</svg>")
    return "\n".join(out)


def _nodes_table(page: _GraphPage) -> str:
    g = page.ex.graph
    total = sum(t.us for t in page.timings.values()) if page.timings else 0.0
    rows = []
    for i, n in enumerate(g.nodes):
        t = page.timings.get(i) if page.timings else None
        time = (f"{t.us:.1f}</td><td>{t.calls}</td><td>{t.us / total:.1%}" if t and total
                else "</td><td></td><td>")
        launched = ", ".join(f"{k} x{c}" for k, c in t.kernels.most_common()) if t else ""
        members = ""
        if i in page.groups:
            members = " ".join(f"%{name}" for name in sorted(page.groups[i]))
        rows.append(
            f'<tr data-node="{page.prefix}f-n{i}"><td>{i}</td><td>{html.escape(n.op)}</td>'
            f"<td>{html.escape(', '.join(map(repr, n.outputs)))}</td>"
            f"<td>{html.escape('; '.join(kernels(n)))}"
            f"{'<br>launched: ' + html.escape(launched) if launched else ''}</td>"
            f"<td>{time}</td><td>{html.escape(members)}</td><td>{html.escape(n.where)}</td></tr>")
    return ("<table class=nodes><tr><th>#</th><th>op</th><th>outputs</th><th>kernels</th>"
            "<th>time (us)</th><th>events</th><th>share</th><th>fused from</th>"
            "<th>where (model source)</th></tr>"
            + "".join(rows) + "</table>")


def _section(page: _GraphPage, notes: list[str]) -> str:
    g, before = page.ex.graph, page.stages["optimized"]
    fused = len(page.groups)
    name = f"graph {page.number}" + (f" ({page.label})" if page.label else "")
    head = (f"{len(page.stages['lowered'].nodes)} nodes lowered, {len(before.nodes)} after "
            f"the passes, {len(g.nodes)} after fusion ({fused} fused kernels); "
            f"{len(g.inputs)} inputs, {len(g.constants)} constants")
    return "\n".join([
        f'<section class="graph-page" id="g{page.number}" data-name="{html.escape(name)}">',
        f"<h2>{html.escape(name)}</h2><p class=summary>{html.escape(head)}</p>",
        *(f"<p class=note>{html.escape(n)}</p>" for n in notes),
        "<details open><summary>After fusion: the graph that runs</summary>"
        f'<div class=scroll>{_svg(page.after())}</div></details>',
        "<details><summary>Before fusion: fused groups boxed</summary>"
        f'<div class=scroll>{_svg(page.before())}</div></details>',
        f"<details open><summary>Nodes ({len(g.nodes)})</summary>{_nodes_table(page)}"
        "</details>",
        f"<details><summary>Memory plan</summary>{_memory(page)}</details>",
        "</section>"])


# -- the page -------------------------------------------------------------------------------
_SVG_CSS = """
text { font: 11px ui-monospace, Menlo, Consolas, monospace; fill: #222; }
text.head { font-weight: bold; }
.node rect { fill: #dbeafe; stroke: #5b7db1; }
.node.fused rect { fill: #fde68a; stroke: #b7791f; }
.node.view rect { fill: #f3f4f6; stroke: #aaa; }
.node.torch rect { fill: #fecaca; stroke: #c53030; }
.node.input rect { fill: #dcfce7; stroke: #2f855a; }
.node.output rect { stroke-width: 2.5; }
.node.hit rect { stroke: #e11d48; stroke-width: 3; }
.node rect.share { fill: #e11d48; stroke: none; }
.group rect { fill: #fffbeb; stroke: #b7791f; stroke-dasharray: 5 3; }
.edge { fill: none; stroke: #888; stroke-width: 1; }
"""

_CSS = _SVG_CSS + """
body { font: 14px system-ui, sans-serif; margin: 0; }
header { position: sticky; top: 0; background: #1e293b; color: #fff; padding: 8px 12px;
         display: flex; gap: 12px; align-items: center; z-index: 2; }
main { padding: 0 12px; }
.scroll { overflow: auto; max-height: 80vh; border: 1px solid #ddd; }
table { border-collapse: collapse; font-size: 12px; }
td, th { border: 1px solid #ddd; padding: 2px 6px; text-align: left; vertical-align: top; }
tr.hit { background: #ffe4e6; }
.memory .arena { fill: #f8fafc; stroke: #999; }
.memory .buffer { fill: #93c5fd; stroke: #1d4ed8; stroke-width: 0.5; }
.memory .python { stroke: #c53030; stroke-dasharray: 3 3; }
.note { color: #92400e; }
#detail { position: fixed; right: 12px; bottom: 12px; max-width: 45vw; max-height: 40vh;
          overflow: auto; background: #fff; border: 1px solid #999; padding: 8px;
          white-space: pre-wrap; font: 12px ui-monospace, monospace; display: none; }
"""

_JS = """
const pages = [...document.querySelectorAll('section.graph-page')];
const pick = document.getElementById('pick');
function show(id) { pages.forEach(p => p.hidden = p.id !== id); }
pick.addEventListener('change', () => show(pick.value));
show(pick.value);
const detail = document.getElementById('detail');
document.querySelectorAll('g.node').forEach(g => g.addEventListener('click', () => {
  detail.textContent = g.dataset.detail; detail.style.display = 'block'; }));
detail.addEventListener('click', () => detail.style.display = 'none');
const search = document.getElementById('search'), hits = document.getElementById('hits');
search.addEventListener('input', () => {
  const q = search.value.trim().toLowerCase();
  const page = document.getElementById(pick.value);
  let first = null, n = 0;
  page.querySelectorAll('g.node').forEach(g => {
    const hit = q !== '' && g.dataset.search.includes(q);
    g.classList.toggle('hit', hit);
    if (hit) { n++; if (!first && g.closest('details').open) first = g; } });
  page.querySelectorAll('tr[data-node]').forEach(tr => tr.classList.toggle('hit',
    q !== '' && document.getElementById(tr.dataset.node).classList.contains('hit')));
  hits.textContent = q ? n + ' nodes' : '';
  if (first) first.scrollIntoView({block: 'center', inline: 'center'});
});
"""


def _pages(source: Any, profile: str | Path | None
           ) -> tuple[list[_GraphPage], list[list[str]], list[Any]]:
    found, keep = _executables(source)
    labels = [getattr(ex, "label", None) for ex in found]
    timings: list[dict[int, Timing] | None] = [None] * len(found)
    notes: list[list[str]] = [[] for _ in found]
    if profile is not None:
        per, general = node_timings(load_profile(profile),
                                    [(label, ex.graph) for label, ex in zip(labels, found,
                                                                            strict=True)])
        timings = list(per)
        notes = [list(general) for _ in found]
    pages = [_GraphPage(k, ex, labels[k], timings[k]) for k, ex in enumerate(found)]
    return pages, notes, keep


def _html(pages: list[_GraphPage], notes: list[list[str]]) -> str:
    options = "".join(f'<option value="g{p.number}">graph {p.number}'
                      f"{' (' + html.escape(p.label) + ')' if p.label else ''}: "
                      f"{len(p.ex.graph.nodes)} nodes</option>" for p in pages)
    return "\n".join([
        "<!DOCTYPE html>", '<html lang="en"><head><meta charset="utf-8">',
        "<title>Tessera graph view</title>", f"<style>{_CSS}</style></head><body>",
        f"<header><b>Tessera graph view</b><select id=pick>{options}</select>"
        '<input id=search type=search placeholder="search: op, value, shape, #node">'
        "<span id=hits></span></header><main>",
        *(_section(p, n) for p, n in zip(pages, notes, strict=True)),
        "</main><div id=detail></div>", f"<script>{_JS}</script></body></html>"])


def _standalone(page: _GraphPage, stage: str) -> str:
    if stage not in ("fused", "optimized"):
        raise ViewError(f"stage={stage!r}; it is 'fused' or 'optimized'")
    return _svg(page.after() if stage == "fused" else page.before(), standalone=True)


def render(source: Any = None, *, profile: str | Path | None = None) -> str:
    """The HTML page showing `source`'s graphs (see the module docstring), with per-node
    times from the Chrome trace `profile` when given."""
    pages, notes, _keep = _pages(source, profile)
    return _html(pages, notes)


def render_svg(source: Any = None, *, stage: str = "fused",
               profile: str | Path | None = None) -> list[str]:
    """Standalone SVG drawings of `source`'s graphs, one per graph: `stage` "fused" (the
    graph that runs, with times from `profile`) or "optimized" (before fusion, fused groups
    boxed)."""
    pages, _, _keep = _pages(source, profile)
    return [_standalone(p, stage) for p in pages]


def view(source: Any = None, path: str | Path = "graph.html", *,
         profile: str | Path | None = None, svg: bool = False) -> list[Path]:
    """Write the page `render` makes to `path` (and with `svg`, next to it, per graph k
    `<stem>.<k>.fused.svg` and `<stem>.<k>.optimized.svg`); the files written."""
    pages, notes, _keep = _pages(source, profile)
    path = Path(path)
    path.write_text(_html(pages, notes), encoding="utf-8")
    written = [path]
    for page in pages if svg else []:
        for stage in ("fused", "optimized"):
            written.append(path.with_name(f"{path.stem}.{page.number}.{stage}.svg"))
            written[-1].write_text(_standalone(page, stage), encoding="utf-8")
    return written


def run_script(path: str | Path, argv: Sequence[str] = ()) -> tuple[list[Any], dict[str, Any]]:
    """Run the Python script at `path` as `__main__` with `sys.argv = [path, *argv]`: (the
    executables it compiled that are still alive, the script's globals, which keep its
    models alive while they are shown)."""
    from tessera.graph import compiled

    before = {id(ex) for ex in compiled()}
    script, code = run_as_main(path, argv, command="view", error=ViewError)
    if code:
        raise ViewError(f"{path} exited with status {code}", where="tessera view")
    found = [ex for ex in compiled() if id(ex) not in before]
    if not found:
        raise ViewError(f"{path} compiled no graph that is still alive when it ends",
                        hint="compile with tessera.compile or torch.compile(model, "
                             "backend='tessera'), call the model, and keep it in a global")
    return found, script
