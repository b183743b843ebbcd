"""OpenCL devices (`opencl:N`, over every platform the ICD loader knows; PoCL in CI):
memory with reserved addresses, command queues as streams, program builds cached on disk.
pyopencl is imported only when an OpenCL device is asked for."""

from __future__ import annotations

import functools
from typing import Any

__all__ = ["INSTALL", "available", "cl", "cl_devices", "unavailable_reason"]

INSTALL = ("pip install pyopencl, and an OpenCL driver: `apt-get install pocl-opencl-icd "
           "ocl-icd-opencl-dev` (PoCL, on the CPU) or your GPU vendor's")


@functools.cache
def _probe() -> tuple[Any, list[Any], str]:
    """(pyopencl or None, every device of every platform, why there are none)."""
    try:
        import pyopencl
    except ImportError as e:
        return None, [], f"pyopencl is not installed ({e})"
    try:
        platforms = pyopencl.get_platforms()
    except pyopencl.Error as e:  # no ICD registered: "PLATFORM_NOT_FOUND_KHR"
        return pyopencl, [], f"no OpenCL platform found by the ICD loader ({e})"
    found = []
    for p in platforms:
        try:
            found += p.get_devices()
        except pyopencl.Error:  # a platform with no devices of any type
            continue
    return pyopencl, found, "" if found else "the OpenCL platforms found have no devices"


def cl() -> Any:
    """The pyopencl module (DeviceError with what to install if it is missing)."""
    module, _, why = _probe()
    if module is None:
        from tessera.errors import DeviceError
        raise DeviceError(f"OpenCL is not available: {why}", hint=INSTALL)
    return module


def cl_devices() -> list[Any]:
    """Every OpenCL device, in `opencl:N` order."""
    return _probe()[1]


def available() -> bool:
    """Whether at least one OpenCL device can be used."""
    return bool(cl_devices())


def unavailable_reason() -> str:
    """Why no OpenCL device can be used and what to install ("" if one can)."""
    why = _probe()[2]
    return f"{why}; {INSTALL}" if why else ""
