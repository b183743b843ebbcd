"""Elementwise ops with numpy broadcasting and torch's type promotion.

Each op is a tile function (`@tl.kernel` returning a value) in one of three tables, by
arity; three generic kernels apply a table entry to the tiles of this program. Operands
are broadcast by stride 0 and their dims coalesced (`_launch.coalesce`), so almost every
call is a rank-1 or rank-2 launch: a handful of specializations per op and dtype, whatever
the shapes. The graph compiler fuses chains of these same tile functions.
"""

from __future__ import annotations

from typing import Any

import torch

import tessera.lang as tl
from tessera.errors import DtypeError, ShapeError
from tessera.lang.jit import Specialization
from tessera.ops import _fastpath
from tessera.ops._launch import (
    KERNEL_DTYPES,
    ArgumentError,
    check_dtype,
    coalesce,
    launch,
    ldtype,
    spec,
)
from tessera.ops.registry import op

ALL = tuple(KERNEL_DTYPES)
NUMERIC = tuple(d for d in ALL if d != torch.bool)
INTS = (torch.int8, torch.uint8, torch.int32, torch.int64)
_ALL_NAMES = tuple(str(d).removeprefix("torch.") for d in ALL)


# -- tile functions: (x, s0, s1) for unary ops, (x, y, s0) for binary, (c, x, y) for where
@tl.kernel
def _neg(x, s0, s1):
    return -x


@tl.kernel
def _abs(x, s0, s1):
    return tl.abs(x)


@tl.kernel
def _exp(x, s0, s1):
    return tl.exp(x)


@tl.kernel
def _log(x, s0, s1):
    return tl.log(x)


@tl.kernel
def _sqrt(x, s0, s1):
    return tl.sqrt(x)


@tl.kernel
def _rsqrt(x, s0, s1):
    return tl.rsqrt(x)


@tl.kernel
def _tanh(x, s0, s1):
    return tl.tanh(x)


@tl.kernel
def _sigmoid(x, s0, s1):
    return tl.sigmoid(x)


@tl.kernel
def _erf(x, s0, s1):
    return tl.erf(x)


@tl.kernel
def _sin(x, s0, s1):
    return tl.sin(x)


@tl.kernel
def _cos(x, s0, s1):
    return tl.cos(x)


@tl.kernel
def _relu(x, s0, s1):
    return tl.where(x > 0, x, tl.where(x != x, x, 0))  # NaN stays NaN, as torch's


@tl.kernel
def _gelu(x, s0, s1):
    return tl.gelu(x)


@tl.kernel
def _gelu_tanh(x, s0, s1):
    return tl.gelu(x, approximate="tanh")


@tl.kernel
def _silu(x, s0, s1):
    return tl.silu(x)


@tl.kernel
def _clamp(x, s0, s1):
    return tl.minimum(tl.maximum(x, s0), s1)


@tl.kernel
def _clamp_min(x, s0, s1):
    return tl.maximum(x, s0)


@tl.kernel
def _clamp_max(x, s0, s1):
    return tl.minimum(x, s1)


@tl.kernel
def _logical_not(x, s0, s1):
    return x == 0


@tl.kernel
def _copy(x, s0, s1):
    return x


@tl.kernel
def _add(x, y, s0):
    return x + y


@tl.kernel
def _add_alpha(x, y, s0):
    return x + y * s0


@tl.kernel
def _sub(x, y, s0):
    return x - y


@tl.kernel
def _sub_alpha(x, y, s0):
    return x - y * s0


@tl.kernel
def _mul(x, y, s0):
    return x * y


@tl.kernel
def _div(x, y, s0):
    return x / y


@tl.kernel
def _pow(x, y, s0):
    return tl.pow(x, y)


@tl.kernel
def _maximum(x, y, s0):
    return tl.maximum(x, y)


@tl.kernel
def _minimum(x, y, s0):
    return tl.minimum(x, y)


@tl.kernel
def _eq(x, y, s0):
    return x == y


@tl.kernel
def _ne(x, y, s0):
    return x != y


@tl.kernel
def _lt(x, y, s0):
    return x < y


@tl.kernel
def _le(x, y, s0):
    return x <= y


@tl.kernel
def _gt(x, y, s0):
    return x > y


@tl.kernel
def _ge(x, y, s0):
    return x >= y


@tl.kernel
def _logical_and(x, y, s0):
    return (x != 0) & (y != 0)


@tl.kernel
def _logical_or(x, y, s0):
    return (x != 0) | (y != 0)


@tl.kernel
def _logical_xor(x, y, s0):
    return (x != 0) ^ (y != 0)


@tl.kernel
def _where(c, x, y):
    return tl.where(c, x, y)


@tl.kernel
def _fma(x, y, z):
    return x * y + z


UNARY = {k.__name__[1:]: k for k in (
    _neg, _abs, _exp, _log, _sqrt, _rsqrt, _tanh, _sigmoid, _erf, _sin, _cos, _relu, _gelu,
    _gelu_tanh, _silu, _clamp, _clamp_min, _clamp_max, _logical_not, _copy)}
BINARY = {k.__name__[1:]: k for k in (
    _add, _add_alpha, _sub, _sub_alpha, _mul, _div, _pow, _maximum, _minimum, _eq, _ne, _lt,
    _le, _gt, _ge, _logical_and, _logical_or, _logical_xor)}
TERNARY = {"where": _where, "fma": _fma}


# -- the generic kernels: this program's tile of each operand, by coalesced rank ---------
@tl.kernel
def _tile(t, RANK: tl.constexpr, CT: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr):
    j = tl.program_id(0) * BN
    if RANK == 1:
        v = t[j:j + BN]
    elif RANK == 2:
        i = tl.program_id(1) * BM
        v = t[i:i + BM, j:j + BN]
    else:
        i = tl.program_id(1) * BM
        v = t[tl.program_id(2), i:i + BM, j:j + BN]
    return v.to(CT)


@tl.kernel
def _put(t, v, RANK: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr):
    j = tl.program_id(0) * BN
    if RANK == 1:
        t[j:j + BN] = v
    elif RANK == 2:
        i = tl.program_id(1) * BM
        t[i:i + BM, j:j + BN] = v
    else:
        i = tl.program_id(1) * BM
        t[tl.program_id(2), i:i + BM, j:j + BN] = v


@tl.kernel
def unary_kernel(x, out, s0, s1, FN: tl.constexpr, CT: tl.constexpr, RANK: tl.constexpr,
                 BM: tl.constexpr, BN: tl.constexpr):
    _put(out, UNARY[FN](_tile(x, RANK, CT, BM, BN), s0, s1), RANK, BM, BN)


@tl.kernel
def binary_kernel(x, y, out, s0, FN: tl.constexpr, CT: tl.constexpr, RANK: tl.constexpr,
                  BM: tl.constexpr, BN: tl.constexpr):
    _put(out, BINARY[FN](_tile(x, RANK, CT, BM, BN), _tile(y, RANK, CT, BM, BN), s0),
         RANK, BM, BN)


@tl.kernel
def ternary_kernel(c, x, y, out, FN: tl.constexpr, CT: tl.constexpr, RANK: tl.constexpr,
                   BM: tl.constexpr, BN: tl.constexpr):
    first = tl.bool if FN == "where" else CT  # where's condition stays a condition
    _put(out, TERNARY[FN](_tile(c, RANK, first, BM, BN), _tile(x, RANK, CT, BM, BN),
                          _tile(y, RANK, CT, BM, BN)), RANK, BM, BN)


_KERNELS = {1: unary_kernel, 2: binary_kernel, 3: ternary_kernel}
_BLOCK = 2048  # elements per program


def _blocks(sizes: list[int]) -> tuple[int, int]:
    """(BM, BN): the tile over the last two coalesced dims, about _BLOCK elements."""
    if len(sizes) == 1:
        return 1, _BLOCK
    bn = min(1024, 1 << max(sizes[-1] - 1, 0).bit_length())
    return max(1, _BLOCK // bn), bn


def _compute_dtype(d: torch.dtype) -> Any:
    """What the kernel computes in for results of dtype `d`: floats in float32, integers
    without a kernel dtype (int16, from uint8 with int8) in int32, which holds them."""
    return tl.float32 if d.is_floating_point else ldtype(d) if d in KERNEL_DTYPES \
        else tl.int32


def run(fn: str, operands: list[torch.Tensor], out_dtype: torch.dtype,
        scalars: tuple[Any, ...] = (), compute: torch.dtype | None = None,
        name: str = "") -> torch.Tensor:
    """Apply table entry `fn` to broadcast `operands`; a new contiguous tensor of
    `out_dtype`. `compute` (default: out_dtype) decides the compute dtype. The native
    fast path replays dense launches of `fn` with these `scalars`: ops whose scalars vary
    per call (alpha, clamp's bounds) must not name `fn`'s table in their `fast`."""
    if out_dtype not in KERNEL_DTYPES:
        raise DtypeError(f"{name}: the result would be {str(out_dtype).removeprefix('torch.')}"
                         " (torch's promotion of the inputs), which the kernels do not hold",
                         hint="convert the inputs to one dtype first")
    x = operands[0]
    shape = x.shape
    if all(t.shape == shape and t.is_contiguous() for t in operands):  # the common case
        out = torch.empty(shape, dtype=out_dtype)
        n = out.numel()
        if n == 0:
            return out
        sizes, coalesced = [n], [[1]] * (len(operands) + 1)
    else:
        if any(t.shape != shape for t in operands):
            shape = _broadcast(operands, name)
        out = torch.empty(shape, dtype=out_dtype)
        if out.numel() == 0:
            return out
        strides = [_broadcast_strides(t, shape) for t in operands]
        sizes, coalesced = coalesce(shape, [*strides, out.stride()])
        if len(sizes) > 3:  # rare: walk the leading dim in Python
            return _leading(fn, operands, out, scalars, compute, name)
    rank = len(sizes)
    bm, bn = _blocks(sizes)
    units = tuple(s[-1] == 1 for s in coalesced)
    key = (fn, rank, bm, bn, units, tuple(type(s) for s in scalars), compute, out_dtype,
           *(t.dtype for t in operands))
    s = _SPECS.get(key) or _specialize(key, fn, operands, out_dtype, scalars, compute,
                                       rank, bm, bn, units)
    flat: list[Any] = []
    for t, st in zip([*operands, out], coalesced, strict=True):
        flat += (t.data_ptr(), *sizes, *st)
    grid = (-(-sizes[-1] // bn), -(-sizes[-2] // bm) if rank > 1 else 1,
            sizes[0] if rank == 3 else 1)
    launch(s, grid, *flat, *scalars)
    return out


_SPECS: dict[tuple, Specialization] = {}


def _specialize(key: tuple, fn: str, operands: list[torch.Tensor], out_dtype: torch.dtype,
                scalars: tuple[Any, ...], compute: torch.dtype | None, rank: int, bm: int,
                bn: int, units: tuple[bool, ...]) -> Specialization:
    dtypes = [*(t.dtype for t in operands), out_dtype]
    specs = [spec(d, rank, u) for d, u in zip(dtypes, units, strict=True)]
    s = _SPECS[key] = _KERNELS[len(operands)].specialize(
        *specs, *scalars, FN=fn, CT=_compute_dtype(compute or out_dtype), RANK=rank, BM=bm,
        BN=bn)
    if rank == 1 and all(units):  # what the native fast path runs for dense operands
        _fastpath.add_plan(fn, s.address, tuple(dtypes[:-1]), out_dtype, bn, scalars)
    return s


def _broadcast(operands: list[torch.Tensor], name: str) -> torch.Size:
    try:
        return torch.broadcast_shapes(*(t.shape for t in operands))
    except RuntimeError:
        raise ShapeError(f"{name}: shapes {', '.join(str(tuple(t.shape)) for t in operands)} "
                         "do not broadcast", hint="dims must match or be 1, aligned from "
                                                  "the right") from None


def _broadcast_strides(t: torch.Tensor, shape: torch.Size) -> list[int]:
    pad = len(shape) - t.dim()
    st = [0] * pad + list(t.stride())
    for d, n in enumerate(t.shape):
        if n == 1:
            st[pad + d] = 0
    return st


def _leading(fn: str, operands: list[torch.Tensor], out: torch.Tensor,
             scalars: tuple[Any, ...], compute: torch.dtype | None, name: str
             ) -> torch.Tensor:
    """Operands that coalesce to more than 3 dims: one launch per index of dim 0."""
    full = [t.expand(out.shape) for t in operands]
    for i in range(out.shape[0]):
        part = run(fn, [t[i] for t in full], out.dtype, scalars, compute, name)
        out[i].copy_(part)
    return out


# -- type promotion ------------------------------------------------------------------------
_RESULT: dict[tuple, torch.dtype] = {}


def result_type(*xs: torch.Tensor) -> torch.dtype:
    """torch's promotion of these tensors (0-dim ones as weak scalars), cached by kind."""
    key = tuple((x.dtype, x.dim() == 0) for x in xs)
    r = _RESULT.get(key)
    if r is None:
        probes = [torch.zeros(() if zero else (1,), dtype=d) for d, zero in key]
        r = probes[0].dtype
        for i, p in enumerate(probes[1:], 1):  # fold, keeping "some operand has dims"
            dims = any(q.dim() for q in probes[:i])
            r = torch.result_type(torch.zeros((1,) if dims else (), dtype=r), p)
        _RESULT[key] = r
    return r


def _checked(x: Any, name: str, arg: str) -> torch.Tensor:
    """A CPU tensor of a kernel dtype: Python numbers become 0-dim tensors."""
    if not isinstance(x, torch.Tensor):
        if isinstance(x, (bool, int, float)):
            return torch.tensor(x)
        raise DtypeError(f"{name}: argument {arg!r} must be a tensor or a number, got "
                         f"{type(x).__name__}")
    if not x.is_cpu:
        from tessera.ops._launch import check_tensor
        check_tensor(x, name, arg, ALL)
    check_dtype(x.dtype, name, arg, ALL)
    return x


def _float_result(d: torch.dtype) -> torch.dtype:
    return d if d.is_floating_point else torch.float32


# -- ops -------------------------------------------------------------------------------------
def _aten(name: str, *overloads: str) -> tuple[Any, ...]:
    """The aten overloads `name.<overload>` that exist: what the graph compiler lowers."""
    packet = getattr(torch.ops.aten, name)
    return tuple(getattr(packet, o) for o in overloads if o in packet.overloads())


def _unary_op(name: str, ref: Any, doc: str, result: str) -> None:
    """Register a one-input op `name(Tensor x) -> Tensor` whose result dtype is the
    input's ("same"), float32 for integer inputs ("float", as torch's exp), or bool."""

    def impl(x: torch.Tensor) -> torch.Tensor:
        x = _checked(x, name, "x")
        out = torch.bool if result == "bool" else _float_result(x.dtype) \
            if result == "float" else x.dtype
        if name in ("neg", "abs", "relu") and x.dtype == torch.bool:
            raise DtypeError(f"{name}: bool tensors are not supported",
                             hint="use logical_not, or convert to an integer dtype first")
        return run(name, [x], out, (0.0, 0.0), name=name)

    impl.__doc__ = doc
    impl.__name__ = name
    op(f"{name}(Tensor x) -> Tensor", kind="pointwise", reference=ref, dtypes=_ALL_NAMES,
       tile=UNARY[name], implements=_aten(name, "default"), fast=f"_pw(@{name}, x)")(impl)


for _name, _ref, _result, _doc in [
    ("neg", torch.neg, "same", "-x"),
    ("abs", torch.abs, "same", "|x|"),
    ("exp", torch.exp, "float", "e^x"),
    ("log", torch.log, "float", "natural logarithm"),
    ("sqrt", torch.sqrt, "float", "square root"),
    ("rsqrt", torch.rsqrt, "float", "1 / sqrt(x)"),
    ("tanh", torch.tanh, "float", "hyperbolic tangent"),
    ("sigmoid", torch.sigmoid, "float", "1 / (1 + e^-x)"),
    ("erf", torch.erf, "float", "the error function"),
    ("sin", torch.sin, "float", "sine"),
    ("cos", torch.cos, "float", "cosine"),
    ("relu", torch.relu, "same", "max(x, 0) (NaN stays NaN)"),
    ("silu", torch.nn.functional.silu, "float", "x * sigmoid(x)"),
    ("logical_not", torch.logical_not, "bool", "x == 0, as bool"),
]:
    _unary_op(_name, _ref, _doc, _result)


@op("gelu(Tensor x, *, str approximate='none') -> Tensor", kind="pointwise",
    reference=lambda x, *, approximate="none": torch.nn.functional.gelu(
        x, approximate=approximate), dtypes=("float32", "bfloat16", "float16"),
    tile=UNARY["gelu"], implements=_aten("gelu", "default"),
    fast="_pw(@gelu, x) if approximate == 'none' else "
         "_pw(@gelu_tanh, x) if approximate == 'tanh' else None")
def gelu(x: torch.Tensor, *, approximate: str = "none") -> torch.Tensor:
    """GELU, exact (erf) or approximate='tanh', as torch.nn.functional.gelu."""
    if approximate not in ("none", "tanh"):
        raise ArgumentError(f"gelu: approximate={approximate!r}; it takes 'none' or 'tanh'")
    x = _checked(x, "gelu", "x")
    check_dtype(x.dtype, "gelu", "x", (torch.float32, torch.bfloat16, torch.float16))
    return run("gelu" if approximate == "none" else "gelu_tanh", [x], x.dtype, (0.0, 0.0),
               name="gelu")


@op("clamp(Tensor x, Scalar? min=None, Scalar? max=None) -> Tensor", kind="pointwise",
    reference=lambda x, min=None, max=None: torch.clamp(x, min, max), tile=UNARY["clamp"],
    dtypes=_ALL_NAMES[:-1], implements=_aten("clamp", "default"))
def clamp(x: torch.Tensor, min: Any = None, max: Any = None) -> torch.Tensor:
    """min(max(x, min), max), either bound optional; NaN in x or a bound gives NaN."""
    x = _checked(x, "clamp", "x")
    if min is None and max is None:
        raise ArgumentError("clamp: at least one of min and max must be given")
    bounds = [b for b in (min, max) if b is not None]
    for b in bounds:
        if not isinstance(b, (bool, int, float)):
            raise DtypeError(f"clamp: bounds must be numbers, got {type(b).__name__}")
    out = result_type(x, *(torch.tensor(b) for b in bounds))
    check_dtype(out, "clamp", "x", NUMERIC)
    kind = float if out.is_floating_point else int
    lo = kind(min) if min is not None else kind(0)
    hi = kind(max) if max is not None else kind(0)
    if kind is int and out != torch.bool:
        lo, hi = _int_bound(lo, out), _int_bound(hi, out)
    fn = "clamp" if min is not None and max is not None else \
        "clamp_min" if min is not None else "clamp_max"
    return run(fn, [x], out, (lo, hi), name="clamp")


def _int_bound(b: int, dtype: torch.dtype) -> int:
    """A clamp bound in an integer dtype as torch converts it: an unsigned type takes
    -max..max (negatives wrap: -1 is 255 in uint8), a signed one its own range; beyond
    that torch refuses the bound, and so do we."""
    info = torch.iinfo(dtype)
    if not (-info.max if info.min == 0 else info.min) <= b <= info.max:
        raise ArgumentError(f"clamp: bound {b} does not fit in {dtype}",
                            hint="use a bound in the tensor's range or convert the tensor")
    return b % (info.max + 1) if info.min == 0 else b


def _binary_op(name: str, ref: Any, doc: str, *, kind: str = "arith",
               alpha: bool = False) -> None:
    """Register `name(Tensor x, Tensor other) -> Tensor` (`alpha`: and `Scalar alpha=1`).
    kind: "arith" (promoted result), "div" (float result), "compare" and "logical" (bool)."""
    schema = f"{name}(Tensor x, Tensor other" + (", *, Scalar alpha=1" if alpha else "") + \
        ") -> Tensor"

    def impl(x: torch.Tensor, other: torch.Tensor, **kw: Any) -> torch.Tensor:
        x, y = _checked(x, name, "x"), _checked(other, name, "other")
        promoted = result_type(x, y)
        if kind in ("compare", "logical"):
            out, compute = torch.bool, promoted
        elif kind == "div":
            out = compute = _float_result(promoted)
        else:
            out = compute = promoted
            if out == torch.bool and name in ("sub", "pow"):  # add is or, mul is and
                raise DtypeError(f"{name}: bool tensors are not supported",
                                 hint="convert to an integer dtype first")
            if name == "pow" and not out.is_floating_point:
                raise DtypeError("pow: integer powers are not supported; use float tensors")
        if kind == "logical":
            compute = torch.bool
        fn, scalars = name, (0.0,)
        a = kw.get("alpha", 1)
        if alpha and a != 1:
            if not isinstance(a, (bool, int, float)) or (
                    isinstance(a, float) and not out.is_floating_point):
                raise ArgumentError(f"{name}: alpha={a!r} must be a number of the result's "
                                    "kind (an int for integer tensors)")
            fn, scalars = f"{name}_alpha", (float(a) if out.is_floating_point else int(a),)
        return run(fn, [x, y], out, scalars, compute, name)

    impl.__doc__ = doc
    impl.__name__ = name
    reference = (lambda x, other, *, alpha=1: ref(x, other, alpha=alpha)) if alpha else ref
    fast = f"_pw(@{name}, x, other)" + (" if alpha == 1 else None" if alpha else "")
    op(schema, kind="pointwise", reference=reference, dtypes=_ALL_NAMES, tile=BINARY[name],
       implements=_aten(name, "Tensor", "Scalar"), fast=fast)(impl)


for _name, _ref, _kind, _alpha, _doc in [
    ("add", torch.add, "arith", True, "x + alpha * other"),
    ("sub", torch.sub, "arith", True, "x - alpha * other"),
    ("mul", torch.mul, "arith", False, "x * other"),
    ("div", torch.div, "div", False, "x / other (true division: float results)"),
    ("pow", torch.pow, "arith", False, "x ** other, for float tensors"),
    ("maximum", torch.maximum, "arith", False, "elementwise max (NaN if either is NaN)"),
    ("minimum", torch.minimum, "arith", False, "elementwise min (NaN if either is NaN)"),
    ("eq", torch.eq, "compare", False, "x == other"),
    ("ne", torch.ne, "compare", False, "x != other"),
    ("lt", torch.lt, "compare", False, "x < other"),
    ("le", torch.le, "compare", False, "x <= other"),
    ("gt", torch.gt, "compare", False, "x > other"),
    ("ge", torch.ge, "compare", False, "x >= other"),
    ("logical_and", torch.logical_and, "logical", False, "x != 0 and other != 0"),
    ("logical_or", torch.logical_or, "logical", False, "x != 0 or other != 0"),
    ("logical_xor", torch.logical_xor, "logical", False, "exactly one of x, other non-zero"),
]:
    _binary_op(_name, _ref, _doc, kind=_kind, alpha=_alpha)


@op("where(Tensor condition, Tensor x, Tensor other) -> Tensor", kind="pointwise",
    reference=torch.where, dtypes=_ALL_NAMES, tile=TERNARY["where"],
    implements=_aten("where", "self"), fast="_pw(@where, condition, x, other)")
def where(condition: torch.Tensor, x: torch.Tensor, other: torch.Tensor) -> torch.Tensor:
    """x where condition, else other (all three broadcast)."""
    c = _checked(condition, "where", "condition")
    if c.dtype != torch.bool:
        raise DtypeError(f"where: condition must be bool, got {str(c.dtype)[6:]}",
                         hint="compare it first, e.g. mask != 0")
    x, y = _checked(x, "where", "x"), _checked(other, "where", "other")
    out = result_type(x, y)
    return run("where", [c, x, y], out, (), name="where")


@op("contiguous(Tensor x) -> Tensor", kind="shape", reference=lambda x: x.contiguous().clone(),
    dtypes=_ALL_NAMES, implements=_aten("clone", "default"))
def contiguous(x: torch.Tensor) -> torch.Tensor:
    """A new contiguous copy of x (any strides, any dtype the kernels hold)."""
    x = _checked(x, "contiguous", "x")
    return run("copy", [x], x.dtype, (0.0, 0.0), name="contiguous")

