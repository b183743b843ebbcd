"""Family `matmul`: tessera.ops.linear against torch eager and Inductor at the sizes of LLM
decode and short prefill (x [M, 4096] through a [4096, 4096] nn.Linear weight with a bias,
M = 1, 8, 32), where the weight's read bounds M = 1 and the per-call cost shows, and one
small layer (x [1, 256], a [256, 256] weight) that is nothing but per-call cost. Reports
GFLOPS."""

from __future__ import annotations

from tessera.bench.cases import op_case
from tessera.bench.runner import Case

SHAPES = ((1, 4096, 4096), (8, 4096, 4096), (32, 4096, 4096), (1, 256, 256))  # M, K, N


def cases(quick: bool) -> list[Case]:
    import torch

    import tessera.ops as O

    out = []
    for m, k, n in SHAPES[::3] if quick else SHAPES:
        gen = torch.Generator().manual_seed(m * n)
        x = torch.randn(m, k, generator=gen)
        w = torch.randn(n, k, generator=gen) / k ** 0.5
        b = torch.randn(n, generator=gen)
        out.append(op_case(f"linear_m{m}_k{k}_n{n}", O.linear, torch.nn.functional.linear,
                           (x, w, b), quick, flops=2 * m * n * k, atol=1e-4, rtol=1e-4))
    return out
