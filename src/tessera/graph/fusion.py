"""Autofusion: regions of pointwise ops (and row ops: reductions over the last dim,
softmax, layer/RMS norm) become one generated kernel each (`fuse`); convolutions take
their consumers into their epilogue (`fuse_epilogues`).

A group is a connected region of fusable nodes over one iteration domain (the broadcast
of its inputs). Values it computes stay in registers unless something outside the group
reads them; those are its outputs, stored once. A pure pointwise group walks the domain
in tiles of coalesced dims, as the eager pointwise ops do; a group with row ops walks
whole rows (the last dim, at most `MAX_ROW` long, in one tile), so a reduction's result
can feed pointwise ops on the same rows (softmax or LayerNorm written out in torch).

Pointwise members are the pointwise ops, copies (`contiguous`) and inference batch norm
with frozen statistics (eager's x * scale + shift). The kernel is `fused_kernel`, written
once in the kernel language: it interprets a compile-time program (a tuple of steps),
inlining each op's tile function (`OpDef.tile`'s tables in ops/pointwise.py) with the
same casts the eager ops make — each operand to the op's compute dtype, each result
rounded to its dtype — so results match eager's. The fused node calls `FusedKernel`,
which launches through the launcher: the native executable records and replays it like
any op.
"""

from __future__ import annotations

import ctypes
import hashlib
import heapq
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch

import tessera.lang as tl
from tessera.errors import ShapeError
from tessera.graph.ir import Dim, Graph, GraphError, Node, Value
from tessera.lang.codegen.c import ENTRY, CPrinter
from tessera.lang.frontend import _Frontend
from tessera.lang.ir import Function, Loc, Op
from tessera.lang.jit import Specialization
from tessera.lang.passes import dce
from tessera.lang.types import TensorType
from tessera.ops import norm, pointwise, reduce, registry
from tessera.ops._launch import FLOATS, KERNEL_DTYPES, coalesce, launch, ldtype
from tessera.runtime import knowledge
from tessera.runtime.toolchain import compile_c

__all__ = ["MAX_ROW", "FusedKernel", "fuse", "fuse_epilogues"]

MAX_ROW = 4096  # longest last dim a group with row ops handles (one tile per row)


# -- the kernel ---------------------------------------------------------------------------
# A program is a tuple of steps; each appends one value to `vals` (after the inputs' tiles).
# An operand reference is ("v", index into vals) or ("c", number, its dtype: a weak scalar).
#   ("pw", tile_fn, refs, cts, scalars, OUT)    a pointwise op: refs cast to cts
#   ("reduce", FN, ref, CT, IDENTITY, OUT)      sum/mean/max/min over the row, kept as [BM, 1]
#   ("softmax", LOG, ref, OUT)
#   ("norm", RMS, ref, weight ref | None, bias ref | None, eps, OUT)


@tl.kernel
def _operand(vals, ref, CT: tl.constexpr):
    """A step's operand converted to its compute dtype CT."""
    if ref[0] == "v":
        r = vals[ref[1]].to(CT)
    else:
        r = tl.cast(tl.cast(ref[1], ref[2]), CT)
    return r


@tl.kernel
def _pointwise(vals, step):
    fn, refs, cts, sc = step[1], step[2], step[3], step[4]
    if len(refs) == 1:
        r = fn(_operand(vals, refs[0], cts[0]), sc[0], sc[1])
    elif len(refs) == 2:
        r = fn(_operand(vals, refs[0], cts[0]), _operand(vals, refs[1], cts[1]), sc[0])
    else:
        r = fn(_operand(vals, refs[0], cts[0]), _operand(vals, refs[1], cts[1]),
               _operand(vals, refs[2], cts[2]))
    return r


@tl.kernel
def _row(vals, step, R: tl.constexpr, BN: tl.constexpr):
    """A row op over tiles [BM, BN] whose rows hold R valid columns."""
    cols = tl.arange(0, BN)[None, :]
    if step[0] == "reduce":
        fn = step[1]
        t = _operand(vals, step[2], step[3])
        if BN != R:  # (the identity as a number: a tl.full here could be declared after
            t = tl.where(cols < R, t, step[4])  # the loop that reads it, lang bug)
        r = reduce._finish(t, 1, fn)[:, None]
        if fn == "mean":
            r = r / R
    elif step[0] == "softmax":
        t = _operand(vals, step[2], tl.float32)
        if BN != R:
            t = tl.where(cols < R, t, -math.inf)
        shifted = t - tl.max(t, axis=1)[:, None]
        if step[1]:
            r = shifted - tl.log(tl.sum(tl.exp(shifted), axis=1))[:, None]
        else:
            e = tl.exp(shifted)
            r = e / tl.sum(e, axis=1)[:, None]
    else:
        t = _operand(vals, step[2], tl.float32)
        if BN != R:
            t = tl.where(cols < R, t, 0.0)
        r = norm._normalize(t, R, step[5], step[1], BN != R)
        if step[3] is not None:
            r = r * _operand(vals, step[3], tl.float32)
        if step[4] is not None:
            r = r + _operand(vals, step[4], tl.float32)
    return r


@tl.kernel
def fused_kernel(ins, outs, PROG: tl.constexpr, OUTS: tl.constexpr, WIDTHS: tl.constexpr,
                 RANK: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr, R: tl.constexpr):
    """Run program PROG on this program's tiles of `ins` (input k a tile WIDTHS[k] wide:
    BN, or 1 for a per-row input of a row group) and store values OUTS[k] = (index,
    width) into outs[k]. R: the row length of a row group (0 for a pointwise group)."""
    vals = ()  # (kernels have no tuple unpacking: `vals + (x,)` below)
    for k in tl.static_range(len(ins)):
        vals = vals + (pointwise._tile(ins[k], RANK, ins[k].dtype, BM, WIDTHS[k]),)  # noqa: RUF005
    for k in tl.static_range(len(PROG)):
        step = PROG[k]
        if step[0] == "pw":
            r = _pointwise(vals, step)
        else:
            r = _row(vals, step, R, BN)
        vals = vals + (r.to(step[len(step) - 1]),)  # noqa: RUF005
    for k in tl.static_range(len(outs)):
        pointwise._put(outs[k], vals[OUTS[k][0]], RANK, BM, OUTS[k][1])


def _specialize(program: tuple, outs: tuple, widths: tuple, dtypes: Sequence[torch.dtype],
                n_in: int, rank: int, units: tuple[bool, ...], bm: int, bn: int, r: int
                ) -> Specialization:
    """Trace fused_kernel with its tensors grouped into `ins` and `outs` (a kernel's
    parameters are fixed; a group's count of tensors is not), then compile it as
    `Kernel` does."""
    fe = _Frontend(fused_kernel.fn)
    fe.at(fe.node)
    params = [Op("param", [], TensorType(ldtype(d), rank, u),
                 {"name": f"in{i}" if i < n_in else f"out{i - n_in}", "index": i}, fe.b.loc)
              for i, (d, u) in enumerate(zip(dtypes, units, strict=True))]
    fe.scope.update(ins=tuple(params[:n_in]), outs=tuple(params[n_in:]), PROG=program,
                    OUTS=outs, WIDTHS=widths, RANK=rank, BM=bm, BN=bn, R=r)
    fe.body(fe.node.body)
    ir = dce(Function("fused_kernel", params, fe.b.blocks[0], Loc(fe.file, fe.first)))
    source = CPrinter(ir, restrict=True).source()
    module = compile_c(source, name="fused_kernel", openmp=True, where=fused_kernel.where,
                       flags=["-fwrapv"])
    address = ctypes.cast(module.function(ENTRY), ctypes.c_void_p).value
    writes = frozenset(p.attrs["name"] for p in params[n_in:])
    return Specialization(address, source, str(ir), writes, True, ir)  # (ir: for devices)


_SPECS: dict[tuple, Specialization] = {}


def _key(x: Any) -> Any:
    """A hashable key of a program that tells apart what == does not (-0.0, NaN, 1, True)."""
    if isinstance(x, tuple):
        return tuple(_key(v) for v in x)
    if isinstance(x, (bool, int, float)):
        return type(x).__name__, repr(x)
    return x


# -- running ------------------------------------------------------------------------------
@dataclass(frozen=True)
class Output:
    """A value a fused kernel stores: its dtype and layout — "full" (the domain's shape),
    "row" (the domain's rows, the last dim kept as 1) or "rowvec" (rows, last dim gone)."""

    dtype: torch.dtype
    layout: str


class FusedKernel:
    """The callable of a fused node: inputs (tensors, broadcast to a common domain) ->
    its outputs, computed by one generated kernel per layout of the operands."""

    def __init__(self, name: str, program: tuple, outputs: list[tuple[int, Output]],
                 in_dtypes: list[torch.dtype], row_inputs: list[bool], r: int) -> None:
        self.name = name
        self.program = program
        self.outputs = [o for _, o in outputs]
        self.r = r  # row length of a row group; 0: a pointwise group
        self.dtypes = [*in_dtypes, *(o.dtype for o in self.outputs)]
        if r:
            bm, bn = reduce._row_tile(r, MAX_ROW)
            self.tile: tuple[int, int] | None = (bm, bn)
            self.widths = tuple(1 if row else bn for row in row_inputs)
            self.stores = tuple((i, bn if o.layout == "full" else 1) for i, o in outputs)
        else:  # (widths and store widths follow each launch's tile)
            self.tile, self.widths = None, (0,) * len(in_dtypes)
            self.stores = tuple((i, 0) for i, _ in outputs)
        self.key = (_key(program), self.stores, self.widths, tuple(self.dtypes), r)
        # the knowledge base's name of this program: the same in every process and checkout
        self.tune_key = "fused:" + hashlib.sha256(repr(_named(self.key)).encode()).hexdigest()[:16]
        self._spec = {"name": name, "program": program, "outputs": outputs,
                      "in_dtypes": in_dtypes, "row_inputs": row_inputs, "r": r}

    def spec(self) -> dict[str, Any]:
        """The arguments that make this kernel again (what a saved graph stores)."""
        return self._spec

    def __repr__(self) -> str:
        return f"<fused kernel {self.name}>"

    def __call__(self, *xs: torch.Tensor) -> torch.Tensor | tuple[torch.Tensor, ...]:
        shape = _domain(xs, self.name)
        rows = shape[:-1]
        outs = [torch.empty(shape if o.layout == "full" else (*rows, 1)
                            if o.layout == "row" else rows, dtype=o.dtype)
                for o in self.outputs]
        if math.prod(shape):
            strides = [pointwise._broadcast_strides(x, shape) for x in xs]
            for t, o in zip(outs, self.outputs, strict=True):
                strides.append(list(t.stride()) if o.layout == "full" else
                               [*t.stride()[:len(rows)], 0])
            if self.r:  # keep the row dim whole; coalesce the rest
                sizes, cs = coalesce(rows, [s[:-1] for s in strides])
                sizes, cs = [*sizes, self.r], [[*c, s[-1]] for c, s in zip(cs, strides,
                                                                          strict=True)]
            else:
                sizes, cs = coalesce(shape, strides)
            self._launch([t.data_ptr() for t in (*xs, *outs)], sizes, cs)
        return outs[0] if len(outs) == 1 else tuple(outs)

    def _launch(self, ptrs: list[int], sizes: list[int], strides: list[list[int]]) -> None:
        if len(sizes) > 3:  # rare: one launch per index of the leading dim
            for i in range(sizes[0]):
                self._launch([p + i * st[0] * d.itemsize for p, st, d in
                              zip(ptrs, strides, self.dtypes, strict=True)],
                             sizes[1:], [st[1:] for st in strides])
            return
        rank = len(sizes)
        bm, bn = self._tile(sizes)
        units = tuple(st[-1] == 1 for st in strides)
        # a pointwise group's inputs that are constant along the last dim (stride 0: a
        # scalar, a per-row value) are 1-wide tiles: what uses only them runs per row
        widths = self.widths if self.r else tuple(
            1 if st[-1] == 0 else bn for st in strides[:len(self.widths)])
        key = (self.key, rank, units, widths, bm, bn)
        s = _SPECS.get(key)
        if s is None:
            stores = self.stores if self.r else tuple((i, bn) for i, _ in self.stores)
            s = _SPECS[key] = _specialize(self.program, stores, widths, self.dtypes,
                                          len(self.widths), rank, units, bm, bn, self.r)
        flat: list[int] = []
        for p, st in zip(ptrs, strides, strict=True):
            flat += (p, *sizes, *st)
        grid = (1 if self.r else -(-sizes[-1] // bn), -(-sizes[-2] // bm) if rank > 1 else 1,
                sizes[0] if rank == 3 else 1)
        launch(s, grid, *flat)


    def _tile(self, sizes: list[int]) -> tuple[int, int]:
        """A launch's (BM, BN): tuned for this program, shape class and dtype if recorded
        (a row group's rows stay one tile: only BM), else the heuristic's."""
        dtype = str(self.dtypes[0]).removeprefix("torch.")
        if self.tile:
            return knowledge.tile(self.tune_key, reduce.shape_class(math.prod(sizes[:-1]),
                                                                    self.r), dtype, self.tile,
                                  fixed_bn=True)
        return knowledge.tile(self.tune_key, "x".join(map(str, sizes)), dtype,
                              pointwise._blocks(sizes))


def _named(x: Any) -> Any:
    """A program key with its kernels named (their repr holds a path)."""
    if isinstance(x, tuple):
        return tuple(_named(v) for v in x)
    return x.fn.__qualname__ if isinstance(x, tl.Kernel) else x


def _domain(xs: Sequence[torch.Tensor], name: str) -> tuple[int, ...]:
    """The broadcast of the inputs' shapes (numpy rules), without touching torch."""
    out: list[int] = []
    for x in xs:
        shape = list(x.shape)
        if len(shape) > len(out):
            out = [1] * (len(shape) - len(out)) + out
        for i, n in enumerate(shape, len(out) - len(shape)):
            if n != out[i] and out[i] != 1 and n != 1:
                raise ShapeError(f"fused kernel {name}: input shapes "
                                 f"{', '.join(str(tuple(x.shape)) for x in xs)} do not "
                                 "broadcast")
            if out[i] == 1:
                out[i] = n
    return tuple(out)


# -- which nodes fuse, and as what step ----------------------------------------------------
_COMPARE = frozenset({"eq", "ne", "lt", "le", "gt", "ge"})
_LOGICAL = frozenset({"logical_and", "logical_or", "logical_xor"})
_REDUCTIONS = {"sum": "sum", "mean": "mean", "amax": "max", "amin": "min"}
Ref = Callable[[Any], tuple]  # a Value or number -> its operand reference


@dataclass(frozen=True, eq=False)
class _Member:
    """A fusable node: `operands` (Values, numbers, and tensors: constants it derives,
    which become graph constants if it is fused) in kernel order, `step(ref)` its
    program step; for row ops `x` (the rows' input) and whether the result keeps the
    reduced dim (a result without it can only be stored, never used in the group)."""

    node: Node
    operands: tuple[Any, ...]
    step: Callable[[Ref], tuple]
    x: Value | None = None
    keep: bool = True

    @property
    def value(self) -> Value:
        return self.node.outputs[0]


def _scalar_dtype(v: Any) -> torch.dtype | None:
    """The dtype torch gives a Python number operand (a weak 0-dim tensor), else None."""
    if isinstance(v, bool):
        return torch.bool
    if isinstance(v, int):
        return torch.int64 if -2**63 <= v < 2**63 else None
    if isinstance(v, float):
        return torch.float32
    return None


def _tensor_ok(v: Any) -> bool:
    """A Value the kernels can read: a kernel dtype, and surely a tensor at run time (an
    int64 scalar made by a torch call or passed in may be a Python int: a size)."""
    if not isinstance(v, Value) or v.dtype not in KERNEL_DTYPES:
        return False
    return not (v.dtype == torch.int64 and v.shape == () and (
        v.kind == "input" or (v.producer is not None and v.producer.kind != "op")))


def _compute(d: torch.dtype) -> Any:
    return pointwise._compute_dtype(d)


def _promoted(operands: Sequence[Any]) -> torch.dtype:
    probes = [torch.tensor(v) if not isinstance(v, Value) else
              torch.zeros(() if v.shape == () else (1,), dtype=v.dtype) for v in operands]
    return pointwise.result_type(*probes)


def _pointwise_member(n: Node) -> _Member | None:
    """The step of a pointwise node as the eager op would run it (pointwise.py: the
    table entry, its scalars, the compute dtype), or None where eager would refuse."""
    name, a, out = n.op, n.args, n.outputs[0].dtype
    if name in ("gelu", "clamp", "contiguous") or name in pointwise.UNARY:
        operands: tuple[Any, ...] = (a.get("x"),)
    elif name in pointwise.BINARY:
        operands = (a.get("x"), a.get("other"))
    elif name == "where":
        operands = (a.get("condition"), a.get("x"), a.get("other"))
    else:
        return None
    if out not in KERNEL_DTYPES or not all(
            _tensor_ok(v) if isinstance(v, Value) else _scalar_dtype(v) is not None
            for v in operands):
        return None
    x = operands[0]
    xd = x.dtype if isinstance(x, Value) else _scalar_dtype(x)
    fn, scalars, compute = name, (0.0, 0.0), out
    if name == "contiguous":  # a copy (of a view, or of a value another op stored)
        fn = "copy"
    elif name == "gelu":
        approximate = a.get("approximate", "none")
        if approximate not in ("none", "tanh") or xd not in FLOATS:
            return None
        fn = "gelu" if approximate == "none" else "gelu_tanh"
    elif name == "clamp":
        lo, hi = a.get("min"), a.get("max")
        bounds = [b for b in (lo, hi) if b is not None]
        if not bounds or out == torch.bool or any(_scalar_dtype(b) is None for b in bounds):
            return None
        if not out.is_floating_point and any(  # (wrapped as torch does: by the op, unfused)
                not torch.iinfo(out).min <= b <= torch.iinfo(out).max for b in bounds):
            return None
        kind = float if out.is_floating_point else int
        scalars = (kind(lo) if lo is not None else kind(0), kind(hi) if hi is not None
                   else kind(0))
        fn = "clamp" if lo is not None and hi is not None else \
            "clamp_min" if lo is not None else "clamp_max"
    elif name in pointwise.UNARY:
        if name in ("neg", "abs", "relu") and xd == torch.bool:
            return None
    elif name == "where":
        if not isinstance(x, Value) or x.dtype != torch.bool:
            return None
    else:
        if name in _COMPARE:
            compute = _promoted(operands)
        elif name in _LOGICAL:
            compute = torch.bool
        elif (out == torch.bool and name in ("sub", "pow")) or (
                name == "pow" and not out.is_floating_point):
            return None
        alpha = a.get("alpha", 1)
        if alpha != 1:
            if _scalar_dtype(alpha) is None or (isinstance(alpha, float)
                                                and not out.is_floating_point):
                return None
            fn, scalars = f"{name}_alpha", (float(alpha) if out.is_floating_point
                                             else int(alpha),)
        else:
            scalars = (0.0,)
    tile = {**pointwise.UNARY, **pointwise.BINARY, **pointwise.TERNARY}[fn]
    ct = _compute(compute)
    cts = (tl.bool, ct, ct) if name == "where" else (ct,) * len(operands)
    return _Member(n, operands, lambda ref: ("pw", tile, tuple(map(ref, operands)), cts,
                                             scalars, ldtype(out)))


def _last_dim(dim: Any, ndim: int) -> bool:
    """Whether a reduction's `dim` argument names only the last dim."""
    if dim is None or (isinstance(dim, (list, tuple)) and len(dim) == 0):
        return ndim == 1
    ds = list(dim) if isinstance(dim, (list, tuple)) else [dim]
    return len(ds) == 1 and isinstance(ds[0], int) and ds[0] in (-1, ndim - 1)


def _identity(fn: str, ct: Any) -> float | int:
    """What masked columns hold for reduction `fn` computed in `ct`."""
    if fn in ("sum", "mean"):
        return 0
    big = math.inf if ct == tl.float32 else 2**63 - 1 if ct == tl.int64 else 2**31 - 1
    return big if fn == "min" else -big - (0 if ct == tl.float32 else 1)


def _row_member(n: Node) -> _Member | None:
    """The step of a row op over the last dim of its input, or None."""
    a, out = n.args, n.outputs[0].dtype
    x = a.get("x")
    if not _tensor_ok(x) or not x.shape or out not in KERNEL_DTYPES:
        return None
    nd = len(x.shape)
    if n.op in _REDUCTIONS:
        fn = _REDUCTIONS[n.op]
        ok = {"sum": (*pointwise.NUMERIC, torch.bool), "mean": FLOATS}.get(n.op,
                                                                             pointwise.NUMERIC)
        if x.dtype not in ok or not _last_dim(a.get("dim"), nd):
            return None
        keep = bool(a.get("keepdim", False))
        acc = tl.float32 if fn == "mean" else reduce._accumulator(
            out if fn == "sum" else x.dtype)
        return _Member(n, (x,), lambda ref: ("reduce", fn, ref(x), acc, _identity(fn, acc),
                                             ldtype(out)), x, keep)
    if x.dtype not in FLOATS:
        return None
    if n.op in ("softmax", "log_softmax"):
        if not _last_dim(a.get("dim", -1), nd):
            return None
        log = n.op == "log_softmax"
        return _Member(n, (x,), lambda ref: ("softmax", log, ref(x), ldtype(out)), x)
    if n.op in ("layer_norm", "rms_norm"):
        w, b = a.get("weight"), a.get("bias")
        eps = a.get("eps", 1e-5 if n.op == "layer_norm" else None)
        if eps is None and n.op == "rms_norm":
            eps = torch.finfo(torch.float32).eps
        if list(a.get("normalized_shape", ())) != [x.shape[-1]] or \
                _scalar_dtype(eps) not in (torch.int64, torch.float32) or any(
                v is not None and not (_tensor_ok(v) and v.dtype in FLOATS
                                       and v.shape == x.shape[-1:]) for v in (w, b)):
            return None
        rms = n.op == "rms_norm"
        operands = tuple(v for v in (x, w, b) if v is not None)
        return _Member(n, operands, lambda ref: (
            "norm", rms, ref(x), ref(w) if w is not None else None,
            ref(b) if b is not None else None, float(eps), ldtype(out)), x)
    return None


def _batch_norm_affine(n: Node) -> tuple[torch.Tensor, torch.Tensor] | None:
    """(scale, shift), float32 [C], of an inference batch norm with frozen statistics
    (computed as the eager op computes them at every call), or None."""
    a = n.args
    x, eps = a.get("x"), a.get("eps", 1e-5)
    stats = [a.get(k) for k in ("running_mean", "running_var", "weight", "bias")]
    if not _tensor_ok(x) or x.dtype not in FLOATS or len(x.shape) < 2 or \
            _scalar_dtype(eps) not in (torch.int64, torch.float32) or None in stats[:2] or \
            any(v is not None and not (isinstance(v, Value) and v.kind == "const" and
                                       v.dtype in FLOATS and v.shape == x.shape[1:2])
                for v in stats):
        return None
    mean, var, w, b = (v.data.float() if v is not None else None for v in stats)
    scale = torch.rsqrt(var + eps) * (w if w is not None else 1.0)  # (as eager's, exactly)
    return scale, (b if b is not None else 0.0) - mean * scale


def _batch_norm_member(n: Node) -> _Member | None:
    """Inference batch norm with frozen statistics: the eager op's x * scale + shift
    (`fma`) with scale and shift as constants."""
    affine = _batch_norm_affine(n)
    if affine is None:
        return None
    x = n.args["x"]
    view = [x.shape[1]] + [1] * (len(x.shape) - 2)
    operands = (x, affine[0].view(view), affine[1].view(view))
    ct, out = _compute(x.dtype), ldtype(n.outputs[0].dtype)
    return _Member(n, operands, lambda ref: ("pw", pointwise.TERNARY["fma"],
                                             tuple(map(ref, operands)), (ct,) * 3, (), out))


def _member(n: Node) -> _Member | None:
    if n.kind != "op" or len(n.outputs) != 1:
        return None
    kind = registry.get(n.op).kind
    if kind == "pointwise" or n.op == "contiguous":
        return _pointwise_member(n)
    if n.op == "batch_norm":
        return _batch_norm_member(n)
    if kind in ("reduction", "normalization"):
        return _row_member(n)
    return None


# -- grouping -------------------------------------------------------------------------------
def _broadcast(a: tuple[Dim, ...], b: tuple[Dim, ...]) -> tuple[Dim, ...] | None:
    """numpy broadcasting of shapes whose dims may be symbols (equal only to themselves)."""
    n = max(len(a), len(b))
    a, b = (1,) * (n - len(a)) + a, (1,) * (n - len(b)) + b
    out: list[Dim] = []
    for x, y in zip(a, b, strict=True):
        if x != y and 1 not in (x, y):
            return None
        out.append(y if x == 1 else x)
    return tuple(out)


@dataclass(frozen=True)
class _Group:
    """Members that can be one kernel over `domain`, and the values it stores."""

    members: tuple[_Member, ...]  # in graph order
    domain: tuple[Dim, ...]
    r: int  # row length if the group has row ops, else 0
    outputs: tuple[tuple[_Member, str], ...]  # values read outside, with their layout


class _Grouper:
    """Grows groups in graph order: each fusable node joins the groups of its inputs'
    producers where the union is still one kernel and no path leaves and re-enters it."""

    def __init__(self, g: Graph) -> None:
        self.g = g
        self.pos = {n: i for i, n in enumerate(g.nodes)}
        self.users = g.users()
        self.graph_outputs = set(g.outputs)
        self.group: dict[Node, _Group] = {}

    def check(self, members: list[_Member]) -> _Group | None:
        """The group of these members, or None if they cannot be one kernel."""
        members.sort(key=lambda m: self.pos[m.node])
        inside = {m.node for m in members}
        rows = [m for m in members if m.x is not None]
        if rows:
            domain = rows[0].x.shape
            r = domain[-1]
            if not isinstance(r, int) or not 2 <= r <= MAX_ROW or \
                    any(m.x.shape != domain for m in rows):
                return None
            row_shape = (*domain[:-1], 1)
        else:
            domain, r = (), 0
            for m in members:
                domain = _broadcast(domain, m.value.shape)
                if domain is None:
                    return None
        outputs = []
        for m in members:
            v = m.value
            if not m.keep:  # a reduction's result without its row dim: stored only
                if any(u in inside for u in self.users[v]) or v.shape != domain[:-1]:
                    return None
                outputs.append((m, "rowvec"))
                continue
            if _broadcast(v.shape, domain) != domain:
                return None
            if v in self.graph_outputs or any(u not in inside for u in self.users[v]):
                if v.shape == domain:
                    outputs.append((m, "full"))
                elif r and v.shape == row_shape:
                    outputs.append((m, "row"))
                else:
                    return None
        if not outputs:
            return None
        return _Group(tuple(members), domain, r, tuple(outputs))

    def cyclic(self, members: Sequence[_Member]) -> bool:
        """Whether a path leaves these members and comes back to them: as one node, the
        group would then depend on itself. Other groups count as the one node each will be."""
        inside = {m.node for m in members}
        seen: set[Node] = set()
        stack = [v.producer for m in members for v in m.node.inputs()
                 if v.producer is not None and v.producer not in inside]
        while stack:
            n = stack.pop()
            if n in seen:
                continue
            seen.add(n)
            if n in inside:
                return True
            group = self.group.get(n)
            around = [m.node for m in group.members] if group is not None else [n]
            for x in around:
                seen.add(x)
                stack += [v.producer for v in x.inputs() if v.producer is not None]
        return False

    def run(self) -> list[_Group]:
        for n in self.g.nodes:
            m = _member(n)
            if m is None:
                continue
            current = self.check([m])
            if current is None:
                continue
            for v in n.inputs():
                other = self.group.get(v.producer) if v.producer is not None else None
                if other is None or other.members[0] in current.members:
                    continue  # not fusable, or merged already
                merged = self.check([*current.members, *other.members])
                if merged is not None and not self.cyclic(merged.members):
                    current = merged
            for member in current.members:
                self.group[member.node] = current
        unique = {id(grp): grp for grp in self.group.values()}
        return [grp for grp in unique.values() if len(grp.members) > 1]


def fuse(g: Graph) -> int:
    """Replace each fusable region of `g` by one fused node, in place; how many regions."""
    groups = _Grouper(g).run()
    if not groups:
        return 0
    replaced = {m.node: grp for grp in groups for m in grp.members}
    fused = {id(grp): _fused_node(g, grp) for grp in groups}
    # the condensed graph in topological order, each fused node where its last member was
    units: dict[int, Node] = {}
    unit_of: dict[Node, int] = {}
    rank: dict[int, int] = {}  # position of the unit's last node
    for i, n in enumerate(g.nodes):
        grp = replaced.get(n)
        key = id(grp) if grp is not None else id(n)
        units[key] = fused[key] if grp is not None else n
        unit_of[n] = key
        rank[key] = i
    deps: dict[int, set[int]] = {k: set() for k in units}
    for n in g.nodes:
        for v in n.inputs():
            if v.producer is not None and unit_of[v.producer] != unit_of[n]:
                deps[unit_of[n]].add(unit_of[v.producer])
    waiting = {k: len(d) for k, d in deps.items()}
    readers: dict[int, list[int]] = {k: [] for k in units}
    for k, d in deps.items():
        for p in d:
            readers[p].append(k)
    ready = [(rank[k], k) for k, c in waiting.items() if c == 0]
    heapq.heapify(ready)
    order: list[Node] = []
    while ready:
        _, k = heapq.heappop(ready)
        order.append(units[k])
        for r in readers[k]:
            waiting[r] -= 1
            if waiting[r] == 0:
                heapq.heappush(ready, (rank[r], r))
    if len(order) != len(units):  # (the grouper's cycle check rules this out)
        raise GraphError("fusion: the fused graph has a cycle", hint="compile with "
                         "options={'fusion': False} and please report this graph")
    g.nodes = []
    for n in order:
        g.add(n)
    return len(groups)


def _fused_node(g: Graph, grp: _Group) -> Node:
    """The node computing `grp`'s outputs with one FusedKernel (constants its members
    derive are added to `g`)."""
    inputs: list[Value] = []
    index: dict[Any, int] = {}  # Values, and id()s of derived constant tensors
    computed = {m.value for m in grp.members}
    for m in grp.members:
        for v in m.operands:
            if isinstance(v, torch.Tensor) and id(v) not in index:
                index[id(v)] = len(inputs)
                inputs.append(g.value(f"{m.node.outputs[0].name}_c", v.dtype,
                                      tuple(v.shape), "const", v))
            elif isinstance(v, Value) and v not in computed and v not in index:
                index[v] = len(inputs)
                inputs.append(v)

    def ref(v: Any) -> tuple:
        if isinstance(v, (Value, torch.Tensor)):
            return "v", index[v if isinstance(v, Value) else id(v)]
        return "c", v, ldtype(_scalar_dtype(v))

    steps = []
    for m in grp.members:
        steps.append(m.step(ref))
        index[m.value] = len(index)
    ops = list(dict.fromkeys(m.node.op for m in grp.members))
    name = "_".join(ops) if len(ops) <= 4 else "_".join(ops[:4]) + f"_{len(ops) - 4}more"
    row_inputs = [grp.r > 0 and (not v.shape or v.shape[-1] == 1) for v in inputs]
    outputs = [(index[m.value], Output(m.value.dtype, layout)) for m, layout in grp.outputs]
    kernel = FusedKernel(name, tuple(steps), outputs, [v.dtype for v in inputs], row_inputs,
                         grp.r)
    values = [m.value for m, _ in grp.outputs]
    node = Node(f"fused:{name}", {"args": inputs, "kwargs": {}}, values, kernel,
                source="fused: " + "; ".join(repr(m.node) for m in grp.members)
                ).derive(m.node for m in grp.members)
    node.meta["returns"] = list(range(len(values)))
    node.meta["members"] = [m.node for m in grp.members]
    return node


# -- convolution epilogues ------------------------------------------------------------------
_ACTIVATIONS = ("relu", "gelu", "silu", "sigmoid", "tanh")  # the GEMM epilogue's (sgemm.py)


def fuse_epilogues(g: Graph) -> int:
    """Fold pointwise consumers of float32 conv2d nodes with frozen weights into the
    convolution, in place: a batch norm with frozen statistics into its weights and bias,
    then an activation and a residual add into the GEMM template's epilogue — one
    `fused_conv2d` computing act(conv(x, W * s) + (b * s + t)) + r. A residual add whose
    result feeds a pointwise op (ResNet's relu) is left to `fuse`: the add and that op in
    one kernel cost the same passes, and the other operand's own ops may join them. How
    many convolutions took a consumer. (Linear layers get theirs from the pattern
    rewrites.)"""
    from tessera.ops.conv import fused_conv2d

    users = g.users()
    outputs = set(g.outputs)

    def only_user(v: Value, ops: Sequence[str]) -> Node | None:
        """The node reading v if it is the only one, is one of `ops`, belongs to no other
        convolution's chain, and v is no output."""
        us = users[v]
        return us[0] if v not in outputs and len(us) == 1 and us[0].op in ops and \
            us[0] not in replace else None

    replace: dict[Node, Node | None] = {}  # chain nodes -> the fused conv (at the last)
    for c in g.nodes:
        if c.op != "conv2d" or not _frozen_float32(c.args.get("weight"), c.args.get("bias"),
                                                    c.args.get("x")):
            continue
        chain, v = [c], c.outputs[0]
        w, b = c.args["weight"], c.args.get("bias")
        n = only_user(v, ("batch_norm",))
        affine = _batch_norm_affine(n) if n is not None and n.args.get("x") is v else None
        if affine is not None:
            scale, shift = affine
            data = c.args["weight"].data * scale.view(-1, 1, 1, 1)
            w = g.value(f"{n.outputs[0].name}_weight", data.dtype, tuple(data.shape), "const",
                        data)
            data = shift if b is None else b.data * scale + shift
            b = g.value(f"{n.outputs[0].name}_bias", data.dtype, tuple(data.shape), "const",
                        data)
            chain.append(n)
            v = n.outputs[0]
        activation = None
        n = only_user(v, _ACTIVATIONS)
        if n is not None and n.args.get("x") is v and n.args.get("approximate", "none") in (
                "none", "tanh"):
            activation = n.op if n.args.get("approximate", "none") == "none" else "gelu_tanh"
            chain.append(n)
            v = n.outputs[0]
        residual = None
        n = only_user(v, ("add",))
        after = users[n.outputs[0]] if n is not None else []
        if n is not None and n.args.get("alpha", 1) == 1 and not (
                len(after) == 1 and _member(after[0]) is not None):  # (else: a group's)
            r = n.args.get("other") if n.args.get("x") is v else n.args.get("x")
            if isinstance(r, Value) and r is not v and r.dtype == torch.float32 and \
                    _broadcast(r.shape, v.shape) == v.shape:
                residual = r
                chain.append(n)
                v = n.outputs[0]
        if len(chain) == 1:
            continue
        a = c.args
        node = Node("fused:conv2d", {
            "args": [a["x"], w, b, a.get("stride", 1), a.get("padding", 0),
                     a.get("dilation", 1), a.get("groups", 1)],
            "kwargs": {"activation": activation, "residual": residual}}, [v], fused_conv2d,
            source="fused: " + "; ".join(repr(m) for m in chain)).derive(chain)
        replace.update(dict.fromkeys(chain[:-1]))
        replace[chain[-1]] = node
    if replace:
        nodes, g.nodes = g.nodes, []
        for n in nodes:
            new = replace.get(n, n)
            if new is not None:
                g.add(new)
    return sum(new is not None for new in replace.values())


def _frozen_float32(w: Any, b: Any, x: Any) -> bool:
    """A float32 convolution of x by a constant weight and (no or a constant) bias."""
    return all(isinstance(v, Value) and v.dtype == torch.float32 for v in (w, x)) and \
        w.kind == "const" and (b is None or (isinstance(b, Value) and b.kind == "const"
                                             and b.dtype == torch.float32))
