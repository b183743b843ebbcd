"""`@tl.kernel`: specialize on argument dtypes, ranks and constexprs, compile through the
runtime toolchain, and launch as `k[grid](*args)` on tessera, torch or numpy tensors.

Launching is on the hot path of small kernels, so it avoids `inspect` and ctypes:
arguments are bound by hand and handed to the native launcher (runtime/cpu/launch.py),
which packs them into the 8-byte slots the generated entry point unpacks (codegen/c.py).
Tensors on an OpenCL device launch the same traced kernel printed as OpenCL C
(codegen/opencl.py) on that device; `device_launch` does so for a CPU specialization's
flat launch, which is how tessera.ops runs on OpenCL."""

from __future__ import annotations

import ctypes
import inspect
import os
import sys
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, NamedTuple

import numpy as np

from tessera.errors import DtypeError
from tessera.lang import core
from tessera.lang.binder import make_fast_launcher
from tessera.lang.codegen.c import ENTRY, CPrinter
from tessera.lang.codegen.opencl import VECTOR_WIDTHS, OpenCLPrinter, kernel_args
from tessera.lang.errors import LaunchError
from tessera.lang.frontend import trace, whole_slices
from tessera.lang.ir import Function
from tessera.lang.passes import dce
from tessera.lang.types import TensorType, TileType
from tessera.runtime import dtype as dt
from tessera.runtime import opencl
from tessera.runtime.cpu.launch import launcher
from tessera.runtime.tensor import Tensor, as_tensor, contiguous_strides, element_span
from tessera.runtime.toolchain import compile_c

__all__ = ["DeviceBuild", "Kernel", "Specialization", "TensorSpec", "device_launch",
           "device_prepare", "kernel", "runs_on_devices"]

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
    device: Any  # the Device whose memory ptr is in, None for host memory


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
                                   ptr + x.numel() * d.itemsize, True, None))
        return _Arg(ptr, shape, strides, d, False, *_span(ptr, shape, strides, d.itemsize),
                    False, None)
    if t is TensorSpec:
        strides = x.strides if x.strides is not None else contiguous_strides(x.shape)
        return _Arg(0, tuple(x.shape), tuple(strides), dt.as_dtype(x.dtype), False, 0, 0, True,
                    None)
    if t is Tensor or t is np.ndarray or hasattr(x, "__dlpack__"):
        x = x if t is Tensor else as_tensor(x)
        ptr = x.data_ptr()
        return _Arg(ptr, x.shape, x.strides, x.dtype, x.readonly,
                    *_span(ptr, x.shape, x.strides, x.dtype.itemsize), False,
                    None if x.device.is_host else x.device)
    return None


def _is_constexpr(annotation: Any) -> bool:
    return annotation is core.constexpr or (isinstance(annotation, str) and
                                            annotation.split(".")[-1] == "constexpr")


@dataclass(eq=False)
class Specialization:
    """One compiled specialization: the native entry point (run it with
    `runtime.cpu.launch.launcher()(address, grid0, grid1, grid2, *args)`, the arguments
    flattened as the general launcher does: each tensor as its data pointer, sizes and
    strides in elements, each scalar as an int or float, constexprs left out). Given its
    traced `function`, `device_launch` can run it on an OpenCL device too."""

    address: int  # of the entry point (see runtime/cpu/launch.py)
    source: str
    ir: str
    writes: frozenset[str]  # tensor parameters the kernel stores into
    restrict: bool  # compiled assuming no output aliases another argument
    function: Function | None = None  # the traced kernel, for other devices
    device_builds: dict[Any, DeviceBuild] = field(default_factory=dict)  # by device

    def __post_init__(self) -> None:
        if self.function is not None:
            _BY_ADDRESS[self.address] = self


class DeviceBuild(NamedTuple):
    """A kernel built for an OpenCL device: the cl.Kernel, its source, how each flat launch
    slot becomes kernel arguments (codegen.opencl.kernel_args), and the lock that keeps
    one thread's arguments from being set between another's set_args and enqueue."""

    kernel: Any
    source: str
    slots: list[tuple[str, dt.dtype | None]]
    lock: threading.Lock
    name: str  # the kernel's, for profiles

    def run(self, device: Any, grid: tuple[int, int, int], flat: Sequence[Any],
            where: str) -> None:
        args = _device_args(self.slots, flat, device, where)
        with self.lock:
            device.run(self.kernel, grid, args, self.name)


_BY_ADDRESS: dict[int, Specialization] = {}  # entry address -> specialization, for devices


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
        self._traced: dict[tuple, tuple[Function, frozenset[str]]] = {}
        self._device_builds: dict[tuple, DeviceBuild] = {}  # by key, aliasing, device
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

    def _function(self, key: tuple, values: dict[str, Any]) -> tuple[Function, frozenset[str]]:
        """The traced kernel for a cache key (without its aliasing flag), and the tensor
        parameters it stores into."""
        traced = self._traced.get(key)
        if traced is None:
            ir = dce(trace(self.fn, self._params(values, key)))
            writes = frozenset(op.operands[0].attrs["name"] for op in ir.body.walk()
                               if op.kind == "store")
            traced = self._traced[key] = (ir, writes)
        return traced

    def _compile(self, key: tuple, values: dict[str, Any]) -> Specialization:
        compiled = self._compiled.get(key)
        if compiled is not None:
            return compiled
        ir, writes = self._function(key[:-1], values)
        source = CPrinter(ir, restrict=not key[-1]).source()
        _dump(self.fn.__name__, key, source)
        module = compile_c(source, name=self.fn.__name__, openmp=True, where=self.where,
                           flags=["-fwrapv"])  # integer overflow wraps, as in torch
        address = ctypes.cast(module.function(ENTRY), ctypes.c_void_p).value
        compiled = Specialization(address, source, str(ir), writes, not key[-1], ir)
        self._compiled[key] = compiled
        return compiled

    def _prepare(self, args: Sequence[Any], kwargs: dict[str, Any]
                 ) -> tuple[dict[str, Any], Specialization, list[Any]]:
        values = self.bind(args, kwargs)
        key, flat, tensors = self._specialize(values)
        return values, self._choose(key, values, tensors), flat

    def _choose(self, key: tuple, values: dict[str, Any], tensors: dict[str, _Arg]
                ) -> Specialization:
        """The CPU build for these arguments (without `restrict` when outputs alias)."""
        compiled = self._compiled.get((*key, False)) or self._compile((*key, False), values)
        if compiled.writes and self._aliased(compiled.writes, tensors):
            compiled = self._compile((*key, True), values)
        return compiled

    def _aliased(self, writes: frozenset[str], tensors: dict[str, _Arg]) -> bool:
        """Whether an output overlaps another tensor argument, once each output is known
        to be writable."""
        for name in writes:
            if not tensors[name].dense:
                self._check_writable(name, tensors[name])
        return _overlaps(tensors, writes)

    def _check_writable(self, name: str, arg: _Arg) -> None:
        if arg.readonly:
            raise LaunchError(f"kernel {self.fn.__name__} stores into {name!r}, which is "
                              "read-only", where=self.where, hint="pass a writable copy")
        if any(s == 0 and n > 1 for n, s in zip(arg.shape, arg.strides, strict=True)):
            raise LaunchError(f"kernel {self.fn.__name__} stores into {name!r}, whose "
                              "elements share memory (a stride-0, expanded view)",
                              where=self.where, hint="pass a contiguous tensor, e.g. "
                                                     ".contiguous() or .copy()")

    # -- devices -----------------------------------------------------------------------------
    def _device_of(self, tensors: dict[str, _Arg]) -> Any:
        """The device the tensor arguments are on (None: host memory, the CPU kernel runs);
        a LaunchError if they are not all on one."""
        first, device = None, None
        for name, arg in tensors.items():
            if first is None:
                first, device = name, arg.device
            elif arg.device != device:
                raise LaunchError(
                    f"kernel {self.fn.__name__}: argument {name!r} is on "
                    f"{_place(arg.device)} but {first!r} is on {_place(device)}",
                    where=self.where, hint="a launch runs on one device: move every tensor "
                    "argument there with .to(device) (numpy arrays and torch tensors are "
                    "host memory)")
        return device

    def _device_build(self, key: tuple, values: dict[str, Any], tensors: dict[str, _Arg],
                      device: Any) -> DeviceBuild:
        """The build for `device` of these arguments (`key` without its aliasing flag)."""
        ir, writes = self._function(key, values)
        full = (*key, bool(writes) and self._aliased(writes, tensors), device)
        build = self._device_builds.get(full)
        if build is None:
            build = self._device_builds[full] = _build(ir, not full[-2], device, self.where)
        return build

    # -- launching and inspection ------------------------------------------------------------
    def launch(self, grid: Any, args: Sequence[Any], kwargs: dict[str, Any]) -> None:
        values = self.bind(args, kwargs)
        key, flat, tensors = self._specialize(values)
        device = self._device_of(tensors)
        if device is not None:
            build = self._device_build(key, values, tensors, device)
            g = _grid(grid(values) if callable(grid) else grid, self)
            build.run(device, g, flat, self.where)
            return
        compiled = self._choose(key, values, tensors)
        g = _grid(grid(values) if callable(grid) else grid, self)
        launcher()(compiled.address, *g, *flat)
        if type(grid) is tuple and compiled.restrict and compiled not in self._fast_for \
                and len(self._fast) < MAX_FAST_LAUNCHERS:
            self._fast_for.append(compiled)
            fast = make_fast_launcher(self, values, compiled, _span)
            if fast is not None:
                self._fast.append(fast)

    def specialize(self, *args: Any, **kwargs: Any) -> Specialization:
        """The compiled CPU build for arguments like these (tensors may be `TensorSpec`s),
        for callers that launch it directly with precomputed arguments (tessera.ops; with
        device memory, through `device_launch`). The build assumes no output overlaps
        another tensor argument."""
        return self._prepare(args, kwargs)[1]

    def source(self, *args: Any, **kwargs: Any) -> str:
        """The source this kernel compiles to for these arguments: C for host memory,
        OpenCL C when the tensors are on an OpenCL device."""
        values = self.bind(args, kwargs)
        key, _, tensors = self._specialize(values)
        device = self._device_of(tensors)
        if device is not None:
            return self._device_build(key, values, tensors, device).source
        return self._choose(key, values, tensors).source

    def ir(self, *args: Any, **kwargs: Any) -> str:
        """The tile IR of this kernel for these arguments."""
        return self._prepare(args, kwargs)[1].ir


def runs_on_devices(address: int) -> bool:
    """Whether the CPU entry point at `address` is a kernel-language specialization that
    `device_launch` can run on other devices (C templates and other native code cannot)."""
    spec = _BY_ADDRESS.get(address)
    return spec is not None and spec.function is not None


def device_launch(address: int, grid: Sequence[int], slots: Sequence[Any], device: Any
                  ) -> None:
    """Run the specialization whose CPU entry point is `address` on `device`: `grid` and
    `slots` are what its CPU launch takes (each tensor as data pointer, sizes and strides
    in elements, each scalar as an int or float), the pointers being `device` addresses.
    tessera.ops reaches OpenCL this way: its impls launch CPU specializations."""
    build, g, where = _device_target(address, grid, device)
    build.run(device, g, slots, where)


def device_prepare(address: int, grid: Sequence[int], slots: Sequence[Any], device: Any
                   ) -> Callable[[], None]:
    """`device_launch`'s launch with its arguments bound once: a function that enqueues it
    again (a kernel object of its own, arguments set; what a graph's replay calls)."""
    build, g, where = _device_target(address, grid, device)
    args = iter(_device_args(build.slots, slots, device, where))
    typed = [x for kind, _ in build.slots for x in (  # numpy scalars: set once, untyped
        (next(args), np.int64(next(args))) if kind == "tensor" else
        (np.int64(next(args)) if kind == "long" else np.float32(next(args)),))]
    return device.prepare(build.kernel, g, typed, build.name)


def _device_target(address: int, grid: Sequence[int], device: Any
                   ) -> tuple[DeviceBuild, tuple[int, int, int], str]:
    """The device build of the specialization at `address`, the grid as 3 ints, and where
    the kernel was written."""
    if not runs_on_devices(address):
        raise LaunchError(f"0x{address:x} is not the entry point of a kernel-language "
                          f"specialization, so it cannot run on {_place(device)}",
                          hint="only kernels built by tessera.lang (Kernel.specialize or a "
                               "launch) run on other devices; other native code is CPU-only")
    spec = _BY_ADDRESS[address]
    where = str(spec.function.loc)
    build = spec.device_builds.get(device)
    if build is None:
        build = spec.device_builds[device] = _build(spec.function, spec.restrict, device, where)
    g = (*grid, 1, 1)[:3] if 1 <= len(grid) <= 3 else None
    if g is None or not all(isinstance(x, (int, np.integer)) and x >= 0 for x in g):
        raise LaunchError(f"grid must be 1 to 3 non-negative ints, got {tuple(grid)!r}",
                          where=where)
    return build, tuple(map(int, g)), where  # type: ignore[return-value]


def _place(device: Any) -> str:
    return "host memory (the CPU)" if device is None else f"device {device.name}"


def _build(fn: Function, restrict: bool, device: Any, where: str) -> DeviceBuild:
    """`fn` printed as OpenCL C for `device` and built there (dev.build caches the
    binary). Division and sqrt are asked to round correctly, as in C, where the device
    can."""
    if getattr(device, "type", None) != "opencl":
        raise LaunchError(f"kernels run on the CPU or on OpenCL devices, not on "
                          f"{_place(device)}", where=where)
    cl, cl_device = opencl.cl(), device.cl_device
    width = cl_device.preferred_vector_width_float
    source = OpenCLPrinter(fn, restrict, width if width in VECTOR_WIDTHS else 4,
                           "cl_khr_fp64" in cl_device.extensions).source()
    _dump(fn.name, device.name, source)
    exact = cl_device.single_fp_config & cl.device_fp_config.CORRECTLY_ROUNDED_DIVIDE_SQRT
    program = device.build(source, fn.name,
                           ("-cl-fp32-correctly-rounded-divide-sqrt",) if exact else (),
                           where=where)
    kernel, slots = cl.Kernel(program, ENTRY), kernel_args(fn)
    # declared scalar types let pyopencl pack arguments without inspecting each one
    kernel.set_scalar_arg_dtypes([t for kind, _ in slots for t in (
        (None, np.int64) if kind == "tensor" else (np.int64 if kind == "long" else np.float32,))])
    return DeviceBuild(kernel, source, slots, threading.Lock(), fn.name)


def _device_args(slots: list[tuple[str, dt.dtype | None]], flat: Sequence[Any], device: Any,
                 where: str) -> list[Any]:
    """Flat launch slots as OpenCL kernel arguments: each data pointer as its buffer and
    element offset, scalars as they are (the kernel packs them: see _build)."""
    if len(flat) != len(slots):
        raise LaunchError(f"the kernel takes {len(slots)} launch slots, got {len(flat)}",
                          where=where)
    args: list[Any] = []
    for (kind, d), v in zip(slots, flat, strict=True):
        if kind == "tensor":  # (an empty tensor's null pointer: a buffer it never reads)
            buffer, offset = device.locate(v) if v else (device.empty_buffer, 0)
            if offset % d.itemsize:  # type: ignore[union-attr]
                raise LaunchError(f"a {d.name} tensor at 0x{v:x} on {device.name} is not "  # type: ignore[union-attr]
                                  "aligned to its element size", where=where,
                                  hint="pass a view whose offset is whole elements")
            args += [buffer, offset // d.itemsize]  # type: ignore[union-attr]
        else:
            args.append(v)  # packed as the kernel's scalar_arg_dtypes say
    return args


def _dump(name: str, key: Any, source: str) -> None:
    if os.environ.get("TESSERA_DUMP"):
        print(f"// tessera: {name} {key}\n{source}", file=sys.stderr)


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
