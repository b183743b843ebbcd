"""Suite `gemm`: the SGEMM template against numpy (OpenBLAS) and torch eager, with the
fraction of this machine's measured fp32 peak. Goal (issue 4): >= 1.0x numpy from 1024 up.
`--quick` runs the small sizes only."""

from __future__ import annotations

from tessera.bench.runner import Case


def cases(quick: bool) -> list[Case]:
    import numpy as np
    import torch

    from tessera.runtime.cpu.probe import measured_peaks
    from tessera.templates.gemm import sgemm

    peak = measured_peaks()["peak_gflops_fp32"]
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
            check=check, extra=extra, meta={"peak_gflops": peak}))
    return out
