"""Attention in the kernel language, for devices that cannot run the C template (OpenCL):
the template's contract — GQA, a strided bool or float mask, causal, logsumexp — as one
FlashAttention-style kernel. Each program owns BM queries of one (batch, head), streams
the keys in blocks of BN with an online softmax (base 2), and never holds the S x S
scores."""

from __future__ import annotations

import math

import torch

import tessera.lang as tl

__all__ = ["attention"]

BM, BN = 32, 32
_LOG2E = 1.4426950408889634


@tl.kernel
def attention_kernel(q, k, v, out, mask, lse, scale, G: tl.constexpr, MASK: tl.constexpr,
                     CAUSAL: tl.constexpr, LSE: tl.constexpr, BM: tl.constexpr,
                     BN: tl.constexpr, D: tl.constexpr, DV: tl.constexpr):
    """out[b, h] = softmax(q[b, h] k[b, h // G]^T * scale + mask) v[b, h // G]."""
    b, h = tl.program_id(2), tl.program_id(1)
    i = tl.program_id(0) * BM
    hk = h // G
    n = k.shape[2]
    qb = q[b, h, i:i + BM, 0:D].to(tl.float32) * (scale * 1.4426950408889634)
    m = tl.full((BM,), -math.inf)
    den = tl.zeros((BM,))
    acc = tl.zeros((BM, DV))
    for j in range(0, n, BN):
        s = tl.dot(qb, tl.trans(k[b, hk, j:j + BN, 0:D].to(tl.float32)))
        keys = j + tl.arange(0, BN)[None, :]
        keep = keys < n
        if CAUSAL:  # query r sees keys 0..r (top-left aligned, as torch's is_causal)
            keep = keep & (keys <= i + tl.arange(0, BM)[:, None])
        if MASK == "bool":
            keep = keep & mask[b, h, i:i + BM, j:j + BN]
        elif MASK == "float":
            s = s + mask[b, h, i:i + BM, j:j + BN].to(tl.float32) * 1.4426950408889634
        s = tl.where(keep, s, -math.inf)
        m_new = tl.maximum(m, tl.max(s, axis=1))
        shift = tl.where(m_new == -math.inf, 0.0, m_new)  # no key yet: no NaN
        p = tl.exp2(s - shift[:, None])
        alpha = tl.exp2(m - shift)
        den = den * alpha + tl.sum(p, axis=1)
        acc = tl.dot(p, v[b, hk, j:j + BN, 0:DV].to(tl.float32), acc * alpha[:, None])
        m = m_new
    seen = den > 0.0  # rows that see no key give zeros (and logsumexp 0), as the template
    out[b, h, i:i + BM, 0:DV] = tl.where(seen[:, None], acc / den[:, None], 0.0)
    if LSE:
        lse[b, h, i:i + BM] = tl.where(seen, (m + tl.log2(den)) * 0.6931471805599453, 0.0)


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, out: torch.Tensor, *,
              scale: float, causal: bool = False, mask: torch.Tensor | None = None,
              lse: torch.Tensor | None = None) -> None:
    """`templates.attention.attention`'s contract (see there), as one kernel launch."""
    batch, hq, sq, d = q.shape
    unused = q[0, 0, 0]  # stands for an absent mask or logsumexp (never read)
    kind = "none" if mask is None else "bool" if mask.dtype == torch.bool else "float"
    attention_kernel[(-(-sq // BM), hq, batch)](
        q, k, v, out, unused if mask is None else mask, unused if lse is None else lse,
        float(scale), G=hq // k.shape[1], MASK=kind, CAUSAL=bool(causal),
        LSE=lse is not None, BM=BM, BN=BN, D=d, DV=v.shape[3])
