"""Benchmarks on a device that is not the host (`tessera bench lang|ops --device opencl`): the
device the suites build their cases for, inputs moved there once, results brought back
for the checks, and where a call's time goes there (OpenCL event profiling)."""

from __future__ import annotations

import statistics
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

from tessera.bench.runner import BenchError
from tessera.runtime.device import Device

__all__ = ["DeviceProfile", "current", "download", "impl_name", "profile", "target", "upload"]

_target: Device | None = None


@contextmanager
def target(device: Device | None) -> Iterator[None]:
    """Cases built inside time the Tessera call on `device` too (None: the host only)."""
    global _target
    previous, _target = _target, device
    try:
        yield
    finally:
        _target = previous


def current() -> Device | None:
    """The device the cases being built time Tessera on besides the host, if any."""
    return _target


def impl_name(device: Device) -> str:
    """The name of the Tessera implementation that runs on `device`, e.g. tessera_opencl."""
    return f"tessera_{device.type}"


def upload(value: Any, device: Device) -> Any:
    """`value` with each torch tensor (also inside lists and tuples) copied to `device` once,
    in its own layout (a transposed view stays a transposed view there)."""
    import torch

    import tessera
    from tessera.runtime.tensor import element_span

    if isinstance(value, (list, tuple)):
        return type(value)(upload(v, device) for v in value)
    if not isinstance(value, torch.Tensor):
        return value
    if value.is_contiguous() or value.numel() == 0:
        return tessera.as_tensor(value.contiguous()).to(device)
    lo, hi = element_span(tuple(value.shape), tuple(value.stride()))
    span = value.as_strided((hi - lo + 1,), (1,), value.storage_offset() + lo).contiguous()
    return tessera.as_tensor(span).to(device).as_strided(tuple(value.shape), value.stride(),
                                                         -lo)


def download(value: Any) -> Any:
    """`value` with each device tensor (also inside lists and tuples) as a host torch tensor."""
    from tessera.runtime.tensor import Tensor

    if isinstance(value, (list, tuple)):
        return type(value)(download(v) for v in value)
    return value.cpu().torch() if isinstance(value, Tensor) else value


class DeviceProfile:
    """Where one call's time goes on an OpenCL device, medians over several calls: the
    commands it enqueues and their summed execution time on the device's clock."""

    def __init__(self, commands: int, device_s: float):
        self.commands = commands
        self.device_s = device_s


def profile(device: Device, fn: Callable[[], object], calls: int = 7) -> DeviceProfile:
    """Run `fn` (which enqueues work on `device`) `calls` times, each followed by a
    synchronize, reading the profiled start and end of every command it enqueued."""
    if getattr(device, "type", None) != "opencl":
        raise BenchError(f"profile reads OpenCL events; {device.name} is not an OpenCL device",
                         hint="profile a call on an opencl device (tessera.device('opencl'))")
    fn()
    device.synchronize()
    counts, times = [], []
    for _ in range(calls):
        with device.commands() as events:
            fn()
            device.synchronize()
        counts.append(len(events))
        times.append(sum(e.profile.end - e.profile.start for e in events) * 1e-9)
    return DeviceProfile(int(statistics.median(counts)), statistics.median(times))
