"""Graph passes: dead-code elimination and common-subexpression elimination, run to a
fixed point by `run`, then autofusion (fusion.py). `run` is `prepare` (everything before
fusion) then `fuse`; `snapshot` copies a graph's structure between them (what the graph
viewer shows as the graph before fusion)."""

from __future__ import annotations

import dataclasses
from typing import Any

import torch

from tessera.graph import fusion, moe, quantize, rewrites
from tessera.graph.ir import Graph, Node, Value

__all__ = ["cse", "dce", "fuse", "prepare", "run", "snapshot"]


def dce(g: Graph) -> bool:
    """Drop nodes none of whose outputs is used (every node is free of side effects: the
    frontend's graphs are functional). Whether anything changed."""
    live: set[Value] = set(g.outputs)
    kept: list[Node] = []
    for n in reversed(g.nodes):
        if any(v in live for v in n.outputs):
            kept.append(n)
            live.update(n.inputs())
    changed = len(kept) != len(g.nodes)
    g.nodes = kept[::-1]
    return changed


def _key(a: Any) -> Any:
    if isinstance(a, Value):
        return ("v", id(a))
    if isinstance(a, (list, tuple)):
        return (type(a).__name__, tuple(_key(x) for x in a))
    if isinstance(a, dict):
        return ("d", tuple((k, _key(v)) for k, v in a.items()))
    return ("c", type(a).__name__, repr(a))


def cse(g: Graph) -> bool:
    """Replace a node by an earlier one with the same op and arguments."""
    seen: dict[Any, Node] = {}
    rename: dict[Value, Value] = {}
    kept: list[Node] = []
    for n in g.nodes:
        n.args = _substitute(n.args, rename)
        key = (n.op, id(n.fn), _key(n.args))
        if torch.Tag.nondeterministic_seeded in getattr(n.fn, "tags", ()):
            kept.append(n)  # two random draws are two values
            continue
        first = seen.get(key)
        if first is not None and len(first.outputs) == len(n.outputs):
            rename.update(zip(n.outputs, first.outputs, strict=True))
            continue
        seen[key] = n
        kept.append(n)
    g.outputs = [rename.get(v, v) for v in g.outputs]
    changed = len(kept) != len(g.nodes)
    g.nodes = kept
    return changed


def _substitute(a: Any, rename: dict[Value, Value]) -> Any:
    if isinstance(a, Value):
        return rename.get(a, a)
    if isinstance(a, (list, tuple)):
        return type(a)(_substitute(x, rename) for x in a)
    if isinstance(a, dict):
        return {k: _substitute(v, rename) for k, v in a.items()}
    return a


def run(g: Graph, options: dict[str, Any] | None = None) -> Graph:
    """The default pipeline, in place; the graph is verified after it. `options`: the
    compiler's (`fusion`: False leaves pointwise and row ops, and convolutions'
    consumers, unfused; `patterns`: False skips the pattern rewrites)."""
    return fuse(prepare(g, options), options)


def prepare(g: Graph, options: dict[str, Any] | None = None) -> Graph:
    """The pipeline up to fusion, in place: expert weights folded, CSE and DCE to a fixed
    point, weights quantized, the pattern rewrites."""
    moe.fold_expert_weights(g)
    while cse(g) | dce(g):
        pass
    if (options or {}).get("quantize") is not None:
        quantize.quantize(g, options["quantize"])
        dce(g)  # the float weights' transposes
    if (options or {}).get("patterns", True):
        # attention, norms, GEMM epilogues (rewrites.py) and the user's
        rewrites.run(g, fusion=(options or {}).get("fusion", True))
        dce(g)
    return g


def fuse(g: Graph, options: dict[str, Any] | None = None) -> Graph:
    """The rest of the pipeline after `prepare`, in place: fusion (unless `fusion` is
    False), then the graph is verified."""
    if (options or {}).get("fusion", True):
        fusion.fuse_epilogues(g)  # convolutions take their consumers first
        fusion.fuse(g)
    g.verify()
    return g


def snapshot(g: Graph, data: bool = False) -> Graph:
    """A copy of g's structure that passes run on g later cannot change: new Values and
    Nodes (same names, ops, callables, sources, every other field) over, with `data`, the
    same constant tensors; without, constants hold no tensor (only for looking at)."""
    new = Graph()
    values: dict[Value, Value] = {}

    def copy(v: Value) -> Value:
        values[v] = new.value(v.name, v.dtype, v.shape, v.kind, v.data if data else None)
        return values[v]

    for v in (*g.inputs, *g.constants):
        copy(v)
    for n in g.nodes:
        outputs = [copy(v) for v in n.outputs]
        new.add(dataclasses.replace(n, args=_substitute(n.args, values), outputs=outputs,
                                    meta=dict(n.meta)))
    new.outputs = [values[v] for v in g.outputs]
    return new
