"""Reductions and softmax: sum, mean, amax/amin, max/min (with indices), argmax/argmin,
var, softmax, log_softmax, over any dims. (Ops are reached as `tessera.ops.NAME`; this
module never binds names such as `sum` or `max`, which kernels and helpers here need as
Python's builtins.)

A reduction over one dim sees the input as [outer, R, inner] (coalesced strides, copied
only when the dims around it do not coalesce). inner == 1 is a row reduction (tiles of
BM rows x BN columns walk R); inner > 1 a column reduction (each program owns BI inner
columns and walks R with vector loads). Tile widths come from a short menu, so a kernel
is compiled once per menu entry, never per size: a decode loop whose softmax row grows
by one each step compiles nothing new. A tile tuned for this machine (`tessera tune op`,
recorded in the knowledge base per op, shape class and dtype) replaces the heuristic one.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch

import tessera.lang as tl
from tessera.errors import ShapeError
from tessera.ops import _fastpath
from tessera.ops._launch import (
    FLOATS,
    ArgumentError,
    check_dim,
    check_tensor,
    compiled,
    launch,
    ldtype,
    spec,
)
from tessera.ops.pointwise import NUMERIC, contiguous
from tessera.ops.registry import op
from tessera.runtime import knowledge

_NUM_NAMES = tuple(str(d).removeprefix("torch.") for d in NUMERIC)
_ROWS = 4096  # elements per program of a row kernel (BM x BN)


@tl.kernel
def _fill(FN: tl.constexpr, CT: tl.constexpr):
    """The identity of reduction FN, as a scalar of CT."""
    big = math.inf if CT == tl.float32 else 2 ** 63 - 1 if CT == tl.int64 else 2 ** 31 - 1
    if FN == "max" or FN == "argmax":
        r = tl.full((), -big - (0 if CT == tl.float32 else 1), CT)
    elif FN == "min" or FN == "argmin":
        r = tl.full((), big, CT)
    else:
        r = tl.zeros((), CT)
    return r


@tl.kernel
def _combine(acc, t, FN: tl.constexpr):
    if FN == "max":
        r = tl.maximum(acc, t)
    elif FN == "min":
        r = tl.minimum(acc, t)
    else:
        r = acc + t
    return r


@tl.kernel
def _finish(acc, AXIS: tl.constexpr, FN: tl.constexpr):
    if FN == "max":
        r = tl.max(acc, axis=AXIS)
    elif FN == "min":
        r = tl.min(acc, axis=AXIS)
    else:
        r = tl.sum(acc, axis=AXIS)
    return r


@tl.kernel
def _better(t, best, FN: tl.constexpr):
    """Whether t replaces best in an arg-reduction: strictly better, or the first NaN."""
    if FN == "argmax":
        r = (t > best) | ((t != t) & (best == best))
    else:
        r = (t < best) | ((t != t) & (best == best))
    return r


@tl.kernel
def rows_kernel(x, out, idx, R, FN: tl.constexpr, CT: tl.constexpr, BM: tl.constexpr,
                BN: tl.constexpr, CORRECTION: tl.constexpr):
    """out[r] = reduce(x[r, :]) for BM rows per program; idx gets arg-reductions' index."""
    i = tl.program_id(0) * BM
    cols = tl.arange(0, BN)[None, :]
    if FN == "argmax" or FN == "argmin":
        best = tl.zeros((BM, BN), CT) + _fill(FN, CT)
        at = tl.zeros((BM, BN), tl.int64)
        for j in range(0, R, BN):
            t = tl.where(j + cols < R, x[i:i + BM, j:j + BN].to(CT), _fill(FN, CT))
            better = _better(t, best, FN)
            best = tl.where(better, t, best)
            at = tl.where(better, j + cols, at)
        m = _finish(best, 1, "max" if FN == "argmax" else "min")
        pick = (best == m[:, None]) | (best != best)
        idx[i:i + BM] = tl.min(tl.where(pick, at, 2 ** 62), axis=1)
        out[i:i + BM] = m
    elif FN == "var":
        s = tl.zeros((BM, BN))
        for j in range(0, R, BN):
            s += x[i:i + BM, j:j + BN].to(tl.float32)
        mean = tl.sum(s, axis=1) / R
        q = tl.zeros((BM, BN))
        for j in range(0, R, BN):
            d = tl.where(j + cols < R, x[i:i + BM, j:j + BN].to(tl.float32) - mean[:, None],
                         0.0)
            q += d * d
        out[i:i + BM] = tl.sum(q, axis=1) / max(R - CORRECTION, 0)
    else:
        acc = tl.zeros((BM, BN), CT) + _fill(FN, CT)
        for j in range(0, R, BN):
            t = tl.where(j + cols < R, x[i:i + BM, j:j + BN].to(CT), _fill(FN, CT))
            acc = _combine(acc, t, FN)
        r = _finish(acc, 1, FN)
        if FN == "mean":
            r = r / R
        out[i:i + BM] = r


@tl.kernel
def cols_kernel(x, out, idx, FN: tl.constexpr, CT: tl.constexpr, BI: tl.constexpr,
                CORRECTION: tl.constexpr):
    """out[o, c] = reduce(x[o, :, c]) for BI inner columns c per program."""
    c = tl.program_id(0) * BI
    o = tl.program_id(1)
    r_n = x.shape[1]
    if FN == "argmax" or FN == "argmin":
        best = tl.zeros((BI,), CT) + _fill(FN, CT)
        at = tl.zeros((BI,), tl.int64)
        for j in range(0, r_n):
            t = x[o, j, c:c + BI].to(CT)
            better = _better(t, best, FN)
            best = tl.where(better, t, best)
            at = tl.where(better, j, at)
        out[o, c:c + BI] = best
        idx[o, c:c + BI] = at
    elif FN == "var":
        s = tl.zeros((BI,))
        for j in range(0, r_n):
            s += x[o, j, c:c + BI].to(tl.float32)
        mean = s / r_n
        q = tl.zeros((BI,))
        for j in range(0, r_n):
            d = x[o, j, c:c + BI].to(tl.float32) - mean
            q += d * d
        out[o, c:c + BI] = q / max(r_n - CORRECTION, 0)
    else:
        acc = tl.zeros((BI,), CT) + _fill(FN, CT)
        for j in range(0, r_n):
            acc = _combine(acc, x[o, j, c:c + BI].to(CT), FN)
        if FN == "mean":
            acc = acc / r_n
        out[o, c:c + BI] = acc


def _width(n: int, cap: int) -> int:
    """A row tile's width: n rounded up to 16 elements, at most `cap`. A tile that spans
    the row exactly takes the kernels' unmasked path (a masked edge tile costs several
    times more: softmax of 32x384 in a 1024-wide tile took 7x torch's time)."""
    return min(-(-n // 16) * 16, cap)


def _row_tile(n: int, cap: int) -> tuple[int, int]:
    """(BM, BN) of a row kernel over rows of n: BN from _width, BM rows per program (a
    power of two, so that the common row counts split into whole tiles) filling _ROWS."""
    bn = _width(n, cap)
    return 1 << max(0, (_ROWS // bn).bit_length() - 1), bn


def shape_class(rows: int, n: int) -> str:
    """The knowledge base's shape class of `rows` rows of n: the rows rounded up to a power
    of two (tiles are tuned for a range of row counts), the row length exact."""
    return f"{1 << max(rows - 1, 0).bit_length()}x{n}"


def row_tile(kernel: str, rows: int, n: int, dtype: torch.dtype, cap: int,
             one: bool = False) -> tuple[int, int]:
    """(BM, BN) of row kernel `kernel` (the op's name) over `rows` rows of n: this
    machine's tuned tile if one is recorded, else _row_tile's. `one`: each row must be
    one tile, so only BM may be tuned."""
    return knowledge.tile(kernel, shape_class(rows, n), str(dtype).removeprefix("torch."),
                          _row_tile(n, cap), fixed_bn=one)


def native_rows(kernel: str, n: int, dtype: torch.dtype, tile: tuple[int, int],
                cap: int) -> bool:
    """Whether row kernel `kernel`'s plan for rows of n may be given to the native fast
    path, which knows only default tiles and serves every length of the same default
    tile with one plan: `tile` is the default and no length sharing it has a tuned tile
    on this machine (a record stored after a width's plan was given applies from the
    next process on)."""
    tuned = knowledge.tile_shapes(kernel, str(dtype).removeprefix("torch."))
    default = _row_tile(n, cap)
    return tile == default and not any(_row_tile(int(s.rpartition("x")[2]), cap) == default
                                       for s in tuned)


def _three(x: torch.Tensor, dims: list[int], op_name: str) -> tuple[torch.Tensor, int, int, int]:
    """x seen as [outer, R, inner] over the (adjacent, sorted) reduced `dims`, and those
    three sizes; a contiguous copy when the strides do not allow the view."""
    shape = list(x.shape)
    d0, d1 = dims[0], dims[-1] + 1
    outer, red, inner = math.prod(shape[:d0]), math.prod(shape[d0:d1]), math.prod(shape[d1:])
    try:
        return x.view(outer, red, inner), outer, red, inner
    except RuntimeError:
        return contiguous(x).view(outer, red, inner), outer, red, inner


def _reduce(x: torch.Tensor, dims: list[int], fn: str, out_dtype: torch.dtype,
            compute: Any, op_name: str, correction: int = 0
            ) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(result, index or None) of reduction `fn` over `dims` (sorted, distinct), both
    shaped as the input without those dims."""
    nd = x.dim()
    kept = [d for d in range(nd) if d not in dims]
    if dims != list(range(dims[0], dims[-1] + 1)):  # not adjacent: move them last
        x = contiguous(x.permute(*kept, *dims))
        dims = list(range(len(kept), nd))
    v, outer, red, inner = _three(x, dims, op_name)
    out_shape = [x.shape[d] for d in range(x.dim()) if d not in dims]
    want_idx = fn in ("argmax", "argmin")
    out = torch.empty(out_shape, dtype=out_dtype)
    idx = torch.empty(out_shape, dtype=torch.int64) if want_idx else None
    if out.numel() == 0:
        return out, idx
    if red == 0:
        if fn in ("sum",):
            return out.zero_(), idx
        if fn in ("mean", "var"):
            return out.fill_(math.nan), idx
        raise ShapeError(f"{op_name}: cannot reduce over a dimension of size 0 (it has no "
                         "identity)", hint="reduce over non-empty dims only")
    idx_arg = idx if idx is not None else out
    od = ldtype(out_dtype)
    if inner == 1:
        bm, bn = row_tile(op_name, outer, red, v.dtype, 1024)
        st = v.stride()
        key = ("rows", fn, compute, bm, bn, correction, v.dtype, out_dtype, st[1] == 1)
        s = compiled(key, rows_kernel, tl.TensorSpec(ldtype(v.dtype), (2, 2),
                                                        (2, 1 if st[1] == 1 else 2)),
                        tl.TensorSpec(od, (2,)), tl.TensorSpec(tl.int64, (2,)), red, FN=fn,
                        CT=compute, BM=bm, BN=bn, CORRECTION=correction)
        launch(s, (-(-outer // bm), 1, 1), v.data_ptr(), outer, red, st[0], st[1],
               out.data_ptr(), outer, 1, idx_arg.data_ptr(), outer, 1, red)
        return out, idx
    bi = _width(inner, 256)
    st = v.stride()
    key = ("cols", fn, compute, bi, correction, v.dtype, out_dtype, st[2] == 1)
    s = compiled(key, cols_kernel, tl.TensorSpec(ldtype(v.dtype), (2, 2, 2),
                                                    (4, 2, 1 if st[2] == 1 else 2)),
                    tl.TensorSpec(od, (2, 2)), tl.TensorSpec(tl.int64, (2, 2)), FN=fn,
                    CT=compute, BI=bi, CORRECTION=correction)
    launch(s, (-(-inner // bi), outer, 1), v.data_ptr(), outer, red, inner, *st,
           out.data_ptr(), outer, inner, inner, 1, idx_arg.data_ptr(), outer, inner, inner, 1)
    return out, idx


def _dims(dim: Any, nd: int, op_name: str) -> list[int]:
    """Sorted distinct dims to reduce (None or [] means all)."""
    if dim is None or (isinstance(dim, (list, tuple)) and len(dim) == 0):
        return list(range(nd))
    ds = [dim] if isinstance(dim, int) else list(dim)
    norm = [check_dim(d, nd, op_name) for d in ds]
    if len(set(norm)) != len(norm):
        raise ShapeError(f"{op_name}: dim {tuple(ds)} names a dimension twice")
    return sorted(norm) if nd else []


def _keep(r: torch.Tensor, x: torch.Tensor, dims: list[int], keepdim: bool) -> torch.Tensor:
    if not keepdim:
        return r
    shape = [1 if d in dims else n for d, n in enumerate(x.shape)]
    return r.view(shape)


def _reduction(x: torch.Tensor, dim: Any, keepdim: bool, fn: str, op_name: str,
               out_dtype: torch.dtype, compute: Any, correction: int = 0
               ) -> tuple[torch.Tensor, torch.Tensor | None]:
    dims = _dims(dim, x.dim(), op_name)
    if x.dim() == 0:  # a scalar: reduce a 1-element row
        r, i = _reduce(x.view(1, 1), [1], fn, out_dtype, compute, op_name, correction)
        return r.view(()), (i.view(()) if i is not None else None)
    r, i = _reduce(x, dims, fn, out_dtype, compute, op_name, correction)
    return _keep(r, x, dims, keepdim), (_keep(i, x, dims, keepdim) if i is not None else None)


def _sum_dtype(d: torch.dtype) -> torch.dtype:
    return d if d.is_floating_point else torch.int64


def _accumulator(d: torch.dtype) -> Any:
    return tl.float32 if d.is_floating_point else tl.int64 if d == torch.int64 else tl.int32


_AXES = "int[1]? dim=None, bool keepdim=False"


@op(f"sum(Tensor x, {_AXES}) -> Tensor", kind="reduction",
    reference=lambda x, dim=None, keepdim=False: torch.sum(x, dim, keepdim),
    dtypes=(*_NUM_NAMES, "bool"), implements=(torch.ops.aten.sum.dim_IntList,
                                              torch.ops.aten.sum.default))
def sum_(x: torch.Tensor, dim: Sequence[int] | None = None,
         keepdim: bool = False) -> torch.Tensor:
    """Sum over dims (all if None); integers and bools sum to int64, as torch."""
    check_tensor(x, "sum", "x", (*NUMERIC, torch.bool))
    out = _sum_dtype(x.dtype)
    return _reduction(x, dim, keepdim, "sum", "sum", out, _accumulator(out))[0]


@op(f"mean(Tensor x, {_AXES}) -> Tensor", kind="reduction",
    reference=lambda x, dim=None, keepdim=False: torch.mean(x, dim, keepdim),
    implements=(torch.ops.aten.mean.dim, torch.ops.aten.mean.default))
def mean(x: torch.Tensor, dim: Sequence[int] | None = None,
         keepdim: bool = False) -> torch.Tensor:
    """Mean over dims (all if None), accumulated in float32; float tensors only."""
    check_tensor(x, "mean", "x", FLOATS)
    return _reduction(x, dim, keepdim, "mean", "mean", x.dtype, tl.float32)[0]


def _extreme(name: str, fn: str, doc: str) -> None:
    def impl(x: torch.Tensor, dim: Sequence[int] | None = None,
             keepdim: bool = False) -> torch.Tensor:
        check_tensor(x, name, "x", NUMERIC)
        return _reduction(x, dim, keepdim, fn, name, x.dtype, _accumulator(x.dtype))[0]

    impl.__doc__, impl.__name__ = doc, name
    ref = getattr(torch, name)
    op(f"{name}(Tensor x, int[1]? dim=None, bool keepdim=False) -> Tensor",
        kind="reduction", reference=lambda x, dim=None, keepdim=False: ref(
            x, dim if dim is not None else [], keepdim),
        dtypes=_NUM_NAMES, implements=(getattr(torch.ops.aten, name).default,))(impl)


_extreme("amax", "max", "max over dims (all if None); NaN if any element is NaN")
_extreme("amin", "min", "min over dims (all if None); NaN if any element is NaN")


def _arg(name: str, doc: str) -> None:
    def impl(x: torch.Tensor, dim: int | None = None, keepdim: bool = False) -> torch.Tensor:
        check_tensor(x, name, "x", NUMERIC)
        if dim is None:
            flat = x.reshape(-1) if x.dim() else x.view(1)
            r = _reduction(flat, 0, False, name, name, x.dtype, _accumulator(x.dtype))[1]
            return r.view([1] * x.dim()) if keepdim else r.view(())
        return _reduction(x, dim, keepdim, name, name, x.dtype, _accumulator(x.dtype))[1]

    impl.__doc__, impl.__name__ = doc, name
    op(f"{name}(Tensor x, int? dim=None, bool keepdim=False) -> Tensor",
                         kind="reduction", reference=getattr(torch, name),
                         dtypes=_NUM_NAMES,
                         implements=(getattr(torch.ops.aten, name).default,))(impl)


_arg("argmax", "index of the first max along dim (of the flattened tensor if None); the "
               "first NaN wins")
_arg("argmin", "index of the first min along dim (of the flattened tensor if None); the "
               "first NaN wins")


def _with_indices(name: str, doc: str) -> None:
    fn = "argmax" if name == "max" else "argmin"

    def impl(x: torch.Tensor, dim: int, keepdim: bool = False
             ) -> tuple[torch.Tensor, torch.Tensor]:
        check_tensor(x, name, "x", NUMERIC)
        r, i = _reduction(x, dim, keepdim, fn, name, x.dtype, _accumulator(x.dtype))
        return r, i

    impl.__doc__, impl.__name__ = doc, name
    ref = getattr(torch, name)
    op(f"{name}(Tensor x, int dim, bool keepdim=False) -> (Tensor values, Tensor indices)",
        kind="reduction", reference=lambda x, dim, keepdim=False: tuple(ref(x, dim, keepdim)),
        dtypes=_NUM_NAMES, implements=(getattr(torch.ops.aten, name).dim,))(impl)


_with_indices("max", "(values, indices) of the max along dim, as torch.max(x, dim)")
_with_indices("min", "(values, indices) of the min along dim, as torch.min(x, dim)")


@op("var(Tensor x, int[1]? dim=None, *, int correction=1, bool keepdim=False) -> Tensor",
    kind="reduction", reference=lambda x, dim=None, *, correction=1, keepdim=False:
    torch.var(x, dim, correction=correction, keepdim=keepdim),
    implements=(torch.ops.aten.var.correction,))
def var(x: torch.Tensor, dim: Sequence[int] | None = None, *, correction: int = 1,
        keepdim: bool = False) -> torch.Tensor:
    """Variance over dims (all if None) with Bessel's `correction` (two passes: mean, then
    squared deviations, in float32)."""
    check_tensor(x, "var", "x", FLOATS)
    if not isinstance(correction, int) or isinstance(correction, bool):
        raise ArgumentError(f"var: correction={correction!r} must be an int")
    return _reduction(x, dim, keepdim, "var", "var", x.dtype, tl.float32, correction)[0]


# -- softmax ---------------------------------------------------------------------------------
@tl.kernel
def softmax_rows(x, out, R, LOG: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr,
                 ONE: tl.constexpr):
    """Softmax of each row: one tile per row block if the row fits (ONE), else an online
    max/sum pass then a writing pass."""
    i = tl.program_id(0) * BM
    if ONE:
        t = tl.load(x[i:i + BM, 0:BN], other=-math.inf).to(tl.float32)
        m = tl.max(t, axis=1)
        e = tl.exp(t - m[:, None])
        s = tl.sum(e, axis=1)
        if LOG:
            out[i:i + BM, 0:BN] = t - m[:, None] - tl.log(s)[:, None]
        else:
            out[i:i + BM, 0:BN] = e / s[:, None]
    else:
        m = tl.full((BM,), -math.inf)
        s = tl.zeros((BM,))
        for j in range(0, R, BN):
            t = tl.load(x[i:i + BM, j:j + BN], other=-math.inf).to(tl.float32)
            m_new = tl.maximum(m, tl.max(t, axis=1))
            shift = tl.where(m_new == -math.inf, 0.0, m_new)  # all -inf so far: no NaN
            s = s * tl.exp(m - shift) + tl.sum(tl.exp(t - shift[:, None]), axis=1)
            m = m_new
        for j in range(0, R, BN):
            t = x[i:i + BM, j:j + BN].to(tl.float32)
            if LOG:
                out[i:i + BM, j:j + BN] = t - m[:, None] - tl.log(s)[:, None]
            else:
                out[i:i + BM, j:j + BN] = tl.exp(t - m[:, None]) / s[:, None]


@tl.kernel
def softmax_cols(x, out, LOG: tl.constexpr, BI: tl.constexpr):
    """Softmax along the middle dim of [outer, R, inner], BI inner columns per program."""
    c = tl.program_id(0) * BI
    o = tl.program_id(1)
    m = tl.full((BI,), -math.inf)
    for j in range(0, x.shape[1]):
        m = tl.maximum(m, x[o, j, c:c + BI].to(tl.float32))
    s = tl.zeros((BI,))
    for j in range(0, x.shape[1]):
        s += tl.exp(x[o, j, c:c + BI].to(tl.float32) - m)
    for j in range(0, x.shape[1]):
        t = x[o, j, c:c + BI].to(tl.float32) - m
        if LOG:
            out[o, j, c:c + BI] = t - tl.log(s)
        else:
            out[o, j, c:c + BI] = tl.exp(t) / s


_ONE_ROW = 4096  # rows up to this long are one tile


def _softmax(x: torch.Tensor, dim: int, log: bool, name: str) -> torch.Tensor:
    check_tensor(x, name, "x", FLOATS)
    d = check_dim(dim, x.dim(), name)
    out = torch.empty(x.shape, dtype=x.dtype)
    if out.numel() == 0:
        return out
    if x.dim() == 0:
        return out.fill_(0.0 if log else 1.0)
    v, outer, red, inner = _three(x, [d], name)
    ov = out.view(outer, red, inner)
    if inner == 1:
        one = red <= _ONE_ROW
        bm, bn = row_tile(name, outer, red, v.dtype, _ONE_ROW if one else 1024, one)
        st = v.stride()
        key = ("softmax_rows", log, bm, bn, one, v.dtype, st[1] == 1)
        s = compiled(key, softmax_rows, tl.TensorSpec(ldtype(v.dtype), (2, 2),
                                                         (2, 1 if st[1] == 1 else 2)),
                        spec(x.dtype, 2), red, LOG=log, BM=bm, BN=bn, ONE=one)
        if st[1] == 1 and native_rows(name, red, v.dtype, (bm, bn), _ONE_ROW if one else 1024):
            _fastpath.add_plan(name, s.address, (x.dtype,), x.dtype,
                               rows=(False, False, x.dtype, x.dtype, bm, bn, one, red == bn))
        launch(s, (-(-outer // bm), 1, 1), v.data_ptr(), outer, red, st[0], st[1],
               ov.data_ptr(), outer, red, red, 1, red)
        return out
    bi = _width(inner, 256)
    st = v.stride()
    key = ("softmax_cols", log, bi, v.dtype, st[2] == 1)
    s = compiled(key, softmax_cols, tl.TensorSpec(ldtype(v.dtype), (2, 2, 2),
                                                     (4, 2, 1 if st[2] == 1 else 2)),
                    spec(x.dtype, 3), LOG=log, BI=bi)
    launch(s, (-(-inner // bi), outer, 1), v.data_ptr(), outer, red, inner, *st,
           ov.data_ptr(), outer, red, inner, red * inner, inner, 1)
    return out


@op("softmax(Tensor x, int dim=-1) -> Tensor", kind="reduction",
    reference=lambda x, dim=-1: torch.softmax(x, dim),
    fast="_rows(@softmax, x, None, None, None, None) if dim == -1 else None",
    implements=(torch.ops.aten._softmax.default, torch.ops.aten.softmax.int))
def softmax(x: torch.Tensor, dim: int = -1) -> torch.Tensor:
    """exp(x - max) / sum(exp(x - max)) along dim, in float32, stored in x's dtype."""
    return _softmax(x, dim, False, "softmax")


@op("log_softmax(Tensor x, int dim=-1) -> Tensor", kind="reduction",
    reference=lambda x, dim=-1: torch.log_softmax(x, dim),
    fast="_rows(@log_softmax, x, None, None, None, None) if dim == -1 else None",
    implements=(torch.ops.aten._log_softmax.default, torch.ops.aten.log_softmax.int))
def log_softmax(x: torch.Tensor, dim: int = -1) -> torch.Tensor:
    """x - max - log(sum(exp(x - max))) along dim, in float32, stored in x's dtype."""
    return _softmax(x, dim, True, "log_softmax")

