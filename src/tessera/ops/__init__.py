"""Tessera's operator library: one definition per op, serving eager calls on torch
tensors, numpy arrays and tessera tensors (`tessera.ops.softmax(x, dim=-1)`, the result
in the caller's kind), `torch.ops.tessera.<name>` inside `torch.compile` and
`torch.export`, and the graph compiler. `tessera.ops.list()` names them; the reference
is docs/ops.md, generated from the registry (`python -m tessera.ops.docs`).

Each family of ops is a module of this package (every module whose name does not start
with an underscore and is not part of the machinery below); importing the package
imports them all, which registers their ops."""

from __future__ import annotations

import importlib
import pkgutil

from tessera.ops import _fastpath
from tessera.ops._launch import ArgumentError
from tessera.ops.registry import KINDS, OpDef, definitions, get, list_ops
from tessera.ops.torchlib import register as _register_torch

_MACHINERY = {"registry", "dispatch", "torchlib", "docs"}
for _m in pkgutil.iter_modules(__path__):
    if not _m.name.startswith("_") and _m.name not in _MACHINERY:
        importlib.import_module(f"{__name__}.{_m.name}")

for _d in definitions():
    _register_torch(_d)
    globals()[_d.name] = _d.eager

list = list_ops  # tessera.ops.list(), as numpy's and torch's modules name things
_fastpath.start()

__all__ = ["KINDS", "ArgumentError", "OpDef", "get", "list", *list_ops()]
