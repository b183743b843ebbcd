"""The GEMM of `matmul.product` in the kernel language, for devices that cannot run the C
template (OpenCL): each program owns a BM x BN block of one product of the batch, walks K
with `tl.dot` in float32, and applies the same epilogue as the template — alpha, beta,
bias (per column, or per row), activation, residual — before its one store."""

from __future__ import annotations

import math

import torch

import tessera.lang as tl

__all__ = ["product"]

BN, BK = 32, 32
_ROWS = (1, 8, 32)  # BM: the smallest that covers M (a decode GEMV does not pay 32 rows)


@tl.kernel
def gemm_kernel(a, b, c, bias, res, alpha, beta, BIAS: tl.constexpr, ACT: tl.constexpr,
                RES: tl.constexpr, BETA: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr,
                BK: tl.constexpr):
    """c[z] = act(alpha * a[z] @ b[z] + beta * c[z] + bias) + res[z], z = program_id(2)."""
    i = tl.program_id(0) * BM
    j = tl.program_id(1) * BN
    z = tl.program_id(2)
    acc = tl.zeros((BM, BN))
    for k in range(0, a.shape[2], BK):
        acc = tl.dot(a[z, i:i + BM, k:k + BK].to(tl.float32),
                     b[z, k:k + BK, j:j + BN].to(tl.float32), acc)
    y = acc * alpha
    if BETA:
        y = y + beta * c[z, i:i + BM, j:j + BN].to(tl.float32)
    if BIAS == "cols":
        y = y + bias[j:j + BN].to(tl.float32)[None, :]
    elif BIAS == "rows":
        y = y + bias[i:i + BM].to(tl.float32)[:, None]
    if ACT == "relu":
        y = tl.maximum(y, 0.0)
    elif ACT == "gelu":
        y = tl.gelu(y)
    elif ACT == "gelu_tanh":
        y = tl.gelu(y, approximate="tanh")
    elif ACT == "silu":
        y = tl.silu(y)
    elif ACT == "sigmoid":
        y = tl.sigmoid(y)
    elif ACT == "tanh":
        y = tl.tanh(y)
    if RES:
        y = y + res[z, i:i + BM, j:j + BN].to(tl.float32)
    c[z, i:i + BM, j:j + BN] = y


def _batched(t: torch.Tensor, batch: list[int], rows: int, cols: int) -> torch.Tensor:
    """t broadcast to [*batch, rows, cols], seen as [B, rows, cols] (a copy only when the
    batch dims do not fold into one stride)."""
    t = t.expand(*batch, rows, cols)
    try:
        return t.view(math.prod(batch), rows, cols)
    except RuntimeError:
        return t.reshape(math.prod(batch), rows, cols)


def product(a: torch.Tensor, b: torch.Tensor, out: torch.Tensor, *, alpha: float = 1.0,
            beta: float = 0.0, bias: torch.Tensor | None = None,
            activation: str | None = None, residual: torch.Tensor | None = None,
            bias_rows: bool = False) -> None:
    """`matmul.product`'s contract (see there), as one kernel-language launch."""
    *batch, m, n = out.shape
    k = a.shape[-1]
    try:
        o, copied = out.view(math.prod(batch), m, n), False
    except RuntimeError:  # batch dims that do not fold: work in a copy, then write back
        o, copied = out.contiguous().view(math.prod(batch), m, n), True
    a3, b3 = _batched(a, batch, m, k), _batched(b, batch, k, n)
    unused = a3[0, 0]  # stands for an absent bias or residual (never read)
    bm = next((r for r in _ROWS if m <= r), _ROWS[-1])
    gemm_kernel[(-(-m // bm), -(-n // BN), o.shape[0])](
        a3, b3, o, unused if bias is None else bias,
        unused if residual is None else _batched(residual, batch, m, n),
        float(alpha), float(beta), BIAS="none" if bias is None else "rows" if bias_rows
        else "cols", ACT=activation or "none", RES=residual is not None, BETA=beta != 0,
        BM=bm, BN=BN, BK=BK)
    if copied:
        out.copy_(o.view(out.shape))
