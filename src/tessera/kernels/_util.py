"""What the kernel wrappers share: checking inputs, sizing rows, and allocating outputs
where the inputs live (host torch tensors, or tessera tensors on a device, which the
kernels launch on)."""

from __future__ import annotations

import math
from typing import Any

from tessera.errors import ShapeError
from tessera.runtime.tensor import Tensor, contiguous_strides


def rows(x: Any, name: str) -> tuple[Any, int, int]:
    """`x` viewed as a 2-D [rows, last dim] tensor (no copy when its layout allows)."""
    if x.ndim == 2:  # already rows (and torch's reshape/view cost ~1 us each)
        return x, x.shape[0], x.shape[1]
    if x.ndim < 1:
        raise ShapeError(f"{name} needs a tensor with at least 1 dimension, got a scalar")
    n = x.shape[-1]
    x2 = reshape(x, (math.prod(x.shape) // max(n, 1), n), name)
    return x2, x2.shape[0], n


def like(out: Any, x: Any) -> Any:
    """`out`, computed as rows, in the shape of `x`."""
    return out if x.ndim == 2 else reshape(out, tuple(x.shape), "the result")


def reshape(x: Any, shape: tuple[int, ...], name: str) -> Any:
    """`x` in `shape`: torch's reshape for torch tensors; a view of a contiguous tessera
    tensor (a device tensor's data cannot be copied into a new layout here)."""
    if not isinstance(x, Tensor):
        return x.reshape(shape)
    if not x.is_contiguous():
        raise ShapeError(f"{name}: a non-contiguous {x.device.name} tensor of shape "
                         f"{x.shape} cannot be viewed as {shape}",
                         hint="pass a contiguous tensor (t.clone() makes one)")
    return x.as_strided(shape, contiguous_strides(shape))


def empty(shape: tuple[int, ...], like: Any) -> Any:
    """A new contiguous tensor of `shape` and like's dtype, where `like` lives."""
    if isinstance(like, Tensor):
        from tessera.runtime.tensor import empty as tessera_empty
        return tessera_empty(shape, like.dtype, like.device)
    import torch
    return torch.empty(shape, dtype=like.dtype)


def zeros(shape: tuple[int, ...], like: Any) -> Any:
    """`empty`, filled with zeros."""
    if isinstance(like, Tensor):
        from tessera.runtime.tensor import zeros as tessera_zeros
        return tessera_zeros(shape, like.dtype, like.device)
    import torch
    return torch.zeros(shape, dtype=like.dtype)


def check_vector(v: Any, n: int, name: str, what: str) -> None:
    if v is not None and tuple(v.shape) != (n,):
        raise ShapeError(f"{name}: {what} must have shape ({n},), got {tuple(v.shape)}")
