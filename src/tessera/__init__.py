"""Tessera: an open, hardware-neutral compute architecture for neural networks.

Public names are resolved lazily so that `import tessera` stays fast and never imports
torch; see ARCHITECTURE.md for the layers behind them.
"""

from __future__ import annotations

import importlib
from typing import Any

from tessera.errors import *  # noqa: F403
from tessera.errors import __all__ as _error_names

__version__ = "0.1.0"

_LAZY: dict[str, str] = {
    # devices
    "Device": "tessera.runtime.device",
    "device": "tessera.runtime.device",
    "devices": "tessera.runtime.device",
    # dtypes
    "dtype": "tessera.runtime.dtype",
    "float32": "tessera.runtime.dtype",
    "float16": "tessera.runtime.dtype",
    "bfloat16": "tessera.runtime.dtype",
    "int8": "tessera.runtime.dtype",
    "uint8": "tessera.runtime.dtype",
    "int32": "tessera.runtime.dtype",
    "int64": "tessera.runtime.dtype",
    "bool": "tessera.runtime.dtype",
    # tensors
    "Tensor": "tessera.runtime.tensor",
    "empty": "tessera.runtime.tensor",
    "zeros": "tessera.runtime.tensor",
    "as_tensor": "tessera.runtime.tensor",
    "from_dlpack": "tessera.runtime.tensor",
    # memory
    "memory_stats": "tessera.runtime.memory",
    "reset_peak_memory_stats": "tessera.runtime.memory",
    "empty_cache": "tessera.runtime.memory",
    "Arena": "tessera.runtime.memory",
    # streams
    "Stream": "tessera.runtime.stream",
    "Event": "tessera.runtime.stream",
    "stream": "tessera.runtime.stream",
    "current_stream": "tessera.runtime.stream",
    "synchronize": "tessera.runtime.stream",
    # the graph compiler
    "compile": "tessera.graph.api",
    "load": "tessera.graph.api",
    # tools
    "profile": "tessera.tools.profiler",
}

__all__ = [*_error_names, *_LAZY, "__version__"]


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'tessera' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(__all__)
