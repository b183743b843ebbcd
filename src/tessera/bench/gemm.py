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
    from tessera.templates.gemm import sgemm

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
            sgemm(a, b, c)
            np.matmul(a, b, out=c_np)
            np.testing.assert_allclose(c, c_np, rtol=1e-4, atol=1e-3 * s ** 0.5)

        def extra(impl: str, median_s: float, s=s) -> dict[str, float]:
            gflops = 2 * s ** 3 / median_s / 1e9
            return {"gflops": gflops, "pct_of_peak": 100 * gflops / peak}

        out.append(Case(f"sgemm_{s}", {
            "tessera": lambda a=a, b=b, c=c: sgemm(a, b, c),
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
        sgemm(ta, tb, tc, bias=tbias, activation="gelu")
        torch.testing.assert_close(tc, eager(), rtol=1e-4, atol=1e-3)

    out.append(Case(f"gemm_bias_gelu_{s}", {
        "tessera": lambda: sgemm(ta, tb, tc, bias=tbias, activation="gelu"),
        "torch_eager": eager},
        check=fused_check, extra=lambda impl, t, s=s: {"gflops": 2 * s ** 3 / t / 1e9}))
    return out
