"""Devices and the registry that backends plug into (`cpu` now, `opencl` later).

`tessera.device("cpu")` returns the one `Device` object for that spec; backends register a
factory with `register_backend` and are looked up by the part before the colon.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from tessera.errors import DeviceError

if TYPE_CHECKING:
    from tessera.runtime.memory import CachingAllocator

__all__ = ["Device", "device", "devices", "register_backend"]


class Device:
    """One compute device. Subclasses provide `properties()` and an allocator."""

    type: str = "abstract"
    is_host = True  # its memory is host memory (numpy and torch may read it in place)

    def __init__(self, index: int = 0):
        self.index = index
        self._allocator: CachingAllocator | None = None
        self._lock = threading.Lock()

    @property
    def name(self) -> str:
        """The spec that `tessera.device()` accepts back, e.g. `cpu` or `opencl:1`."""
        return self.type if self.index == 0 else f"{self.type}:{self.index}"

    @property
    def allocator(self) -> CachingAllocator:
        """This device's caching allocator, created on first use."""
        with self._lock:
            if self._allocator is None:
                self._allocator = self._make_allocator()
            return self._allocator

    def _make_allocator(self) -> CachingAllocator:
        raise DeviceError(f"device {self.name!r} has no allocator")

    def properties(self) -> dict[str, Any]:
        """What the device is and can do (ISA, cores, caches, measured peaks)."""
        return {"name": self.name, "type": self.type}

    def new_queue(self) -> Any:
        """A native queue for a new stream (devices with command queues), or None: the
        stream then runs its work on a thread of its own."""
        return None

    def synchronize(self) -> None:
        """Wait for all work queued on this device's streams."""
        from tessera.runtime.stream import synchronize

        synchronize(self)

    def __repr__(self) -> str:
        return f"device({self.name!r})"

    def __eq__(self, other: object) -> bool:
        if isinstance(other, str):
            try:
                other = device(other)
            except DeviceError:
                return False
        return isinstance(other, Device) and (self.type, self.index) == (other.type, other.index)

    def __hash__(self) -> int:
        return hash((self.type, self.index))


_backends: dict[str, Callable[[int], Device]] = {}
_counts: dict[str, Callable[[], int]] = {}
_missing: dict[str, Callable[[], str]] = {}
_instances: dict[tuple[str, int], Device] = {}
_registry_lock = threading.Lock()


def register_backend(type_: str, factory: Callable[[int], Device],
                     count: Callable[[], int] = lambda: 1,
                     missing: Callable[[], str] = lambda: "") -> None:
    """Make `tessera.device(f"{type_}:i")` build devices with `factory(i)`, i < `count()`;
    `missing()` says why there are none and what to install."""
    with _registry_lock:
        _backends[type_] = factory
        _counts[type_] = count
        _missing[type_] = missing


def _ensure_builtin_backends() -> None:
    if "cpu" not in _backends:
        from tessera.runtime.cpu import device as _cpu  # noqa: F401  (registers "cpu")
    if "opencl" not in _backends:
        from tessera.runtime.opencl import device as _cl  # noqa: F401  (registers "opencl")


def device(spec: str | Device | None = None) -> Device:
    """The device for `spec` ("cpu", "opencl:1", a Device, or None for the default CPU)."""
    if isinstance(spec, Device):
        return spec
    _ensure_builtin_backends()
    spec = "cpu" if spec is None else spec
    if not isinstance(spec, str):
        raise DeviceError(f"a device is named by a string such as 'cpu', not {spec!r}",
                          hint="pass tessera.device('cpu') or the string 'cpu'")
    type_, _, idx = spec.strip().partition(":")
    if type_ not in _backends:
        raise DeviceError(f"unknown device type {type_!r} in {spec!r}",
                          hint=f"known device types: {', '.join(sorted(_backends))}")
    try:
        index = int(idx) if idx else 0
    except ValueError:
        raise DeviceError(f"bad device index {idx!r} in {spec!r}",
                          hint="write e.g. 'cpu' or 'cpu:0'") from None
    n = _counts[type_]()
    if n == 0:
        raise DeviceError(f"device {spec!r} does not exist: this machine has no {type_} "
                          "device", hint=_missing[type_]() or None)
    if not 0 <= index < n:
        raise DeviceError(f"device {spec!r} does not exist: {type_} has {n} device(s)",
                          hint=f"use an index in 0..{n - 1}")
    with _registry_lock:
        key = (type_, index)
        if key not in _instances:
            _instances[key] = _backends[type_](index)
        return _instances[key]


def devices() -> list[Device]:
    """Every device of every registered backend."""
    _ensure_builtin_backends()
    return [device(f"{t}:{i}") for t in sorted(_backends) for i in range(_counts[t]())]
