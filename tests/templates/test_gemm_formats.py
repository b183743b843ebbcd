"""The GEMM template beyond float32: 16-bit operands and results, weight-only int8/int4
with group scales, the SwiGLU pair, prepacked weights; each against torch on the same
(converted or dequantized) values, on the GEMV path (1-4 rows) and the packed one."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import tessera
from marks import slow_after
from tessera.errors import ShapeError, TesseraError
from tessera.templates.gemm import (
    Blocking,
    batched_gemm,
    blocking,
    gemm,
    grouped_gemm,
    pack,
    quantize,
)

F16 = (torch.bfloat16, torch.float16)
# many KC steps, so partial sums go through the float32 workspace
TINY = Blocking(4, blocking().vl * 2, blocking().vl, 8, 16, blocking().vl * 4)


def _close(got: torch.Tensor, want: torch.Tensor, k: int) -> None:
    rtol = {torch.bfloat16: 2e-2, torch.float16: 2e-3}.get(got.dtype, 1e-4)
    torch.testing.assert_close(got.float(), want.float(), rtol=rtol,
                               atol=rtol * k ** 0.5 + 1e-4)


# Each pair is a variant of the template to compile (seconds each). Every format of A, of B
# and of C (their promotion), A read in place (float32) or converted, with B read in place
# (float32) or converted: no format's conversion depends on the other operand's.
PAIRS = [(torch.float32, torch.float32), (torch.float32, torch.bfloat16),
         (torch.float32, torch.float16), (torch.bfloat16, torch.float32),
         (torch.bfloat16, torch.bfloat16), (torch.bfloat16, torch.float16),
         (torch.float16, torch.float16)]


@pytest.mark.parametrize("m", [1, 3, 9, 16, 37, 60])
@pytest.mark.parametrize("a_dtype, b_dtype", [
    *PAIRS[:3], *(pytest.param(*p, marks=pytest.mark.slow) for p in PAIRS[3:])])
def test_16bit_operands(m: int, a_dtype: torch.dtype, b_dtype: torch.dtype) -> None:
    k, n = 70, 45
    a = torch.randn(m, k).to(a_dtype)
    for b in (torch.randn(k, n).to(b_dtype), torch.randn(n, k).to(b_dtype).t()):
        got = gemm(a, b)
        assert got.dtype == torch.promote_types(a_dtype, b_dtype)
        _close(got, (a.float() @ b.float()).to(got.dtype), k)


# each 16-bit result once, one of them with many KC steps (a variant per pair and epilogue)
@pytest.mark.parametrize("out_dtype, config", [
    (torch.bfloat16, None), pytest.param(torch.float16, TINY, marks=pytest.mark.slow)])
def test_16bit_result_accumulates_in_float32(out_dtype: torch.dtype, config: Blocking) -> None:
    m, n, k = 29, 50, 1000  # K spans several KC blocks
    a, b = torch.randn(m, k), torch.randn(k, n)
    c0 = torch.randn(m, n).to(out_dtype)
    out = c0.clone()
    gemm(a, b, out, alpha=0.5, beta=-1.0, config=config)
    want = 0.5 * (a @ b) - c0.float()
    torch.testing.assert_close(out, want.to(out_dtype), rtol=1e-2, atol=1e-2)
    gemm(a, b, out, bias=torch.randn(n).to(out_dtype), activation="gelu", config=config)
    assert out.isfinite().all()


@pytest.mark.parametrize("bits", [8, 4])
@pytest.mark.parametrize("group", [32, 64, 128])
def test_quantize_round_trip(bits: int, group: int) -> None:
    w = torch.randn(257, 40)
    q = quantize(w, bits=bits, group_size=group)
    deq = torch.from_numpy(q.dequantize())
    assert deq.shape == w.shape
    scale = torch.from_numpy(np.repeat(q.scales, group, axis=-1)[:, :257].T)
    assert ((deq - w).abs() <= scale / 2 + 1e-6).all()  # round to nearest, within range
    assert q.nbytes == q.data.nbytes + q.scales.nbytes


# (bits, group): one variant each per blocking and A format; with K = 32 (less than a group
# of 64, padded), 100 and 257 (partial last groups)
@pytest.mark.parametrize("bits, group", [(4, 64), pytest.param(8, 32, marks=pytest.mark.slow)])
@pytest.mark.parametrize("m", [1, 2, 4, 5, 8, 37])
@pytest.mark.parametrize("k", slow_after(1, [100, 32, 257]))
def test_quantized_matches_dequantized(bits: int, group: int, m: int, k: int) -> None:
    n = 70
    q = quantize(torch.randn(k, n), bits=bits, group_size=group)
    a = torch.randn(m, k)
    want = a @ torch.from_numpy(q.dequantize())
    torch.testing.assert_close(gemm(a, q), want, rtol=1e-4, atol=1e-4 * k ** 0.5)
    _close(gemm(a.bfloat16(), q), want.bfloat16(), k)
    torch.testing.assert_close(gemm(a, q, config=TINY), want, rtol=1e-4,
                               atol=1e-4 * k ** 0.5)


def _swiglu(a: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    gate, up = (a.float() @ w.float()).chunk(2, dim=1)
    return torch.nn.functional.silu(gate) * up


@pytest.mark.parametrize("m", [1, 4, 9, 64])
@pytest.mark.parametrize("n", [5, 37, 64])
@pytest.mark.parametrize("config", slow_after(1, [None, TINY]))
def test_swiglu(m: int, n: int, config: Blocking) -> None:
    k = 300
    a, w = torch.randn(m, k), torch.randn(k, 2 * n) / 8
    _close(gemm(a, w, swiglu=True, config=config), _swiglu(a, w), k)
    res = torch.randn(m, n)
    _close(gemm(a, w, swiglu=True, residual=res, config=config), _swiglu(a, w) + res, k)
    _close(gemm(a, w.bfloat16(), swiglu=True, config=config),
           _swiglu(a, w.bfloat16()), k)
    q = quantize(w, bits=4, group_size=32)
    _close(gemm(a, q, swiglu=True, config=config),
           _swiglu(a, torch.from_numpy(q.dequantize())), k)


@pytest.mark.parametrize("m", slow_after(1, [100, 1, 3]))
def test_prepacked(m: int) -> None:
    k, n = 150, 90
    a, w = torch.randn(m, k), torch.randn(n, k).t()  # an nn.Linear weight, transposed
    packed = pack(w)
    torch.testing.assert_close(gemm(a, packed), a @ w, rtol=1e-4, atol=1e-3)
    torch.testing.assert_close(gemm(a, pack(w, config=TINY)), a @ w, rtol=1e-4, atol=1e-3)
    sw = pack(w, swiglu=True)
    _close(gemm(a, sw, swiglu=True), _swiglu(a, w), k)
    q = quantize(w, bits=8, group_size=32)
    torch.testing.assert_close(gemm(a, pack(q)), a @ torch.from_numpy(q.dequantize()),
                               rtol=1e-4, atol=1e-3)
    assert gemm(a.half(), pack(w.half())).dtype == torch.float16
    with pytest.raises(TesseraError, match="swiglu"):
        gemm(a, packed, swiglu=True)
    with pytest.raises(TesseraError, match="blocking"):
        gemm(a, packed, config=TINY)


def test_grouped_and_batched_formats() -> None:
    sizes, k, n = [5, 0, 11, 3], 64, 48
    x, w = torch.randn(19, k), torch.randn(4, k, 2 * n)
    starts = np.concatenate([[0], np.cumsum(sizes)])

    def reference(weights: torch.Tensor, swiglu: bool) -> torch.Tensor:
        outs = []
        for e in range(4):
            rows = x[starts[e]:starts[e + 1]]
            outs.append(_swiglu(rows, weights[e]) if swiglu else rows @ weights[e].float())
        return torch.cat(outs)

    _close(grouped_gemm(x, w.bfloat16(), sizes), reference(w.bfloat16(), False), k)
    q = quantize(w, bits=4, group_size=32)
    deq = torch.from_numpy(q.dequantize())
    assert deq.shape == w.shape
    _close(grouped_gemm(x, q, sizes), reference(deq, False), k)
    _close(grouped_gemm(x, q, sizes, swiglu=True), reference(deq, True), k)
    a, b = torch.randn(3, 9, 20).half(), torch.randn(20, 7).half()
    _close(batched_gemm(a, b), (a.float() @ b.float()).half(), 20)


def test_bad_inputs() -> None:
    w = torch.randn(16, 8)
    with pytest.raises(TesseraError, match="bits"):
        quantize(w, bits=3)
    with pytest.raises(TesseraError, match="group_size"):
        quantize(w, group_size=48)
    with pytest.raises(TesseraError, match="NaN"):
        quantize(torch.full((4, 4), float("nan")))
    with pytest.raises(ShapeError, match="even"):
        gemm(torch.randn(2, 16), torch.randn(16, 7), swiglu=True)
    with pytest.raises(TesseraError, match="no beta, bias"):
        gemm(torch.randn(2, 16), w, swiglu=True, bias=torch.randn(4))
    with pytest.raises(ShapeError, match="inner"):
        gemm(torch.randn(2, 15), quantize(w))
    with pytest.raises(ShapeError, match="2-D"):
        gemm(torch.randn(2, 16), quantize(torch.randn(2, 16, 8)))
    a16 = tessera.as_tensor(torch.randn(2, 16).bfloat16())
    assert gemm(a16, w.bfloat16()).dtype is tessera.bfloat16
    with pytest.raises(TesseraError, match="int32"):
        gemm(torch.randn(2, 16), w, torch.empty(2, 8, dtype=torch.int32))


def test_grouped_uneven_sizes() -> None:
    """Big groups run on all threads, the rest one a thread, biggest first: every row of
    every group still gets its own expert."""
    rng = np.random.default_rng(3)
    sizes = np.floor(rng.dirichlet(np.full(40, 0.3)) * 700).astype(np.int64)
    sizes[5] += 700 - sizes.sum()
    x, w = torch.randn(700, 48), torch.randn(40, 48, 33)
    starts = np.concatenate([[0], np.cumsum(sizes)])
    want = torch.cat([x[starts[e]:starts[e + 1]] @ w[e] for e in range(40)])
    torch.testing.assert_close(grouped_gemm(x, w, sizes), want, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(grouped_gemm(x, w, sizes, config=TINY), want, rtol=1e-4,
                               atol=1e-4)


# Every ISA path of the formats: AVX-512 (this machine's width), AVX2 intrinsics (8 lanes),
# and the portable C fallback (a build for plain x86-64, in a process of its own).
EIGHT_LANES = Blocking(6, 16, 8, 12, 24, 32)

_PORTABLE = """
import torch
from tessera.templates.gemm import gemm, quantize
torch.manual_seed(0)
for m in (1, 3, 9, 40):
    a, w = torch.randn(m, 100), torch.randn(100, 36)
    for bits in (8, 4):  # the default blocking: each format is one more compile
        q = quantize(w, bits=bits, group_size=32)
        want = a @ torch.from_numpy(q.dequantize())
        torch.testing.assert_close(gemm(a, q), want, rtol=1e-4, atol=1e-3)
    got = gemm(a.to(torch.bfloat16), w.to(torch.bfloat16).t().contiguous().t())
    want = (a.to(torch.bfloat16).float() @ w.to(torch.bfloat16).float()).to(torch.bfloat16)
    torch.testing.assert_close(got, want, rtol=2e-2, atol=5e-2)
print("ok")
"""


@pytest.mark.parametrize("bits", [8, 4])
def test_quantized_at_eight_lanes(bits: int) -> None:
    q = quantize(torch.randn(130, 50), bits=bits, group_size=32)
    for m in (1, 2, 3, 4, 7, 30):
        a = torch.randn(m, 130)
        torch.testing.assert_close(gemm(a, q, config=EIGHT_LANES),
                                   a @ torch.from_numpy(q.dequantize()), rtol=1e-4, atol=1e-3)


@pytest.mark.slow
def test_portable_c_fallback(tmp_path) -> None:
    import os
    import subprocess
    import sys
    env = {**os.environ, "TESSERA_CFLAGS": "-march=x86-64 -mtune=generic",
           "TESSERA_CACHE_DIR": str(tmp_path)}
    run = subprocess.run([sys.executable, "-c", _PORTABLE], env=env, capture_output=True,
                         text=True, timeout=600)
    assert run.returncode == 0 and run.stdout.strip() == "ok", run.stderr[-3000:]
