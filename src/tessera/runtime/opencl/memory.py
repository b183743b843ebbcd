"""Device memory with host-shaped addresses.

Each allocation is an OpenCL buffer plus a range of host address space reserved for it
(mmap PROT_NONE: never readable, never backed). The range's start is the buffer's address
in Tessera: tensors, views, bounds checks, the caching allocator and the graph recorder
work on device memory exactly as on host memory, addresses of different buffers never
collide with each other or with host memory, and host code that would read one by mistake
faults at once instead of reading stale data. `locate(address)` turns an address back
into (buffer, byte offset) where a kernel argument or a copy needs it.
"""

from __future__ import annotations

import bisect
import ctypes
import os
import threading
from typing import Any

from tessera.errors import DeviceError, OutOfMemoryError, ShapeError
from tessera.runtime.memory import format_bytes

__all__ = ["DeviceMemory"]

_PROT_NONE, _MAP_PRIVATE, _MAP_ANONYMOUS, _MAP_NORESERVE = 0, 0x02, 0x20, 0x4000
_libc = ctypes.CDLL(None, use_errno=True)
_mmap = _libc.mmap
_mmap.restype = ctypes.c_void_p
_mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int, ctypes.c_int,
                  ctypes.c_long]
_munmap = _libc.munmap
_munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
_MAP_FAILED = ctypes.c_void_p(-1).value


class DeviceMemory:
    """The `MemoryBackend` of one OpenCL device (see the module docstring)."""

    alignment = 4096  # a page: what the reservation gives

    def __init__(self, device: Any):
        self.device = device
        self._lock = threading.Lock()
        self._starts: list[int] = []  # sorted
        self._ends: dict[int, int] = {}
        self._buffers: dict[int, Any] = {}

    def malloc(self, nbytes: int) -> int:
        if nbytes < 0:
            raise ShapeError(f"cannot allocate a negative number of bytes ({nbytes})")
        cl = self.device.cl
        size = max(nbytes, 1)
        limit = self.device.cl_device.max_mem_alloc_size
        if size > limit:
            raise OutOfMemoryError(f"{format_bytes(size)} is more than one buffer may hold on "
                                   f"{self.device.name} ({format_bytes(limit)})",
                                   where=self.device.name, hint="use smaller tensors")
        try:
            buffer = cl.Buffer(self.device.context, cl.mem_flags.READ_WRITE, size)
        except cl.Error as e:
            raise OutOfMemoryError(f"allocating {format_bytes(size)} on {self.device.name} "
                                   f"failed: {e}", where=self.device.name,
                                   hint="free some tensors or use smaller shapes") from e
        address = _mmap(None, size, _PROT_NONE, _MAP_PRIVATE | _MAP_ANONYMOUS | _MAP_NORESERVE,
                        -1, 0)
        if address in (None, _MAP_FAILED):
            buffer.release()
            raise OutOfMemoryError(f"cannot reserve {format_bytes(size)} of address space for "
                                   f"{self.device.name}: {os.strerror(ctypes.get_errno())}",
                                   where=self.device.name)
        with self._lock:
            bisect.insort(self._starts, address)
            self._ends[address] = address + size
            self._buffers[address] = buffer
        return address

    def free(self, ptr: int) -> None:
        with self._lock:
            i = bisect.bisect_left(self._starts, ptr)
            del self._starts[i]
            end = self._ends.pop(ptr)
            buffer = self._buffers.pop(ptr)
        buffer.release()
        _munmap(ptr, end - ptr)

    def locate(self, address: int) -> tuple[Any, int]:
        """(buffer, byte offset) of a device address; DeviceError if none holds it."""
        with self._lock:
            i = bisect.bisect_right(self._starts, address) - 1
            if i >= 0:
                start = self._starts[i]
                if address <= self._ends[start]:  # (the end itself: an empty view there)
                    return self._buffers[start], address - start
        raise DeviceError(f"address 0x{address:x} is not memory of {self.device.name}",
                          hint="pass tensors allocated on this device (t.to(device))")
