"""`@tl.kernel`: specialize on argument dtypes, ranks and constexprs, compile through the
runtime toolchain, and launch as `k[grid](*args)` on tessera, torch or numpy tensors.

Launching is on the hot path of small kernels, so it avoids `inspect` and ctypes:
arguments are bound by hand and handed to the native launcher (runtime/cpu/launch.py),
which packs them into the 8-byte slots the generated entry point unpacks (codegen/c.py)."""

from __future__ import annotations

import ctypes
import inspect
import os
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, NamedTuple

import numpy as np

from tessera.errors import DtypeError
from tessera.lang import core
from tessera.lang.binder import make_fast_launcher
from tessera.lang.codegen.c import ENTRY, CPrinter
from tessera.lang.errors import LaunchError
from tessera.lang.frontend import trace, whole_slices
from tessera.lang.passes import dce
from tessera.lang.types import TensorType, TileType
from tessera.runtime import dtype as dt
from tessera.runtime.cpu.launch import launcher
from tessera.runtime.tensor import Tensor, as_tensor, contiguous_strides, element_span
from tessera.runtime.toolchain import compile_c

__all__ = ["Kernel", "Specialization", "TensorSpec", "kernel"]

_TORCH_DTYPES: dict[Any, dt.dtype] = {}  # torch.dtype -> dtype, filled on first sight


class TensorSpec(NamedTuple):
    """A tensor argument described rather than given, for `Kernel.specialize`: compile for
    this dtype, rank and layout (`strides` None: contiguous) without any memory."""

    dtype: dt.dtype
    shape: tuple[int, ...]
    strides: tuple[int, ...] | None = None


class _Arg(NamedTuple):
    """One tensor argument, reduced to what the generated code needs, and the bytes
    [lo, hi) its elements occupy (to detect outputs that alias inputs)."""

    ptr: int
    shape: tuple[int, ...]
    strides: tuple[int, ...]
    dtype: dt.dtype
    readonly: bool
    lo: int
    hi: int
    dense: bool  # known to be contiguous (so no two elements share memory)


def _span(ptr: int, shape: Sequence[int], strides: Sequence[int], itemsize: int
          ) -> tuple[int, int]:
    """[first byte, last byte + 1) of the memory a tensor's elements occupy."""
    if 0 in shape:
        return ptr, ptr
    lo, hi = element_span(shape, strides)
    return ptr + lo * itemsize, ptr + (hi + 1) * itemsize


MAX_FAST_LAUNCHERS = 4  # signatures per kernel with a generated launcher
_new_arg = tuple.__new__
_TORCH_TYPES: set[type] = set()  # torch.Tensor and subclasses seen so far
_TORCH_DTYPES: dict[Any, dt.dtype] = {}  # torch.dtype -> dtype, filled on first sight


def _tensor_arg(x: Any, name: str) -> _Arg | None:
    """The tensor behind `x` (torch, tessera, numpy, DLPack), or None if it is no tensor."""
    t = type(x)
    if t in _TORCH_TYPES or (t.__module__.startswith("torch") and hasattr(x, "data_ptr")):
        _TORCH_TYPES.add(t)
        if not x.is_cpu:
            raise LaunchError(f"argument {name!r} is on {x.device}; Tessera's CPU kernels "
                              "need CPU tensors", hint="move it with .cpu()")
        d = _TORCH_DTYPES.get(x.dtype)
        if d is None:
            d = _TORCH_DTYPES[x.dtype] = dt.as_dtype(x.dtype)
        ptr, shape, strides = x.data_ptr(), x.shape, x.stride()
        if x.is_contiguous():  # (_new_arg: the NamedTuple without its slow __new__)
            return _new_arg(_Arg, (ptr, shape, strides, d, False, ptr,
                                   ptr + x.numel() * d.itemsize, True))
        return _Arg(ptr, shape, strides, d, False, *_span(ptr, shape, strides, d.itemsize),
                    False)
    if t is TensorSpec:
        strides = x.strides if x.strides is not None else contiguous_strides(x.shape)
        return _Arg(0, tuple(x.shape), tuple(strides), dt.as_dtype(x.dtype), False, 0, 0, True)
    if t is Tensor or t is np.ndarray or hasattr(x, "__dlpack__"):
        x = x if t is Tensor else as_tensor(x)
        ptr = x.data_ptr()
        return _Arg(ptr, x.shape, x.strides, x.dtype, x.readonly,
                    *_span(ptr, x.shape, x.strides, x.dtype.itemsize), False)
    return None


def _is_constexpr(annotation: Any) -> bool:
    return annotation is core.constexpr or (isinstance(annotation, str) and
                                            annotation.split(".")[-1] == "constexpr")


@dataclass(eq=False)
class Specialization:
    """One compiled specialization: the native entry point (run it with
    `runtime.cpu.launch.launcher()(address, grid0, grid1, grid2, *args)`, the arguments
    flattened as the general launcher does: each tensor as its data pointer, sizes and
    strides in elements, each scalar as an int or float, constexprs left out)."""

    address: int  # of the entry point (see runtime/cpu/launch.py)
    source: str
    ir: str
    writes: frozenset[str]  # tensor parameters the kernel stores into
    restrict: bool  # compiled assuming no output aliases another argument


class Kernel:
    """A kernel-language function. Launch with `k[grid](*args)`; inspect with
    `k.source(*args)` (the C it compiles to) and `k.ir(*args)` (the tile IR)."""

    def __init__(self, fn: Callable[..., Any]):
        self.fn = fn
        self.signature = inspect.signature(fn)
        params = list(self.signature.parameters.values())
        for p in params:
            if p.kind not in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY):
                raise LaunchError(f"kernel {fn.__name__}: *args and **kwargs parameters are "
                                  "not supported", where=_where(fn))
        self.names = [p.name for p in params]
        self.defaults = {p.name: p.default for p in params if p.default is not p.empty}
        self.constexprs = {p.name for p in params if _is_constexpr(p.annotation)}
        self._is_constexpr = [n in self.constexprs for n in self.names]
        self._name_set = frozenset(self.names)
        self._whole: dict[str, frozenset[int]] | None = None  # parsed at first launch
        self.where = _where(fn)
        self._compiled: dict[tuple, Specialization] = {}
        self._fast: list[Callable[..., bool]] = []  # see binder.py
        self._fast_for: list[Specialization] = []
        self.__doc__, self.__name__ = fn.__doc__, fn.__name__

    def __repr__(self) -> str:
        return f"<tessera kernel {self.fn.__qualname__} at {self.where}>"

    def __call__(self, *args: Any, **kwargs: Any) -> None:
        raise LaunchError(f"kernel {self.fn.__name__} needs a grid: launch it as "
                          f"{self.fn.__name__}[grid](...)", where=self.where,
                          hint="grid is a tuple of up to 3 program counts, e.g. "
                               "(tl.cdiv(n, BLOCK),)")

    def __getitem__(self, grid: Any) -> Callable[..., None]:
        def launch(*args: Any, **kwargs: Any) -> None:
            for fast in self._fast:
                try:
                    if fast(grid, *args, **kwargs):
                        return
                except TypeError:
                    break  # arguments that do not bind: the general path explains
            self.launch(grid, args, kwargs)
        return launch

    # -- binding and specialization --------------------------------------------------------
    def bind(self, args: Sequence[Any], kwargs: dict[str, Any]) -> dict[str, Any]:
        """Arguments by parameter name, defaults applied (what a grid callable receives)."""
        names = self.names
        if len(args) == len(names) and not kwargs:
            return dict(zip(names, args, strict=True))
        if len(args) + len(kwargs) == len(names):  # every parameter given once, presumably
            values = dict(zip(names, args, strict=False))
            values.update(kwargs)
            if values.keys() == self._name_set:  # else the general path says what is wrong
                return {n: values[n] for n in names}  # in parameter order: the C ABI's
        if len(args) > len(names):
            raise self._arity(f"takes {len(names)} arguments but {len(args)} were given")
        values = dict(zip(names, args, strict=False))
        for k, v in kwargs.items():
            if k not in names:
                raise self._arity(f"got an unexpected argument {k!r}")
            if k in values:
                raise self._arity(f"got multiple values for argument {k!r}")
            values[k] = v
        missing = [n for n in names if n not in values and n not in self.defaults]
        if missing:
            raise self._arity(f"missing argument(s) {', '.join(map(repr, missing))}")
        return {n: values[n] if n in values else self.defaults[n] for n in names}

    def _arity(self, message: str) -> LaunchError:
        return LaunchError(f"kernel {self.fn.__name__} {message}", where=self.where,
                           hint=f"its signature is {self.fn.__name__}{self.signature}")

    def _specialize(self, values: dict[str, Any]
                    ) -> tuple[tuple, list[Any], dict[str, _Arg]]:
        """(cache key, flat C arguments, tensor arguments by name)."""
        key: list[Any] = []
        flat: list[Any] = []
        tensors: dict[str, _Arg] = {}
        if self._whole is None:
            self._whole = whole_slices(self.fn)
        for is_constexpr, (name, v) in zip(self._is_constexpr, values.items(), strict=True):
            if is_constexpr:
                if not isinstance(v, (bool, int, float, str, dt.dtype)) and v is not None:
                    raise LaunchError(f"constexpr {name!r} must be an int, float, bool, str "
                                      f"or dtype, got {type(v).__name__}", where=self.where)
                key.append((type(v), v))
                continue
            if type(v) is float:
                key.append(float)
                flat.append(v)
                continue
            try:
                arg = _tensor_arg(v, name)
            except DtypeError as e:
                raise LaunchError(f"argument {name!r} of kernel {self.fn.__name__}: "
                                  f"{e.message}", where=self.where, hint=e.hint) from None
            if arg is not None:
                whole = self._whole.get(name)
                sizes = tuple(n if d in whole else None for d, n in enumerate(arg.shape)) \
                    if whole else ()
                key.append((arg.dtype, len(arg.shape), bool(arg.shape) and arg.strides[-1] == 1,
                            sizes))
                flat += (arg.ptr, *arg.shape, *arg.strides)
                tensors[name] = arg
            elif isinstance(v, (bool, np.bool_)):
                key.append(bool)
                flat.append(int(v))
            elif isinstance(v, (int, np.integer)):
                if not -2**63 <= v < 2**63:
                    raise LaunchError(f"argument {name!r} = {v} does not fit in int64",
                                      where=self.where)
                key.append(int)
                flat.append(int(v))
            elif isinstance(v, (float, np.floating)):
                key.append(float)
                flat.append(float(v))
            else:
                raise LaunchError(f"argument {name!r} of kernel {self.fn.__name__} is a "
                                  f"{type(v).__name__}; kernels take tensors, int, float, "
                                  "bool, or constexprs", where=self.where)
        return tuple(key), flat, tensors

    def _params(self, values: dict[str, Any], key: tuple) -> dict[str, Any]:
        """Trace parameters: a TensorType or scalar TileType per argument, or the value of a
        constexpr."""
        params: dict[str, Any] = {}
        for (name, v), k in zip(values.items(), key, strict=True):
            if name in self.constexprs:
                params[name] = v
            elif isinstance(k, tuple):
                params[name] = TensorType(*k)
            else:
                params[name] = TileType({bool: dt.bool, int: dt.int64, float: dt.float32}[k])
        return params

    def _compile(self, key: tuple, values: dict[str, Any]) -> Specialization:
        compiled = self._compiled.get(key)
        if compiled is not None:
            return compiled
        ir = dce(trace(self.fn, self._params(values, key[:-1])))
        writes = frozenset(op.operands[0].attrs["name"] for op in ir.body.walk()
                           if op.kind == "store")
        source = CPrinter(ir, restrict=not key[-1]).source()
        if os.environ.get("TESSERA_DUMP"):
            print(f"// tessera: {self.fn.__name__} {key}\n{source}", file=sys.stderr)
        module = compile_c(source, name=self.fn.__name__, openmp=True, where=self.where,
                           flags=["-fwrapv"])  # integer overflow wraps, as in torch
        address = ctypes.cast(module.function(ENTRY), ctypes.c_void_p).value
        compiled = Specialization(address, source, str(ir), writes, not key[-1])
        self._compiled[key] = compiled
        return compiled

    def _prepare(self, args: Sequence[Any], kwargs: dict[str, Any]
                 ) -> tuple[dict[str, Any], Specialization, list[Any]]:
        values = self.bind(args, kwargs)
        key, flat, tensors = self._specialize(values)
        compiled = self._compiled.get((*key, False)) or self._compile((*key, False), values)
        if compiled.writes:
            for name in compiled.writes:
                if not tensors[name].dense:
                    self._check_writable(name, tensors[name])
            if _overlaps(tensors, compiled.writes):  # no `restrict` when outputs alias
                compiled = self._compile((*key, True), values)
        return values, compiled, flat

    def _check_writable(self, name: str, arg: _Arg) -> None:
        if arg.readonly:
            raise LaunchError(f"kernel {self.fn.__name__} stores into {name!r}, which is "
                              "read-only", where=self.where, hint="pass a writable copy")
        if any(s == 0 and n > 1 for n, s in zip(arg.shape, arg.strides, strict=True)):
            raise LaunchError(f"kernel {self.fn.__name__} stores into {name!r}, whose "
                              "elements share memory (a stride-0, expanded view)",
                              where=self.where, hint="pass a contiguous tensor, e.g. "
                                                     ".contiguous() or .copy()")

    # -- launching and inspection ------------------------------------------------------------
    def launch(self, grid: Any, args: Sequence[Any], kwargs: dict[str, Any]) -> None:
        values, compiled, flat = self._prepare(args, kwargs)
        g = _grid(grid(values) if callable(grid) else grid, self)
        launcher()(compiled.address, *g, *flat)
        if type(grid) is tuple and compiled.restrict and compiled not in self._fast_for \
                and len(self._fast) < MAX_FAST_LAUNCHERS:
            self._fast_for.append(compiled)
            fast = make_fast_launcher(self, values, compiled, _span)
            if fast is not None:
                self._fast.append(fast)

    def specialize(self, *args: Any, **kwargs: Any) -> Specialization:
        """The compiled build for arguments like these (tensors may be `TensorSpec`s), for
        callers that launch it directly with precomputed arguments (tessera.ops). The
        build assumes no output overlaps another tensor argument."""
        return self._prepare(args, kwargs)[1]

    def source(self, *args: Any, **kwargs: Any) -> str:
        """The C source this kernel compiles to for these arguments."""
        return self._prepare(args, kwargs)[1].source

    def ir(self, *args: Any, **kwargs: Any) -> str:
        """The tile IR of this kernel for these arguments."""
        return self._prepare(args, kwargs)[1].ir


def _where(fn: Callable[..., Any]) -> str:
    return f"{inspect.getsourcefile(fn)}:{fn.__code__.co_firstlineno}"


def _grid(g: Any, k: Kernel) -> tuple[int, int, int]:
    if type(g) is tuple and len(g) == 1 and type(g[0]) is int and g[0] >= 0:
        return g[0], 1, 1  # the common case, without the general checks
    g = (g,) if isinstance(g, (int, np.integer)) else tuple(g) \
        if isinstance(g, (tuple, list)) else g
    if not isinstance(g, tuple) or not 1 <= len(g) <= 3 or not all(
            isinstance(x, (int, np.integer)) and not isinstance(x, bool) and x >= 0
            for x in g):
        raise LaunchError(f"grid must be 1 to 3 non-negative ints, got {g!r}", where=k.where,
                          hint="e.g. k[(tl.cdiv(n, BLOCK),)](...)")
    return (*map(int, g), *(1,) * (3 - len(g)))  # type: ignore[return-value]


def _overlaps(tensors: dict[str, _Arg], writes: frozenset[str]) -> bool:
    """Whether a tensor the kernel writes shares memory with any other tensor argument."""
    for name in writes:
        w = tensors[name]
        for other, a in tensors.items():
            if other != name and a.lo < w.hi and w.lo < a.hi:
                return True
    return False


def kernel(fn: Callable[..., Any]) -> Kernel:
    """Make `fn` a Tessera kernel: an SPMD program over a grid of up to 3 axes."""
    return Kernel(fn)
