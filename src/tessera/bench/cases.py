"""Case builders the suites share."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from tessera.bench.runner import Case

__all__ = ["torch_case"]


def torch_case(name: str, ours: Callable[[], Any], ref: Callable[..., Any], args: tuple,
               quick: bool, *, bytes_moved: int = 0, flops: int = 0, atol: float = 1e-4,
               rtol: float = 1e-4, meta: dict[str, Any] | None = None) -> Case:
    """A case timing `ours()` against `ref(*args)` in torch eager and, unless `quick`,
    under torch.compile (Inductor); checked to agree within `atol` first. Reports GFLOPS
    if `flops` is given, else GB/s of `bytes_moved`."""
    import torch

    impls: dict[str, Callable[[], Any]] = {"tessera": ours,
                                           "torch_eager": lambda: ref(*args)}
    if not quick:
        compiled = torch.compile(ref, dynamic=False)
        impls["torch_inductor"] = lambda: compiled(*args)

    def check() -> None:
        want = ref(*args)
        for impl in impls.values():
            torch.testing.assert_close(impl(), want, atol=atol, rtol=rtol)

    def extra(impl: str, median_s: float) -> dict[str, float]:
        if flops:
            return {"gflops": flops / median_s / 1e9}
        return {"gb_per_s": bytes_moved / median_s / 1e9}

    return Case(name, impls, check=check, extra=extra, meta=meta or {})
