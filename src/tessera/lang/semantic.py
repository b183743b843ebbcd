"""The IR builder: typed constructors for every tile op, with broadcasting, dtype
promotion, constant folding and common-subexpression elimination as values are built."""

from __future__ import annotations

import math
import operator
from typing import Any

from tessera.lang.errors import KernelTypeError
from tessera.lang.ir import Block, Loc, Op
from tessera.lang.types import TensorType, TileType, compute_dtype, promote
from tessera.runtime import dtype as dt

__all__ = ["MAX_TILE_BYTES", "Builder", "broadcast_shapes"]

MAX_TILE_BYTES = 1 << 20  # tiles live on the stack of each worker thread

ARITH = {"add": operator.add, "sub": operator.sub, "mul": operator.mul,
         "truediv": operator.truediv, "floordiv": operator.floordiv, "mod": operator.mod,
         "pow": operator.pow, "and": operator.and_, "or": operator.or_, "xor": operator.xor,
         "lshift": operator.lshift, "rshift": operator.rshift, "maximum": max, "minimum": min}
COMPARE = {"lt": operator.lt, "le": operator.le, "gt": operator.gt, "ge": operator.ge,
           "eq": operator.eq, "ne": operator.ne}
COMMUTATIVE = frozenset({"add", "mul", "and", "or", "xor", "maximum", "minimum", "eq", "ne"})
IDENTITY = {"add": 0, "sub": 0, "mul": 1, "truediv": 1}
INT_ONLY = frozenset({"floordiv", "mod", "and", "or", "xor", "lshift", "rshift"})
FLOAT_UNARY = frozenset({"exp", "exp2", "log", "log2", "sqrt", "rsqrt", "tanh", "sigmoid",
                         "erf", "sin", "cos", "silu", "gelu_erf", "gelu_tanh"})
REDUCE_IDENTITY = {"sum": 0.0, "max": -math.inf, "min": math.inf}


def broadcast_shapes(a: tuple[int, ...], b: tuple[int, ...]) -> tuple[int, ...] | None:
    """numpy broadcasting of two static shapes (None if they do not broadcast)."""
    n = max(len(a), len(b))
    a, b = (1,) * (n - len(a)) + a, (1,) * (n - len(b)) + b
    out = []
    for x, y in zip(a, b, strict=True):
        if x != y and 1 not in (x, y):
            return None
        out.append(max(x, y))
    return tuple(out)


class Builder:
    """Appends ops to the current block; `loc` is the user's source line being built."""

    def __init__(self) -> None:
        self.blocks: list[Block] = [Block()]
        self.loc: Loc | None = None
        self._cse: list[dict[tuple, Op]] = [{}]

    # -- plumbing -------------------------------------------------------------------------
    @property
    def block(self) -> Block:
        return self.blocks[-1]

    def error(self, message: str, hint: str | None = None) -> KernelTypeError:
        where = None
        if self.loc is not None:
            where = f"{self.loc}: {self.loc.text.strip()}" if self.loc.text else str(self.loc)
        return KernelTypeError(message, where=where, hint=hint)

    def emit(self, kind: str, operands: list[Op], type_: Any, pure: bool = True,
             **attrs: Any) -> Op:
        """Append an op, or return an identical pure one already visible here (CSE)."""
        if isinstance(type_, TileType) and type_.shape:
            self.check_shape(type_.shape, 8 if type_.ctype == "int64_t" else 4)
        key = None
        if pure:
            key = (kind, tuple(o.id for o in operands), type_,
                   tuple(sorted((k, repr(v)) for k, v in attrs.items())))
            for table in reversed(self._cse):
                if key in table:
                    return table[key]
        op = Op(kind, operands, type_, attrs, self.loc)
        self.block.ops.append(op)
        if key is not None:
            self._cse[-1][key] = op
        return op

    def push(self, block: Block) -> None:
        self.blocks.append(block)
        self._cse.append({})

    def pop(self) -> Block:
        self._cse.pop()
        return self.blocks.pop()

    # -- values ---------------------------------------------------------------------------
    def const(self, value: bool | int | float, dtype: dt.dtype | None = None) -> Op:
        if isinstance(value, int) and not isinstance(value, bool) and \
                not -2**63 <= value < 2**63:
            raise self.error(f"integer constant {value} does not fit in int64")
        if dtype is None:
            dtype = dt.bool if isinstance(value, bool) else \
                dt.int32 if isinstance(value, int) and -2**31 <= value < 2**31 else \
                dt.int64 if isinstance(value, int) else dt.float32
        return self.emit("const", [], TileType(dtype), value=value)

    def value(self, x: Any) -> Op:
        """An IR value for a tile or a Python constant."""
        if isinstance(x, Op):
            if isinstance(x.type, TensorType):
                raise self.error("a tensor is used as a value",
                                 hint="load a tile from it first, e.g. x[i:i + BLOCK]")
            return x
        if isinstance(x, (bool, int, float)):
            return self.const(x)
        raise self.error(f"{type(x).__name__} value {x!r} cannot be used in a kernel here")

    def full(self, shape: tuple[int, ...], value: float, dtype: dt.dtype) -> Op:
        self.check_shape(shape)
        return self.emit("full", [], TileType(compute_dtype(dtype) if dtype.is_floating_point
                                              else dtype, shape), value=value)

    def arange(self, start: int, stop: int) -> Op:
        if stop <= start:
            raise self.error(f"arange({start}, {stop}) is empty")
        self.check_shape((stop - start,))
        return self.emit("arange", [], TileType(dt.int32, (stop - start,)), start=start)

    def check_shape(self, shape: tuple[int, ...], itemsize: int = 4) -> None:
        """Tile shapes are positive compile-time ints; a tile holds at most 1 MiB."""
        if any(not isinstance(s, int) or s <= 0 for s in shape):
            raise self.error(f"tile shape {shape} must be positive compile-time integers",
                             hint="make sizes tl.constexpr parameters or literals")
        if math.prod(shape) * itemsize > MAX_TILE_BYTES:
            raise self.error(f"a tile of shape {shape} is larger than "
                             f"{MAX_TILE_BYTES >> 10} KiB",
                             hint="use smaller blocks and loop over them")

    # -- elementwise ----------------------------------------------------------------------
    def _result_shape(self, *ops: Op) -> tuple[int, ...]:
        shape: tuple[int, ...] = ()
        for op in ops:
            out = broadcast_shapes(shape, op.shape)
            if out is None:
                shapes = " and ".join(str(o.shape) for o in ops)
                raise self.error(f"shapes {shapes} do not broadcast",
                                 hint="insert size-1 dimensions with x[:, None] / x[None, :]")
            shape = out
        self.check_shape(shape)
        return shape

    def cast(self, x: Op, dtype: dt.dtype) -> Op:
        if x.type.dtype is dtype:
            return x
        if x.kind == "const" and dtype in (dt.float32, dt.int32, dt.int64, dt.bool):
            v = x.attrs["value"]
            if dtype is dt.bool or dtype is dt.float32:
                return self.const(bool(v) if dtype is dt.bool else float(v), dtype)
            bits = 31 if dtype is dt.int32 else 63
            if math.isfinite(v) and -2**bits <= int(v) < 2**bits:
                return self.const(int(v), dtype)
        return self.emit("cast", [x], TileType(dtype, x.shape))

    def binary(self, fn: str, a: Any, b: Any) -> Op:
        a, b = self.value(a), self.value(b)
        shape = self._result_shape(a, b)
        if fn in COMPARE:
            dtype = promote(a.type, b.type)
            rtype = dt.bool
        else:
            dtype = promote(a.type, b.type)
            if fn == "truediv" or (fn == "pow" and dtype is not dt.bool):
                dtype = dt.float32
            if fn in INT_ONLY and dtype.is_floating_point:
                if fn in ("floordiv", "mod"):
                    raise self.error(f"'{_SYMBOL[fn]}' on floating-point tiles is not "
                                     "supported", hint="cast to an integer dtype first, or "
                                                       "divide with /")
                raise self.error(f"'{_SYMBOL[fn]}' needs integer or bool operands, got "
                                 f"{a.type} and {b.type}")
            if dtype is dt.bool and fn not in ("and", "or", "xor", "maximum", "minimum"):
                dtype = dt.int32
            rtype = dtype
        a, b = self.cast(a, dtype), self.cast(b, dtype)
        if a.kind == "const" and b.kind == "const":
            folded = self._fold(fn, a.attrs["value"], b.attrs["value"], rtype)
            if folded is not None:
                return folded
        if fn in COMMUTATIVE and (a.kind == "const", a.id) > (b.kind == "const", b.id):
            a, b = b, a  # canonical order: constants right, older values left (helps CSE)
        if b.kind == "const" and a.type == TileType(rtype, shape) and \
                b.attrs["value"] == IDENTITY.get(fn) and not isinstance(b.attrs["value"], bool) \
                and not (fn == "add" and rtype.is_floating_point):  # -0.0 + 0 is +0.0
            return a  # x + 0, x - 0, x * 1, x / 1
        return self.emit("binary", [a, b], TileType(rtype, shape), fn=fn)

    def _fold(self, fn: str, x: Any, y: Any, dtype: dt.dtype) -> Op | None:
        try:
            value = (COMPARE.get(fn) or ARITH[fn])(x, y)
        except (ArithmeticError, ValueError):
            return None  # leave it to run time, which follows C/IEEE rules
        if dtype is dt.float32:
            value = float(value)
        elif dtype is dt.int32 and not -2**31 <= value < 2**31:
            return None  # wraps at run time exactly as C does
        return self.const(value, dtype)

    def unary(self, fn: str, x: Any) -> Op:
        x = self.value(x)
        dtype = compute_dtype(x.type.dtype)
        if fn in FLOAT_UNARY:
            dtype = dt.float32
        elif fn == "not":
            dtype = dt.bool
        elif fn == "invert" and dtype.is_floating_point:
            raise self.error("'~' needs integer or bool operands")
        elif fn == "neg" and dtype is dt.bool:
            dtype = dt.int32
        x = self.cast(x, dtype if fn != "not" else dt.bool)
        if x.kind == "const" and fn in ("neg", "not", "abs"):
            v = x.attrs["value"]
            return self.const({"neg": operator.neg, "not": operator.not_, "abs": abs}[fn](v),
                              dtype)
        return self.emit("unary", [x], TileType(dtype, x.shape), fn=fn)

    def where(self, cond: Any, a: Any, b: Any) -> Op:
        cond, a, b = self.value(cond), self.value(a), self.value(b)
        shape = self._result_shape(cond, a, b)
        dtype = promote(a.type, b.type)
        return self.emit("where", [self.cast(cond, dt.bool), self.cast(a, dtype),
                                   self.cast(b, dtype)], TileType(dtype, shape))

    def reshape(self, x: Op, shape: tuple[int, ...]) -> Op:
        """Only inserts or removes size-1 dimensions (what x[None, :] and keepdims need)."""
        if [s for s in shape if s != 1] != [s for s in x.shape if s != 1]:
            raise self.error(f"cannot view a tile of shape {x.shape} as {shape}")
        if shape == x.shape:
            return x
        self.check_shape(shape)
        return self.emit("reshape", [x], TileType(x.type.dtype, shape))

    # -- reductions -----------------------------------------------------------------------
    def reduce(self, fn: str, x: Any, axis: int | None, keepdims: bool) -> Op:
        x = self.value(x)
        if x.type.is_scalar:
            raise self.error(f"{fn}() needs a tile, got the scalar {x.type}")
        ndim = len(x.shape)
        if axis is None:
            axes = tuple(range(ndim))
        else:
            if not isinstance(axis, int) or not -ndim <= axis < ndim:
                raise self.error(f"axis {axis} is out of range for a tile of rank {ndim}")
            axes = (axis % ndim,)
        if fn == "mean":
            total = self.reduce("sum", self.cast(x, dt.float32), axis, keepdims)
            count = math.prod(x.shape[a] for a in axes)
            return self.binary("truediv", total, float(count))
        dtype = compute_dtype(x.type.dtype)
        if fn == "sum" and not dtype.is_floating_point:
            dtype = dt.int64  # as torch.sum of integers and bools
        x = self.cast(x, dtype)
        kept = tuple(1 if i in axes else s for i, s in enumerate(x.shape))
        out = self.emit("reduce", [x], TileType(dtype, kept), fn=fn, axes=axes)
        if keepdims:
            return out
        return self.reshape(out, tuple(s for i, s in enumerate(x.shape) if i not in axes))

    def argreduce(self, fn: str, x: Any, axis: int | None, keepdims: bool) -> Op:
        """Index (int64) of the first max/min along `axis`, or of the flattened tile when
        axis is None; the first NaN wins, as in torch."""
        x = self.value(x)
        if x.type.is_scalar:
            raise self.error(f"{fn}() needs a tile, got the scalar {x.type}")
        if axis is None:
            if len(x.shape) != 1:
                raise self.error(f"{fn}() over all axes needs a 1-D tile, got {x.type}",
                                 hint="give axis=")
            axis = 0
        ndim = len(x.shape)
        if not isinstance(axis, int) or not -ndim <= axis < ndim:
            raise self.error(f"axis {axis} is out of range for a tile of rank {ndim}")
        axis %= ndim
        best = self.reduce("max" if fn == "argmax" else "min", x, axis, keepdims=True)
        hit = self.binary("eq", x, best)
        if x.type.dtype.is_floating_point:  # a NaN maximum: the first NaN is the answer
            hit = self.where(self.binary("ne", best, best), self.binary("ne", x, x), hit)
        n = x.shape[axis]
        pos = self.reshape(self.arange(0, n), tuple(n if d == axis else 1 for d in range(ndim)))
        first = self.reduce("min", self.where(hit, pos, n), axis, keepdims)
        return self.cast(first, dt.int64)

    def trans(self, x: Any) -> Op:
        """The transpose of a 2-D tile (a view: no data moves until it is used)."""
        x = self.value(x)
        if len(x.shape) != 2:
            raise self.error(f"transpose needs a 2-D tile, got {x.type}")
        return self.emit("trans", [x], TileType(x.type.dtype, x.shape[::-1]))

    def dot(self, a: Any, b: Any, acc: Any = None) -> Op:
        """a @ b for 2-D tiles [M, K] x [K, N], accumulated in float32 (int32 or int64 for
        integer tiles), plus `acc` if given."""
        a, b = self.value(a), self.value(b)
        if len(a.shape) != 2 or len(b.shape) != 2 or a.shape[1] != b.shape[0]:
            raise self.error(f"dot needs tiles [M, K] and [K, N], got {a.type} and {b.type}",
                             hint="load 2-D tiles; use x.T (tl.trans) to transpose one")
        dtype = promote(a.type, b.type)
        if dtype is dt.bool:
            dtype = dt.int32
        shape = (a.shape[0], b.shape[1])
        operands = [self.cast(a, dtype), self.cast(b, dtype)]
        if acc is not None:
            acc = self.value(acc)
            if broadcast_shapes(acc.shape, shape) != shape:
                raise self.error(f"dot accumulator of shape {acc.shape} does not fit the "
                                 f"result shape {shape}")
            operands.append(self.cast(acc, dtype))
        self.check_shape(shape)
        return self.emit("dot", operands, TileType(dtype, shape))

    # -- memory ---------------------------------------------------------------------------
    def load(self, tensor: Op, index: list[tuple[Op, int | None]], other: Any) -> Op:
        """`index[d]` is (start, size) for a slice or (position, None) for an integer."""
        shape = tuple(size for _, size in index if size is not None)
        self.check_shape(shape)
        dtype = tensor.type.dtype
        other_op = self.cast(self.value(other), compute_dtype(dtype))
        if other_op.kind != "const" or not other_op.type.is_scalar:
            raise self.error("other= must be a scalar constant")
        return self.emit("load", [tensor, *(start for start, _ in index)],
                         TileType(dtype, shape), pure=False,
                         sizes=tuple(size for _, size in index), other=other_op.attrs["value"])

    def store(self, tensor: Op, index: list[tuple[Op, int | None]], value: Any) -> None:
        shape = tuple(size for _, size in index if size is not None)
        value = self.value(value)
        if broadcast_shapes(value.shape, shape) != shape:
            raise self.error(f"cannot store a tile of shape {value.shape} into a slice of "
                             f"shape {shape}")
        dtype = tensor.type.dtype
        value = self.cast(value, dtype if dtype in (dt.float16, dt.bfloat16) else
                          compute_dtype(dtype))
        self.emit("store", [tensor, value, *(start for start, _ in index)], None, pure=False,
                  sizes=tuple(size for _, size in index))


_SYMBOL = {"floordiv": "//", "mod": "%", "and": "&", "or": "|", "xor": "^",
           "lshift": "<<", "rshift": ">>"}
