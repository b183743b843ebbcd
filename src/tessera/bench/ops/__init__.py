"""Suite `ops`: tessera.ops against torch eager and torch.compile (Inductor), family by
family. Each module of this package is one family's cases (`cases(quick) -> list[Case]`);
the suite runs them all, in module name order."""

from __future__ import annotations

import importlib
import pkgutil

from tessera.bench.runner import Case

__all__ = ["cases"]


def cases(quick: bool) -> list[Case]:
    out: list[Case] = []
    for m in sorted(pkgutil.iter_modules(__path__), key=lambda m: m.name):
        if not m.name.startswith("_"):
            out += importlib.import_module(f"{__name__}.{m.name}").cases(quick)
    return out
