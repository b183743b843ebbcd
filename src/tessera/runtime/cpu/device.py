"""The host CPU as a Tessera device: ISA features, cores, caches and measured peaks."""

from __future__ import annotations

import functools
import os
import platform
from pathlib import Path
from typing import Any

from tessera.runtime.device import Device, register_backend

__all__ = ["CPUDevice", "cache_sizes", "cpu_features", "cpu_model", "usable_cores"]

# Features the code generators and templates choose kernels by.
_REPORTED = ("sse4_2", "avx", "avx2", "fma", "f16c", "avx512f", "avx512bw", "avx512vl",
             "avx512_bf16", "avx512_vnni", "avx_vnni", "amx_tile", "neon", "asimd", "sve")


@functools.cache
def _cpuinfo() -> dict[str, str]:
    """The first processor block of /proc/cpuinfo (empty off Linux)."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return {}
    info: dict[str, str] = {}
    for line in text.split("\n\n")[0].splitlines():
        key, _, value = line.partition(":")
        info[key.strip()] = value.strip()
    return info


@functools.cache
def cpu_features() -> frozenset[str]:
    """ISA extensions of this CPU, in Linux /proc/cpuinfo spelling (avx2, fma, f16c, ...)."""
    info = _cpuinfo()
    flags = info.get("flags") or info.get("Features") or ""
    return frozenset(flags.split())


@functools.cache
def cpu_model() -> str:
    """The CPU's marketing name, or the machine architecture if unknown."""
    info = _cpuinfo()
    return info.get("model name") or info.get("Hardware") or platform.processor() or \
        platform.machine()


def usable_cores() -> int:
    """Cores this process may run on (affinity mask, which containers set)."""
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


@functools.cache
def cache_sizes() -> dict[str, int]:
    """Per-core data cache sizes in bytes, keyed L1d, L2, L3 (from sysfs; 0 when unknown)."""
    sizes = {"L1d": 0, "L2": 0, "L3": 0}
    root = Path("/sys/devices/system/cpu/cpu0/cache")
    for index in sorted(root.glob("index*")):
        try:
            level = (index / "level").read_text().strip()
            kind = (index / "type").read_text().strip()
            size = _parse_size((index / "size").read_text().strip())
        except OSError:
            continue
        if kind == "Instruction":
            continue
        sizes["L1d" if level == "1" else f"L{level}"] = size
    return sizes


def _parse_size(text: str) -> int:
    units = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}
    if text and text[-1].upper() in units:
        return int(text[:-1]) * units[text[-1].upper()]
    return int(text)


class CPUDevice(Device):
    """The host CPU. Memory is host memory; work runs on the calling thread or a stream."""

    type = "cpu"

    def _make_allocator(self):
        from tessera.runtime.memory import CachingAllocator, HostMemory

        return CachingAllocator(self, HostMemory())

    @property
    def features(self) -> frozenset[str]:
        return cpu_features()

    @property
    def cores(self) -> int:
        return usable_cores()

    def properties(self, measure: bool = True) -> dict[str, Any]:
        """Static facts plus (if `measure`) peak GFLOPS and bandwidth, measured once per
        machine and cached on disk."""
        props: dict[str, Any] = {
            **super().properties(),
            "model": cpu_model(),
            "arch": platform.machine(),
            "cores": self.cores,
            "logical_cpus": os.cpu_count(),
            "isa": sorted(f for f in _REPORTED if f in cpu_features()),
            "cache_bytes": cache_sizes(),
        }
        if measure:
            from tessera.runtime.cpu.probe import measured_peaks

            props.update(measured_peaks())
        return props


register_backend("cpu", CPUDevice)
