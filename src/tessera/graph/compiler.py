"""Graph -> executable: passes (or their result from the compiled-graph cache, cache.py),
then the native executor (one call per forward) or, with `TESSERA_EXECUTOR=python` or
`options={"executor": "python"}`, the node-by-node Python interpreter."""

from __future__ import annotations

import os
import weakref
from typing import Any

from tessera.errors import TesseraError
from tessera.graph import cache, passes, quantize
from tessera.graph.executable import Executable
from tessera.graph.ir import Graph
from tessera.graph.serialize import from_data, to_data

__all__ = ["OPTIONS", "compile_graph", "compiled"]

OPTIONS = {"executor": "native or python (default: $TESSERA_EXECUTOR, else native)",
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
    reference = None
    if options.get("quantize") is not None:
        float_options = {k: v for k, v in options.items() if k != "quantize"}
        reference = compile_graph(from_data(to_data(graph)), float_options)
    graph = cache.optimized(graph, options, lambda g: passes.run(g, options))
    ex = Executable(graph, native=executor == "native", reference=reference)
    _COMPILED.append(weakref.ref(ex))
    return ex


_COMPILED: list[weakref.ref[Executable]] = []


def compiled() -> list[Executable]:
    """The Executables compiled in this process that are still alive, oldest first."""
    _COMPILED[:] = [r for r in _COMPILED if r() is not None]
    return [ex for r in _COMPILED if (ex := r()) is not None]
