"""Every registered op as a torch custom op, `torch.ops.tessera.<name>`, with a fake
(meta) implementation so it can live inside `torch.compile` graphs and `torch.export`
programs. Inference only: no autograd formulas."""

from __future__ import annotations

import torch

from tessera.ops.registry import OpDef

__all__ = ["register"]

_LIB = torch.library.Library("tessera", "DEF")


def register(d: OpDef) -> None:
    """Define `tessera::<name>` from the op's schema, with its eager implementation for
    every backend (it checks the device itself) and its meta function for fake tensors."""
    _LIB.define(d.schema)
    _LIB.impl(d.name, d.impl, "CompositeExplicitAutograd")
    torch.library.register_fake(f"tessera::{d.name}", d.meta, lib=_LIB)
