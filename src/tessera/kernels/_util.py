"""What the kernel wrappers share: checking inputs and sizing rows."""

from __future__ import annotations

from typing import Any

from tessera.errors import ShapeError


def rows(x: Any, name: str) -> tuple[Any, int, int]:
    """`x` viewed as a 2-D [rows, last dim] tensor (no copy when its layout allows)."""
    if x.dim() == 2:  # already rows (and torch's reshape/view cost ~1 us each)
        return x, x.shape[0], x.shape[1]
    if x.dim() < 1:
        raise ShapeError(f"{name} needs a tensor with at least 1 dimension, got a scalar")
    n = x.shape[-1]
    x2 = x.reshape(-1, n)
    return x2, x2.shape[0], n


def like(out: Any, x: Any) -> Any:
    """`out`, computed as rows, in the shape of `x`."""
    return out if x.dim() == 2 else out.view(x.shape)


def check_vector(v: Any, n: int, name: str, what: str) -> None:
    if v is not None and tuple(v.shape) != (n,):
        raise ShapeError(f"{name}: {what} must have shape ({n},), got {tuple(v.shape)}")
