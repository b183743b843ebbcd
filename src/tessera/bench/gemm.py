"""Suite `gemm`: the SGEMM template against numpy (OpenBLAS) and torch eager, with the
fraction of this machine's measured fp32 peak (goal, issue 4: >= 1.0x numpy from 1024 up),
and GEMM + bias + GELU fused into one pass against torch's addmm then gelu (goal >= 1.3x).
`--quick` runs the small sizes only."""

from __future__ import annotations

import os

from tessera.bench.runner import Case


def cases(quick: bool) -> list[Case]:
    import numpy as np
    import torch

    from tessera.runtime.cpu.probe import measured_peaks
    from tessera.templates.gemm import gemm

    peak = measured_peaks()["peak_gflops_fp32"]
    # OpenBLAS's idle workers spin ~0.1 s by default and starve the next impl's threads;
    # `make bench` sets 2^20 cycles. Recorded so a table says how it was taken.
    spin = os.environ.get("OPENBLAS_THREAD_TIMEOUT", "default (28)")
    rng = np.random.default_rng(0)
    out = []
    for s in (256, 512) if quick else (256, 512, 1024, 2048, 4096):
        a, b = (rng.standard_normal((s, s), dtype=np.float32) for _ in range(2))
        c, c_np = np.empty((s, s), np.float32), np.empty((s, s), np.float32)
        ta, tb, tc = torch.from_numpy(a), torch.from_numpy(b), torch.empty(s, s)

        def check(a=a, b=b, c=c, c_np=c_np, s=s) -> None:
            gemm(a, b, c)
            np.matmul(a, b, out=c_np)
            np.testing.assert_allclose(c, c_np, rtol=1e-4, atol=1e-3 * s ** 0.5)

        def extra(impl: str, median_s: float, s=s) -> dict[str, float]:
            gflops = 2 * s ** 3 / median_s / 1e9
            return {"gflops": gflops, "pct_of_peak": 100 * gflops / peak}

        out.append(Case(f"sgemm_{s}", {
            "tessera": lambda a=a, b=b, c=c: gemm(a, b, c),
            "numpy": lambda a=a, b=b, c=c_np: np.matmul(a, b, out=c),
            "torch_eager": lambda ta=ta, tb=tb, tc=tc: torch.matmul(ta, tb, out=tc)},
            check=check, extra=extra,
            meta={"peak_gflops": peak, "openblas_thread_timeout": spin}))
    s = 256 if quick else 1024
    a, b = (rng.standard_normal((s, s), dtype=np.float32) for _ in range(2))
    ta, tb, tbias = torch.from_numpy(a), torch.from_numpy(b), torch.randn(s)
    tc = torch.empty(s, s)

    def eager() -> object:
        return torch.nn.functional.gelu(torch.addmm(tbias, ta, tb))

    def fused_check() -> None:
        gemm(ta, tb, tc, bias=tbias, activation="gelu")
        torch.testing.assert_close(tc, eager(), rtol=1e-4, atol=1e-3)

    out.append(Case(f"gemm_bias_gelu_{s}", {
        "tessera": lambda: gemm(ta, tb, tc, bias=tbias, activation="gelu"),
        "torch_eager": eager},
        check=fused_check, extra=lambda impl, t, s=s: {"gflops": 2 * s ** 3 / t / 1e9}))
    out += [_grouped_case(e, quick) for e in (8, 64)]
    return out


def _grouped_case(experts: int, quick: bool) -> Case:
    """MoE experts with uneven token counts: one grouped call against a loop of
    torch.matmul over the experts (goal, issue 4: >= 1.5x)."""
    import numpy as np
    import torch

    from tessera.templates.gemm import grouped_gemm

    rows, k, n = (256, 256, 256) if quick else \
        (1024, 1024, 1408) if experts <= 8 else (1024, 512, 512)
    rng = np.random.default_rng(experts)
    share = rng.dirichlet(np.full(experts, 0.5))  # a few busy experts, many idle ones
    sizes = np.floor(share * rows).astype(np.int64)
    sizes[0] += rows - sizes.sum()
    starts = np.concatenate([[0], np.cumsum(sizes)[:-1]]).tolist()
    x, w = torch.randn(rows, k), torch.randn(experts, k, n)
    out_t, out_ref = torch.empty(rows, n), torch.empty(rows, n)

    def loop() -> None:
        for e, (s, c) in enumerate(zip(starts, sizes.tolist(), strict=True)):
            if c:
                torch.matmul(x[s:s + c], w[e], out=out_ref[s:s + c])

    def check() -> None:
        grouped_gemm(x, w, sizes, out_t)
        loop()
        torch.testing.assert_close(out_t, out_ref, rtol=1e-4, atol=1e-3)

    flops = 2 * rows * k * n
    return Case(f"grouped_gemm_e{experts}",
                {"tessera": lambda: grouped_gemm(x, w, sizes, out_t), "torch_eager": loop},
                check=check, extra=lambda impl, t: {"gflops": flops / t / 1e9},
                meta={"rows": rows, "k": k, "n": n, "busiest": int(sizes.max())})
