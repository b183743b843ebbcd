"""Suite `lang`: kernels written in tessera.lang (tessera.kernels) against torch eager
and torch.compile (Inductor), on the same inputs in the same process.

Memory-bound kernels report GB/s (bytes read + written once); matmul and attention
report GFLOPS. `--quick` uses small shapes and skips Inductor (its compile dominates).
"""

from __future__ import annotations

from tessera.bench.cases import torch_case as _case
from tessera.bench.runner import Case


def cases(quick: bool) -> list[Case]:
    import torch
    import torch.nn.functional as F

    import tessera.kernels as K

    torch.manual_seed(0)
    rows_big = (256, 1024) if quick else (8192, 4096)
    n_add = 1 << (18 if quick else 24)
    out: list[Case] = []

    x, y = torch.randn(n_add), torch.randn(n_add)
    out.append(_case(f"add_{n_add >> 10}K", lambda: K.add(x, y), torch.add, (x, y), quick,
                     bytes_moved=12 * n_add))

    for m, n in (rows_big, (32, 384)):
        a = torch.randn(m, n)
        w, b = torch.randn(n), torch.randn(n)
        io = 8 * m * n
        out += [
            _case(f"softmax_{m}x{n}", lambda a=a: K.softmax(a),
                  lambda t: torch.softmax(t, -1), (a,), quick, bytes_moved=io),
            _case(f"layernorm_{m}x{n}", lambda a=a, w=w, b=b: K.layer_norm(a, w, b),
                  lambda t, w, b: F.layer_norm(t, t.shape[-1:], w, b), (a, w, b), quick,
                  bytes_moved=io),
            _case(f"rmsnorm_{m}x{n}", lambda a=a, w=w: K.rms_norm(a, w),
                  lambda t, w: F.rms_norm(t, t.shape[-1:], w, 1e-6), (a, w), quick,
                  bytes_moved=io),
        ]
    m, n = rows_big
    a, b = torch.randn(m, n), torch.randn(n)
    out.append(_case(f"bias_gelu_{m}x{n}", lambda: K.bias_gelu(a, b),
                     lambda t, b: F.gelu(t + b), (a, b), quick, bytes_moved=8 * m * n))

    s = 128 if quick else 512
    p, q = torch.randn(s, s), torch.randn(s, s)
    out.append(_case(f"dot_matmul_{s}", lambda: K.matmul(p, q), torch.matmul, (p, q), quick,
                     flops=2 * s ** 3, atol=1e-3,
                     meta={"note": "tl.dot's register-blocked lowering, without the packing "
                                   "and cache blocking of the GEMM templates (issue 4)"}))

    bsz, heads, seq, d = (1, 2, 128, 64) if quick else (1, 8, 1024, 64)
    qkv = [torch.randn(bsz, heads, seq, d) for _ in range(3)]
    out.append(_case(f"flash_attention_causal_h{heads}_s{seq}_d{d}",
                     lambda: K.flash_attention(*qkv, causal=True),
                     lambda q, k, v: F.scaled_dot_product_attention(q, k, v, is_causal=True),
                     tuple(qkv), quick, flops=2 * bsz * heads * seq * seq * d, atol=1e-4))
    return out
