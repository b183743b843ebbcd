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

As in shape.py, a call's launches are planned once per layout (shapes, strides, dtypes,
dim): a repeated call allocates its result, adds data pointers and launches.
"""

from __future__ import annotations

import ctypes
import math
import threading
from collections.abc import Sequence
from typing import Any, NamedTuple

import torch

import tessera.lang as tl
from tessera.errors import ShapeError
from tessera.lang.jit import Specialization
from tessera.ops import device
from tessera.ops._launch import (
    KERNEL_DTYPES,
    ArgumentError,
    check_dim,
    check_tensor,
    coalesce,
    compiled,
    spec,
)
from tessera.ops.registry import op
from tessera.ops.shape import (
    Alloc,
    CopyLaunch,
    Plans,
    allocator,
    call,
    contiguous_strides,
    copy_launches,
    fit,
    run_copy,
    segments,
)

__all__ = ["embedding", "gather", "index_add", "index_select", "scatter_add"]

ALL = tuple(KERNEL_DTYPES)
_ALL_NAMES = tuple(str(d).removeprefix("torch.") for d in ALL)
INDEX = (torch.int32, torch.int64)
_WIDTHS = (1, 16, 128, 1024)  # row tiles' widths (shape.fit: full tiles but the last)
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
def _outside(i, n):
    """Whether index i is outside [0, n)."""
    return (i < 0) | (i >= n)


@tl.kernel
def _corner(BR: tl.constexpr, BN: tl.constexpr):
    """This program's first inner column, first row and outer index."""
    return tl.program_id(0) * BN, tl.program_id(1) * BR, tl.program_id(2)


@tl.kernel
def select_kernel(x, index, out, flag, BR: tl.constexpr, BN: tl.constexpr):
    """out[o, r, :] = x[o, index[r], :] for BR rows r and BN inner columns."""
    j, r0, o = _corner(BR, BN)
    n = x.shape[1]
    if BR == 1:  # no loop: the launch's work estimate stays true, small ones stay serial
        i = index[r0]
        out[o, r0, j:j + BN] = x[o, i, j:j + BN]
        bad = _outside(i, n)
    else:
        bad = False
        for r in tl.range(r0, min(r0 + BR, index.shape[0])):
            i = index[r]
            bad = bad | _outside(i, n)
            out[o, r, j:j + BN] = x[o, i, j:j + BN]
    _flag(flag, bad)


@tl.kernel
def gather_kernel(x, index, out, flag, BR: tl.constexpr, BN: tl.constexpr):
    """out[o, r, c] = x[o, index[o, r, c], c] over BR x BN elements."""
    j, r0, o = _corner(BR, BN)
    n = x.shape[1]
    bad = False
    for r in tl.range(r0, min(r0 + BR, index.shape[1])):
        for c in tl.range(j, min(j + BN, index.shape[2])):
            i = index[o, r, c]
            bad = bad | _outside(i, n)
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
        bad = bad | _outside(i, n)
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
            bad = bad | _outside(i, n)
            out[o, i, c] += src[o, r, c]
    _flag(flag, bad)


# -- index checks ------------------------------------------------------------------------------
class _Flags(threading.local):
    """This thread's flag bytes, one per program of a launch (each program writes its own,
    so nothing needs clearing)."""

    def __init__(self) -> None:
        self.size = 0
        self.take(4096)

    def take(self, programs: int) -> int:
        """The buffer's address, grown to hold `programs` flags if it does not."""
        if programs > self.size:
            self.size = max(programs, 4096)
            self.buf = bytearray(self.size)
            self._pin = (ctypes.c_char * self.size).from_buffer(self.buf)
            self.address = ctypes.addressof(self._pin)
        return self.address


_FLAGS = _Flags()


def _out_of_range(index: torch.Tensor, n: int, name: str, arg: str, what: str) -> None:
    """Raise if `index` holds a value outside [0, n) (one vectorized pass)."""
    bad = index[(index < 0) | (index >= n)]
    if bad.numel():
        raise ArgumentError(f"{name}: argument {arg!r} holds {int(bad.flatten()[0])}, out of "
                            f"range for {what} of size {n}",
                            hint=f"indices must be in [0, {n}) (torch's rule: no negative "
                                 "indices)")


# -- plans -------------------------------------------------------------------------------------
Layout = tuple[tuple[int, ...], tuple[int, ...], int]  # shape, strides, byte offset


class Launch(NamedTuple):
    """One kernel launch (entry point, grid): the three tensor operands' byte offsets from
    their data pointers and the sizes and strides each is passed with; scalars and the
    flag buffer follow them."""

    address: int
    grid: tuple[int, int, int]
    programs: int
    offsets: tuple[int, int, int]
    tails: tuple[tuple[int, ...], tuple[int, ...], tuple[int, ...]]


class Plan(NamedTuple):
    """Everything a call of one layout does, but for its data pointers."""

    alloc: Alloc  # the result's allocation
    dtype: torch.dtype
    n: int  # the indexed dim's size, and what it is (for errors)
    what: str
    launches: list[Launch]
    check: bool = False  # the indices are not all seen by a launch: check them in torch
    clone: Sequence[CopyLaunch] = ()  # x copied into the result first (accumulating ops)
    prep: Sequence[CopyLaunch] = ()  # the index copied to a contiguous vector first


def _layout(t: torch.Tensor) -> Layout:
    """t's layout; a 0-dim tensor as 1-dim of size 1, as torch treats it in index ops."""
    return (tuple(t.shape), t.stride(), 0) if t.dim() else ((1,), (1,), 0)


def _narrow(lay: Layout, shape: Sequence[int]) -> Layout:
    return tuple(shape), lay[1], lay[2]


def _fresh(shape: Sequence[int]) -> Layout:
    return tuple(shape), contiguous_strides(shape), 0


def _go(plan: Plan, p0: int, p1: int, p2: int, scalars: tuple[Any, ...],
        index: torch.Tensor, name: str, arg: str) -> None:
    """Run a plan's index launches on operands at data pointers p0, p1, p2; raise on a
    bad index."""
    flags = _FLAGS
    on = device.current()  # on OpenCL: the flags live on the device and are read back
    for lc in plan.launches:
        (o0, o1, o2), (t0, t1, t2), programs = lc.offsets, lc.tails, lc.programs
        flag = on.scratch(programs) if on is not None else \
            flags.address if programs <= flags.size else flags.take(programs)
        call(lc.address, *lc.grid, p0 + o0, *t0, p1 + o1, *t1, p2 + o2, *t2, *scalars, flag,
             programs, 1)
        if (on.flagged(flag, programs, f"{name}: argument {arg!r} holds an index out of "
                                       f"range for {plan.what} of size {plan.n}")
                if on is not None else flags.buf.find(1, 0, programs) >= 0):
            _out_of_range(index, plan.n, name, arg, plan.what)
    if plan.check:
        _out_of_range(index, plan.n, name, arg, plan.what)


def _around(shape: Sequence[int], d: int, strides: Sequence[Sequence[int]]
            ) -> tuple[int, int, list[tuple[int, int, int]]] | None:
    """(outer, inner, each operand's (outer, d, inner) strides) for operands that agree
    with `shape` outside dim d, or None if the dims on one side do not coalesce."""
    outer, so = _side(shape[:d], [s[:d] for s in strides])
    inner, si = _side(shape[d + 1:], [s[d + 1:] for s in strides])
    if outer is None or inner is None:
        return None
    return outer, inner, [(a, s[d], b) for a, s, b in zip(so, strides, si, strict=True)]


def _side(sizes: Sequence[int], strides: list[Sequence[int]]
          ) -> tuple[int | None, list[int]]:
    """The dims on one side of the indexed one as one (size, strides), if they coalesce
    (size None if not); no dims at all are one of size 1."""
    if len(sizes) <= 1:
        return (sizes[0], [s[0] for s in strides]) if sizes else (1, [1] * len(strides))
    n, st = coalesce(sizes, strides)
    return (n[0], [s[0] for s in st]) if len(n) == 1 else (None, [])


def _leading(d: int, lays: Sequence[Layout], items: Sequence[int]
             ) -> tuple[int, list[list[Layout]]]:
    """For operands whose dims around d do not coalesce: d renumbered, and the operands
    at each index of the first dim that is not d, with that dim dropped."""
    k = 1 if d == 0 else 0
    subs = [[(s[:k] + s[k + 1:], st[:k] + st[k + 1:], off + i * st[k] * b)
             for (s, st, off), b in zip(lays, items, strict=True)]
            for i in range(lays[0][0][k])]
    return d - (k < d), subs


def _columns(inner: int) -> int:
    """Columns per program of an element kernel (its loops stop at the tensor's end, so
    two widths serve every size): one when the indexed dim is innermost, else 32."""
    return 1 if inner == 1 else 32


def _t3(lay: Layout, o: int, n: int, inner: int, st: Sequence[int], skip: int = 0
        ) -> tuple[int, tuple[int, ...]]:
    """An operand viewed as [o, n, inner] with strides st, `skip` bytes in: (byte offset,
    sizes + strides)."""
    return lay[2] + skip, (o, n, inner, *st)


def _launch(s: Specialization, grid: tuple[int, int, int], *args: tuple[int, tuple[int, ...]]
            ) -> Launch:
    offsets, tails = zip(*args, strict=True)
    return Launch(s.address, grid, grid[0] * grid[1] * grid[2], offsets, tails)


def _index_tensor(index: Any, name: str, arg: str = "index") -> None:
    check_tensor(index, name, arg, INDEX)


def _vector(index: torch.Tensor, name: str) -> None:
    if index.dim() > 1:
        raise ShapeError(f"{name}: argument 'index' must be a vector, got shape "
                         f"{tuple(index.shape)}", hint="flatten it, or use gather")


# -- row ops: embedding, index_select, index_add -------------------------------------------------
def _row_launches(kind: str, a: Layout, index: Layout, b: Layout, d: int, dt: torch.dtype,
                  di: torch.dtype, scaled: bool = False) -> list[Launch]:
    """Launches of a row kernel ("select", "index_add"): operand a has n slices along d
    (select reads them, index_add adds into them), b one slice per entry of the 1-dim
    index (select writes them, index_add reads them)."""
    v = _around(a[0], d, [a[1], b[1]])
    if v is None:
        dd, subs = _leading(d, [a, b], [dt.itemsize, dt.itemsize])
        return [lc for sa, sb in subs
                for lc in _row_launches(kind, sa, index, sb, dd, dt, di, scaled)]
    o, inner, (sa, sb) = v
    n, length, istride = a[0][d], index[0][0], index[1][0]
    units = (sa[2] == 1, istride == 1, sb[2] == 1)
    specs = (spec(dt, 3, units[0]), spec(di, 1, units[1]), spec(dt, 3, units[2]))
    menu = _WIDTHS if kind == "select" else _ADD_WIDTHS
    out = []
    for c0, nc, bn in segments(inner, fit(inner, menu), menu):
        if kind == "select":
            br = _ELEMS // bn
            s = compiled((kind, dt, di, bn, units), select_kernel, *specs,
                         spec(torch.bool, 1), BR=br, BN=bn)
            grid = (-(-nc // bn), -(-length // br), o)
        else:
            alpha = 0.0 if scaled and dt.is_floating_point else 0
            s = compiled((kind, dt, di, bn, units, scaled), index_add_kernel, *specs, alpha,
                         spec(torch.bool, 1), ALPHA=scaled, BN=bn)
            grid = (-(-nc // bn), o, 1)
        skip = c0 * dt.itemsize
        out.append(_launch(s, grid, _t3(a, o, n, nc, sa, skip * sa[2]),
                           (index[2], (length, istride)), _t3(b, o, length, nc, sb,
                                                               skip * sb[2])))
    return out


_EMBEDDING = Plans()


@op("embedding(Tensor weight, Tensor indices) -> Tensor", kind="index",
    reference=lambda weight, indices: torch.nn.functional.embedding(indices, weight),
    dtypes=_ALL_NAMES, implements=(torch.ops.aten.embedding.default,), host_reads=True)
def embedding(weight: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
    """Rows of `weight` [V, D] at `indices` (any shape, int32 or int64): a tensor of shape
    indices.shape + [D], as torch.nn.functional.embedding(indices, weight)."""
    key = (weight.shape, weight.stride(), weight.dtype, weight.is_cpu, indices.shape,
           indices.stride(), indices.dtype, indices.is_cpu)
    p = _EMBEDDING.get(key) or _EMBEDDING.put(key, _embedding_plan(weight, indices))
    if p.prep:
        flat = torch.empty(indices.shape, dtype=indices.dtype)
        run_copy(p.prep, indices.data_ptr(), flat.data_ptr())
        indices = flat
    out = p.alloc()
    _go(p, weight.data_ptr(), indices.data_ptr(), out.data_ptr(), (), indices, "embedding",
        "indices")
    return out


def _embedding_plan(weight: torch.Tensor, indices: torch.Tensor) -> Plan:
    check_tensor(weight, "embedding", "weight", ALL)
    _index_tensor(indices, "embedding", "indices")
    if weight.dim() != 2:
        raise ShapeError(f"embedding: argument 'weight' must be 2-dim [rows, dim], got shape "
                         f"{tuple(weight.shape)}")
    (rows, dim), length = weight.shape, indices.numel()
    prep: Sequence[CopyLaunch] = ()
    sizes, (st,) = coalesce(indices.shape, [indices.stride()])
    stride = st[-1]
    if len(sizes) > 1:  # no 1-dim view: copy to a contiguous vector first
        prep = copy_launches(indices.shape, indices.stride(), indices.dtype,
                             contiguous_strides(indices.shape), indices.dtype)
        stride = 1
    launches = _row_launches("select", _layout(weight), ((length,), (stride,), 0),
                                _fresh((length, dim)), 0, weight.dtype, indices.dtype) \
        if length * dim else []
    return Plan(allocator((*indices.shape, dim), weight.dtype), weight.dtype, rows,
                "the rows of 'weight'", launches, check=length > 0 and not launches,
                prep=prep)


_INDEX_SELECT = Plans()


@op("index_select(Tensor x, int dim, Tensor index) -> Tensor", kind="index",
    reference=torch.index_select, dtypes=_ALL_NAMES,
    implements=(torch.ops.aten.index_select.default,), host_reads=True)
def index_select(x: torch.Tensor, dim: int, index: torch.Tensor) -> torch.Tensor:
    """The slices of x along `dim` at `index` (a vector of int32/int64), in that order."""
    key = (dim, x.shape, x.stride(), x.dtype, x.is_cpu, index.shape, index.stride(),
           index.dtype, index.is_cpu)
    p = _INDEX_SELECT.get(key) or _INDEX_SELECT.put(key, _index_select_plan(x, dim, index))
    out = p.alloc()
    _go(p, x.data_ptr(), index.data_ptr(), out.data_ptr(), (), index, "index_select",
        "index")
    return out


def _index_select_plan(x: torch.Tensor, dim: int, index: torch.Tensor) -> Plan:
    check_tensor(x, "index_select", "x", ALL)
    _index_tensor(index, "index_select")
    _vector(index, "index_select")
    d = check_dim(dim, x.dim(), "index_select")
    length = index.numel()
    if x.dim() == 0 and length != 1:
        raise ShapeError(f"index_select: x is 0-dim, so 'index' must hold one value, got "
                         f"{length}")
    xl = _layout(x)
    shape = list(xl[0])
    shape[d] = length
    launches = _row_launches("select", xl, _layout(index), _fresh(shape), d, x.dtype,
                             index.dtype) if math.prod(shape) else []
    return Plan(allocator(shape if x.dim() else (), x.dtype), x.dtype, xl[0][d],
                f"dim {d}", launches, check=length > 0 and not launches)


_INDEX_ADD = Plans()


@op("index_add(Tensor x, int dim, Tensor index, Tensor source, *, Scalar alpha=1) -> "
    "Tensor", kind="index",
    reference=lambda x, dim, index, source, *, alpha=1: torch.index_add(
        x, dim, index, source, alpha=alpha),
    dtypes=_ALL_NAMES, implements=(torch.ops.aten.index_add.default,), host_reads=True)
def index_add(x: torch.Tensor, dim: int, index: torch.Tensor, source: torch.Tensor, *,
              alpha: Any = 1) -> torch.Tensor:
    """A copy of x with alpha * source[.., r, ..] added to the slice index[r] along `dim`,
    for every r in order (duplicates accumulate, deterministically)."""
    key = (dim, x.shape, x.stride(), x.dtype, x.is_cpu, index.shape, index.stride(),
           index.dtype, index.is_cpu, source.shape, source.stride(), source.dtype,
           source.is_cpu, type(alpha), alpha == 1)
    p = _INDEX_ADD.get(key) or _INDEX_ADD.put(key, _index_add_plan(x, dim, index, source,
                                                                   alpha))
    out = p.alloc()
    run_copy(p.clone, x.data_ptr(), out.data_ptr())
    a = 0 if alpha == 1 else float(alpha) if p.dtype.is_floating_point else int(alpha)
    _go(p, out.data_ptr(), index.data_ptr(), source.data_ptr(), (a,), index, "index_add",
        "index")
    return out


def _alpha(alpha: Any, dtype: torch.dtype) -> None:
    if not isinstance(alpha, (bool, int, float)):
        raise ArgumentError(f"index_add: alpha={alpha!r} must be a number")
    if isinstance(alpha, float) and not dtype.is_floating_point:
        raise ArgumentError(f"index_add: alpha={alpha!r} is a float, but x is "
                            f"{str(dtype).removeprefix('torch.')}",
                            hint="use an int alpha for integer and bool tensors")


def _index_add_plan(x: torch.Tensor, dim: int, index: torch.Tensor, source: torch.Tensor,
                    alpha: Any) -> Plan:
    name = "index_add"
    check_tensor(x, name, "x", ALL)
    _index_tensor(index, name)
    check_tensor(source, name, "source", (x.dtype,))
    _vector(index, name)
    d = check_dim(dim, x.dim(), name)
    _alpha(alpha, x.dtype)
    xl, il, sl = _layout(x), _layout(index), _layout(source)
    length = index.numel()
    if source.dim() != x.dim() or sl[0][d] != length or \
            sl[0][:d] + sl[0][d + 1:] != xl[0][:d] + xl[0][d + 1:]:
        raise ShapeError(f"{name}: 'source' has shape {tuple(source.shape)}; it must be "
                         f"x's {tuple(x.shape)} with dim {d} of size len(index) = {length}")
    out = _fresh(xl[0])
    launches = _row_launches("index_add", out, il, sl, d, x.dtype, index.dtype,
                             alpha != 1) if math.prod(sl[0]) else []
    return Plan(allocator(x.shape, x.dtype), x.dtype, xl[0][d], f"dim {d}", launches,
                check=length > 0 and not launches,
                clone=copy_launches(xl[0], xl[1], x.dtype, out[1], x.dtype))


# -- element ops: gather, scatter_add --------------------------------------------------------------
def _same_rank(index: torch.Tensor, t: torch.Tensor, name: str, arg: str) -> None:
    if max(index.dim(), 1) != max(t.dim(), 1):
        raise ShapeError(f"{name}: 'index' has {index.dim()} dims and {arg} has {t.dim()}; "
                         "they must have the same number")


def _no_larger(index: Sequence[int], t: Sequence[int], skip: int | None, name: str,
               arg: str) -> None:
    if any(a > b for k, (a, b) in enumerate(zip(index, t, strict=True)) if k != skip):
        raise ShapeError(f"{name}: 'index' has shape {tuple(index)}, larger than {arg!r} "
                         f"{tuple(t)}" + (f" outside dim {skip}" if skip is not None else ""))


def _cut(lay: Layout, shape: Sequence[int], skip: int | None) -> Layout:
    """lay cut to `shape` in every dim but `skip`."""
    return _narrow(lay, [n if k == skip else shape[k] for k, n in enumerate(lay[0])])


def _element_launches(kind: str, a: Layout, index: Layout, b: Layout, d: int,
                      dt: torch.dtype, di: torch.dtype) -> list[Launch]:
    """Launches of an element kernel ("gather", "scatter_add"): operand a has n entries
    along d (gather reads them, scatter_add adds into them); index and b agree (gather
    writes b, scatter_add reads it)."""
    v = _around(index[0], d, [a[1], index[1], b[1]])
    if v is None:
        dd, subs = _leading(d, [a, index, b], [dt.itemsize, di.itemsize, dt.itemsize])
        return [lc for sa, si, sb in subs
                for lc in _element_launches(kind, sa, si, sb, dd, dt, di)]
    o, inner, (sa, si, sb) = v
    n, length = a[0][d], index[0][d]
    bn = _columns(inner)
    specs = (spec(dt, 3, False), spec(di, 3, False), spec(dt, 3, False), spec(torch.bool, 1))
    if kind == "gather":
        br = _ELEMS // bn
        s = compiled((kind, dt, di, bn), gather_kernel, *specs, BR=br, BN=bn)
        grid = (-(-inner // bn), -(-length // br), o)
    else:
        s = compiled((kind, dt, di, bn), scatter_add_kernel, *specs, BN=bn)
        grid = (-(-inner // bn), o, 1)
    return [_launch(s, grid, _t3(a, o, n, inner, sa), _t3(index, o, length, inner, si),
                    _t3(b, o, length, inner, sb))]


_GATHER = Plans()


@op("gather(Tensor x, int dim, Tensor index) -> Tensor", kind="index",
    reference=torch.gather, dtypes=_ALL_NAMES, implements=(torch.ops.aten.gather.default,),
    host_reads=True)
def gather(x: torch.Tensor, dim: int, index: torch.Tensor) -> torch.Tensor:
    """out[..., r, ...] = x[..., index[..., r, ...], ...] along `dim`: a tensor of
    index's shape (index no larger than x outside `dim`), as torch.gather."""
    key = (dim, x.shape, x.stride(), x.dtype, x.is_cpu, index.shape, index.stride(),
           index.dtype, index.is_cpu)
    p = _GATHER.get(key) or _GATHER.put(key, _gather_plan(x, dim, index))
    out = p.alloc()
    _go(p, x.data_ptr(), index.data_ptr(), out.data_ptr(), (), index, "gather", "index")
    return out


def _gather_plan(x: torch.Tensor, dim: int, index: torch.Tensor) -> Plan:
    name = "gather"
    check_tensor(x, name, "x", ALL)
    _index_tensor(index, name)
    d = check_dim(dim, x.dim(), name)
    xl, il = _layout(x), _layout(index)
    launches = []
    if index.numel():  # as torch: an empty index is not checked against x
        _same_rank(index, x, name, "x")
        _no_larger(il[0], xl[0], d, name, "x")
        launches = _element_launches("gather", _cut(xl, il[0], d), il, _fresh(il[0]), d,
                                     x.dtype, index.dtype)
    return Plan(allocator(index.shape, x.dtype), x.dtype, xl[0][d], f"dim {d}", launches)

_SCATTER_ADD = Plans()


@op("scatter_add(Tensor x, int dim, Tensor index, Tensor src) -> Tensor", kind="index",
    reference=torch.scatter_add, dtypes=_ALL_NAMES,
    implements=(torch.ops.aten.scatter_add.default,), host_reads=True)
def scatter_add(x: torch.Tensor, dim: int, index: torch.Tensor, src: torch.Tensor
                ) -> torch.Tensor:
    """A copy of x with src[..., r, ...] added at x[..., index[..., r, ...], ...] along
    `dim` for every element of index, in order (duplicates accumulate, deterministically),
    as torch.scatter_add."""
    key = (dim, x.shape, x.stride(), x.dtype, x.is_cpu, index.shape, index.stride(),
           index.dtype, index.is_cpu, src.shape, src.stride(), src.dtype, src.is_cpu)
    p = _SCATTER_ADD.get(key) or _SCATTER_ADD.put(key, _scatter_add_plan(x, dim, index, src))
    out = p.alloc()
    run_copy(p.clone, x.data_ptr(), out.data_ptr())
    _go(p, out.data_ptr(), index.data_ptr(), src.data_ptr(), (), index, "scatter_add",
        "index")
    return out


def _scatter_add_plan(x: torch.Tensor, dim: int, index: torch.Tensor, src: torch.Tensor
                      ) -> Plan:
    name = "scatter_add"
    check_tensor(x, name, "x", ALL)
    _index_tensor(index, name)
    check_tensor(src, name, "src", (x.dtype,))
    d = check_dim(dim, x.dim(), name)
    xl, il, sl = _layout(x), _layout(index), _layout(src)
    out = _fresh(xl[0])
    launches = []
    if index.numel():
        _same_rank(index, x, name, "x")
        _same_rank(index, src, name, "src")
        _no_larger(il[0], xl[0], d, name, "x")
        _no_larger(il[0], sl[0], None, name, "src")
        launches = _element_launches("scatter_add", _cut(out, il[0], d), il,
                                     _cut(sl, il[0], None), d, x.dtype, index.dtype)
    return Plan(allocator(x.shape, x.dtype), x.dtype, xl[0][d], f"dim {d}", launches,
                clone=copy_launches(xl[0], xl[1], x.dtype, out[1], x.dtype))
