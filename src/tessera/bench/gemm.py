"""Suite `gemm`: the GEMM template against numpy (OpenBLAS) and torch eager (issue 4):
square SGEMM with the fraction of this machine's measured fp32 peak (goal >= 1.0x numpy
from 1024 up); LLM linear layers (x @ W.T for a [N, K] weight, M = 1..128 tokens); decode
GEMV per weight format, as weight GB/s against measured bandwidth (goal >= 80%); GEMM +
bias + GELU fused (goal >= 1.3x eager); MoE grouped GEMM (goal >= 1.5x a loop).
`--quick` runs small sizes only."""

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
    out += [_linear_case(m, n) for m, n in ((1, 4096), (32, 4096)) if quick] or \
        [_linear_case(m, n) for n in (4096, 11008) for m in (1, 8, 32, 128)]
    out += [_gemv_case(f, 1024 if quick else 4096, 2752 if quick else 11008)
            for f in ("fp32", "bf16", "int8", "int4")]
    out += [_grouped_case(e, quick) for e in (8, 64)]
    return out


def _linear_case(m: int, n: int, k: int = 4096) -> Case:
    """An LLM projection: m tokens through an nn.Linear weight [n, k], as it is stored."""
    import numpy as np
    import torch

    from tessera.templates.gemm import gemm

    x, w = torch.randn(m, k), torch.randn(n, k) / k ** 0.5
    out, out_np = torch.empty(m, n), np.empty((m, n), np.float32)
    x_np, wt_np = x.numpy(), w.numpy().T

    def check() -> None:
        torch.testing.assert_close(gemm(x, w.t(), out), torch.nn.functional.linear(x, w),
                                   rtol=1e-4, atol=1e-4)

    return Case(f"linear_m{m}_k{k}_n{n}", {
        "tessera": lambda: gemm(x, w.t(), out),
        "numpy": lambda: np.matmul(x_np, wt_np, out=out_np),
        "torch_eager": lambda: torch.nn.functional.linear(x, w)},
        check=check, extra=lambda impl, t: {"gflops": 2 * m * n * k / t / 1e9})


def _gemv_case(fmt: str, k: int, n: int) -> Case:
    """Decode: one token through a [n, k] weight stored as `fmt`, against torch's kernel
    for the same storage (int8: per-channel scales; int4: groups of 128 with zero
    points). Reports the weight bytes streamed per second and the % of this machine's
    measured read bandwidth."""
    import torch

    from tessera.runtime.cpu.probe import measured_peaks
    from tessera.templates.gemm import gemm, quantize

    bandwidth = measured_peaks()["read_bandwidth_gbs"]
    x, w = torch.randn(1, k), torch.randn(n, k) / k ** 0.5
    aten = torch.ops.aten
    if fmt in ("fp32", "bf16"):
        wt = w if fmt == "fp32" else w.bfloat16()
        xt = x if fmt == "fp32" else x.bfloat16()
        ours, theirs = wt.t(), wt
        sizes = {"tessera": wt.nbytes, "torch_eager": wt.nbytes}

        def baseline() -> object:
            return torch.nn.functional.linear(xt, theirs)
        want = (xt.float() @ wt.float().t())
    else:
        ours, xt = quantize(w.t(), bits=8 if fmt == "int8" else 4, group_size=128), x
        want = x @ torch.from_numpy(ours.dequantize())
        if fmt == "int8":
            scale = w.abs().amax(1) / 127
            q8 = torch.round(w / scale[:, None]).to(torch.int8)
            sizes = {"tessera": ours.nbytes, "torch_eager": q8.nbytes + scale.nbytes}

            def baseline() -> object:
                return aten._weight_int8pack_mm(x, q8, scale)
        else:
            groups = w.reshape(n, k // 128, 128)
            lo, hi = groups.amin(-1), groups.amax(-1)
            scale = ((hi - lo) / 15).clamp(min=1e-8)
            q4 = torch.round((groups - lo[..., None]) / scale[..., None]).clamp(0, 15)
            packed = aten._convert_weight_to_int4pack_for_cpu(q4.reshape(n, k).int(), 1)
            zeros = lo + 8 * scale  # torch's int4 stores (q - 8) * scale + zero
            sz = torch.stack([scale, zeros], -1).transpose(0, 1).contiguous()
            sizes = {"tessera": ours.nbytes, "torch_eager": packed.nbytes + sz.nbytes}

            def baseline() -> object:
                return aten._weight_int4pack_mm_for_cpu(x, packed, 128, sz)

    def check() -> None:
        torch.testing.assert_close(gemm(xt, ours).float(), want, rtol=2e-2, atol=2e-2)
        assert (baseline().float() - x @ w.t()).abs().max() < 0.5  # torch's own rounding

    def extra(impl: str, t: float) -> dict[str, float]:
        gbs = sizes[impl] / t / 1e9
        return {"gb_per_s": gbs, "pct_of_bandwidth": 100 * gbs / bandwidth}

    return Case(f"gemv_{fmt}_{k}x{n}", {"tessera": lambda: gemm(xt, ours),
                                         "torch_eager": baseline},
                check=check, extra=extra, meta={"read_bandwidth_gbs": bandwidth})


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
