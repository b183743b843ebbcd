"""Gathers and scatters by index: embedding, index_select, gather, index_add, scatter_add.

Every op sees its operands as [outer, n, inner] around the indexed dim (the dims on either
side coalesced; a leading dim is walked in Python in the rare case they do not coalesce),
so one rank-3 kernel per op serves every dim, shape and stride. Row ops (embedding,
index_select, index_add) move whole inner rows as tiles; element ops (gather,
scatter_add) walk elements. Accumulating ops give each program its own output columns
and walk the indices in order: duplicates accumulate deterministically, as torch's CPU
kernels do.

Indices are checked in the kernels: each program sets its byte of a per-thread flag
buffer if it met an index outside [0, n) (the kernel language masks that access, so
nothing out of bounds is read or written), and a set flag becomes an ArgumentError
naming the op, the argument and the value (found by one torch pass, only then).
"""

from __future__ import annotations

import ctypes
import threading
from collections.abc import Sequence
from typing import Any

import torch

import tessera.lang as tl
from tessera.errors import ShapeError
from tessera.ops._launch import (
    KERNEL_DTYPES,
    ArgumentError,
    check_dim,
    check_tensor,
    coalesce,
    compiled,
    launch,
    spec,
)
from tessera.ops.registry import op
from tessera.ops.shape import copy_into, empty

__all__ = ["embedding", "gather", "index_add", "index_select", "scatter_add"]

ALL = tuple(KERNEL_DTYPES)
_ALL_NAMES = tuple(str(d).removeprefix("torch.") for d in ALL)
INDEX = (torch.int32, torch.int64)
_WIDTHS = (1, 16, 128, 1024)  # inner tile widths: a short menu, so sizes never recompile
_ADD_WIDTHS = _WIDTHS[:-1]  # index_add walks every index per program: narrower tiles
_ELEMS = 1024  # elements per program (at most: rows and columns stop at the tensor's end)


# -- kernels ---------------------------------------------------------------------------------
@tl.kernel
def _flag(flag, bad):
    """Record this program's verdict on the indices it saw."""
    p = tl.program_id(0) + tl.num_programs(0) * (
        tl.program_id(1) + tl.num_programs(1) * tl.program_id(2))
    flag[p] = bad


@tl.kernel
def select_kernel(x, index, out, flag, BR: tl.constexpr, BN: tl.constexpr):
    """out[o, r, :] = x[o, index[r], :] for BR rows r and BN inner columns."""
    j = tl.program_id(0) * BN
    r0 = tl.program_id(1) * BR
    o = tl.program_id(2)
    n = x.shape[1]
    if BR == 1:  # no loop: the launch's work estimate stays true, small ones stay serial
        i = index[r0]
        out[o, r0, j:j + BN] = x[o, i, j:j + BN]
        bad = (i < 0) | (i >= n)
    else:
        bad = False
        for r in tl.range(r0, min(r0 + BR, index.shape[0])):
            i = index[r]
            bad = bad | (i < 0) | (i >= n)
            out[o, r, j:j + BN] = x[o, i, j:j + BN]
    _flag(flag, bad)


@tl.kernel
def gather_kernel(x, index, out, flag, BR: tl.constexpr, BN: tl.constexpr):
    """out[o, r, c] = x[o, index[o, r, c], c] over BR x BN elements."""
    j = tl.program_id(0) * BN
    r0 = tl.program_id(1) * BR
    o = tl.program_id(2)
    n = x.shape[1]
    bad = False
    for r in tl.range(r0, min(r0 + BR, index.shape[1])):
        for c in tl.range(j, min(j + BN, index.shape[2])):
            i = index[o, r, c]
            bad = bad | (i < 0) | (i >= n)
            out[o, r, c] = x[o, i, c]
    _flag(flag, bad)


@tl.kernel
def index_add_kernel(out, index, source, alpha, flag, ALPHA: tl.constexpr,
                     BN: tl.constexpr):
    """out[o, index[r], :] += alpha * source[o, r, :] for every r in order, BN columns."""
    j = tl.program_id(0) * BN
    o = tl.program_id(1)
    n = out.shape[1]
    bad = False
    for r in tl.range(0, index.shape[0]):
        i = index[r]
        bad = bad | (i < 0) | (i >= n)
        v = source[o, r, j:j + BN]
        out[o, i, j:j + BN] += v * alpha if ALPHA else v
    _flag(flag, bad)


@tl.kernel
def scatter_add_kernel(out, index, src, flag, BN: tl.constexpr):
    """out[o, index[o, r, c], c] += src[o, r, c] for every r in order, BN columns c."""
    j = tl.program_id(0) * BN
    o = tl.program_id(1)
    n = out.shape[1]
    bad = False
    for r in tl.range(0, index.shape[1]):
        for c in tl.range(j, min(j + BN, index.shape[2])):
            i = index[o, r, c]
            bad = bad | (i < 0) | (i >= n)
            out[o, i, c] += src[o, r, c]
    _flag(flag, bad)


# -- index checks ------------------------------------------------------------------------------
class _Flags(threading.local):
    """This thread's flag bytes, one per program of a launch (each program writes its own,
    so nothing needs clearing)."""

    def __init__(self) -> None:
        self.buf = bytearray()
        self.address = 0

    def take(self, programs: int) -> int:
        if programs > len(self.buf):
            self.buf = bytearray(max(programs, 4096))
            self._pin = (ctypes.c_char * len(self.buf)).from_buffer(self.buf)
            self.address = ctypes.addressof(self._pin)
        return self.address

    def set(self, programs: int) -> bool:
        return self.buf.find(1, 0, programs) >= 0


_FLAGS = _Flags()


def _index_tensor(index: Any, name: str, arg: str = "index") -> torch.Tensor:
    check_tensor(index, name, arg, INDEX)
    return index


def _out_of_range(index: torch.Tensor, n: int, name: str, arg: str, what: str) -> None:
    """Raise if `index` holds a value outside [0, n) (one vectorized pass)."""
    bad = index[(index < 0) | (index >= n)]
    if bad.numel():
        raise ArgumentError(f"{name}: argument {arg!r} holds {int(bad.flatten()[0])}, out of "
                            f"range for {what} of size {n}",
                            hint=f"indices must be in [0, {n}) (torch's rule: no negative "
                                 "indices)")


def _run(s: Any, grid: tuple[int, int, int], args: list[Any], index: torch.Tensor, n: int,
         name: str, arg: str, what: str) -> None:
    """Launch with the flag buffer as the last argument; raise if a program saw a bad index."""
    programs = grid[0] * grid[1] * grid[2]
    launch(s, grid, *args, _FLAGS.take(programs), programs, 1)
    if _FLAGS.set(programs):
        _out_of_range(index, n, name, arg, what)


# -- views around the indexed dim ---------------------------------------------------------------
def _around(shape: Sequence[int], d: int, tensors: Sequence[torch.Tensor]
            ) -> tuple[int, int, list[tuple[int, int, int]]] | None:
    """(outer, inner, each tensor's (outer, d, inner) strides) for tensors that agree
    with `shape` outside dim d, or None if the dims on one side do not coalesce."""
    strides = [t.stride() for t in tensors]
    outer, so = _side(shape[:d], [s[:d] for s in strides])
    inner, si = _side(shape[d + 1:], [s[d + 1:] for s in strides])
    if outer is None or inner is None:
        return None
    return outer, inner, [(a, s[d], b) for a, s, b in zip(so, strides, si, strict=True)]


def _side(sizes: Sequence[int], strides: list[Sequence[int]]
          ) -> tuple[int | None, list[int]]:
    """The dims on one side of the indexed one as one (size, strides), if they coalesce
    (size None if not); no dims at all are one of size 1."""
    if len(sizes) <= 1:  # the common case, without coalesce's loops
        return (sizes[0], [s[0] for s in strides]) if sizes else (1, [1] * len(strides))
    n, st = coalesce(sizes, strides)
    return (n[0], [s[0] for s in st]) if len(n) == 1 else (None, [])


def _leading(d: int, fn: Any, tensors: Sequence[torch.Tensor], *rest: Any) -> None:
    """fn once per index of the first dim that is not d (operands that do not coalesce)."""
    k = 1 if d == 0 else 0
    for i in range(tensors[0].shape[k]):
        fn(*(t.select(k, i) for t in tensors), d - (k < d), *rest)


def _width(n: int, widths: Sequence[int] = _WIDTHS) -> int:
    return next((w for w in widths if w >= n), widths[-1])


def _t3(t: torch.Tensor, o: int, n: int, i: int, st: tuple[int, int, int]) -> list[Any]:
    return [t.data_ptr(), o, n, i, *st]


def _rank0(*ts: torch.Tensor) -> list[torch.Tensor]:
    """0-dim tensors as 1-dim of size 1, as torch treats them in index ops."""
    return [t.reshape(1) if t.dim() == 0 else t for t in ts]


def _index_dim(index: torch.Tensor, name: str, arg: str = "index") -> None:
    if index.dim() > 1:
        raise ShapeError(f"{name}: argument {arg!r} must be a vector, got shape "
                         f"{tuple(index.shape)}", hint="flatten it, or use gather")


# -- row ops: embedding, index_select, index_add -------------------------------------------------
def _select(x: torch.Tensor, index: torch.Tensor, out: torch.Tensor, d: int, name: str,
            arg: str, what: str) -> None:
    """out = x.index_select(d, index) into `out` (index 1-dim; out any strides)."""
    n, length = x.shape[d], index.shape[0]
    v = _around(x.shape, d, [x, out])
    if v is None:
        _leading(d, lambda a, b, dd: _select(a, index, b, dd, name, arg, what), [x, out])
        return
    o, inner, (sx, so) = v
    bn = _width(inner)
    br = _ELEMS // bn
    ux, ui, uo = sx[2] == 1, index.stride(0) == 1, so[2] == 1
    key = ("select", x.dtype, index.dtype, bn, br, ux, ui, uo)
    s = compiled(key, select_kernel, lambda: spec(x.dtype, 3, ux),
                 lambda: spec(index.dtype, 1, ui), lambda: spec(out.dtype, 3, uo),
                 lambda: spec(torch.bool, 1), BR=br, BN=bn)
    grid = (-(-inner // bn), -(-length // br), o)
    args = [*_t3(x, o, n, inner, sx), index.data_ptr(), length, index.stride(0),
            *_t3(out, o, length, inner, so)]
    _run(s, grid, args, index, n, name, arg, what)


def _select_op(x: torch.Tensor, d: int, index: torch.Tensor, out: torch.Tensor, name: str,
               arg: str, what: str) -> torch.Tensor:
    if out.numel():
        _select(x, index, out, d, name, arg, what)
    elif index.numel():
        _out_of_range(index, x.shape[d], name, arg, what)
    return out


@op("embedding(Tensor weight, Tensor indices) -> Tensor", kind="index",
    reference=lambda weight, indices: torch.nn.functional.embedding(indices, weight),
    dtypes=_ALL_NAMES, implements=(torch.ops.aten.embedding.default,))
def embedding(weight: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
    """Rows of `weight` [V, D] at `indices` (any shape, int32 or int64): a tensor of shape
    indices.shape + [D], as torch.nn.functional.embedding(indices, weight)."""
    check_tensor(weight, "embedding", "weight", ALL)
    _index_tensor(indices, "embedding", "indices")
    if weight.dim() != 2:
        raise ShapeError(f"embedding: argument 'weight' must be 2-dim [rows, dim], got shape "
                         f"{tuple(weight.shape)}")
    out = empty((*indices.shape, weight.shape[1]), weight.dtype)
    flat = indices.view(-1) if indices.is_contiguous() else _flat(indices)
    return _select_op(weight, 0, flat, out.view(flat.numel(), weight.shape[1]), "embedding",
                      "indices", "the rows of 'weight'").view(out.shape)


def _flat(index: torch.Tensor) -> torch.Tensor:
    """A 1-dim view of a strided index tensor, or a contiguous copy if it has none."""
    sizes, (st,) = coalesce(index.shape, [index.stride()])
    if len(sizes) == 1:
        return index.as_strided((index.numel(),), (st[0],))
    flat = torch.empty(index.numel(), dtype=index.dtype)
    copy_into(flat.view(index.shape), index)
    return flat


@op("index_select(Tensor x, int dim, Tensor index) -> Tensor", kind="index",
    reference=torch.index_select, dtypes=_ALL_NAMES,
    implements=(torch.ops.aten.index_select.default,))
def index_select(x: torch.Tensor, dim: int, index: torch.Tensor) -> torch.Tensor:
    """The slices of x along `dim` at `index` (a vector of int32/int64), in that order."""
    check_tensor(x, "index_select", "x", ALL)
    _index_tensor(index, "index_select")
    _index_dim(index, "index_select")
    d = check_dim(dim, x.dim(), "index_select")
    (x1, index) = _rank0(x, index)
    if x.dim() == 0 and index.numel() != 1:
        raise ShapeError(f"index_select: x is 0-dim, so 'index' must hold one value, got "
                         f"{index.numel()}")
    shape = list(x1.shape)
    shape[d] = index.numel()
    out = empty(shape, x.dtype)
    _select_op(x1, d, index, out, "index_select", "index", f"dim {d}")
    return out.view(x.shape) if x.dim() == 0 else out


@op("index_add(Tensor x, int dim, Tensor index, Tensor source, *, Scalar alpha=1) -> "
    "Tensor", kind="index",
    reference=lambda x, dim, index, source, *, alpha=1: torch.index_add(
        x, dim, index, source, alpha=alpha),
    dtypes=_ALL_NAMES, implements=(torch.ops.aten.index_add.default,))
def index_add(x: torch.Tensor, dim: int, index: torch.Tensor, source: torch.Tensor, *,
              alpha: Any = 1) -> torch.Tensor:
    """A copy of x with alpha * source[.., r, ..] added to the slice index[r] along `dim`,
    for every r in order (duplicates accumulate, deterministically)."""
    name = "index_add"
    check_tensor(x, name, "x", ALL)
    _index_tensor(index, name)
    check_tensor(source, name, "source", (x.dtype,))
    _index_dim(index, name)
    d = check_dim(dim, x.dim(), name)
    scale = _alpha(alpha, x.dtype, name)
    x1, index, src = _rank0(x, index, source)
    if source.dim() != x.dim() or any(
            a != b for k, (a, b) in enumerate(zip(src.shape, x1.shape, strict=True)) if k != d) \
            or src.shape[d] != index.numel():
        raise ShapeError(f"{name}: 'source' has shape {tuple(source.shape)}; it must be "
                         f"x's {tuple(x.shape)} with dim {d} of size len(index) = "
                         f"{index.numel()}")
    out = empty(x1.shape, x.dtype)
    copy_into(out, x1)
    if src.numel():
        _index_add(out, index, src, d, scale)
    elif index.numel():
        _out_of_range(index, x1.shape[d], name, "index", f"dim {d}")
    return out.view(x.shape)


def _alpha(alpha: Any, dtype: torch.dtype, name: str) -> int | float | None:
    """alpha as the kernel's scalar (None when it is 1: no multiply)."""
    if not isinstance(alpha, (bool, int, float)):
        raise ArgumentError(f"{name}: alpha={alpha!r} must be a number")
    if isinstance(alpha, float) and not dtype.is_floating_point:
        raise ArgumentError(f"{name}: alpha={alpha!r} is a float, but x is "
                            f"{str(dtype).removeprefix('torch.')}",
                            hint="use an int alpha for integer and bool tensors")
    if alpha == 1:
        return None
    return float(alpha) if dtype.is_floating_point else int(alpha)


def _index_add(out: torch.Tensor, index: torch.Tensor, src: torch.Tensor, d: int,
               scale: int | float | None) -> None:
    v = _around(out.shape, d, [out, src])
    if v is None:
        _leading(d, lambda a, b, dd: _index_add(a, index, b, dd, scale), [out, src])
        return
    o, inner, (so, ss) = v
    n, length = out.shape[d], index.shape[0]
    bn = _width(inner, _ADD_WIDTHS)
    uo, ui, us = so[2] == 1, index.stride(0) == 1, ss[2] == 1
    a = 0 if scale is None else scale
    key = ("index_add", out.dtype, index.dtype, bn, uo, ui, us, type(scale))
    s = compiled(key, index_add_kernel, lambda: spec(out.dtype, 3, uo),
                 lambda: spec(index.dtype, 1, ui), lambda: spec(src.dtype, 3, us), a,
                 lambda: spec(torch.bool, 1), ALPHA=scale is not None, BN=bn)
    grid = (-(-inner // bn), o, 1)
    args = [*_t3(out, o, n, inner, so), index.data_ptr(), length, index.stride(0),
            *_t3(src, o, length, inner, ss), a]
    _run(s, grid, args, index, n, "index_add", "index", f"dim {d}")


# -- element ops: gather, scatter_add --------------------------------------------------------------
def _same_rank(x: torch.Tensor, index: torch.Tensor, name: str) -> None:
    if max(index.dim(), 1) != max(x.dim(), 1):
        raise ShapeError(f"{name}: 'index' has {index.dim()} dims and x has {x.dim()}; they "
                         "must have the same number")


def _no_larger(index: torch.Tensor, t: torch.Tensor, skip: int | None, name: str,
               arg: str) -> None:
    if any(a > b for k, (a, b) in enumerate(zip(index.shape, t.shape, strict=True)) if k != skip):
        raise ShapeError(f"{name}: 'index' has shape {tuple(index.shape)}, larger than "
                         f"{arg!r} {tuple(t.shape)}" +
                         (f" outside dim {skip}" if skip is not None else ""))


def _narrow(t: torch.Tensor, shape: Sequence[int], skip: int | None) -> torch.Tensor:
    """t cut to `shape` in every dim but `skip` (a view)."""
    for k, n in enumerate(shape):
        if k != skip and t.shape[k] != n:
            t = t.narrow(k, 0, n)
    return t


@op("gather(Tensor x, int dim, Tensor index) -> Tensor", kind="index",
    reference=torch.gather, dtypes=_ALL_NAMES, implements=(torch.ops.aten.gather.default,))
def gather(x: torch.Tensor, dim: int, index: torch.Tensor) -> torch.Tensor:
    """out[..., r, ...] = x[..., index[..., r, ...], ...] along `dim`: a tensor of
    index's shape (index no larger than x outside `dim`), as torch.gather."""
    name = "gather"
    check_tensor(x, name, "x", ALL)
    _index_tensor(index, name)
    d = check_dim(dim, x.dim(), name)
    out = empty(index.shape, x.dtype)
    if index.numel() == 0:
        return out
    _same_rank(x, index, name)
    x1, index1, out1 = _rank0(x, index, out)
    _no_larger(index1, x1, d, name, "x")
    _gather(_narrow(x1, index1.shape, d), index1, out1, d)
    return out


def _gather(x: torch.Tensor, index: torch.Tensor, out: torch.Tensor, d: int) -> None:
    v = _around(index.shape, d, [x, index, out])
    if v is None:
        _leading(d, _gather, [x, index, out])
        return
    o, inner, (sx, si, so) = v
    n, length = x.shape[d], index.shape[d]
    bn = _width(inner)
    br = _ELEMS // bn
    key = ("gather", x.dtype, index.dtype, bn, br)
    s = compiled(key, gather_kernel, lambda: spec(x.dtype, 3, False),
                 lambda: spec(index.dtype, 3, False), lambda: spec(out.dtype, 3, False),
                 lambda: spec(torch.bool, 1), BR=br, BN=bn)
    grid = (-(-inner // bn), -(-length // br), o)
    args = [*_t3(x, o, n, inner, sx), *_t3(index, o, length, inner, si),
            *_t3(out, o, length, inner, so)]
    _run(s, grid, args, index, n, "gather", "index", f"dim {d}")


@op("scatter_add(Tensor x, int dim, Tensor index, Tensor src) -> Tensor", kind="index",
    reference=torch.scatter_add, dtypes=_ALL_NAMES,
    implements=(torch.ops.aten.scatter_add.default,))
def scatter_add(x: torch.Tensor, dim: int, index: torch.Tensor, src: torch.Tensor
                ) -> torch.Tensor:
    """A copy of x with src[..., r, ...] added at x[..., index[..., r, ...], ...] along
    `dim` for every element of index, in order (duplicates accumulate, deterministically),
    as torch.scatter_add."""
    name = "scatter_add"
    check_tensor(x, name, "x", ALL)
    _index_tensor(index, name)
    check_tensor(src, name, "src", (x.dtype,))
    d = check_dim(dim, x.dim(), name)
    x1, index1, src1 = _rank0(x, index, src)
    out = empty(x1.shape, x.dtype)
    copy_into(out, x1)
    if index.numel():
        _same_rank(x, index, name)
        _same_rank(src, index, name)
        _no_larger(index1, x1, d, name, "x")
        _no_larger(index1, src1, None, name, "src")
        _scatter_add(_narrow(out, index1.shape, d), index1, _narrow(src1, index1.shape, None),
                     d)
    return out.view(x.shape)


def _scatter_add(out: torch.Tensor, index: torch.Tensor, src: torch.Tensor, d: int) -> None:
    v = _around(index.shape, d, [out, index, src])
    if v is None:
        _leading(d, _scatter_add, [out, index, src])
        return
    o, inner, (so, si, ss) = v
    n, length = out.shape[d], index.shape[d]
    bn = _width(inner)
    key = ("scatter_add", out.dtype, index.dtype, bn)
    s = compiled(key, scatter_add_kernel, lambda: spec(out.dtype, 3, False),
                 lambda: spec(index.dtype, 3, False), lambda: spec(src.dtype, 3, False),
                 lambda: spec(torch.bool, 1), BN=bn)
    grid = (-(-inner // bn), o, 1)
    args = [*_t3(out, o, n, inner, so), *_t3(index, o, length, inner, si),
            *_t3(src, o, length, inner, ss)]
    _run(s, grid, args, index, n, "scatter_add", "index", f"dim {d}")

