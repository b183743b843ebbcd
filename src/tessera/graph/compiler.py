"""Graph -> executable: passes (or their result from the compiled-graph cache, cache.py),
then the native executor (one call per forward) or, with `TESSERA_EXECUTOR=python` or
`options={"executor": "python"}`, the node-by-node Python interpreter. `stages(ex)`: the
graph of an executable before passes, before fusion and as it runs (tessera.tools.view)."""

from __future__ import annotations

import os
import weakref
from collections.abc import Iterator, Mapping
from typing import Any

from tessera.errors import TesseraError
from tessera.graph import cache, passes, quantize
from tessera.graph.executable import Executable
from tessera.graph.ir import Graph
from tessera.graph.serialize import from_data, to_data
from tessera.runtime.device import device

__all__ = ["OPTIONS", "Stages", "compile_graph", "compiled", "stages"]

OPTIONS = {"device": "'cpu' (default) or a device such as 'opencl' or 'opencl:1': where the "
                     "graph's kernels run (inputs and outputs stay host tensors)",
           "executor": "native or python (default: $TESSERA_EXECUTOR, else native)",
           "fusion": "True (default) or False: pointwise and row-op chains as generated "
                     "kernels",
           "quantize": "None (default), 'int8' or 'int4': weight-only quantized linear "
                       "layers and MoE experts, with the accuracy change against float "
                       "reported on the first call (Executable.quantization)",
           "moe": "True (default) or False: MoE blocks traced as one fused_moe op "
                  "(tessera.graph.moe)",
           "patterns": "True (default) or False: the pattern rewrites (attention, norms, "
                       "GEMM epilogues, SwiGLU; tessera.graph.rewrites) and the user's "
                       "(@tessera.graph.pattern)"}


def compile_graph(graph: Graph, options: dict[str, Any] | None = None) -> Executable:
    """An optimized callable computing `graph`'s outputs (a tuple) from its inputs."""
    options = dict(options or {})
    unknown = set(options) - set(OPTIONS)
    if unknown:
        raise TesseraError(f"unknown graph compiler option(s) {sorted(unknown)}",
                           hint="options: " + "; ".join(f"{k}: {v}"
                                                        for k, v in OPTIONS.items()))
    executor = options.get("executor", os.environ.get("TESSERA_EXECUTOR", "native"))
    if executor not in ("native", "python"):
        raise TesseraError(f"executor={executor!r}; it is 'native' or 'python'")
    for flag in ("fusion", "patterns", "moe"):
        if not isinstance(options.get(flag, True), bool):
            raise TesseraError(f"{flag}={options[flag]!r}; it is True or False")
    if options.get("quantize") not in (None, *quantize.BITS):
        raise TesseraError(f"quantize={options['quantize']!r}; it is None, "
                           f"{' or '.join(map(repr, quantize.BITS))}")
    dev = device(options.get("device", "cpu"))
    reference = None
    if options.get("quantize") is not None:
        float_options = {k: v for k, v in options.items() if k != "quantize"}
        reference = compile_graph(from_data(to_data(graph)), float_options)
    lowered = passes.snapshot(graph, data=True)  # (the passes change `graph` in place)
    graph = cache.optimized(graph, options, lambda g: passes.run(g, options))
    ex = Executable(graph, native=executor == "native", reference=reference, device=dev)
    _COMPILED.append(weakref.ref(ex))
    _STAGES[ex] = Stages(lowered, graph, options)
    return ex


class Stages(Mapping[str, Graph]):
    """An executable's graph at each stage of compiling: "lowered" (the frontend's, before
    the passes), "optimized" (after the passes, before fusion) and "fused" (the graph that
    runs). Values keep their names from stage to stage, and a fused node's members are the
    nodes of "optimized" it replaced. "optimized" is made when first asked for, by the
    passes before fusion on a copy of "lowered" (the compiled graph may come from the
    cache, which keeps only the last stage), and holds no constant tensors."""

    NAMES = ("lowered", "optimized", "fused")

    def __init__(self, lowered: Graph, fused: Graph, options: dict[str, Any]) -> None:
        """`lowered` holds the same constant tensors as the graph compiled (no copies)."""
        self._graphs = {"lowered": lowered, "fused": fused}
        self._options = options

    def __getitem__(self, name: str) -> Graph:
        if name == "optimized" and name not in self._graphs:
            again = passes.prepare(passes.snapshot(self._graphs["lowered"], data=True),
                                   self._options)
            self._graphs[name] = passes.snapshot(again)
        return self._graphs[name]

    def __iter__(self) -> Iterator[str]:
        return iter(self.NAMES)

    def __len__(self) -> int:
        return len(self.NAMES)


_COMPILED: list[weakref.ref[Executable]] = []
_STAGES: weakref.WeakKeyDictionary[Executable, Stages] = weakref.WeakKeyDictionary()


def stages(ex: Executable) -> Stages:
    """The stages of an executable `compile_graph` made (see `Stages`)."""
    found = _STAGES.get(ex)
    if found is None:
        raise TesseraError(f"{ex!r} was not made by compile_graph: its stages are unknown",
                           hint="compile with tessera.compile or torch.compile(backend="
                                "'tessera'); the executable's own graph is ex.graph")
    return found


def compiled() -> list[Executable]:
    """The Executables compiled in this process that are still alive, oldest first."""
    _COMPILED[:] = [r for r in _COMPILED if r() is not None]
    return [ex for r in _COMPILED if (ex := r()) is not None]
