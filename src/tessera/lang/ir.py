"""The tile IR: SSA values in blocks with structured control flow (for, if, while).

Every value is an `Op`; an op's operands are earlier ops. `for`, `if` and `while` own
blocks; values they carry out are `result` ops, values a block receives are `blockarg`
ops, and a block ends by yielding values. `str(fn)` prints the IR.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field
from typing import Any

from tessera.lang.types import TensorType, TileType

__all__ = ["Block", "Function", "Loc", "Op"]

ELEMENTWISE = frozenset({"unary", "binary", "where", "cast", "const", "arange", "full",
                         "load", "reshape"})


@dataclass(frozen=True)
class Loc:
    """A place in the user's kernel source."""

    file: str
    line: int
    text: str = ""

    def __str__(self) -> str:
        return f"{self.file}:{self.line}"


_ids = itertools.count()


@dataclass(eq=False)
class Op:
    kind: str
    operands: list[Op]
    type: TileType | TensorType | None
    attrs: dict[str, Any] = field(default_factory=dict)
    loc: Loc | None = None
    blocks: list[Block] = field(default_factory=list)
    id: int = field(default_factory=lambda: next(_ids))

    @property
    def shape(self) -> tuple[int, ...]:
        assert isinstance(self.type, TileType), self
        return self.type.shape

    def __repr__(self) -> str:
        return f"%{self.id}"


@dataclass(eq=False)
class Block:
    args: list[Op] = field(default_factory=list)
    ops: list[Op] = field(default_factory=list)
    yields: list[Op] = field(default_factory=list)

    def walk(self):
        """Every op in this block and the blocks nested in it, in program order."""
        for op in self.ops:
            yield op
            for b in op.blocks:
                yield from b.walk()


@dataclass(eq=False)
class Function:
    name: str
    params: list[Op]
    body: Block
    loc: Loc | None = None

    def __str__(self) -> str:
        lines = [f"func {self.name}(" + ", ".join(f"{p!r}: {p.type}" for p in self.params)
                 + ")"]
        _print_block(self.body, lines, 1)
        return "\n".join(lines)


def _print_block(block: Block, lines: list[str], depth: int) -> None:
    pad = "  " * depth
    if block.args:
        lines.append(f"{pad}^(" + ", ".join(f"{a!r}: {a.type}" for a in block.args) + ")")
    for op in block.ops:
        attrs = " ".join(f"{k}={v}" for k, v in op.attrs.items())
        head = f"{op!r} = " if op.type is not None else ""
        lines.append(f"{pad}{head}{op.kind}({', '.join(map(repr, op.operands))}) {attrs}"
                     f"{' : ' + str(op.type) if op.type is not None else ''}".rstrip())
        for b in op.blocks:
            _print_block(b, lines, depth + 1)
    if block.yields:
        lines.append(f"{pad}yield " + ", ".join(map(repr, block.yields)))
