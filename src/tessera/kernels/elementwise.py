"""Elementwise kernels: the smallest useful kernel, and a fused epilogue."""

from __future__ import annotations

import math
from typing import Any

import tessera.lang as tl
from tessera.errors import ShapeError
from tessera.kernels._util import check_vector, empty, like, reshape, rows


@tl.kernel
def add_kernel(x, y, out, BLOCK: tl.constexpr):
    i = tl.program_id(0) * BLOCK
    out[i:i + BLOCK] = x[i:i + BLOCK] + y[i:i + BLOCK]


def add(x: Any, y: Any, block: int = 4096) -> Any:
    """x + y for two tensors of the same shape."""
    if tuple(x.shape) != tuple(y.shape):
        raise ShapeError(f"add: shapes {tuple(x.shape)} and {tuple(y.shape)} differ")
    out = empty(tuple(x.shape), x)
    n = (math.prod(x.shape),)
    xf, yf, of = reshape(x, n, "add"), reshape(y, n, "add"), reshape(out, n, "add")
    add_kernel[(tl.cdiv(n[0], block),)](xf, yf, of, BLOCK=block)
    return out


@tl.kernel
def bias_gelu_kernel(x, bias, out, BM: tl.constexpr, BN: tl.constexpr,
                     APPROX: tl.constexpr):
    i = tl.program_id(0) * BM
    j = tl.program_id(1) * BN
    h = x[i:i + BM, j:j + BN] + bias[j:j + BN][None, :]
    out[i:i + BM, j:j + BN] = tl.gelu(h, approximate=APPROX)


def bias_gelu(x: Any, bias: Any, approximate: str = "none") -> Any:
    """gelu(x + bias) over the last dimension, in one pass (the fused epilogue of a linear
    layer), as torch.nn.functional.gelu(x + bias, approximate=...)."""
    x2, m, n = rows(x, "bias_gelu")
    check_vector(bias, n, "bias_gelu", "bias")
    out = empty((m, n), x)
    bm, bn = 8, min(512, 1 << max(n - 1, 1).bit_length())
    bias_gelu_kernel[(tl.cdiv(m, bm), tl.cdiv(n, bn))](x2, bias, out, BM=bm, BN=bn,
                                                       APPROX=approximate)
    return like(out, x)
