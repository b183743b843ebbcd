"""An OpenCL device: its context, queues, memory, copies and program builds."""

from __future__ import annotations

import contextlib
import functools
import hashlib
import threading
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np

from tessera.errors import CompileError
from tessera.runtime import opencl, profiling
from tessera.runtime.device import Device, register_backend
from tessera.runtime.profiling import span
from tessera.runtime.toolchain import save_failed_source

__all__ = ["OpenCLDevice", "Queue"]


class _Marker:
    """An event recorded in a queue (runtime/stream.py's record protocol)."""

    __slots__ = ("event",)

    def __init__(self, event: Any):
        self.event = event

    def done(self) -> bool:
        return self.event.command_execution_status == opencl.cl().command_execution_status.COMPLETE

    def wait(self) -> None:
        self.event.wait()

    @property
    def time(self) -> float | None:
        """Seconds on the device's clock when the marker completed (profiled queues)."""
        try:
            return self.event.profile.end * 1e-9
        except opencl.cl().Error:
            return None


class Queue:
    """An in-order command queue with profiling: what a Stream on an OpenCL device is."""

    def __init__(self, device: OpenCLDevice):
        cl = device.cl
        self.device = device
        self.cl_queue = cl.CommandQueue(
            device.context, properties=cl.command_queue_properties.PROFILING_ENABLE)

    def finish(self) -> None:
        self.cl_queue.finish()

    def marker(self) -> _Marker:
        return _Marker(self.device.cl.enqueue_marker(self.cl_queue))

    def wait_for(self, record: _Marker) -> None:
        """Make later commands wait for `record` (a marker of any queue of this device)."""
        self.device.cl.enqueue_barrier(self.cl_queue, wait_for=[record.event])


class OpenCLDevice(Device):
    """One OpenCL device. Memory lives on the device: move tensors with `t.to(device)`."""

    type = "opencl"
    is_host = False

    def __init__(self, index: int = 0):
        super().__init__(index)
        self.cl = opencl.cl()
        self.cl_device = opencl.cl_devices()[index]
        self.context = self.cl.Context([self.cl_device])
        # On CPU devices (PoCL) one work-item per work-group: given no local size, PoCL picks
        # large groups and keeps every work-item's private arrays at once, so a kernel's
        # 16 KB tiles over a large grid overflow its threads' stacks (a segfault). Kernels
        # are one program per work-item (no barriers, no local memory): no slower on PoCL.
        cpu = self.cl_device.type & self.cl.device_type.CPU
        self._local_size = (1, 1, 1) if cpu else None
        self._default_queue: Queue | None = None
        self._programs: dict[str, Any] = {}
        self._programs_lock = threading.Lock()
        self._sinks = threading.local()  # .stack: the lists `commands()` blocks collect into

    def _make_allocator(self):
        from tessera.runtime.memory import CachingAllocator
        from tessera.runtime.opencl.memory import DeviceMemory

        return CachingAllocator(self, DeviceMemory(self))

    # -- queues --------------------------------------------------------------------------
    def new_queue(self) -> Queue:
        return Queue(self)

    @property
    def queue(self) -> Queue:
        """The queue of the calling thread's current stream on this device."""
        from tessera.runtime.stream import current_stream

        return current_stream(self).queue

    @property
    def default_queue(self) -> Queue:
        with self._lock:
            if self._default_queue is None:
                self._default_queue = Queue(self)
            return self._default_queue

    # -- memory --------------------------------------------------------------------------
    def locate(self, address: int) -> tuple[Any, int]:
        """(cl.Buffer, byte offset) of a device address (a tensor's data_ptr())."""
        return self.allocator.backend.locate(address)

    @functools.cached_property
    def empty_buffer(self) -> Any:
        """A small buffer that stands for the null data pointer of an empty tensor in kernel
        arguments (a kernel never reads an empty tensor's elements)."""
        return self.cl.Buffer(self.context, self.cl.mem_flags.READ_WRITE, 64)

    def write(self, address: int, host: np.ndarray) -> None:
        """Copy the bytes of contiguous `host` to device memory at `address`."""
        if host.nbytes:
            buffer, offset = self.locate(address)
            self._note(self.cl.enqueue_copy(self.queue.cl_queue, buffer, host,
                                            dst_offset=offset))
            self.queue.finish()  # the host array may go away once this returns

    def read(self, address: int, nbytes: int) -> np.ndarray:
        """The `nbytes` bytes at device `address`, as a new uint8 array."""
        out = np.empty(nbytes, np.uint8)
        if nbytes:
            buffer, offset = self.locate(address)
            self._note(self.cl.enqueue_copy(self.queue.cl_queue, out, buffer,
                                            src_offset=offset))
            self.queue.finish()
        return out

    def copy(self, dst: int, src: int, nbytes: int) -> None:
        """Device-to-device copy of `nbytes` (queued on the current stream)."""
        if nbytes:
            (db, do), (sb, so) = self.locate(dst), self.locate(src)
            self._note(self.cl.enqueue_copy(self.queue.cl_queue, db, sb, byte_count=nbytes,
                                            dst_offset=do, src_offset=so))

    def fill(self, address: int, nbytes: int, byte: int = 0) -> None:
        """Set `nbytes` bytes at `address` to `byte` (queued on the current stream)."""
        if nbytes:
            buffer, offset = self.locate(address)
            self._note(self.cl.enqueue_fill_buffer(self.queue.cl_queue, buffer,
                                                   np.uint8(byte), offset, nbytes))

    @contextlib.contextmanager
    def commands(self) -> Iterator[list[Any]]:
        """Collect the OpenCL event of every command this thread enqueues on this device
        inside the block — kernels, copies, fills — e.g. to sum their device times
        (`e.profile.end - e.profile.start`, ns, once each has completed)."""
        sinks = self._sinks.__dict__.setdefault("stack", [])
        events: list[Any] = []
        sinks.append(events)
        try:
            yield events
        finally:
            sinks.remove(events)

    def _note(self, event: Any) -> Any:
        for events in getattr(self._sinks, "stack", ()):
            events.append(event)
        return event

    # -- programs ------------------------------------------------------------------------
    def build(self, source: str, name: str, options: tuple[str, ...] = (),
              where: str | None = None) -> Any:
        """`source` built for this device (a cl.Program). The binary is kept in the compile
        cache, keyed by source, options, device and driver; a build error is a
        CompileError carrying the build log."""
        key = hashlib.sha256("\0".join(["tessera-opencl-1", source, *options,
                                         *self._identity()]).encode()).hexdigest()
        with self._programs_lock:
            program = self._programs.get(key)
        if program is not None:
            return program
        from tessera.runtime.cache import default_cache

        def compile_(tmp) -> dict[str, Any]:
            program = self._compile(source, name, options, where, key)
            (tmp / "program.bin").write_bytes(program.get_info(
                self.cl.program_info.BINARIES)[0])
            (tmp / "source.cl").write_text(source)
            return {"name": name, "device": self.cl_device.name}

        with span("compile", name, {"key": key[:16], "device": self.name}) as event:
            entry, built = default_cache().get_or_build("opencl", key, compile_)
            event["cache"] = "miss" if built else "hit"
        binary = (entry / "program.bin").read_bytes()
        try:
            program = self.cl.Program(self.context, [self.cl_device], [binary]).build(
                options=list(options))
        except self.cl.Error:  # a binary this driver no longer takes: build from source
            program = self._compile(source, name, options, where, key)
        with self._programs_lock:
            return self._programs.setdefault(key, program)

    def _compile(self, source: str, name: str, options: tuple[str, ...],
                 where: str | None, key: str) -> Any:
        try:
            return self.cl.Program(self.context, source).build(options=list(options))
        except self.cl.Error as e:
            raise CompileError(f"OpenCL build of {name!r} failed on {self.name} "
                               f"({self.cl_device.name})", compiler_output=str(e),
                               source_path=str(save_failed_source(source, name, key, ".cl")),
                               command=f"clBuildProgram(options={' '.join(options)!r})",
                               where=where) from None

    def _identity(self) -> tuple[str, ...]:
        d = self.cl_device
        return (d.platform.name, d.platform.version, d.name, d.version, d.driver_version)

    def run(self, kernel: Any, grid: tuple[int, int, int], args: list[Any],
            name: str = "") -> None:
        """Enqueue `kernel` over an NDRange of `grid` on the current stream's queue. While
        a profile is active the launch waits for the device and becomes a "kernel" event
        lasting what the device's own timestamps say, ending when the host saw it end."""
        if 0 in grid:
            return
        kernel.set_args(*args)
        self._enqueue(kernel, grid, name)

    def prepare(self, kernel: Any, grid: tuple[int, int, int], args: list[Any],
                name: str = "") -> Callable[[], None]:
        """A function that runs `kernel` with `args` over `grid` each time it is called,
        through a kernel object of its own whose arguments are set now, once."""
        if 0 in grid:
            return lambda: None
        own = self.cl.Kernel(kernel.program, kernel.function_name)
        for i, a in enumerate(args):
            own.set_arg(i, a)
        return functools.partial(self._enqueue, own, grid, name)

    def _enqueue(self, kernel: Any, grid: tuple[int, int, int], name: str) -> None:
        event = self._note(self.cl.enqueue_nd_range_kernel(self.queue.cl_queue, kernel, grid,
                                                           self._local_size))
        session = profiling.active
        if session is not None:
            event.wait()
            end = profiling.now()
            ran = event.profile.end - event.profile.start
            session.record("kernel", name or kernel.function_name, end - ran, end,
                           {"device": self.name, "grid": list(grid)})

    # -- facts ---------------------------------------------------------------------------
    def properties(self) -> dict[str, Any]:
        d, info = self.cl_device, self.cl.device_type
        kinds = [k for k in ("GPU", "CPU", "ACCELERATOR") if d.type & getattr(info, k)]
        return {
            **super().properties(),
            "model": d.name.strip(),
            "kind": "/".join(kinds) or "other",
            "vendor": d.vendor.strip(),
            "platform": f"{d.platform.name} {d.platform.version}".strip(),
            "driver": d.driver_version,
            "version": d.version,
            "compute_units": d.max_compute_units,
            "clock_mhz": d.max_clock_frequency,
            "global_memory_bytes": d.global_mem_size,
            "max_buffer_bytes": d.max_mem_alloc_size,
            "local_memory_bytes": d.local_mem_size,
            "max_work_group_size": d.max_work_group_size,
            "preferred_float_vector": d.preferred_vector_width_float,
            "fp16": "cl_khr_fp16" in d.extensions,
            "fp64": "cl_khr_fp64" in d.extensions,
        }

    def synchronize(self) -> None:
        from tessera.runtime.stream import synchronize

        synchronize(self)


@functools.cache
def _count() -> int:
    return len(opencl.cl_devices())


def _missing() -> str:
    return opencl.unavailable_reason()


register_backend("opencl", OpenCLDevice, _count, _missing)
