"""The native launcher: `call(address, grid0, grid1, grid2, *args)` runs a compiled kernel
entry point (the ABI of lang/codegen/c.py: the grid, then 8-byte argument slots) for
about the cost of a Python method call. ctypes took ~2 us per launch to marshal the same.
"""

from __future__ import annotations

from collections.abc import Callable
from functools import cache
from pathlib import Path
from typing import Any

from tessera.runtime.toolchain import compile_extension

__all__ = ["launcher"]


@cache
def launcher() -> Callable[..., None]:
    """The extension's `call` (built once per machine, then loaded from the cache)."""
    ext: Any = compile_extension(Path(__file__).with_name("launch.c").read_text(), "_tsr_launch")
    return ext.call
