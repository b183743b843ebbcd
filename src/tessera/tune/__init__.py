"""The autotuner: measure which template parameters and kernel tiles are fastest on this
machine and keep them in the per-machine knowledge base (`tessera.runtime.knowledge`),
which the templates, ops and generated kernels read without importing this layer; and
share that knowledge between machines. The tile search (which imports torch) loads on
first use, so sharing records stays light; its targets for ops and compiled graphs are
in `tessera.tools.tuning` (they import the layers above this one)."""

from __future__ import annotations

import importlib
from typing import Any

from tessera.tune.gemm import FULL_SIZES, MAX_NOISE, QUICK_SIZES, tune_gemm
from tessera.tune.share import ShareError, export_records, import_records

_LAZY = dict.fromkeys(("MAX_SPREAD", "STRATEGIES", "Target", "Trial", "TuneResult", "estimate",
                       "tune_tile"), "tessera.tune.search")

__all__ = ["FULL_SIZES", "MAX_NOISE", "QUICK_SIZES", "ShareError", "export_records",
           "import_records", "tune_gemm", *_LAZY]


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'tessera.tune' has no attribute {name!r}")
