"""Concatenation, splitting and layout copies: cat, split, permute, transpose.

All four are one strided copy kernel: operands' dims are coalesced, and the copy walks
tiles of the last two dims (dims before those on grid axis 2). When the source's
unit-stride dim is not the destination's last one the copy is a transpose: the tile is
read along the source's rows into a buffer and written transposed, so both sides stream
whole cache lines instead of one element per line. Results are new contiguous tensors,
converted to the result dtype on the store (cat's type promotion).

A call's launches depend only on its layout (shapes, strides, dtypes, attributes), so
they are planned once per layout (`Plans`) and a repeated call only allocates, adds data
pointers and launches: the per-call cost that matters inside decode loops.
"""

from __future__ import annotations

import ctypes
import math
import sys
from collections.abc import Callable, Sequence
from functools import partial
from typing import Any, NamedTuple

import torch

import tessera.lang as tl
from tessera.errors import ShapeError, TesseraError
from tessera.ops._launch import (
    KERNEL_DTYPES,
    ArgumentError,
    check_dim,
    check_dtype,
    check_tensor,
    coalesce,
    compiled,
    spec,
)
from tessera.ops.pointwise import result_type
from tessera.ops.registry import op
from tessera.runtime.cpu.launch import launcher

__all__ = ["Alloc", "Plans", "allocator", "call", "cat", "contiguous_strides", "copy_into",
           "copy_launches", "empty", "fit", "permute", "run_copy", "segments", "split",
           "transpose"]

ALL = tuple(KERNEL_DTYPES)
_ALL_NAMES = tuple(str(d).removeprefix("torch.") for d in ALL)
# Tile sizes come from short menus (sizes never recompile), each the largest entry that
# fits the dim, so only the last tile of a dim is partial: a partial tile runs the kernel
# language's masked loop, several times slower than a full one.
_WIDTHS = (16, 128, 1024)  # straight tiles' widths
_HEIGHTS = (1, 4, 16, 64, 256)  # straight tiles' heights
_TILE = 4096  # elements per straight tile, at most
_SQUARES = (16, 64)  # transposed tiles' sides
_HUGE = 1 << 21  # a transparent huge page
_ADVISE = 4 * _HUGE  # outputs from this size are advised onto huge pages
_MADV_HUGEPAGE = 14
call = launcher()  # call(address, grid0, grid1, grid2, *args): a compiled entry point


class Plans(dict):
    """Launch plans by call layout (`plans.get(key) or plans.put(key, plan(...))`).
    Bounded: cleared when full, so a loop whose shapes change every call (a growing
    cache) cannot grow it without limit."""

    LIMIT = 2048

    def put(self, key: Any, plan: Any) -> Any:
        if len(self) >= self.LIMIT:
            self.clear()
        self[key] = plan
        return plan


def _madvise() -> Any:
    if not sys.platform.startswith("linux"):
        return None
    f = ctypes.CDLL(None, use_errno=True).madvise
    f.argtypes, f.restype = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int], ctypes.c_int
    return f


_MADVISE = _madvise()


_LIKE = {d: torch.empty(0, dtype=d) for d in ALL}  # new_empty parses faster than empty


def empty(shape: Sequence[int], dtype: torch.dtype) -> torch.Tensor:
    """torch.empty(shape, dtype=dtype); on Linux a large result is advised onto
    transparent huge pages first (as torch's THP_MEM_ALLOC_ENABLE does): a fresh 64 MB
    output then takes 32 page faults instead of 16384, which on a VM cost more than
    writing it (75 -> 24 ms)."""
    like = _LIKE.get(dtype)
    out = torch.empty(shape, dtype=dtype) if like is None else \
        like.new_empty(*shape) if shape else like.new_empty(())
    nbytes = math.prod(shape) * dtype.itemsize
    if nbytes >= _ADVISE and _MADVISE is not None:
        p = out.data_ptr()
        lo, hi = (p + _HUGE - 1) & -_HUGE, (p + nbytes) & -_HUGE
        _MADVISE(lo, hi - lo, _MADV_HUGEPAGE)  # advice only: a refusal changes nothing
    return out


Alloc = Callable[[], torch.Tensor]


def allocator(shape: Sequence[int], dtype: torch.dtype) -> Alloc:
    """A function returning empty(shape, dtype), with everything about the call decided
    now (a plan's allocation: ~0.6 us less per call than empty)."""
    like = _LIKE.get(dtype)
    if like is None or not shape or math.prod(shape) * dtype.itemsize >= _ADVISE:
        return partial(empty, tuple(shape), dtype)
    return partial(like.new_empty, *shape)


# -- the copy kernel -------------------------------------------------------------------------
@tl.kernel
def _tile(x, b, c, i, j, RANK: tl.constexpr, TRANS: tl.constexpr, BM: tl.constexpr,
          BN: tl.constexpr):
    """x's [BM, BN] tile at rows i, columns j of matrix (b, c) (the leading dims that
    exist); TRANS: x holds that matrix transposed, and this is x's [BN, BM] tile."""
    if RANK == 2:
        t = x[j:j + BN, i:i + BM] if TRANS else x[i:i + BM, j:j + BN]
    elif RANK == 3:
        t = x[c, j:j + BN, i:i + BM] if TRANS else x[c, i:i + BM, j:j + BN]
    else:
        t = x[b, c, j:j + BN, i:i + BM] if TRANS else x[b, c, i:i + BM, j:j + BN]
    return t


@tl.kernel
def _put(out, t, b, c, i, j, RANK: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr):
    if RANK == 2:
        out[i:i + BM, j:j + BN] = t
    elif RANK == 3:
        out[c, i:i + BM, j:j + BN] = t
    else:
        out[b, c, i:i + BM, j:j + BN] = t


@tl.kernel
def copy_kernel(x, out, RANK: tl.constexpr, TRANS: tl.constexpr, BM: tl.constexpr,
                BN: tl.constexpr):
    """out = x (converted to out's dtype) over one tile of the last two dims; dims before
    those (at most two) walk grid axis 2."""
    j = tl.program_id(0) * BN
    if RANK == 1:
        out[j:j + BN] = x[j:j + BN]
    else:
        i = tl.program_id(1) * BM
        lead = tl.program_id(2)
        b = lead // out.shape[1] if RANK == 4 else 0
        c = lead % out.shape[1] if RANK == 4 else lead
        t = _tile(x, b, c, i, j, RANK, TRANS, BM, BN)
        if TRANS:
            # Always true, but a load used inside a branch is first copied into a tile
            # buffer (row by row from x), so the transposed reads below hit L1 instead of
            # one cache line of x per element.
            if i < out.shape[RANK - 2]:
                _put(out, t.T, b, c, i, j, RANK, BM, BN)
        else:
            _put(out, t, b, c, i, j, RANK, BM, BN)


class CopyLaunch(NamedTuple):
    """One launch of copy_kernel (its entry point and grid): byte offsets from the source's
    and destination's data pointers, and the sizes and strides each is passed with."""

    address: int
    grid: tuple[int, int, int]
    src_offset: int
    src: tuple[int, ...]
    dst_offset: int
    dst: tuple[int, ...]


def fit(n: int, menu: Sequence[int]) -> int:
    """The largest menu entry not above n (the smallest if all are)."""
    return next((m for m in reversed(menu) if m <= n), menu[0])


def copy_launches(shape: Sequence[int], ss: Sequence[int], sdtype: torch.dtype,
                  ds: Sequence[int], ddtype: torch.dtype, soff: int = 0, doff: int = 0
                  ) -> list[CopyLaunch]:
    """The launches copying a tensor of `shape` from source strides `ss` to destination
    strides `ds` (in elements; byte offsets soff, doff), converting sdtype to ddtype: one
    for up to 4 coalesced dims, one per index of the first dim beyond."""
    if 0 in shape:
        return []
    sizes, (cs, cd) = coalesce(shape, [ss, ds])
    if len(sizes) > 4:
        sb, db = sdtype.itemsize, ddtype.itemsize
        return [c for i in range(sizes[0])
                for c in copy_launches(sizes[1:], cs[1:], sdtype, cd[1:], ddtype,
                                       soff + i * cs[0] * sb, doff + i * cd[0] * db)]
    if sdtype == ddtype and sdtype.itemsize == 2 and cs[-1] == cd[-1] == 1:
        # A half type moved as bytes: no round trip through float32 (4x the time), and
        # the bits stay exactly as they were (NaN payloads too).
        sizes[-1] *= 2
        cs = [*(2 * v for v in cs[:-1]), 1]
        cd = [*(2 * v for v in cd[:-1]), 1]
        sdtype = ddtype = torch.uint8
    return _copy_launch(sizes, cs, sdtype, cd, ddtype, soff, doff)


def segments(n: int, tile: int, menu: Sequence[int]) -> list[tuple[int, int, int]]:
    """[(start, size, tile)] covering [0, n): a run of whole tiles, then the rest with the
    menu's largest tile that fits it (partial only if the rest is below the smallest)."""
    main = n // tile * tile
    segs = [(0, main, tile)] if main else []
    if n > main:
        segs.append((main, n - main, fit(n - main, menu)))
    return segs


def _copy_launch(sizes: list[int], ss: list[int], sdtype: torch.dtype, ds: list[int],
                 ddtype: torch.dtype, soff: int, doff: int) -> list[CopyLaunch]:
    """The launches of one copy of up to 4 coalesced dims: one per segment of the last
    two dims, so every launch but the last along a dim has whole tiles."""
    rank = len(sizes)
    trans = rank > 1 and ds[-1] == 1 and ss[-1] != 1 and 1 in ss
    if trans:  # the source's unit dim becomes the second to last; pass x transposed
        a = ss.index(1)
        order = [d for d in range(rank) if d != a]
        order.insert(rank - 2, a)
        sizes, ds, ss = ([v[d] for d in order] for v in (sizes, ds, ss))
    su = (ss[-2] if trans else ss[-1]) == 1
    du = ds[-1] == 1
    sb, db = sdtype.itemsize, ddtype.itemsize
    rows = sizes[-2] if rank > 1 else 1
    lead = math.prod(sizes[:-2])
    out = []
    width = fit(sizes[-1], _SQUARES if trans else _WIDTHS)
    for c0, nc, bn in segments(sizes[-1], width, _SQUARES if trans else _WIDTHS):
        menu = _SQUARES if trans else _HEIGHTS
        height = fit(rows if trans else min(rows, _TILE // bn), menu) if rank > 1 else 1
        for r0, nr, bm in segments(rows, height, menu):
            key = ("copy", rank, trans, bm, bn, su, du, sdtype, ddtype)
            s = compiled(key, copy_kernel, lambda: spec(sdtype, rank, su),
                         lambda: spec(ddtype, rank, du), RANK=rank, TRANS=trans, BM=bm,
                         BN=bn)
            part = [*sizes[:-2], nr, nc][-rank:]
            xs = [*part[:-2], nc, nr] if trans else part
            xst = [*ss[:-2], ss[-1], ss[-2]] if trans else ss
            skip = r0 * (ss[-2] if rank > 1 else 0) + c0 * ss[-1]
            dskip = r0 * (ds[-2] if rank > 1 else 0) + c0 * ds[-1]
            grid = (-(-nc // bn), -(-nr // bm), lead)
            out.append(CopyLaunch(s.address, grid, soff + skip * sb, (*xs, *xst),
                                  doff + dskip * db, (*part, *ds)))
    return out


def run_copy(launches: Sequence[CopyLaunch], src: int, dst: int) -> None:
    """Run copy launches from data pointer `src` to `dst`."""
    for c in launches:
        call(c.address, *c.grid, src + c.src_offset, *c.src, dst + c.dst_offset, *c.dst)


_INTO = Plans()


def copy_into(dst: torch.Tensor, src: torch.Tensor) -> None:
    """dst[...] = src for CPU tensors of one shape and any strides (src may be broadcast,
    stride 0; dst's elements must not share memory), src converted to dst's dtype."""
    key = (dst.shape, src.stride(), src.dtype, dst.stride(), dst.dtype)
    launches = _INTO.get(key) or _INTO.put(key, copy_launches(
        dst.shape, src.stride(), src.dtype, dst.stride(), dst.dtype))
    run_copy(launches, src.data_ptr(), dst.data_ptr())


def contiguous_strides(shape: Sequence[int]) -> tuple[int, ...]:
    strides, step = [], 1
    for n in reversed(shape):
        strides.append(step)
        step *= max(n, 1)
    return tuple(reversed(strides))


# -- cat -----------------------------------------------------------------------------------
_CAT = Plans()


@op("cat(Tensor[] tensors, int dim=0) -> Tensor", kind="shape", reference=torch.cat,
    dtypes=_ALL_NAMES, implements=(torch.ops.aten.cat.default, torch.ops.aten.concat.default))
def cat(tensors: Sequence[torch.Tensor], dim: int = 0) -> torch.Tensor:
    """Concatenation along `dim` with torch's type promotion; 1-dim empty tensors are
    skipped, as torch skips them."""
    if not isinstance(tensors, (list, tuple)) or not tensors:
        raise TesseraError("cat: argument 'tensors' must be a non-empty list of tensors",
                           hint="pass at least one tensor")
    key = (dim, *[(t.shape, t.stride(), t.dtype, t.is_cpu) for t in tensors])
    alloc, parts = _CAT.get(key) or _CAT.put(key, _cat_plan(tensors, dim))
    out = alloc()
    ptr = out.data_ptr()
    for k, launches in parts:
        run_copy(launches, tensors[k].data_ptr(), ptr)
    return out


def _cat_plan(tensors: Sequence[Any], dim: int
              ) -> tuple[Alloc, list[tuple[int, list[CopyLaunch]]]]:
    """(the result's allocation, each copied tensor's index and copy launches)."""
    for k, t in enumerate(tensors):
        check_tensor(t, "cat", f"tensors[{k}]", ALL)
        if t.dim() == 0:
            raise ShapeError(f"cat: tensors[{k}] is 0-dim and cannot be concatenated",
                             hint="give it a dim first, e.g. t.reshape(1)")
    dtype = result_type(*tensors)
    check_dtype(dtype, "cat", "tensors", ALL)
    used = [(k, t) for k, t in enumerate(tensors) if t.shape != (0,)]
    if not used:
        return allocator([0], dtype), []
    first = used[0][1]
    d = check_dim(dim, first.dim(), "cat")
    shape = list(first.shape)
    shape[d] = 0
    for k, t in used:
        if t.dim() != first.dim() or t.shape[:d] != first.shape[:d] or \
                t.shape[d + 1:] != first.shape[d + 1:]:
            raise ShapeError(f"cat: tensors[{k}] has shape {tuple(t.shape)}, which does not "
                             f"match {tuple(first.shape)} outside dim {d}",
                             hint="all sizes must agree except along the cat dim")
        shape[d] += t.shape[d]
    strides = contiguous_strides(shape)
    step = strides[d] * dtype.itemsize
    parts, offset = [], 0
    for k, t in used:
        launches = copy_launches(t.shape, t.stride(), t.dtype, strides, dtype, 0,
                                 offset * step)
        if launches:
            parts.append((k, launches))
        offset += t.shape[d]
    return allocator(shape, dtype), parts


# -- split ---------------------------------------------------------------------------------
_SPLIT = Plans()


def _split_sizes(x: torch.Tensor, split_sizes: Any, d: int) -> list[int]:
    """The piece sizes: a list summing to x.shape[d], or an int chunk (as torch.split)."""
    n = x.shape[d]
    if isinstance(split_sizes, int) and not isinstance(split_sizes, bool):
        if split_sizes <= 0 and n:
            raise ArgumentError(f"split: split_sizes={split_sizes} must be positive")
        step = max(split_sizes, 1)
        return [min(step, n - i) for i in range(0, n, step)] or [0]
    sizes = list(split_sizes)
    if any(not isinstance(s, int) or isinstance(s, bool) or s < 0 for s in sizes):
        raise ArgumentError(f"split: split_sizes={sizes} must be non-negative ints")
    if sum(sizes) != n:
        raise ShapeError(f"split: split_sizes={sizes} sum to {sum(sizes)}, but dim {d} has "
                         f"size {n}", hint="the sizes must add up to the dim's size")
    return sizes


def _split_reference(x: torch.Tensor, split_sizes: Sequence[int] | int, dim: int = 0
                     ) -> list[torch.Tensor]:
    sizes = split_sizes if isinstance(split_sizes, int) else list(split_sizes)
    return [t.clone(memory_format=torch.contiguous_format)
            for t in torch.split(x, sizes, dim)]


@op("split(Tensor x, int[] split_sizes, int dim=0) -> Tensor[]", kind="shape",
    reference=_split_reference, dtypes=_ALL_NAMES,
    implements=(torch.ops.aten.split_with_sizes.default, torch.ops.aten.split.Tensor))
def split(x: torch.Tensor, split_sizes: Sequence[int] | int, dim: int = 0
          ) -> list[torch.Tensor]:
    """x cut along `dim` into pieces of `split_sizes` (the eager call also takes an int:
    equal chunks, the last smaller, as aten.split.Tensor). The pieces are new contiguous
    tensors, not views: the schema declares no aliasing, so torch.compile and the graph
    compiler may treat each piece as a fresh buffer and hand it to kernels that want unit
    strides; a graph that only slices keeps aten's views and never calls this."""
    sizes = split_sizes if isinstance(split_sizes, int) else tuple(split_sizes)
    key = (x.shape, x.stride(), x.dtype, x.is_cpu, sizes, dim)
    pieces = _SPLIT.get(key) or _SPLIT.put(key, _split_plan(x, split_sizes, dim))
    ptr = x.data_ptr()
    outs = []
    for alloc, launches in pieces:
        out = alloc()
        run_copy(launches, ptr, out.data_ptr())
        outs.append(out)
    return outs


def _split_plan(x: torch.Tensor, split_sizes: Any, dim: int
                ) -> list[tuple[Alloc, list[CopyLaunch]]]:
    """Each piece's allocation and copy launches."""
    check_tensor(x, "split", "x", ALL)
    d = check_dim(dim, x.dim(), "split")
    if x.dim() == 0:
        raise ShapeError("split: x is 0-dim and has no dim to split",
                         hint="give it a dim first, e.g. x.reshape(1)")
    pieces, start = [], 0
    for n in _split_sizes(x, split_sizes, d):
        shape = list(x.shape)
        shape[d] = n
        pieces.append((allocator(shape, x.dtype), copy_launches(shape, x.stride(), x.dtype,
                                            contiguous_strides(shape), x.dtype,
                                            start * x.stride(d) * x.element_size())))
        start += n
    return pieces


# -- permute, transpose ----------------------------------------------------------------------
_LAYOUT = Plans()


def _layout_plan(x: torch.Tensor, order: Sequence[int]) -> tuple[Alloc, list[CopyLaunch]]:
    """(allocation, launches) of x.permute(order) copied into a new contiguous tensor."""
    shape = [x.shape[d] for d in order]
    return allocator(shape, x.dtype), copy_launches(shape, [x.stride(d) for d in order], x.dtype,
                                contiguous_strides(shape), x.dtype)


def _layout_copy(x: torch.Tensor, plan: tuple[Alloc, list[CopyLaunch]]) -> torch.Tensor:
    alloc, launches = plan
    out = alloc()
    run_copy(launches, x.data_ptr(), out.data_ptr())
    return out


@op("permute(Tensor x, int[] dims) -> Tensor", kind="shape",
    reference=lambda x, dims: x.permute(dims).clone(memory_format=torch.contiguous_format),
    dtypes=_ALL_NAMES, implements=(torch.ops.aten.permute.default,))
def permute(x: torch.Tensor, dims: Sequence[int]) -> torch.Tensor:
    """x.permute(dims) as a new contiguous tensor (the layout copy a graph needs), a
    tiled transpose when the dims that move include the innermost one."""
    key = ("permute", x.shape, x.stride(), x.dtype, x.is_cpu, tuple(dims))
    return _layout_copy(x, _LAYOUT.get(key) or _LAYOUT.put(key, _permute_plan(x, dims)))


def _permute_plan(x: torch.Tensor, dims: Sequence[int]) -> tuple[Alloc, list[CopyLaunch]]:
    check_tensor(x, "permute", "x", ALL)
    dims = list(dims)
    if len(dims) != x.dim():
        raise ShapeError(f"permute: dims={dims} has {len(dims)} entries for a {x.dim()}-dim "
                         "tensor", hint="give one entry per dim")
    order = [check_dim(d, x.dim(), "permute", "dims") for d in dims]
    if len(set(order)) != len(order):
        raise ArgumentError(f"permute: dims={dims} repeats a dim",
                            hint="dims must be a permutation of range(x.dim())")
    return _layout_plan(x, order)


@op("transpose(Tensor x, int dim0, int dim1) -> Tensor", kind="shape",
    reference=lambda x, dim0, dim1: x.transpose(dim0, dim1).clone(
        memory_format=torch.contiguous_format),
    dtypes=_ALL_NAMES, implements=(torch.ops.aten.transpose.int,))
def transpose(x: torch.Tensor, dim0: int, dim1: int) -> torch.Tensor:
    """x.transpose(dim0, dim1) as a new contiguous tensor, by a tiled transpose (reads
    and writes stream whole cache lines: bandwidth-bound)."""
    key = ("transpose", x.shape, x.stride(), x.dtype, x.is_cpu, dim0, dim1)
    plan = _LAYOUT.get(key) or _LAYOUT.put(key, _transpose_plan(x, dim0, dim1))
    return _layout_copy(x, plan)


def _transpose_plan(x: torch.Tensor, dim0: int, dim1: int
                    ) -> tuple[Alloc, list[CopyLaunch]]:
    check_tensor(x, "transpose", "x", ALL)
    order = list(range(x.dim()))
    if x.dim():
        d0 = check_dim(dim0, x.dim(), "transpose", "dim0")
        d1 = check_dim(dim1, x.dim(), "transpose", "dim1")
        order[d0], order[d1] = d1, d0
    else:
        check_dim(dim0, 0, "transpose", "dim0")
        check_dim(dim1, 0, "transpose", "dim1")
    return _layout_plan(x, order)
