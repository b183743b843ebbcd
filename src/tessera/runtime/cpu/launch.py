"""The native launcher: `call(address, grid0, grid1, grid2, *args)` runs a compiled kernel
entry point (the ABI of lang/codegen/c.py: the grid, then 8-byte argument slots) for
about the cost of a Python method call. ctypes took ~2 us per launch to marshal the same.

A recorder (the graph compiler's) may watch every launch and every status check, to
replay the sequence later without Python. A redirect (tessera.ops on an OpenCL device) may
take launches over and run them on another device. While a profile is active (runtime/profiling.py)
every launch is timed in C and reported; otherwise the timer hook is a NULL pointer.
"""

from __future__ import annotations

import ctypes
from collections.abc import Callable
from functools import cache
from pathlib import Path
from typing import Any, Protocol

from tessera.runtime import profiling
from tessera.runtime.toolchain import compile_extension

__all__ = ["Recorder", "check", "lasting", "lasting_buffers", "launcher", "set_recorder",
           "set_redirect"]


class Recorder(Protocol):
    def launched(self, address: int, g0: int, g1: int, g2: int, *slots: Any) -> None: ...
    def checked(self, address: int, error: Callable[[], Exception]) -> None: ...


_recorder: Recorder | None = None
_LASTING: dict[int, int] = {}  # address -> bytes of buffers kernels use for the process


@cache
def _extension() -> Any:
    ext = compile_extension(Path(__file__).with_name("launch.c").read_text(), "_tsr_launch")
    profiling.subscribe(lambda session: ext.set_timer(session and session.kernel))
    return ext


def launcher() -> Callable[..., None]:
    """The extension's `call` (built once per machine, then loaded from the cache)."""
    return _extension().call


def set_recorder(recorder: Recorder | None) -> None:
    """Pass every launch and status check to `recorder` (None: stop)."""
    global _recorder
    _recorder = recorder
    _extension().set_hook(recorder.launched if recorder is not None else None)


def set_redirect(redirect: Callable[..., bool] | None) -> None:
    """Ask `redirect(address, g0, g1, g2, *slots)` about every launch first: when it returns
    True it has run the launch itself (on another device) and the entry point is skipped."""
    _extension().set_redirect(redirect)


def check(address: int, error: Callable[[], Exception]) -> None:
    """Raise `error()` if the int64 status word a kernel wrote at `address` is non-zero."""
    if _recorder is not None:
        _recorder.checked(address, error)
    if ctypes.c_int64.from_address(address).value:
        raise error()


def lasting(address: int, nbytes: int) -> None:
    """Declare a buffer that kernels are given and that lives as long as the process (a
    table, a cache of packed weights): a recorded launch may keep pointing into it."""
    _LASTING[address] = nbytes


def lasting_buffers() -> list[tuple[int, int]]:
    return list(_LASTING.items())
