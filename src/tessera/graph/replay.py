"""The native replayer of recorded launch sequences (replay.c), built once per machine;
`profiled()` is its build with per-launch timers, used only while a profile is active."""

from __future__ import annotations

from functools import cache
from pathlib import Path
from typing import Any

from tessera.runtime import profiling
from tessera.runtime.toolchain import compile_extension

__all__ = ["builtins", "native", "profiled"]


@cache
def native() -> Any:
    return compile_extension(Path(__file__).with_name("replay.c").read_text(), "_tsr_replay")


@cache
def profiled() -> Any:
    """replay.c built with -DTESSERA_PROFILE: `run` takes a ninth argument, the address of
    an int64 array receiving each launch's start and end times."""
    return compile_extension(Path(__file__).with_name("replay.c").read_text(),
                             "_tsr_replay_prof", flags=["-DTESSERA_PROFILE"])


@cache
def builtins() -> dict[str, int]:
    """Addresses of the builtin entry points (e.g. "memset": zero a buffer)."""
    found = native().builtins()
    for name, address in found.items():
        profiling.name_kernel(address, name)
    return found
