"""Family `attention`: tessera.ops rotary_embedding, scaled_dot_product_attention and
decode_attention against torch (SDPA's CPU flash kernel; the rotary reference is
transformers' Llama apply_rotary_pos_emb) eager and under torch.compile.

Prefill attention is causal, batch 1, 8 heads, float32, and reports GFLOPS of the causal
half (2 B H S^2 D: q k^T and p v over the S (S + 1) / 2 pairs, rounded). Decode is one
query per sequence over a full 2048-long cache, 32 heads or GQA 32/8, d 128, and reports
GB/s of K and V read (it is memory-bound). Rotary reports GB/s of x read and out written.
Goal: attention at least 1.5x torch's SDPA from sequence 512."""

from __future__ import annotations

from typing import Any

from tessera.bench.cases import op_case
from tessera.bench.runner import Case


def cases(quick: bool) -> list[Case]:
    import torch

    torch.manual_seed(0)
    out = _rotary(quick)
    for s in (128, 512) if quick else (128, 512, 2048):
        for d in (64,) if quick else (64, 128):
            out.append(_prefill(s, d, quick))
    for hq, hkv in ((32, 32), (32, 8)):
        out.append(_decode(hq, hkv, 512 if quick else 2048, 128, quick))
    return out


def _llama_rotary(x: Any, cos: Any, sin: Any) -> Any:
    """transformers' apply_rotary_pos_emb for one tensor ([S, D] tables)."""
    import torch

    half = x.shape[-1] // 2
    rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return x * cos + rotated * sin


def _rotary(quick: bool) -> list[Case]:
    import torch

    import tessera.ops as O

    out = []
    for name, (b, h, s, d), dtype in (
            ("rope_s2048_h32_d128", (1, 32, 256 if quick else 2048, 128), torch.float32),
            ("rope_s2048_h32_d128_bf16", (1, 32, 256 if quick else 2048, 128), torch.bfloat16),
            ("rope_decode_b32_h32_d128", (32, 32, 1, 128), torch.float32)):
        x = torch.randn(b, s, h, d).to(dtype).transpose(1, 2)  # a [B, S, H, D] projection
        pos = torch.arange(4096 - s, 4096).float()
        freqs = torch.outer(pos, 1.0 / 10000 ** (torch.arange(0, d, 2).float() / d))
        emb = torch.cat((freqs, freqs), dim=-1)
        cos, sin = emb.cos().to(dtype), emb.sin().to(dtype)
        tol = 2e-2 if dtype == torch.bfloat16 else 1e-5  # torch rounds each bf16 step
        out.append(op_case(name, O.rotary_embedding, _llama_rotary, (x, cos, sin), quick,
                           bytes_moved=2 * x.numel() * x.element_size(), atol=tol, rtol=tol))
    return out


def _prefill(s: int, d: int, quick: bool) -> Case:
    import torch
    import torch.nn.functional as F

    import tessera.ops as O

    b, h = 1, 8
    q, k, v = (torch.randn(b, h, s, d) for _ in range(3))
    return op_case(f"attention_s{s}_d{d}",
                   lambda q, k, v: O.scaled_dot_product_attention(q, k, v, is_causal=True),
                   lambda q, k, v: F.scaled_dot_product_attention(q, k, v, is_causal=True),
                   (q, k, v), quick, flops=2 * b * h * s * s * d, atol=1e-4)


def _decode(hq: int, hkv: int, s: int, d: int, quick: bool) -> Case:
    import torch
    import torch.nn.functional as F

    import tessera.ops as O

    b = 1
    q = torch.randn(b, hq, 1, d)
    k, v = torch.randn(b, hkv, s, d), torch.randn(b, hkv, s, d)
    lens = torch.full((b,), s)
    name = f"attention_decode_h{hq}" + (f"_gqa{hkv}" if hkv != hq else "") + f"_s{s}_d{d}"
    return op_case(name, O.decode_attention,
                   lambda q, k, v: F.scaled_dot_product_attention(q, k, v, enable_gqa=True),
                   (q, k, v), quick, ours_args=(q, k, v, lens),
                   bytes_moved=(k.numel() + v.numel()) * 4, atol=1e-4)
