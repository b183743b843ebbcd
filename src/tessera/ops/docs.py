"""docs/ops.md, generated from the registry: `python -m tessera.ops.docs [PATH]` writes it;
the tests check that the checked-in page is current."""

from __future__ import annotations

import sys
from pathlib import Path

from tessera.ops.registry import KINDS, OpDef, definitions

__all__ = ["render"]

_HEADER = """# Operator reference

Generated from the registry by `python -m tessera.ops.docs`; do not edit by hand.

Every op is callable three ways, with one definition behind them:

- eagerly, `tessera.ops.NAME(...)`, on CPU torch tensors, numpy arrays or tessera tensors
  (zero-copy; the result comes back in the kind of the first tensor argument);
- as a torch custom op, `torch.ops.tessera.NAME(...)`, which works inside
  `torch.compile` graphs and `torch.export` programs (it has a fake implementation);
- from the graph compiler, which lowers the torch ops in the last column to it.

Bad arguments raise a `tessera.TesseraError` naming the op and the argument. Dtypes:
"all" is float32, bfloat16, float16, int8, uint8, int32, int64 and bool; "floats" the
first three. Half-precision inputs are computed in float32 and rounded once on store.
"""


def _row(d: OpDef) -> str:
    torch_names = ", ".join(sorted({_torch_name(t) for t in d.implements})) or ""
    args = d.schema[d.schema.index("(") + 1:d.schema.rindex(") ->")]
    cells = [f"`{d.name}`", f"`{args}`", f"`{d.schema.rsplit(' -> ', 1)[1]}`",
             d.doc.replace("|", "\\|"), _dtypes(d.dtypes), ", ".join(d.epilogues),
             torch_names]
    return "| " + " | ".join(cells) + " |"


_ALL = {"float32", "bfloat16", "float16", "int8", "uint8", "int32", "int64", "bool"}
_FLOATS = {"float32", "bfloat16", "float16"}


def _dtypes(names: tuple[str, ...]) -> str:
    """The dtype list, with the two common sets named: all 8, or the 3 float dtypes."""
    s = set(names)
    if s == _ALL:
        return "all"
    if _FLOATS <= s:
        return ", ".join(["floats", *(n for n in names if n not in _FLOATS)])
    return ", ".join(names)


def _torch_name(t: object) -> str:
    name = getattr(t, "__qualname__", None) or str(t)
    module = getattr(t, "__module__", "") or ""
    return f"`{module}.{name}`" if module and "." not in str(t) and module != "builtins" \
        else f"`{t}`"


def render() -> str:
    lines = [_HEADER]
    defs = definitions()
    for kind, what in KINDS.items():
        ops = [d for d in defs if d.kind == kind]
        if not ops:
            continue
        lines += [f"## {kind}", "", what[0].upper() + what[1:] + ".", "",
                  "| op | arguments | returns | what | dtypes | fuses | lowers from |",
                  "|---|---|---|---|---|---|---|", *(_row(d) for d in ops), ""]
    return "\n".join(lines)


def default_path() -> Path:
    return Path(__file__).resolve().parents[3] / "docs" / "ops.md"


if __name__ == "__main__":
    path = Path(sys.argv[1]) if len(sys.argv) > 1 else default_path()
    path.write_text(render())
    print(f"wrote {path}")
