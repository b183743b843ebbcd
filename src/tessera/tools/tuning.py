"""The tile targets of `tessera tune op` and `tessera tune graph`: an op's row kernel at a
given shape, and the generated kernels (fused groups, row ops) of every graph a script
compiles. A target learns which kernel, shape class and dtype a call looks up by running
it once under `knowledge.trying(None)`, so the keys are exactly the ones compilation
reads; its candidates are tiles that keep a row whole where the kernel needs it.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from functools import partial
from pathlib import Path
from typing import Any

import torch

from tessera.errors import TuneError
from tessera.runtime import knowledge
from tessera.tools.script import run_as_main
from tessera.tune.search import MAX_SPREAD, Target, Tile, TuneResult, tune_tile

__all__ = ["OPS", "graph_targets", "op_target", "parse_spec", "tune_graph", "tune_op"]

# op -> (tensors a launch streams through memory, its arguments for an input x)
OPS: dict[str, tuple[int, Callable[[torch.Tensor, torch.Generator], tuple[Any, ...]]]] = {
    "softmax": (2, lambda x, g: (x, -1)),
    "log_softmax": (2, lambda x, g: (x, -1)),
    "layer_norm": (2, lambda x, g: (x, [x.shape[-1]], _like(x, g), _like(x, g))),
    "rms_norm": (2, lambda x, g: (x, [x.shape[-1]], _like(x, g))),
    **{name: (1, lambda x, g: (x, -1)) for name in ("sum", "mean", "amax", "amin")},
    "var": (2, lambda x, g: (x, -1)),  # two passes over the row
}
_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
_MIN_TILE, _MAX_TILE = 64, 16384  # elements of the candidate tiles


def parse_spec(spec: str) -> tuple[tuple[int, ...], str]:
    """(shape, dtype) of "4096x1024" or "4096x1024:float16" (rows are the leading dims)."""
    dims, _, dtype = spec.partition(":")
    dtype = dtype or "float32"
    try:
        shape = tuple(int(d) for d in dims.lower().split("x"))
    except ValueError:
        shape = ()
    if not shape or any(d <= 0 for d in shape) or dtype not in _DTYPES:
        raise TuneError(f"tune: cannot read the shape spec {spec!r}",
                        hint=f"e.g. 4096x1024 or 8x128x768:bfloat16 (dtypes: "
                             f"{', '.join(_DTYPES)})")
    return shape, dtype


def op_target(name: str, shape: Sequence[int], dtype: str = "float32") -> Target:
    """The row kernel op `name` compiles for an input of `shape` and `dtype`."""
    from tessera.ops import registry
    if name not in OPS:
        raise TuneError(f"tune: op {name!r} has no tunable tile",
                        hint=f"tunable ops: {', '.join(OPS)}")
    if dtype not in _DTYPES:
        raise TuneError(f"tune: dtype {dtype!r} is not one of {', '.join(_DTYPES)}")
    g = torch.Generator().manual_seed(0)
    x = torch.randn(tuple(shape), generator=g).to(_DTYPES[dtype])
    streams, arguments = OPS[name]
    impl, args = registry.get(name).impl, arguments(x, g)
    label = f"{name} {'x'.join(map(str, shape))}:{dtype}"
    target = _target(label, lambda: impl(*args), x.shape, x.element_size(), streams, True)
    if target is None:
        raise TuneError(f"tune: {label} runs no kernel with a tunable tile",
                        hint="tiles are tuned for reductions over the last dim")
    return target


def tune_op(name: str, shape: Sequence[int], dtype: str = "float32",
            strategy: str = "model", timeout: float = 30.0,
            candidates: Sequence[Tile] | None = None,
            progress: Callable[[str], None] | None = None,
            max_spread: float | None = MAX_SPREAD) -> TuneResult:
    """Search the tile of op `name`'s row kernel at `shape` (see `tune_tile`)."""
    return tune_tile(op_target(name, shape, dtype), strategy, timeout, candidates,
                     progress=progress, max_spread=max_spread)


def graph_targets(executables: Sequence[Any] | None = None
                  ) -> tuple[list[Target], list[str]]:
    """The tunable kernels of compiled graphs (default: every live one), one target per
    distinct (kernel, shape class, dtype), and what was skipped (symbolic shapes)."""
    from tessera.graph import compiled
    from tessera.graph.fusion import FusedKernel
    from tessera.ops import registry
    found: dict[str, Target] = {}
    skipped: list[str] = []
    g = torch.Generator().manual_seed(0)
    for ex in compiled() if executables is None else executables:
        for node in ex.graph.nodes:
            fused = node.kind == "fused" and isinstance(node.fn, FusedKernel)
            if not fused and node.op not in OPS:
                continue
            if any(v.symbolic for v in node.inputs()):
                skipped.append(f"{node.op} ({node.source or 'no source'}): symbolic shapes")
                continue
            if fused:
                xs = [_materialize(a, g) for a in node.args["args"]]
                call, streams = partial(node.fn, *xs), len(xs) + len(node.outputs)
                full = max((x for x in xs if isinstance(x, torch.Tensor)),
                           key=lambda t: t.numel())
            else:
                kw = {k: _materialize(a, g) for k, a in node.args.items()}
                call, streams = partial(registry.get(node.op).impl, **kw), OPS[node.op][0]
                full = kw["x"]
            label = f"{node.op} {'x'.join(map(str, full.shape))}:{_name(full.dtype)}"
            target = _target(label, call, full.shape,
                             full.element_size(), streams, not fused or node.fn.r > 0)
            if target is not None:
                found.setdefault(target.key, target)
    return list(found.values()), skipped


def tune_graph(script: str | Path, args: Sequence[str] = (), strategy: str = "model",
               timeout: float = 30.0, progress: Callable[[str], None] | None = None,
               max_spread: float | None = MAX_SPREAD) -> tuple[list[TuneResult], list[str]]:
    """Run `script` with `args` as `python script args` would, then search the tile of
    every generated kernel of the graphs it compiled that are still alive when it ends
    (each search within `timeout`). Returns the results and what was skipped."""
    from tessera.graph import compiled
    before = {id(ex): ex for ex in compiled()}  # (held, so that no id is reused)
    scope, code = run_as_main(script, args, command="tune graph", error=TuneError)
    if code:
        raise TuneError(f"tune graph: {script} exited with status {code}")
    targets, skipped = graph_targets([ex for ex in compiled() if id(ex) not in before])
    if not targets:
        raise TuneError(f"tune graph: {script} compiled no graph with a tunable kernel "
                        "that is still alive when it ends",
                        hint="compile with torch.compile(model, backend='tessera') or "
                             "tessera.compile and keep the model referenced")
    results = [tune_tile(t, strategy, timeout, progress=progress, max_spread=max_spread)
               for t in targets]
    del scope  # the script's objects (its compiled graphs) were needed until here
    return results, skipped


def _target(label: str, call: Callable[[], Any], shape: Sequence[int], itemsize: int,
            streams: int, rows_kernel: bool) -> Target | None:
    """A target for `call` if it looks up exactly one tile (None if it looks up none)."""
    with knowledge.trying(None) as seen:
        call()
    keys = {(s["kernel"], s["shape"], s["dtype"]): s for s in seen}
    if not keys:
        return None
    if len(keys) > 1:
        raise TuneError(f"tune: {label} compiles {len(keys)} tunable kernels "
                        f"({', '.join(k[0] for k in keys)}); tune them one at a time")
    s = next(iter(keys.values()))
    default, fixed = tuple(s["default"]), s["fixed_bn"]
    if not rows_kernel:  # a pointwise launch walks the coalesced sizes its class names
        shape = [int(d) for d in s["shape"].split("x")]
    rows = math.prod(shape[:-1]) if len(shape) > 1 else 1
    cols = shape[-1] if len(shape) else 1

    def run(tile: Tile) -> Any:
        with knowledge.trying(tile):
            return call()

    flat = "x" not in s["shape"]  # a pointwise launch over one coalesced dim: BM is 1
    return Target(s["kernel"], s["shape"], s["dtype"], default,
                  _candidates(default, rows, cols, fixed, flat), run, rows, cols, itemsize,
                  streams, rows_kernel, fixed, label)


def _candidates(default: Tile, rows: int, cols: int, fixed_bn: bool, flat: bool) -> list[Tile]:
    """Power-of-two tiles of 64 to 16384 elements around `default`: BM up to the rows'
    power of two (1 if `flat`), BN the default's if `fixed_bn`, else 16 up to the row's."""
    top = 1 << max(rows - 1, 0).bit_length()
    bms = [1] if flat else [1 << i for i in range(9) if 1 << i <= top]
    if fixed_bn:
        bns = [default[1]]
    else:
        widest = max(default[1], 1 << max(cols - 1, 0).bit_length())
        bns = [1 << i for i in range(4, 15) if 1 << i <= min(widest, _MAX_TILE)]
    tiles = {(bm, bn) for bm in bms for bn in bns if _MIN_TILE <= bm * bn <= _MAX_TILE}
    return sorted(tiles - {default})


def _name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def _like(x: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    """A random weight for rows of x."""
    return torch.randn(x.shape[-1], generator=g).to(x.dtype)


def _materialize(a: Any, g: torch.Generator) -> Any:
    """A graph argument as a value to call with: a constant's data, random data of an
    input's or an intermediate's shape and dtype, lists element-wise."""
    from tessera.graph.ir import Value
    if isinstance(a, (list, tuple)):
        return type(a)(_materialize(v, g) for v in a)
    if not isinstance(a, Value):
        return a
    if a.data is not None:
        return a.data
    if a.dtype.is_floating_point:
        return torch.randn(a.shape, generator=g).to(a.dtype)
    if a.dtype == torch.bool:
        return torch.randint(0, 2, a.shape, generator=g).bool()
    return torch.randint(0, 4, a.shape, generator=g).to(a.dtype)
