"""FlashAttention forward: each program owns BM queries of one (batch, head) and streams
over keys in blocks of BN with an online softmax, so the S x S scores never exist.

The scores are computed transposed, S^T = K Q^T [BN, BM]: K's block is the dot's left
operand, read in place from the tensor, and Q^T is built once per program, where S = Q K^T
would transpose every block of K. The softmax then reduces over axis 0, lane-wise across
the program's queries. Causal programs take their whole blocks of keys unmasked and mask
only the blocks that reach the diagonal (or the end of the keys).
(tessera.ops.scaled_dot_product_attention runs on the attention template instead, whose
micro-tiles and fused softmax the kernel language does not express; see its docs.)"""

from __future__ import annotations

import math
from typing import Any

import tessera.lang as tl
from tessera.errors import ShapeError
from tessera.kernels._util import empty


@tl.kernel
def _online_softmax(st, vb, m, denom, acc):
    """One block of transposed scores st [BN, BM] (log2 units) into the running max m,
    sum denom and output acc [BM, D] (vb: the block's values [BN, D])."""
    m_new = tl.maximum(m, tl.max(st, axis=0))
    pt = tl.exp2(st - m_new[None, :])
    alpha = tl.exp2(m - m_new)
    denom = denom * alpha + tl.sum(pt, axis=0)
    acc = tl.dot(pt.T, vb, acc * alpha[:, None])
    return m_new, denom, acc


@tl.kernel
def flash_attention_kernel(q, k, v, out, scale, BM: tl.constexpr, BN: tl.constexpr,
                           D: tl.constexpr, CAUSAL: tl.constexpr):
    b, h = tl.program_id(2), tl.program_id(1)
    i = tl.program_id(0) * BM
    n = k.shape[2]
    qt = (q[b, h, i:i + BM, 0:D] * (scale * 1.4426950408889634)).T  # exp -> exp2
    m = tl.full((BM,), -float("inf"))
    denom = tl.zeros((BM,))
    acc = tl.zeros((BM, D))
    end = min(n, i + BM) if CAUSAL else n
    whole = (min(n, i + 1) if CAUSAL else n) // BN * BN  # blocks no key of which is masked
    for j in range(0, whole, BN):
        st = tl.dot(k[b, h, j:j + BN, 0:D], qt)
        m, denom, acc = _online_softmax(st, v[b, h, j:j + BN, 0:D], m, denom, acc)
    for j in range(whole, end, BN):
        keys = j + tl.arange(0, BN)[:, None]
        keep = keys < n
        if CAUSAL:  # query r sees keys 0..r (top-left aligned, as torch's is_causal)
            keep = keep & (keys <= i + tl.arange(0, BM)[None, :])
        st = tl.where(keep, tl.dot(k[b, h, j:j + BN, 0:D], qt), -float("inf"))
        m, denom, acc = _online_softmax(st, v[b, h, j:j + BN, 0:D], m, denom, acc)
    out[b, h, i:i + BM, 0:D] = acc / denom[:, None]


def flash_attention(q: Any, k: Any, v: Any, causal: bool = False,
                    scale: float | None = None, block: tuple[int, int] = (64, 64)) -> Any:
    """softmax(q @ k^T * scale) @ v for [batch, heads, seq, head_dim] tensors, as
    torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=causal)."""
    if q.ndim != 4 or tuple(k.shape) != tuple(v.shape) or q.shape[:2] != k.shape[:2] or \
            q.shape[3] != k.shape[3]:
        raise ShapeError(f"flash_attention needs q [B, H, S, D] and k, v [B, H, S', D], got "
                         f"{tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}")
    bsz, heads, s, d = q.shape
    out = empty(tuple(q.shape), q)
    bm, bn = block
    scale = 1.0 / math.sqrt(d) if scale is None else float(scale)
    flash_attention_kernel[(tl.cdiv(s, bm), heads, bsz)](q, k, v, out, scale, BM=bm, BN=bn,
                                                         D=d, CAUSAL=causal)
    return out
