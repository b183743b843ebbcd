"""FlashAttention forward: each program owns BM queries of one (batch, head) and streams
over keys in blocks of BN with an online softmax, so the S x S scores never exist."""

from __future__ import annotations

import math
from typing import Any

import tessera.lang as tl
from tessera.errors import ShapeError


@tl.kernel
def flash_attention_kernel(q, k, v, out, scale, BM: tl.constexpr, BN: tl.constexpr,
                           D: tl.constexpr, CAUSAL: tl.constexpr):
    b, h = tl.program_id(2), tl.program_id(1)
    i = tl.program_id(0) * BM
    n = k.shape[2]
    qt = q[b, h, i:i + BM, 0:D] * (scale * 1.4426950408889634)  # exp -> exp2
    m = tl.full((BM,), -float("inf"))
    denom = tl.zeros((BM,))
    acc = tl.zeros((BM, D))
    end = min(n, i + BM) if CAUSAL else n
    for j in range(0, end, BN):
        s = qt @ k[b, h, j:j + BN, 0:D].T
        cols = j + tl.arange(0, BN)[None, :]
        keep = cols < n
        if CAUSAL:  # query r sees keys 0..r (top-left aligned, as torch's is_causal)
            keep = keep & (cols <= i + tl.arange(0, BM)[:, None])
        s = tl.where(keep, s, -float("inf"))
        m_new = tl.maximum(m, tl.max(s, axis=1))
        p = tl.exp2(s - m_new[:, None])
        alpha = tl.exp2(m - m_new)
        denom = denom * alpha + tl.sum(p, axis=1)
        acc = tl.dot(p, v[b, h, j:j + BN, 0:D], acc * alpha[:, None])
        m = m_new
    out[b, h, i:i + BM, 0:D] = acc / denom[:, None]


def flash_attention(q: Any, k: Any, v: Any, causal: bool = False,
                    scale: float | None = None, block: tuple[int, int] = (64, 64)) -> Any:
    """softmax(q @ k^T * scale) @ v for [batch, heads, seq, head_dim] tensors, as
    torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=causal)."""
    import torch
    if q.dim() != 4 or k.shape != v.shape or q.shape[:2] != k.shape[:2] or \
            q.shape[3] != k.shape[3]:
        raise ShapeError(f"flash_attention needs q [B, H, S, D] and k, v [B, H, S', D], got "
                         f"{tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}")
    bsz, heads, s, d = q.shape
    out = torch.empty_like(q, memory_format=torch.contiguous_format)
    bm, bn = block
    scale = 1.0 / math.sqrt(d) if scale is None else float(scale)
    flash_attention_kernel[(tl.cdiv(s, bm), heads, bsz)](q, k, v, out, scale, BM=bm, BN=bn,
                                                         D=d, CAUSAL=causal)
    return out
