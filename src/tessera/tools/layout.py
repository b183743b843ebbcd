"""Layered drawing of a DAG (Sugiyama-style, done here so the graph viewer needs no
graphviz): nodes go into layers by longest path, so every edge points downward; within a
layer they are ordered by the barycenter of their neighbours, a few sweeps down and up,
which removes most crossings; then packed left to right without overlap, each as close as
it can get above or below its neighbours. `clustered` lays out groups of nodes as boxes
around their members (the graph viewer's fused groups)."""

from __future__ import annotations

import itertools
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from tessera.errors import TesseraError

__all__ = ["Box", "Layout", "LayoutError", "clustered", "layered"]

GAP_X, GAP_Y = 24.0, 36.0  # between neighbours in a layer; between layers
PAD, TITLE = 10.0, 18.0  # inside a cluster's box: around its members; its title line
_DUMMY = 2.0  # the width a long edge takes in a layer it crosses


class LayoutError(TesseraError):
    """Edges that do not form a DAG over the given nodes."""


@dataclass(frozen=True)
class Box:
    """A node's rectangle: top-left corner, width, height."""

    x: float
    y: float
    w: float
    h: float

    @property
    def bottom(self) -> float:
        return self.y + self.h

    @property
    def center(self) -> float:
        return self.x + self.w / 2

    def overlaps(self, other: Box) -> bool:
        return self.x < other.x + other.w and other.x < self.x + self.w and \
            self.y < other.bottom and other.y < self.bottom


@dataclass
class Layout:
    """Boxes of the nodes, and for each edge spanning more than one layer the points it
    passes through in the layers between (gaps the layout keeps free for it)."""

    boxes: list[Box]
    routes: dict[tuple[int, int], list[tuple[float, float]]]


def layered(sizes: Sequence[tuple[float, float]], edges: Iterable[tuple[int, int]],
            sweeps: int = 4) -> Layout:
    """A layout of nodes of the given (width, height), edges (from, to) by index: each
    edge goes from a box to one wholly below it; no two boxes overlap; the top-left is
    (0, 0). A long edge gets a point-sized dummy node in every layer it crosses, ordered
    and packed like the nodes, so it runs between them rather than through them."""
    n = len(sizes)
    preds: list[set[int]] = [set() for _ in range(n)]
    succs: list[set[int]] = [set() for _ in range(n)]
    edges = sorted(set(edges))
    for u, v in edges:
        if not (0 <= u < n and 0 <= v < n) or u == v:
            raise LayoutError(f"edge ({u}, {v}) is not between two of the {n} nodes")
        preds[v].add(u)
        succs[u].add(v)
    layer = _layers(preds, succs)
    sizes = list(sizes)
    chains: dict[tuple[int, int], list[int]] = {}
    for u, v in edges:  # dummies: they join the graph in place of the long edge
        if layer[v] - layer[u] > 1:
            chain = list(range(len(sizes), len(sizes) + layer[v] - layer[u] - 1))
            chains[(u, v)] = chain
            for k in range(len(chain)):
                sizes.append((_DUMMY, 0.0))
                layer.append(layer[u] + 1 + k)
                preds.append(set())
                succs.append(set())
            path = [u, *chain, v]
            succs[u].discard(v)
            preds[v].discard(u)
            for a, b in itertools.pairwise(path):
                succs[a].add(b)
                preds[b].add(a)
    total = len(sizes)
    rows: list[list[int]] = [[] for _ in range(max(layer, default=-1) + 1)]
    for i in range(total):
        rows[layer[i]].append(i)
    center = [0.0] * total
    for row in rows:
        _pack(row, {i: 0.0 for i in row}, sizes, center)
    for sweep in range(sweeps):
        down = sweep % 2 == 0
        for row in (rows[1:] if down else rows[-2::-1]):
            near = preds if down else succs
            want = {i: sum(center[j] for j in near[i]) / len(near[i]) if near[i] else center[i]
                    for i in row}
            row.sort(key=lambda i: want[i])
            _pack(row, want, sizes, center)
    for row in rows[1:]:  # last: sit under the predecessors
        _pack(row, {i: sum(center[j] for j in preds[i]) / len(preds[i]) if preds[i]
                    else center[i] for i in row}, sizes, center)
    left = min((center[i] - sizes[i][0] / 2 for i in range(total)), default=0.0)
    boxes: list[Box | None] = [None] * total
    y = 0.0
    for row in rows:
        height = max((sizes[i][1] for i in row), default=0.0)
        for i in row:
            w, h = sizes[i]
            boxes[i] = Box(center[i] - w / 2 - left, y, w, h if i < n else height)
        y += height + GAP_Y
    routes = {e: [p for d in chain if (b := boxes[d]) is not None
                  for p in ((b.center, b.y), (b.center, b.bottom))]
              for e, chain in chains.items()}
    return Layout([b for b in boxes[:n] if b is not None], routes)


def _layers(preds: list[set[int]], succs: list[set[int]]) -> list[int]:
    """Longest-path layers (sources that feed something sit right above their first
    reader rather than at the top); LayoutError on a cycle."""
    n = len(preds)
    waiting = [len(p) for p in preds]
    order = [i for i in range(n) if waiting[i] == 0]
    for i in order:  # (grows while walking: Kahn's algorithm)
        for j in sorted(succs[i]):
            waiting[j] -= 1
            if waiting[j] == 0:
                order.append(j)
    if len(order) != n:
        stuck = [i for i in range(n) if waiting[i]]
        raise LayoutError(f"the edges have a cycle through nodes {stuck[:10]}")
    layer = [0] * n
    for i in order:
        for j in succs[i]:
            layer[j] = max(layer[j], layer[i] + 1)
    for i in order:
        if not preds[i] and succs[i]:
            layer[i] = min(layer[j] for j in succs[i]) - 1
    return layer


def _pack(row: list[int], want: dict[int, float], sizes: Sequence[tuple[float, float]],
          center: list[float]) -> None:
    """Centers for `row`'s nodes in its order: each at its wanted center, or pushed right
    of its left neighbour; then the row is shifted to put its mean error at zero."""
    right = None
    for i in row:
        w = sizes[i][0]
        x = want[i] - w / 2 if right is None else max(want[i] - w / 2, right + GAP_X)
        center[i] = x + w / 2
        right = x + w
    if row:
        shift = sum(want[i] - center[i] for i in row) / len(row)
        if shift < 0:  # (moving right would open gaps; left keeps the row's spacing)
            for i in row:
                center[i] += shift


def clustered(sizes: Sequence[tuple[float, float]], edges: Iterable[tuple[int, int]],
              cluster: Sequence[int | None]) -> tuple[Layout, dict[int, Box]]:
    """A layout of the nodes, and for each cluster a box holding exactly its members:
    `cluster[i]` is node i's cluster id (None: none). Members are laid out among
    themselves inside their box, then the boxes and the other nodes together; the
    clusters must not form a cycle through outside nodes."""
    edges = sorted(set(edges))
    members: dict[int, list[int]] = {}
    for i, c in enumerate(cluster):
        if c is not None:
            members.setdefault(c, []).append(i)
    inner: dict[int, Layout] = {}
    units: list[tuple[str, int]] = []  # ("node", i) or ("cluster", id)
    unit_of: dict[int, int] = {}
    unit_sizes: list[tuple[float, float]] = []
    for i, c in enumerate(cluster):
        if c is None:
            unit_of[i] = len(units)
            units.append(("node", i))
            unit_sizes.append(sizes[i])
        elif c not in inner:
            local = {m: k for k, m in enumerate(members[c])}
            inner[c] = layered([sizes[m] for m in members[c]],
                               [(local[u], local[v]) for u, v in edges
                                if u in local and v in local])
            unit_sizes.append((max(b.x + b.w for b in inner[c].boxes) + 2 * PAD,
                               max(b.bottom for b in inner[c].boxes) + 2 * PAD + TITLE))
            for m in members[c]:
                unit_of[m] = len(units)
            units.append(("cluster", c))
    outer = layered(unit_sizes, {(unit_of[u], unit_of[v]) for u, v in edges
                                 if unit_of[u] != unit_of[v]})
    boxes: list[Box | None] = [None] * len(sizes)
    groups: dict[int, Box] = {}
    routes: dict[tuple[int, int], list[tuple[float, float]]] = {}
    for (kind, key), box in zip(units, outer.boxes, strict=True):
        if kind == "node":
            boxes[key] = box
            continue
        groups[key] = box
        dx, dy = box.x + PAD, box.y + PAD + TITLE
        for m, b in zip(members[key], inner[key].boxes, strict=True):
            boxes[m] = Box(dx + b.x, dy + b.y, b.w, b.h)
        for (u, v), points in inner[key].routes.items():
            routes[(members[key][u], members[key][v])] = [(x + dx, y + dy) for x, y in points]
    for u, v in edges:
        points = outer.routes.get((unit_of[u], unit_of[v]))
        if points:
            routes[(u, v)] = points
    return Layout([b for b in boxes if b is not None], routes), groups
