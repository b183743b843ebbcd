"""Graphs to and from plain data (for `CompiledModel.save` / `tessera.load` and the
compiled-graph cache): only strings, numbers, lists, dicts and tensors, so a file loads
with `torch.load(weights_only=True)` and never runs code from it. Callables of view,
fallback and fused nodes are stored by name and resolved only inside torch's namespaces
and Tessera's own; a fused node's generated kernel is stored as its program."""

from __future__ import annotations

import importlib
from typing import Any

import torch

from tessera.graph.fusion import FusedKernel, Output
from tessera.graph.ir import Graph, GraphError, Node, Value
from tessera.lang.jit import Kernel
from tessera.runtime.dtype import as_dtype
from tessera.runtime.dtype import dtype as ldtype

__all__ = ["FORMAT", "from_data", "to_data"]

FORMAT = 3  # 3: nodes' origin and source line, values' origin
_MODULES = ("torch", "operator", "math", "tessera")  # where stored callables may be found
_TAGGED = {torch.dtype: "dtype", torch.memory_format: "memory_format",
           torch.layout: "layout", torch.device: "device"}


def _callable_name(fn: Any) -> str:
    if isinstance(fn, torch._ops.OpOverload):
        return f"torch.ops.{fn.namespace}.{fn._opname}.{fn._overloadname}"
    named = fn.fn if isinstance(fn, Kernel) else fn  # a lang kernel: by its function
    module = getattr(named, "__module__", None) or ""
    if module == "_operator":
        module = "operator"
    if module.split(".")[0] in _MODULES:
        for name in (f"{module}.{named.__name__}", f"{module}.{named.__qualname__}"):
            try:
                if _resolve(name) is fn:  # e.g. torch.reshape, whose qualname is private
                    return name
            except (GraphError, AttributeError):
                continue
    raise GraphError(f"cannot save a graph that calls {fn!r} (from module {module!r})")


def _resolve(name: str) -> Any:
    root = name.split(".")[0]
    if root not in _MODULES:
        raise GraphError(f"saved graph names {name!r}, outside {', '.join(_MODULES)}")
    parts = name.split(".")
    for i in range(len(parts), 0, -1):  # the longest importable prefix, then attributes
        try:
            obj = importlib.import_module(".".join(parts[:i]))
        except ImportError:
            continue
        for attr in parts[i:]:
            obj = getattr(obj, attr)
        return obj
    raise GraphError(f"saved graph names {name!r}, which does not exist here")


def _encode(a: Any, node: str) -> Any:
    if isinstance(a, Value):
        return {"value": a.name}
    if isinstance(a, ldtype):
        return {"ldtype": a.name}
    if isinstance(a, Kernel):
        return {"kernel": _callable_name(a)}
    if isinstance(a, Output):
        return {"output": [_encode(a.dtype, node), a.layout]}
    if isinstance(a, FusedKernel):
        return {"fused": {k: _encode(v, node) for k, v in a.spec().items()}}
    if a is None or isinstance(a, (bool, int, float, str)):
        return a
    if isinstance(a, (list, tuple)):
        return {"list" if isinstance(a, list) else "tuple": [_encode(x, node) for x in a]}
    if isinstance(a, dict):
        return {"dict": {k: _encode(v, node) for k, v in a.items()}}
    for kind, tag in _TAGGED.items():
        if isinstance(a, kind):
            return {tag: str(a).removeprefix("torch.")}
    raise GraphError(f"cannot save attribute {a!r} ({type(a).__name__}) of node {node}")


def _decode(a: Any, values: dict[str, Value]) -> Any:
    if not isinstance(a, dict):
        return a
    (tag, x), = a.items()
    if tag == "value":
        return values[x]
    if tag in ("list", "tuple"):
        items = [_decode(i, values) for i in x]
        return items if tag == "list" else tuple(items)
    if tag == "dict":
        return {k: _decode(v, values) for k, v in x.items()}
    if tag == "device":
        return torch.device(x)
    if tag == "ldtype":
        return as_dtype(x)
    if tag == "kernel":
        kernel = _resolve(x)
        if not isinstance(kernel, Kernel):
            raise GraphError(f"saved graph names {x!r} as a kernel; it is {kernel!r}")
        return kernel
    if tag == "output":
        return Output(_decode(x[0], values), x[1])
    if tag == "fused":
        return FusedKernel(**{k: _decode(v, values) for k, v in x.items()})
    return getattr(torch, x)  # dtype, memory_format, layout


def _value(v: Value) -> dict[str, Any]:
    return {"name": v.name, "dtype": str(v.dtype).removeprefix("torch."),
            "shape": list(v.shape), "kind": v.kind, "origin": v.origin}


def to_data(g: Graph) -> dict[str, Any]:
    """The graph as plain data; constants' tensors under "constants"."""
    return {
        "format": FORMAT,
        "inputs": [_value(v) for v in g.inputs],
        "constants": {v.name: v.data for v in g.constants},
        "constant_values": [_value(v) for v in g.constants],
        "nodes": [{"op": n.op, "fn": None if n.fn is None else _encode(n.fn, n.op)
                   if isinstance(n.fn, FusedKernel) else _callable_name(n.fn),
                   "args": _encode(n.args, n.op), "outputs": [_value(v) for v in n.outputs],
                   "returns": n.meta.get("returns", [0]), "source": n.source,
                   "origin": n.origin, "where": n.where}
                  for n in g.nodes],
        "outputs": [v.name for v in g.outputs],
    }


def from_data(data: dict[str, Any]) -> Graph:
    """The Graph `to_data` described (verified)."""
    if data.get("format") != FORMAT:
        raise GraphError(f"saved graph has format {data.get('format')!r}; this Tessera "
                         f"reads format {FORMAT}", hint="compile and save it again")
    g = Graph()
    values: dict[str, Value] = {}

    def make(d: dict[str, Any], data_: torch.Tensor | None = None) -> Value:
        v = g.value(d["name"], getattr(torch, d["dtype"]), tuple(d["shape"]), d["kind"], data_)
        v.origin = d["origin"]
        values[d["name"]] = v
        return v

    for d in data["inputs"]:
        make(d)
    for d in data["constant_values"]:
        make(d, data["constants"][d["name"]])
    for nd in data["nodes"]:
        outs = [make(d) for d in nd["outputs"]]
        fn = nd["fn"] if nd["fn"] is None else _decode(nd["fn"], values) \
            if isinstance(nd["fn"], dict) else _resolve(nd["fn"])
        node = Node(nd["op"], _decode(nd["args"], values), outs, fn, nd["source"],
                    origin=nd["origin"], where=nd["where"])
        node.meta["returns"] = nd["returns"]
        g.add(node)
    g.outputs = [values[name] for name in data["outputs"]]
    g.verify()
    return g

