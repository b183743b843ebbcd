"""A tiled matmul with tl.dot: each program owns a BM x BN block of C and walks K."""

from __future__ import annotations

from typing import Any

import tessera.lang as tl
from tessera.errors import ShapeError
from tessera.kernels._util import empty


@tl.kernel
def matmul_kernel(a, b, c, BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr):
    i = tl.program_id(0) * BM
    j = tl.program_id(1) * BN
    acc = tl.zeros((BM, BN))
    for k in range(0, a.shape[1], BK):
        acc = tl.dot(a[i:i + BM, k:k + BK], b[k:k + BK, j:j + BN], acc)
    c[i:i + BM, j:j + BN] = acc


def matmul(a: Any, b: Any, block: tuple[int, int, int] = (32, 64, 64)) -> Any:
    """a @ b for 2-D tensors, accumulated in float32, returned in a's dtype."""
    if a.ndim != 2 or b.ndim != 2 or a.shape[1] != b.shape[0]:
        raise ShapeError(f"matmul needs [M, K] and [K, N] tensors, got {tuple(a.shape)} "
                         f"and {tuple(b.shape)}")
    (m, _), n = a.shape, b.shape[1]
    c = empty((m, n), a)
    bm, bn, bk = block
    matmul_kernel[(tl.cdiv(m, bm), tl.cdiv(n, bn))](a, b, c, BM=bm, BN=bn, BK=bk)
    return c
