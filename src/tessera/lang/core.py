"""The kernel language's builtins (`tl.program_id`, `tl.exp`, `tl.sum`, ...).

They are markers: inside a `@tl.kernel` the frontend calls their `build` with the IR
builder; called from plain Python they raise, pointing at `@tl.kernel`.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from tessera.lang.errors import KernelError
from tessera.lang.semantic import Builder
from tessera.runtime import dtype as dt

__all__ = ["abs", "arange", "argmax", "argmin", "cast", "cdiv", "constexpr", "cos", "dot",
           "erf", "exp", "exp2", "full", "gelu", "load", "log", "log2", "max", "maximum",
           "mean", "min", "minimum", "num_programs", "pow", "program_id", "range", "rsqrt",
           "sigmoid", "silu", "sin", "sqrt", "static_range", "sum", "tanh", "trans", "where",
           "zeros"]

_builtin_range = range


class constexpr:
    """Annotation of a kernel parameter whose value is baked in at compile time."""


class Builtin:
    """A function that exists only inside kernels."""

    def __init__(self, name: str, build: Callable[..., Any],
                 python: Callable[..., Any] | None = None):
        self.name = name
        self.build = build
        self.python = python  # what the builtin means outside kernels, if anything
        self.__doc__ = build.__doc__

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        if self.python is not None:
            return self.python(*args, **kwargs)
        raise KernelError(f"tl.{self.name}() can only be used inside a @tl.kernel function",
                          hint="decorate the function with @tessera.lang.kernel and launch "
                               "it as k[grid](...)")

    def __repr__(self) -> str:
        return f"tl.{self.name}"


_REGISTRY: dict[str, Builtin] = {}


def builtin(fn: Callable[..., Any], name: str | None = None, doc: str | None = None
            ) -> Builtin:
    """Register `fn(builder, ...)` as the builtin tl.<name> (default: fn's own name)."""
    name = name or fn.__name__.lstrip("_")
    fn.__doc__ = doc or fn.__doc__
    _REGISTRY[name] = b = Builtin(name, fn)
    return b


def _axis(b: Builder, axis: Any) -> int:
    if axis not in (0, 1, 2):
        raise b.error(f"grid axis must be 0, 1 or 2, got {axis!r}")
    return axis


@builtin
def program_id(b: Builder, axis: int = 0):
    """Index of this program (block) along grid axis 0, 1 or 2."""
    return b.emit("program_id", [], b.const(0, dt.int64).type, axis=_axis(b, axis))


@builtin
def num_programs(b: Builder, axis: int = 0):
    """Number of programs along grid axis 0, 1 or 2."""
    return b.emit("num_programs", [], b.const(0, dt.int64).type, axis=_axis(b, axis))


@builtin
def arange(b: Builder, start: int, stop: int | None = None):
    """int32 tile [start, start+1, ..., stop-1] (compile-time bounds)."""
    if stop is None:
        start, stop = 0, start
    if not (isinstance(start, int) and isinstance(stop, int)):
        raise b.error("arange bounds must be compile-time integers",
                      hint="use tl.constexpr parameters; add a run-time offset afterwards")
    return b.arange(start, stop)


def _shape(b: Builder, shape: Any) -> tuple[int, ...]:
    shape = (shape,) if isinstance(shape, int) else tuple(shape)
    b.check_shape(shape)
    return shape


@builtin
def zeros(b: Builder, shape, dtype=dt.float32):
    """A tile of zeros."""
    return b.full(_shape(b, shape), 0, dt.as_dtype(dtype))


@builtin
def full(b: Builder, shape, value, dtype=dt.float32):
    """A tile filled with a compile-time constant."""
    if not isinstance(value, (int, float, bool)):
        raise b.error("tl.full needs a constant fill value; for a run-time value write "
                      "tl.zeros(shape) + value")
    return b.full(_shape(b, shape), value, dt.as_dtype(dtype))


@builtin
def where(b: Builder, cond, x, y):
    """Elementwise select, broadcasting all three."""
    return b.where(cond, x, y)


@builtin
def maximum(b: Builder, x, y):
    """Elementwise max; NaN if either is NaN (as torch.maximum)."""
    return b.binary("maximum", x, y)


@builtin
def minimum(b: Builder, x, y):
    """Elementwise min; NaN if either is NaN (as torch.minimum)."""
    return b.binary("minimum", x, y)


@builtin
def pow(b: Builder, x, y):
    """x ** y in float32."""
    return b.binary("pow", b.cast(b.value(x), dt.float32), b.cast(b.value(y), dt.float32))


def _unary(name: str, doc: str) -> Builtin:
    return builtin(lambda b, x: b.unary(name, x), name, doc)


exp = _unary("exp", "e ** x")
exp2 = _unary("exp2", "2 ** x")
log = _unary("log", "natural logarithm")
log2 = _unary("log2", "base-2 logarithm")
sqrt = _unary("sqrt", "square root")
rsqrt = _unary("rsqrt", "1 / sqrt(x)")
abs = _unary("abs", "absolute value")
tanh = _unary("tanh", "hyperbolic tangent")
sigmoid = _unary("sigmoid", "1 / (1 + exp(-x))")
erf = _unary("erf", "the error function")
sin = _unary("sin", "sine")
cos = _unary("cos", "cosine")
silu = _unary("silu", "x * sigmoid(x)")


@builtin
def gelu(b: Builder, x, approximate: str = "none"):
    """GELU, exact (erf) or approximate='tanh', as torch.nn.functional.gelu."""
    if approximate not in ("none", "tanh"):
        raise b.error(f"gelu approximate must be 'none' or 'tanh', got {approximate!r}")
    return b.unary("gelu_erf" if approximate == "none" else "gelu_tanh", x)


def _reduction(name: str, doc: str) -> Builtin:
    method = "argreduce" if name.startswith("arg") else "reduce"

    def build(b: Builder, x, axis=None, keepdims: bool = False):
        return getattr(b, method)(name, x, axis, keepdims)
    return builtin(build, name, doc)


sum = _reduction("sum", "sum over `axis` (all axes if None)")
max = _reduction("max", "maximum over `axis`; NaN if any element is NaN")
min = _reduction("min", "minimum over `axis`; NaN if any element is NaN")
mean = _reduction("mean", "mean over `axis`, in float32")
argmax = _reduction("argmax", "int64 index of the first maximum along `axis` (NaN wins)")
argmin = _reduction("argmin", "int64 index of the first minimum along `axis` (NaN wins)")


@builtin
def dot(b: Builder, x, y, acc=None):
    """Matrix product of 2-D tiles [M, K] @ [K, N] with float32 accumulation, plus acc."""
    return b.dot(x, y, acc)


@builtin
def trans(b: Builder, x):
    """Transpose of a 2-D tile (also written x.T)."""
    return b.trans(x)


def _cdiv(x: int, y: int) -> int:
    return -(-x // y)


@builtin
def cdiv(b: Builder, x, y):
    """Ceiling division of integers (also usable outside kernels, for grids)."""
    if isinstance(x, int) and isinstance(y, int):
        return _cdiv(x, y)
    return b.binary("floordiv", b.binary("sub", b.binary("add", x, y), 1), y)


cdiv.python = _cdiv


@builtin
def cast(b: Builder, x, dtype):
    """x converted to `dtype` (rounded to it for float16/bfloat16)."""
    return b.cast(b.value(x), dt.as_dtype(dtype))


class range:
    """`for i in tl.range(start, stop, step, unroll=N)`: a run-time loop with hints."""

    def __init__(self, *args: Any, unroll: int | None = None, pipeline: int | None = None):
        self.args, self.unroll, self.pipeline = args, unroll, pipeline


class static_range:
    """`for i in tl.static_range(n)`: unrolled at compile time; `i` is a constant."""

    def __init__(self, *args: int):
        self.values = _builtin_range(*args)


# `load` is handled by the frontend itself: its first argument must be a tensor slice.
load = Builtin("load", lambda *a, **k: None)
load.__doc__ = "tl.load(x[slices], other=v): a masked load whose out-of-range elements are v."
_REGISTRY["load"] = load
