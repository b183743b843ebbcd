"""`@tl.kernel`: specialize on argument dtypes, ranks and constexprs, compile through the
runtime toolchain, and launch as `k[grid](*args)` on tessera, torch or numpy tensors."""

from __future__ import annotations

import ctypes
import inspect
import os
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from tessera.errors import DtypeError
from tessera.lang import core
from tessera.lang.codegen.c import ENTRY, CPrinter
from tessera.lang.errors import LaunchError
from tessera.lang.frontend import trace
from tessera.lang.passes import dce
from tessera.lang.types import TensorType, TileType
from tessera.runtime import dtype as dt
from tessera.runtime.tensor import Tensor, as_tensor
from tessera.runtime.toolchain import compile_c

__all__ = ["Kernel", "kernel"]

_CTYPES = {dt.int64: ctypes.c_int64, dt.float32: ctypes.c_float, dt.bool: ctypes.c_bool}


@dataclass(frozen=True)
class _Arg:
    """One launch argument, reduced to what the generated code needs."""

    ptr: int
    shape: tuple[int, ...]
    strides: tuple[int, ...]
    dtype: dt.dtype
    readonly: bool

    @property
    def span(self) -> tuple[int, int]:
        lo = hi = 0
        for n, s in zip(self.shape, self.strides, strict=True):
            if n == 0:
                return self.ptr, self.ptr
            (hi := hi + (n - 1) * s) if s > 0 else (lo := lo + (n - 1) * s)
        size = self.dtype.itemsize
        return self.ptr + lo * size, self.ptr + (hi + 1) * size


def _tensor_arg(x: Any, name: str) -> _Arg | None:
    """The tensor behind `x` (tessera, torch, numpy, DLPack), or None if it is no tensor."""
    if type(x).__module__.startswith("torch") and hasattr(x, "data_ptr"):
        if x.device.type != "cpu":
            raise LaunchError(f"argument {name!r} is on {x.device}; Tessera's CPU kernels "
                              "need CPU tensors", hint="move it with .cpu()")
        return _Arg(x.data_ptr(), tuple(x.shape), tuple(x.stride()), dt.as_dtype(x.dtype),
                    False)
    if isinstance(x, Tensor) or isinstance(x, np.ndarray) or hasattr(x, "__dlpack__"):
        t = x if isinstance(x, Tensor) else as_tensor(x)
        return _Arg(t.data_ptr(), t.shape, t.strides, t.dtype, t.readonly)
    return None


def _is_constexpr(annotation: Any) -> bool:
    return annotation is core.constexpr or (isinstance(annotation, str) and
                                            annotation.split(".")[-1] == "constexpr")


@dataclass
class _Compiled:
    fn: Any
    source: str
    ir: str
    writes: frozenset[str]  # tensor parameters the kernel stores into


class Kernel:
    """A kernel-language function. Launch with `k[grid](*args)`; inspect with
    `k.source(*args)` (the C it compiles to) and `k.ir(*args)` (the tile IR)."""

    def __init__(self, fn: Callable[..., Any]):
        self.fn = fn
        self.signature = inspect.signature(fn)
        self.constexprs = {n for n, p in self.signature.parameters.items()
                           if _is_constexpr(p.annotation)}
        self.where = f"{inspect.getsourcefile(fn)}:{fn.__code__.co_firstlineno}"
        self._compiled: dict[tuple, _Compiled] = {}
        self.__doc__, self.__name__ = fn.__doc__, fn.__name__

    def __repr__(self) -> str:
        return f"<tessera kernel {self.fn.__qualname__} at {self.where}>"

    def __call__(self, *args: Any, **kwargs: Any) -> None:
        raise LaunchError(f"kernel {self.fn.__name__} needs a grid: launch it as "
                          f"{self.fn.__name__}[grid](...)", where=self.where,
                          hint="grid is a tuple of up to 3 program counts, e.g. (n // 128,)")

    def __getitem__(self, grid: Any) -> Callable[..., None]:
        def launch(*args: Any, **kwargs: Any) -> None:
            self.launch(grid, args, kwargs)
        return launch

    # -- specialization -----------------------------------------------------------------------
    def _bind(self, args: Sequence[Any], kwargs: dict[str, Any]) -> dict[str, Any]:
        try:
            bound = self.signature.bind(*args, **kwargs)
        except TypeError as e:
            raise LaunchError(f"kernel {self.fn.__name__}: {e}", where=self.where,
                              hint=f"its signature is {self.fn.__name__}{self.signature}") from None
        bound.apply_defaults()
        return dict(bound.arguments)

    def _specialize(self, values: dict[str, Any]
                    ) -> tuple[tuple, dict[str, Any], list[Any], dict[str, _Arg]]:
        """(cache key, trace params, flat C arguments, tensor arguments by name)."""
        key, params, flat, tensors = [], {}, [], {}
        for name, v in values.items():
            if name in self.constexprs:
                if not isinstance(v, (bool, int, float, str, dt.dtype)) and v is not None:
                    raise LaunchError(f"constexpr {name!r} must be an int, float, bool, str "
                                      f"or dtype, got {type(v).__name__}", where=self.where)
                key.append(("c", name, type(v).__name__, v))
                params[name] = v
                continue
            try:
                arg = _tensor_arg(v, name)
            except DtypeError as e:
                raise LaunchError(f"argument {name!r} of kernel {self.fn.__name__}: "
                                  f"{e.message}", where=self.where, hint=e.hint) from None
            if arg is not None:
                unit = len(arg.shape) > 0 and arg.strides[-1] == 1
                params[name] = TensorType(arg.dtype, len(arg.shape), unit)
                key.append(("t", name, arg.dtype.name, len(arg.shape), unit))
                flat += [arg.ptr, *arg.shape, *arg.strides]
                tensors[name] = arg
            elif isinstance(v, (bool, np.bool_)):
                params[name] = TileType(dt.bool)
                key.append(("b", name))
                flat.append(bool(v))
            elif isinstance(v, (int, np.integer)):
                params[name] = TileType(dt.int64)
                key.append(("i", name))
                flat.append(int(v))
            elif isinstance(v, (float, np.floating)):
                params[name] = TileType(dt.float32)
                key.append(("f", name))
                flat.append(float(v))
            else:
                raise LaunchError(f"argument {name!r} of kernel {self.fn.__name__} is a "
                                  f"{type(v).__name__}; kernels take tensors, int, float, "
                                  "bool, or constexprs", where=self.where)
        key.append(("alias", _overlaps(list(tensors.values()))))
        return tuple(key), params, flat, tensors

    def _compile(self, key: tuple, params: dict[str, Any]) -> _Compiled:
        compiled = self._compiled.get(key)
        if compiled is not None:
            return compiled
        ir = dce(trace(self.fn, params))
        source = CPrinter(ir, restrict=not key[-1][1]).source()
        if os.environ.get("TESSERA_DUMP"):
            print(f"// tessera: {self.fn.__name__} {key}\n{source}", file=sys.stderr)
        module = compile_c(source, name=self.fn.__name__, openmp=True, where=self.where)
        argtypes = [ctypes.c_int64] * 3
        for p in ir.params:
            if isinstance(p.type, TensorType):
                argtypes += [ctypes.c_void_p] + [ctypes.c_int64] * (2 * p.type.ndim)
            else:
                argtypes.append(_CTYPES[p.type.dtype])
        writes = frozenset(op.operands[0].attrs["name"] for op in ir.body.walk()
                           if op.kind == "store")
        compiled = _Compiled(module.function(ENTRY, None, argtypes), source, str(ir), writes)
        self._compiled[key] = compiled
        return compiled

    def _check_writable(self, name: str, arg: _Arg) -> None:
        if arg.readonly:
            raise LaunchError(f"kernel {self.fn.__name__} stores into {name!r}, which is "
                              "read-only", where=self.where, hint="pass a writable copy")
        if any(s == 0 and n > 1 for n, s in zip(arg.shape, arg.strides, strict=True)):
            raise LaunchError(f"kernel {self.fn.__name__} stores into {name!r}, whose "
                              "elements share memory (a stride-0, expanded view)",
                              where=self.where, hint="pass a contiguous tensor, e.g. "
                                                     ".contiguous() or .copy()")

    # -- launching --------------------------------------------------------------------------
    def launch(self, grid: Any, args: Sequence[Any], kwargs: dict[str, Any]) -> None:
        values = self._bind(args, kwargs)
        key, params, flat, tensors = self._specialize(values)
        compiled = self._compile(key, params)
        for name in compiled.writes:
            self._check_writable(name, tensors[name])
        g = _grid(grid(values) if callable(grid) else grid, self)
        if 0 in g:
            return
        compiled.fn(*g, *flat)

    def source(self, *args: Any, **kwargs: Any) -> str:
        """The C source this kernel compiles to for these arguments."""
        key, params, _, _ = self._specialize(self._bind(args, kwargs))
        return self._compile(key, params).source

    def ir(self, *args: Any, **kwargs: Any) -> str:
        """The tile IR of this kernel for these arguments."""
        key, params, _, _ = self._specialize(self._bind(args, kwargs))
        return self._compile(key, params).ir


def _grid(g: Any, k: Kernel) -> tuple[int, int, int]:
    g = (g,) if isinstance(g, (int, np.integer)) else tuple(g)
    if not 1 <= len(g) <= 3 or not all(isinstance(x, (int, np.integer)) and x >= 0
                                       for x in g):
        raise LaunchError(f"grid must be 1 to 3 non-negative ints, got {g!r}", where=k.where,
                          hint="e.g. k[(triton_style_cdiv(n, BLOCK),)](...)")
    return (*map(int, g), *(1,) * (3 - len(g)))  # type: ignore[return-value]


def _overlaps(args: list[_Arg]) -> bool:
    ranges = sorted(a.span for a in args if a.span[0] != a.span[1])
    return any(b[0] < a[1] for a, b in zip(ranges, ranges[1:], strict=False))


def kernel(fn: Callable[..., Any]) -> Kernel:
    """Make `fn` a Tessera kernel: an SPMD program over a grid of up to 3 axes."""
    return Kernel(fn)
