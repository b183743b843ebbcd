"""The native replayer of recorded launch sequences (replay.c), built once per machine."""

from __future__ import annotations

from functools import cache
from pathlib import Path
from typing import Any

from tessera.runtime.toolchain import compile_extension

__all__ = ["builtins", "native"]


@cache
def native() -> Any:
    return compile_extension(Path(__file__).with_name("replay.c").read_text(), "_tsr_replay")


@cache
def builtins() -> dict[str, int]:
    """Addresses of the builtin entry points (e.g. "memset": zero a buffer)."""
    return native().builtins()
