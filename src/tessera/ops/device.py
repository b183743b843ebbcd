"""tessera.ops on a device that is not the host (OpenCL): the same op definitions, with the
data on the device.

An op's implementation is written against CPU torch tensors: it checks shapes, makes
views, allocates outputs and launches kernel-language kernels through the one native
launcher. On a device it runs unchanged over *aliases*: CPU torch tensors whose storage is
the device buffer's reserved address (runtime/opencl/memory.py: never readable by the
host). While it runs, a `TorchDispatchMode` serves what torch would do on the host:
allocations come from the device's allocator, zero-fills are device fills, views cost
nothing, constants made from Python data are uploaded, and every other torch call (torch
computing on the data) runs on host copies of its operands — a round trip, counted and
warned about once per op and aten function. The launcher's redirect sends every kernel
launch to the device (`tessera.lang.jit.device_launch`: the same specialization, built
for the device). The C++ eager fast path, which would read the data on the host, is
suspended meanwhile. One in-order queue per stream keeps freed blocks safe to reuse.
"""

from __future__ import annotations

import functools
import threading
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import numpy as np
import torch
from torch.utils._python_dispatch import TorchDispatchMode, _disable_current_modes
from torch.utils._pytree import tree_map

from tessera.errors import DeviceError
from tessera.lang import jit
from tessera.ops import _fastpath, registry
from tessera.ops._launch import ArgumentError
from tessera.runtime.cpu import launch as cpu_launch
from tessera.runtime.device import Device
from tessera.runtime.dtype import as_dtype
from tessera.runtime.tensor import Tensor, element_span

__all__ = ["DEVICE_KINDS", "HOST_ONLY", "DeviceSession", "current", "device_of", "download",
           "on_device", "prepare", "round_trips", "runs_on_devices", "session", "write"]

aten = torch.ops.aten
_ALLOC = {aten.empty.memory_format, aten.empty_strided.default, aten.new_empty.default,
          aten.new_empty_strided.default, aten.empty_like.default}
_ZEROS = {aten.zeros.default: aten.empty.memory_format, aten.new_zeros.default:
          aten.new_empty.default, aten.zeros_like.default: aten.empty_like.default}
_FREE = {aten.detach.default, aten.alias.default, aten.resolve_conj.default,
         aten.resolve_neg.default, aten.is_same_size.default, aten.sym_size.int,
         aten.sym_stride.int, aten.sym_numel.default, aten.sym_storage_offset.default}

# The op kinds whose implementations only check, view, allocate and launch kernel-language
# kernels (so they run over aliases; tests/ops check every one on OpenCL), but for the ops
# named: those, and every op of another kind (convolution and pooling, on the GEMM
# template and host tables; MoE and quantization, on C templates and host reads), run on
# host copies of their arguments, as a counted and warned round trip.
DEVICE_KINDS = frozenset({"pointwise", "reduction", "normalization", "contraction", "index",
                          "shape", "attention"})
HOST_ONLY = frozenset({"quantized_linear", "decode_attention", "topk",
                       "fused:conv2d"})  # (the graph compiler's conv with its epilogue)

_local = threading.local()  # .session: the DeviceSession running on this thread
_ROUND_TRIPS: dict[tuple[str, str], int] = {}  # (op, aten function) -> host round trips
_redirect_lock = threading.Lock()
_redirect_installed = False


def current() -> DeviceSession | None:
    """The device run of an op on this thread, if any (ops choose device kernels by it)."""
    return getattr(_local, "session", None)


def round_trips() -> dict[tuple[str, str], int]:
    """How often each (op, aten function) ran on host copies of device data so far."""
    return dict(_ROUND_TRIPS)


def device_of(values: Iterator[Any]) -> Device | None:
    """The one non-host device of the tessera tensors among `values`, None if there is none;
    DeviceError if there are several, or host tensors beside device ones."""
    found: Device | None = None
    host = None
    for v in values:
        if isinstance(v, Tensor):
            if v.device.is_host:
                host = v.device.name
            elif found is None:
                found = v.device
            elif v.device != found:
                raise DeviceError(f"tensors on {found.name} and {v.device.name} in one call",
                                  hint="move them to one device with t.to(device)")
        elif isinstance(v, (torch.Tensor, np.ndarray)):
            host = "cpu"
    if found is not None and host is not None:
        raise DeviceError(f"a tensor on {found.name} and one on the host ({host}) in one call",
                          hint=f"move the host tensor with t.to({found.name!r}) (tessera."
                               "as_tensor(x).to(device) for torch and numpy)")
    return found


def runs_on_devices(op: str) -> bool:
    """Whether op `op` (a registry op, or a graph's generated `fused:` kernel) runs over
    device data; others run on host copies."""
    return (op.startswith("fused:") and op not in HOST_ONLY) or op in _device_ops()


@functools.cache
def _device_ops() -> frozenset[str]:
    return frozenset(n for n in registry.list_ops()
                     if registry.get(n).kind in DEVICE_KINDS) - HOST_ONLY


def on_device(name: str, impl: Callable[..., Any], device: Device, args: list[Any],
              kwargs: dict[str, Any]) -> Any:
    """`impl(*args, **kwargs)` of op `name` with its tessera tensors on `device`; the
    result's tensors are tessera tensors on `device`."""
    with session(device, name) as s:
        out = s.run(name, impl, *tree_map(s.arg, args), **tree_map(s.arg, kwargs))
        return tree_map(s.result, out)


class DeviceSession(TorchDispatchMode):
    """One op's run over device data (see the module docstring)."""

    def __init__(self, device: Device, op: str):
        super().__init__()
        self.device = device
        self.op = op
        self.storages: dict[int, Tensor] = {}  # storage base address -> a tensor over it
        # storage base -> a host tensor holding the same bytes, for device data that never
        # changes (a graph's weights): host round trips read it instead of downloading
        self.host_copies: dict[int, torch.Tensor] = {}
        self.host_calls = 0  # torch calls that ran on host copies
        # what ran on the device, in order, to replay: ("launch", address, grid, slots),
        # ("fill", address, nbytes), ("copy", dst, src, nbytes) or ("check", address,
        # nbytes, message): flags read back, an error if any is set
        self.commands: list[tuple[Any, ...]] = []

    def __enter__(self) -> DeviceSession:
        if getattr(_local, "session", None) is not None:
            raise DeviceError(f"{self.op}: an op on {self.device.name} called inside another "
                              "op's device run", hint="report this: ops must not nest so")
        _local.session = self
        self._suspend = _fastpath.suspended()
        self._suspend.__enter__()
        return super().__enter__()

    def __exit__(self, *exc: Any) -> None:
        try:
            super().__exit__(*exc)
        finally:
            self._suspend.__exit__(*exc)
            _local.session = None

    # -- tessera tensors <-> aliases -----------------------------------------------------
    def arg(self, v: Any) -> Any:
        return self.alias(v) if isinstance(v, Tensor) else v

    def alias(self, t: Tensor) -> torch.Tensor:
        """A CPU torch tensor over t's device address (never read by the host)."""
        base = t.data_ptr() - t.storage_offset() * t.dtype.itemsize
        self.storages[base] = t
        itemsize = t.dtype.itemsize
        typestr = np.dtype(t.dtype.numpy or np.uint16).str
        holder = _Interface(t, {"version": 3, "shape": (max(t.storage_nbytes // itemsize, 1),),
                                "typestr": typestr, "data": (base, False)})
        with _disable_current_modes():  # (torch.from_numpy would reach lift_fresh)
            flat = torch.from_numpy(np.asarray(holder))
            if t.dtype.numpy is None:
                flat = flat.view(torch.bfloat16)
            return flat.as_strided(t.shape, t.strides, t.storage_offset())

    def owner(self, x: torch.Tensor) -> Tensor | None:
        return self.storages.get(x.untyped_storage().data_ptr())

    def adopt(self, x: torch.Tensor) -> Tensor:
        """The tessera tensor an alias stands for."""
        t = self.owner(x)
        if t is None:
            raise DeviceError(f"{self.op}: a host tensor reached a result on "
                              f"{self.device.name}", hint="report this with the op's call")
        base = x.untyped_storage().data_ptr()
        d = as_dtype(x.dtype)
        return Tensor(t.owner, base, t.storage_nbytes, tuple(x.shape), tuple(x.stride()),
                      x.storage_offset(), d, self.device)

    def result(self, v: Any) -> Any:
        return self.adopt(v) if isinstance(v, torch.Tensor) else v

    def new(self, like: torch.Tensor) -> torch.Tensor:
        """An alias of fresh device memory with `like`'s shape, strides and dtype."""
        n = _span_elements(tuple(like.shape), tuple(like.stride()))
        block = self.device.allocator.allocate(n * like.element_size())
        t = Tensor(block, block.ptr, n * like.element_size(), (n,), (1,), 0,
                   as_dtype(like.dtype), self.device)
        return self.alias(t).as_strided(like.shape, like.stride(), 0)

    # -- host <-> device -----------------------------------------------------------------
    def to_host(self, x: torch.Tensor) -> torch.Tensor:
        known = self.host_copies.get(x.untyped_storage().data_ptr())
        if known is not None and known.dtype == x.dtype:  # (never written: a graph's weights)
            with _disable_current_modes():
                return known.as_strided(x.shape, x.stride(), x.storage_offset())
        return download(self.device, x)

    def write_back(self, x: torch.Tensor, host: torch.Tensor) -> None:
        write(self.device, x, host)

    def upload(self, host: torch.Tensor) -> torch.Tensor:
        """An alias of new device memory holding `host`'s values in `host`'s layout."""
        out = self.new(host)
        write(self.device, out, host)
        return out

    # -- ops -------------------------------------------------------------------------------
    def run(self, name: str, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        """fn(*args, **kwargs) of op `name` over device aliases; an op that does not run on
        devices (`runs_on_devices`), or that launches native code other than
        kernel-language kernels, runs on host copies instead (a counted, warned round
        trip)."""
        if runs_on_devices(name):
            try:
                return fn(*args, **kwargs)
            except _HostOnly:
                pass
        self._count(name, "its implementation")
        host = tree_map(lambda v: self.to_host(v) if self.is_alias(v) else v, (args, kwargs))
        with _disable_current_modes(), _detached():
            out = fn(*host[0], **host[1])
        return tree_map(lambda v: self.upload(v) if isinstance(v, torch.Tensor) else v, out)

    def is_alias(self, v: Any) -> bool:
        return isinstance(v, torch.Tensor) and self.owner(v) is not None

    def _count(self, op: str, what: str) -> None:
        self.host_calls += 1
        key = (op, what)
        if key not in _ROUND_TRIPS:
            warnings.warn(f"tessera.ops.{op} on {self.device.name}: {what} ran on the host "
                          "(data copied to and from the device)", stacklevel=3)
        _ROUND_TRIPS[key] = _ROUND_TRIPS.get(key, 0) + 1

    # -- torch calls -----------------------------------------------------------------------
    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None
                           ) -> Any:
        kwargs = kwargs or {}
        if func in _ALLOC:
            return self.new(func(*args, **kwargs))
        if func in _ZEROS:
            out = self.new(_ZEROS[func](*args, **kwargs))
            self.fill(out.data_ptr(), out.untyped_storage().nbytes())
            return out
        if func in (aten.lift_fresh.default, aten.lift_fresh_copy.default) and \
                not self.is_alias(args[0]):  # torch.tensor(data): upload it
            return self.upload(args[0])
        if func in _FREE or func.is_view:
            return func(*args, **kwargs)
        if func is aten.copy_.default and self._device_copy(args[0], args[1]):
            return args[0]
        return self.on_host(func, args, kwargs)

    def _device_copy(self, dst: torch.Tensor, src: Any) -> bool:
        """Copy between device tensors of one dtype and layout as one device copy."""
        if not (isinstance(src, torch.Tensor) and self.owner(dst) and self.owner(src)
                and dst.dtype == src.dtype and dst.shape == src.shape
                and dst.is_contiguous() and src.is_contiguous()):
            return False
        command = ("copy", dst.data_ptr(), src.data_ptr(), dst.numel() * dst.element_size())
        self.device.copy(*command[1:])
        self.commands.append(command)
        return True

    def fill(self, address: int, nbytes: int) -> None:
        self.device.fill(address, nbytes)
        self.commands.append(("fill", address, nbytes))

    def scratch(self, nbytes: int) -> int:
        """The address of `nbytes` of device memory that lives as long as the session
        (status flags kernels write and the host reads back)."""
        return self.new(torch.empty(max(nbytes, 1), dtype=torch.uint8)).data_ptr()

    def flagged(self, address: int, nbytes: int, message: str) -> bool:
        """Whether any of the `nbytes` flag bytes at `address` is set (replays check them
        again and raise ArgumentError(message))."""
        self.commands.append(("check", address, nbytes, message))
        return bool(self.device.read(address, nbytes).any())

    def launch(self, address: int, grid: tuple[int, int, int], slots: tuple[Any, ...]
               ) -> None:
        if not jit.runs_on_devices(address):
            raise _HostOnly(address)
        jit.device_launch(address, grid, slots, self.device)
        self.commands.append(("launch", address, grid, slots))

    def on_host(self, func: Any, args: Any, kwargs: Any) -> Any:
        """Run `func` on host copies of the device tensors it is given; write back the ones
        it mutates and upload the new tensors it returns."""
        copies: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}  # id(host) -> (alias, host)

        def host(v: Any) -> Any:
            if self.is_alias(v):
                h = self.to_host(v)
                copies[id(h)] = (v, h)
                return h
            return v
        self._count(self.op, f"torch's {func}")
        hargs, hkwargs = tree_map(host, args), tree_map(host, kwargs)
        out = func(*hargs, **hkwargs)
        for a, h in copies.values():
            if _mutated(func, h, hargs, hkwargs):
                self.write_back(a, h)

        def back(v: Any) -> Any:
            if not isinstance(v, torch.Tensor):
                return v
            if id(v) in copies:
                return copies[id(v)][0]
            return self.upload(v)
        return tree_map(back, out)


def download(device: Device, x: torch.Tensor) -> torch.Tensor:
    """A host tensor with alias x's layout over a copy of the bytes its elements span."""
    if x.numel() == 0:
        return torch.empty_strided(x.shape, x.stride(), dtype=x.dtype)
    lo, hi = element_span(tuple(x.shape), tuple(x.stride()))
    size = x.element_size()
    raw = device.read(x.data_ptr() + lo * size, (hi - lo + 1) * size)
    with _disable_current_modes():  # host tensors, even inside a session
        return torch.from_numpy(raw).view(x.dtype).as_strided(x.shape, x.stride(), -lo)


def write(device: Device, x: torch.Tensor, host: torch.Tensor) -> None:
    """Write the bytes host's elements span over the same span of alias x (one layout)."""
    if x.numel():
        lo, hi = element_span(tuple(x.shape), tuple(x.stride()))
        with _disable_current_modes():  # host tensors, even inside a session
            span = host.as_strided((hi - lo + 1,), (1,), host.storage_offset() + lo)
            data = span.contiguous().view(torch.uint8).numpy()
        device.write(x.data_ptr() + lo * x.element_size(), data)


class _HostOnly(Exception):
    """A launch of native code that only runs on the CPU, inside a device run (caught by
    DeviceSession.run, which runs the op on the host instead)."""


@contextmanager
def _detached() -> Iterator[None]:
    """No device session on this thread for a while: launches run on the CPU."""
    s = _local.session
    _local.session = None
    try:
        yield
    finally:
        _local.session = s


class _Interface:
    """What numpy is handed to alias device memory (never read), keeping the tensor alive."""

    __slots__ = ("__array_interface__", "tensor")

    def __init__(self, tensor: Tensor, interface: dict[str, Any]):
        self.tensor = tensor
        self.__array_interface__ = interface


def _span_elements(shape: tuple[int, ...], strides: tuple[int, ...]) -> int:
    if 0 in shape:
        return 0
    lo, hi = element_span(shape, strides)
    return hi - lo + 1


def _mutated(func: Any, h: torch.Tensor, args: Any, kwargs: Any) -> bool:
    """Whether `func` writes the argument `h` (its schema marks it `(a!)`)."""
    for i, a in enumerate(func._schema.arguments):
        value = args[i] if i < len(args) else kwargs.get(a.name)
        if value is h and a.alias_info is not None and a.alias_info.is_write:
            return True
    return False


def _redirect(address: int, g0: int, g1: int, g2: int, *slots: Any) -> bool:
    """The launcher's redirect: a launch on a thread running an op on a device runs there."""
    s = getattr(_local, "session", None)
    if s is None:
        return False
    s.launch(address, (g0, g1, g2), slots)
    return True


def prepare(device: Device, commands: list[tuple[Any, ...]]) -> list[Callable[[], None]]:
    """Recorded device commands as functions that run them again, launches with their
    arguments bound (their buffers must stay alive while the functions are used)."""
    def check(address: int, nbytes: int, message: str) -> None:
        if device.read(address, nbytes).any():  # flags a kernel set
            raise ArgumentError(message)
    out: list[Callable[[], None]] = []
    for c in commands:
        if c[0] == "launch":
            out.append(jit.device_prepare(c[1], c[2], c[3], device))
        else:
            run = {"fill": device.fill, "copy": device.copy, "check": check}[c[0]]
            out.append(functools.partial(run, *c[1:]))
    return out


def _install_redirect() -> None:
    global _redirect_installed
    with _redirect_lock:
        if not _redirect_installed:
            cpu_launch.set_redirect(_redirect)
            _redirect_installed = True


@contextmanager
def session(device: Device, op: str) -> Iterator[DeviceSession]:
    """Run code over device aliases as an op does (for the graph compiler's executor)."""
    _install_redirect()
    with DeviceSession(device, op) as s:
        yield s
