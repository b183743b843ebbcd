"""Device memory: raw host allocation, a caching allocator per device, and graph arenas.

Size classes. A request is rounded up to a multiple of 512 bytes up to 1 MiB (minimum one
512-byte block, so 0-byte requests get a real, aligned pointer), and above 1 MiB to the next
of 8 steps per power of two (granularity 2^(⌊log2 n⌋-3)), which bounds rounding waste to 12.5%
while letting nearby sizes share cached blocks.

Reuse. A freed block goes to a free pool keyed by its size. A request of rounded size r takes
the smallest cached block of size in [r, 2r] (best fit); a larger cached block is left alone,
so a 1 KiB request never pins a 1 GiB block and waste stays under 2x. Blocks are never split.

Freeing. A `Block` returns itself to its allocator when it is garbage-collected, from any
thread: `__del__` only appends to a lock-free queue, which the allocator drains under its lock
(at once if the lock is free, else at its next call), so a free can never deadlock with an
allocation that triggered the garbage collector.

`TESSERA_DISABLE_CACHING_ALLOCATOR=1` (read when a device's allocator is created) turns off
rounding and caching: every block comes from and goes back to the OS, for memory debuggers.

Profiling: while a profile is active, every allocation and free is a "memory" event of
source "allocator <device>" (runtime/profiling.py); otherwise each costs one check.
"""

from __future__ import annotations

import bisect
import collections
import ctypes
import errno
import os
import sys
import threading
from typing import TYPE_CHECKING, Protocol

from tessera.errors import OutOfMemoryError, ShapeError
from tessera.runtime import profiling

if TYPE_CHECKING:
    from tessera.runtime.device import Device
    from tessera.runtime.dtype import dtype as DType
    from tessera.runtime.tensor import Tensor

__all__ = [
    "ALIGNMENT",
    "Arena",
    "Block",
    "CachingAllocator",
    "HostMemory",
    "MemoryBackend",
    "empty_cache",
    "memory_stats",
    "reset_peak_memory_stats",
]

ALIGNMENT = 64  # bytes: a cache line, and a full AVX-512 vector
_SMALL_LIMIT = 1 << 20
_SMALL_STEP = 512
_MAX_SIZE_T = (1 << (8 * ctypes.sizeof(ctypes.c_size_t))) - 1


def format_bytes(n: int) -> str:
    """`n` bytes for humans, e.g. '512 B' or '1.5 MiB' (a change may be negative)."""
    units = ("B", "KiB", "MiB", "GiB", "TiB", "PiB", "EiB")
    i = min((max(abs(n), 1).bit_length() - 1) // 10, len(units) - 1)
    return f"{n} B" if i == 0 else f"{n / (1 << (10 * i)):.1f} {units[i]}"


class MemoryBackend(Protocol):
    """Raw memory of one device, as the caching allocator uses it."""

    def malloc(self, nbytes: int) -> int:
        """Address of `nbytes` fresh bytes, 64-byte aligned; OutOfMemoryError if refused."""
        ...

    def free(self, ptr: int) -> None:
        """Give back memory from `malloc`."""
        ...


class HostMemory:
    """Raw, 64-byte aligned host memory from libc's `posix_memalign` and `free`."""

    alignment = ALIGNMENT

    def __init__(self) -> None:
        libc = ctypes.CDLL(None)
        self._memalign = libc.posix_memalign
        self._memalign.argtypes = [ctypes.POINTER(ctypes.c_void_p), ctypes.c_size_t,
                                   ctypes.c_size_t]
        self._memalign.restype = ctypes.c_int
        self._free = libc.free
        self._free.argtypes = [ctypes.c_void_p]
        self._free.restype = None

    def malloc(self, nbytes: int) -> int:
        """The address of `nbytes` fresh bytes; OutOfMemoryError if the OS refuses."""
        if nbytes < 0:
            raise ShapeError(f"cannot allocate a negative number of bytes ({nbytes})")
        out = ctypes.c_void_p()
        err = errno.ENOMEM if nbytes > _MAX_SIZE_T else \
            self._memalign(ctypes.byref(out), self.alignment, max(nbytes, 1))
        if err != 0 or not out.value:
            raise OutOfMemoryError(f"host allocation of {format_bytes(nbytes)} failed "
                                   f"({os.strerror(err) if err else 'null pointer'})",
                                   where="cpu",
                                   hint="free some tensors, use smaller shapes, or add memory")
        return out.value

    def free(self, ptr: int) -> None:
        """Return memory from `malloc` to the OS."""
        self._free(ptr)


class Block:
    """A live allocation: `ptr` (64-byte aligned), `size` (rounded capacity in bytes),
    `nbytes` (what was asked for) and `device`. Its memory returns to the allocator's
    cache when the last reference to the Block goes away."""

    __slots__ = ("__weakref__", "_allocator", "device", "nbytes", "ptr", "size")

    def __init__(self, allocator: CachingAllocator, ptr: int, size: int, nbytes: int):
        self._allocator = allocator
        self.device = allocator.device
        self.ptr = ptr
        self.size = size
        self.nbytes = nbytes

    def __repr__(self) -> str:
        return (f"Block(ptr=0x{self.ptr:x}, size={self.size}, nbytes={self.nbytes}, "
                f"device={self.device.name!r})")

    def __del__(self) -> None:
        if sys is None or sys.is_finalizing():
            return  # the process is exiting: the OS takes the memory back
        self._allocator._release(self.ptr, self.size)


class CachingAllocator:
    """Per-device allocator that caches freed blocks for reuse (see the module docstring for
    the size classes and the reuse policy). Thread-safe."""

    def __init__(self, device: Device, backend: MemoryBackend):
        self.device = device
        self.backend = backend
        self.caching = os.environ.get("TESSERA_DISABLE_CACHING_ALLOCATOR", "") in ("", "0")
        self._lock = threading.Lock()
        self._pending: collections.deque[tuple[int, int]] = collections.deque()
        self._pool: dict[int, list[int]] = {}  # size -> cached pointers (LIFO: warm first)
        self._pool_sizes: list[int] = []  # sorted keys of _pool
        self._allocated = self._reserved = self._peak = 0
        self._num_allocs = self._num_os_allocs = self._active = self._cached = 0

    def round_size(self, nbytes: int) -> int:
        """The capacity a request of `nbytes` gets."""
        if not self.caching:
            return max(nbytes, 1)
        if nbytes <= _SMALL_LIMIT:
            return max(-(-nbytes // _SMALL_STEP), 1) * _SMALL_STEP
        step = 1 << (nbytes.bit_length() - 4)
        return -(-nbytes // step) * step

    def allocate(self, nbytes: int) -> Block:
        """A block of at least `nbytes` bytes, from the cache if a close fit is there."""
        if nbytes < 0:
            raise ShapeError(f"cannot allocate a negative number of bytes ({nbytes})",
                             where=self.device.name)
        size = self.round_size(nbytes)
        session = profiling.active
        t0 = profiling.now() if session is not None else 0
        with self._lock:
            self._drain()
            cached = self._take_cached(size)
            if cached is None:
                ptr = self._os_alloc(size)
            else:
                ptr, size = cached
            self._num_allocs += 1
            self._active += 1
            self._allocated += size
            self._peak = max(self._peak, self._allocated)
        if session is not None:
            session.memory(f"allocator {self.device.name}", "alloc", size, t0,
                           profiling.now(), {"requested": nbytes, "cached": cached is not None})
        return Block(self, ptr, size, nbytes)

    def _take_cached(self, size: int) -> tuple[int, int] | None:
        """Best fit from the pool: (ptr, its size) of the smallest block in [size, 2*size]."""
        i = bisect.bisect_left(self._pool_sizes, size)
        if i == len(self._pool_sizes) or self._pool_sizes[i] > 2 * size:
            return None
        found = self._pool_sizes[i]
        stack = self._pool[found]
        ptr = stack.pop()
        if not stack:
            del self._pool[found]
            del self._pool_sizes[i]
        self._cached -= 1
        return ptr, found

    def _os_alloc(self, size: int) -> int:
        try:
            ptr = self.backend.malloc(size)
        except OutOfMemoryError:
            self._free_cached()  # give the cache back and try once more
            try:
                ptr = self.backend.malloc(size)
            except OutOfMemoryError as err:
                raise OutOfMemoryError(
                    f"cannot allocate {format_bytes(size)} on {self.device.name}: "
                    f"{format_bytes(self._allocated)} already allocated by Tessera",
                    where=self.device.name,
                    hint="free tensors you no longer need, or use smaller shapes") from err
        self._num_os_allocs += 1
        self._reserved += size
        return ptr

    def _release(self, ptr: int, size: int) -> None:
        """Called from `Block.__del__`, on any thread, possibly inside the garbage collector."""
        self._pending.append((ptr, size))
        if self._lock.acquire(blocking=False):
            try:
                self._drain()
            finally:
                self._lock.release()

    def _drain(self) -> None:
        """Move blocks freed since the last call into the pool (or to the OS). Lock held."""
        while self._pending:
            ptr, size = self._pending.popleft()
            self._active -= 1
            self._allocated -= size
            session = profiling.active
            if session is not None:
                t = profiling.now()
                session.memory(f"allocator {self.device.name}", "free", -size, t, t)
            if not self.caching:
                self.backend.free(ptr)
                self._reserved -= size
                continue
            stack = self._pool.get(size)
            if stack is None:
                stack = self._pool[size] = []
                bisect.insort(self._pool_sizes, size)
            stack.append(ptr)
            self._cached += 1

    def _free_cached(self) -> None:
        for size, stack in self._pool.items():
            for ptr in stack:
                self.backend.free(ptr)
            self._reserved -= size * len(stack)
        self._pool.clear()
        self._pool_sizes.clear()
        self._cached = 0

    def empty_cache(self) -> None:
        """Return every cached (unused) block to the OS."""
        with self._lock:
            self._drain()
            self._free_cached()

    def reset_peak(self) -> None:
        """Restart peak tracking from the current allocated bytes."""
        with self._lock:
            self._drain()
            self._peak = self._allocated

    def stats(self) -> dict[str, int]:
        """Current counters: bytes allocated (live blocks, rounded sizes), reserved (live plus
        cached), peak allocated; allocate calls, OS allocations, live and cached blocks."""
        with self._lock:
            self._drain()
            return {
                "allocated_bytes": self._allocated,
                "reserved_bytes": self._reserved,
                "peak_allocated_bytes": self._peak,
                "num_allocs": self._num_allocs,
                "num_os_allocs": self._num_os_allocs,
                "active_blocks": self._active,
                "cached_blocks": self._cached,
            }


def _allocator(dev: str | Device | None) -> CachingAllocator:
    from tessera.runtime.device import device

    return device(dev).allocator


def memory_stats(device: str | Device | None = None) -> dict[str, int]:
    """The allocator counters of `device` (default: the CPU); see `CachingAllocator.stats`."""
    return _allocator(device).stats()


def reset_peak_memory_stats(device: str | Device | None = None) -> None:
    """Make `peak_allocated_bytes` of `device` equal to what is allocated now."""
    _allocator(device).reset_peak()


def empty_cache(device: str | Device | None = None) -> None:
    """Give the cached, unused blocks of `device` back to the OS."""
    _allocator(device).empty_cache()


class Arena:
    """One aligned allocation that a static memory plan carves into tensors at fixed offsets.

    The memory lives while the arena or any of its views does.
    """

    def __init__(self, nbytes: int, device: str | Device | None = None):
        self.block = _allocator(device).allocate(nbytes)
        self.nbytes = nbytes

    @property
    def ptr(self) -> int:
        """Address of the arena's first byte (64-byte aligned)."""
        return self.block.ptr

    @property
    def device(self) -> Device:
        return self.block.device

    def view(self, offset: int, shape: int | tuple[int, ...], dtype: DType | str) -> Tensor:
        """A contiguous tensor of `shape` and `dtype` starting `offset` bytes into the arena."""
        from tessera.runtime.dtype import as_dtype
        from tessera.runtime.tensor import Tensor, contiguous_strides, normalize_shape

        dt, dims = as_dtype(dtype), normalize_shape(shape)
        if offset < 0 or offset % ALIGNMENT:
            raise ShapeError(f"arena offset {offset} is not a non-negative multiple of "
                             f"{ALIGNMENT}", where=repr(self),
                             hint="the memory planner must align every buffer to 64 bytes")
        size = dt.itemsize
        for n in dims:
            size *= n
        if offset + size > self.nbytes:
            raise ShapeError(f"a {dt.name} view of shape {dims} at offset {offset} needs "
                             f"{offset + size} bytes; the arena has {self.nbytes}",
                             where=repr(self))
        return Tensor(self.block, self.block.ptr, self.nbytes, dims,
                      contiguous_strides(dims), offset // dt.itemsize, dt, self.device)

    def __repr__(self) -> str:
        return f"Arena(nbytes={self.nbytes}, ptr=0x{self.ptr:x}, device={self.device.name!r})"

