"""Whole-function passes over the tile IR. Constant folding, CSE and type inference happen
as the builder creates values (semantic.py); fusion and mask elimination are decisions of
the printer (codegen/cstyle.py). What is left needs the whole function: dead-code removal."""

from __future__ import annotations

from tessera.lang.ir import Block, Function, Op

__all__ = ["dce"]

_EFFECTS = frozenset({"store"})


def dce(fn: Function) -> Function:
    """Remove ops whose values are never used and that write nothing, innermost first.
    A loop or branch stays if anything inside it writes or any of its results is used."""
    used: set[int] = set()
    _sweep(fn.body, used)
    return fn


def _sweep(block: Block, used: set[int]) -> bool:
    """Drop dead ops of `block` (walking backwards); True if the block has side effects."""
    used.update(y.id for y in block.yields)
    live: list[Op] = []
    effects = False
    for op in reversed(block.ops):
        inner = False
        for b in op.blocks:
            inner |= _sweep(b, used)
        keep = op.kind in _EFFECTS or inner or op.id in used
        if keep:
            live.append(op)
            used.update(o.id for o in op.operands)
            effects |= op.kind in _EFFECTS or inner
    block.ops = live[::-1]
    return effects
