"""Suite `lang`: kernels written in tessera.lang (tessera.kernels) against torch eager
and torch.compile (Inductor), on the same inputs in the same process.

Memory-bound kernels report GB/s (bytes read + written once); matmul and attention
report GFLOPS; `add_16` is the per-call cost of a launch. `--quick` uses small shapes and
skips Inductor (its compile dominates). With `--device opencl` each kernel also runs
there (`tessera_opencl`): the wrappers of tessera.kernels take device tensors, and the
kernel language launches the same kernel, printed as OpenCL C, on their device.
"""

from __future__ import annotations

from typing import Any

from tessera.bench.cases import op_case as _case
from tessera.bench.runner import Case


def cases(quick: bool) -> list[Case]:
    import torch
    import torch.nn.functional as F

    import tessera.kernels as K

    torch.manual_seed(0)
    rows_big = (256, 1024) if quick else (8192, 4096)
    n_add = 1 << (18 if quick else 24)
    out: list[Case] = []

    for n in (16, n_add):
        x, y = torch.randn(n), torch.randn(n)
        out.append(_case("add_16" if n == 16 else f"add_{n >> 10}K", K.add, torch.add, (x, y),
                         quick, bytes_moved=12 * n))

    for m, n in (rows_big, (32, 384)):
        a = torch.randn(m, n)
        w, b = torch.randn(n), torch.randn(n)
        io = 8 * m * n
        out += [
            _case(f"softmax_{m}x{n}", K.softmax, _softmax_ref, (a,), quick, bytes_moved=io),
            _case(f"layernorm_{m}x{n}", K.layer_norm, _layer_norm_ref, (a, w, b), quick,
                  bytes_moved=io),
            _case(f"rmsnorm_{m}x{n}", K.rms_norm, _rms_norm_ref, (a, w), quick, bytes_moved=io),
        ]
    m, n = rows_big
    a, b = torch.randn(m, n), torch.randn(n)
    out.append(_case(f"bias_gelu_{m}x{n}", K.bias_gelu, lambda t, b: F.gelu(t + b), (a, b),
                     quick, bytes_moved=8 * m * n))

    s = 128 if quick else 512
    p, q = torch.randn(s, s), torch.randn(s, s)
    out.append(_case(f"dot_matmul_{s}", K.matmul, torch.matmul, (p, q), quick,
                     flops=2 * s ** 3, atol=1e-3,
                     meta={"note": "tl.dot's register-blocked lowering, without the packing "
                                   "and cache blocking of the GEMM templates (issue 4)"}))

    bsz, heads, seq, d = (1, 2, 128, 64) if quick else (1, 8, 1024, 64)
    qkv = tuple(torch.randn(bsz, heads, seq, d) for _ in range(3))
    out.append(_case(f"flash_attention_causal_h{heads}_s{seq}_d{d}", _flash_causal,
                     lambda q, k, v: F.scaled_dot_product_attention(q, k, v, is_causal=True),
                     qkv, quick, flops=2 * bsz * heads * seq * seq * d, atol=1e-4))
    return out


def _softmax_ref(t: Any) -> Any:
    import torch

    return torch.softmax(t, -1)


def _layer_norm_ref(t: Any, w: Any, b: Any) -> Any:
    import torch.nn.functional as F

    return F.layer_norm(t, t.shape[-1:], w, b)


def _rms_norm_ref(t: Any, w: Any) -> Any:
    import torch.nn.functional as F

    return F.rms_norm(t, t.shape[-1:], w, 1e-6)


def _flash_causal(q: Any, k: Any, v: Any) -> Any:
    import tessera.kernels as K

    return K.flash_attention(q, k, v, causal=True)
