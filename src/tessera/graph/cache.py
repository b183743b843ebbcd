"""Compiled graphs in the artifact cache (runtime/cache.py): the graph after the passes,
keyed by the lowered graph (ops, attributes, shapes), its constants' contents, the
compiler options and the compiler's code (the sources of the passes and the ops). A
second process compiling the same model skips the passes (expert weights folded, weights
quantized, patterns traced, kernels fused); the kernels themselves come from the kernel
cache as before.

Constants the passes left as they were (most weights) are not stored twice: the entry
names the input constant, whose contents are part of the key. `TESSERA_GRAPH_CACHE=0`
turns the cache off."""

from __future__ import annotations

import functools
import hashlib
import logging
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

import tessera
from tessera.graph.ir import Graph, GraphError
from tessera.graph.serialize import FORMAT, from_data, to_data
from tessera.runtime.cache import default_cache

__all__ = ["KIND", "key", "optimized"]

KIND = "graph"
_FILE = "graph.pt"
_log = logging.getLogger("tessera.graph")


def key(graph: Graph, options: dict[str, Any]) -> str | None:
    """The cache key of compiling `graph` with `options`; None for a graph that cannot be
    stored (a node calling something outside torch and Tessera)."""
    try:
        data = to_data(graph)
    except GraphError:
        return None
    h = hashlib.sha256()
    constants = data.pop("constants")
    for node in data["nodes"]:  # source lines move when the model's file is edited; what
        del node["where"]       # is compiled does not (a hit takes today's, _source_lines)
    h.update(repr((_code(), FORMAT, sorted(options.items()), data)).encode())
    for name, t in constants.items():
        h.update(f"{name}:{t.dtype}:{tuple(t.shape)}".encode())
        h.update(t.detach().contiguous().reshape(-1).view(torch.uint8).numpy())
    return h.hexdigest()


def _source_lines(cached: Graph, lowered: Graph) -> Graph:
    """`cached` with each node's `where` taken from the nodes of `lowered` it stands for
    (the last one's known line, as `Node.derive` does), not from the compile that stored it."""
    where = {o: n.where for n in lowered.nodes for o in n.origin if n.where}
    for node in cached.nodes:
        node.where = next((where[o] for o in reversed(node.origin) if o in where), "")
    return cached


def optimized(graph: Graph, options: dict[str, Any], run: Callable[[Graph], Graph]
              ) -> Graph:
    """`run(graph)` (the passes), or the graph it gave for the same key before."""
    k = key(graph, options) if os.environ.get("TESSERA_GRAPH_CACHE", "1") != "0" else None
    if k is None:
        return run(graph)
    inputs = {v.name: v.data for v in graph.constants}
    store = default_cache()
    entry = store.lookup(KIND, k)
    if entry is not None:
        try:
            # (under dynamo's tracing context torch.load would make meta tensors)
            with torch._guards.tracing(None):
                data = torch.load(entry / _FILE, map_location="cpu", weights_only=True)
            data["constants"].update((name, inputs[source])
                                     for name, source in data.pop("aliases").items())
            return _source_lines(from_data(data), graph)
        except Exception as e:  # an entry of another layout: compile again, replace it
            _log.warning("compiled-graph cache entry %s unreadable (%s); compiling again",
                         k[:12], e)
    out = run(graph)
    try:
        data = to_data(out)
    except GraphError as e:  # e.g. a user's pattern calling a lambda
        _log.info("compiled graph not cached: %s", e)
        return out
    same = {_identity(t): name for name, t in inputs.items()}
    data["aliases"] = {name: same[_identity(t)] for name, t in data["constants"].items()
                       if _identity(t) in same}
    for name in data["aliases"]:
        del data["constants"][name]

    def write(d: Any) -> dict[str, Any]:
        torch.save(data, d / _FILE)
        return {"nodes": len(out.nodes)}

    store.put(KIND, k, write)
    return out


@functools.cache
def _code() -> str:
    """A hash of what decides an optimized graph: the graph compiler's, the operator
    library's and the templates' sources (a changed pass must not find old graphs)."""
    root = Path(tessera.__file__).parent
    h = hashlib.sha256(tessera.__version__.encode())
    for path in sorted(p for d in ("graph", "ops", "templates", "lang")
                       for p in (root / d).rglob("*") if p.suffix in (".py", ".c", ".cpp")):
        h.update(str(path.relative_to(root)).encode())
        h.update(path.read_bytes())
    return h.hexdigest()


def _identity(t: torch.Tensor) -> tuple[Any, ...]:
    return (t.data_ptr(), t.dtype, tuple(t.shape), t.stride())
