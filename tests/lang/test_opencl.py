"""The kernel language on an OpenCL device: the math library, storage conversions, the
worked-example kernels (row reductions, GEMM, flash attention), device views, the OpenCL
source, `device_launch`, and launches that cannot work. Skipped only without a device."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import tessera
import tessera.lang as tl
from tessera.errors import DeviceError
from tessera.kernels.attention import flash_attention_kernel
from tessera.kernels.gemm import matmul_kernel
from tessera.kernels.rows import layer_norm_kernel, softmax_kernel
from tessera.lang.jit import TensorSpec, device_launch, runs_on_devices


@pytest.fixture(autouse=True)
def _needs_opencl(opencl_device):
    """Every test here runs on OpenCL (skipped without a device unless one is required)."""

DEV = "opencl"


def on(x: torch.Tensor | np.ndarray) -> tessera.Tensor:
    return tessera.as_tensor(x).to(DEV)


def back(t: tessera.Tensor) -> torch.Tensor:
    return t.cpu().torch()


# -- the math library -------------------------------------------------------------------------

UNARY = ["exp", "exp2", "log", "log2", "sqrt", "rsqrt", "abs", "tanh", "sigmoid", "erf", "sin",
         "cos", "silu", "gelu_erf", "gelu_tanh"]
BINARY = ["pow", "maximum", "minimum"]


@tl.kernel
def every_function(x, y, out, N: tl.constexpr):
    a = x[0:N]
    b = y[0:N]
    out[0, 0:N] = tl.exp(a)
    out[1, 0:N] = tl.exp2(a)
    out[2, 0:N] = tl.log(a)
    out[3, 0:N] = tl.log2(a)
    out[4, 0:N] = tl.sqrt(a)
    out[5, 0:N] = tl.rsqrt(a)
    out[6, 0:N] = tl.abs(a)
    out[7, 0:N] = tl.tanh(a)
    out[8, 0:N] = tl.sigmoid(a)
    out[9, 0:N] = tl.erf(a)
    out[10, 0:N] = tl.sin(a)
    out[11, 0:N] = tl.cos(a)
    out[12, 0:N] = tl.silu(a)
    out[13, 0:N] = tl.gelu(a)
    out[14, 0:N] = tl.gelu(a, approximate="tanh")
    out[15, 0:N] = tl.pow(a, b)
    out[16, 0:N] = tl.maximum(a, b)
    out[17, 0:N] = tl.minimum(a, b)


def _reference(name: str, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    a, b = a.double(), b.double()
    fns = {"rsqrt": torch.rsqrt, "abs": torch.abs, "sigmoid": torch.sigmoid, "silu": F.silu,
           "gelu_erf": F.gelu, "gelu_tanh": lambda v: F.gelu(v, approximate="tanh"),
           "erf": torch.erf}
    if name in BINARY:
        return getattr(torch, name)(a, b).float()
    return (fns.get(name) or getattr(torch, name))(a).float()


def test_math_functions_match_torch_and_keep_special_values() -> None:
    rng = np.random.default_rng(0)
    dense = np.concatenate([rng.uniform(-10, 10, 3000), rng.uniform(0, 100, 500),
                            rng.standard_normal(500) * 1e-3]).astype(np.float32)
    specials = np.array([0.0, -0.0, np.inf, -np.inf, np.nan, 1.0, -1.0, 0.5, -0.5, 1e-30,
                         -1e30, 88.0, -88.0, 3.0, -2.0], np.float32)
    zeros = np.array([0.0, -0.0, -0.0, 0.0], np.float32)
    a = torch.from_numpy(np.concatenate([dense, specials, specials, zeros]))
    b = torch.from_numpy(np.concatenate([rng.uniform(-3, 3, dense.size).astype(np.float32),
                                         specials, specials[::-1], zeros[[1, 0, 2, 3]]]))
    out = tessera.empty((len(UNARY + BINARY), a.numel()), device=DEV)
    every_function[(1,)](on(a), on(b), out, N=a.numel())
    got = back(out)
    for k, name in enumerate(UNARY + BINARY):
        want = _reference(name, a, b)
        # tessera_math.h on fp64 devices (sin/cos documented on |x| <= 1e5: -1e30 is out),
        # else OpenCL builtins: up to 16 ulp (pow, erf); the gelus' sums lose a little more
        domain = ~(a.abs() > 1e5) | a.isinf() if name in ("sin", "cos") else slice(None)
        torch.testing.assert_close(got[k][domain], want[domain], rtol=8e-6, atol=2e-6,
                                   equal_nan=True, msg=lambda m, name=name: f"{name}: {m}")
        special = got[k][dense.size:]
        assert torch.equal(special.isnan(), want[dense.size:].isnan()), name
        inf = want[dense.size:].isinf()
        assert torch.equal(special[inf], want[dense.size:][inf]), name
    # as the C library: IEEE maximum/minimum of signed zeros (max(-0, +0) = +0, min = -0)
    assert torch.signbit(got[16][-4:]).tolist() == [False, False, True, False]
    assert torch.signbit(got[17][-4:]).tolist() == [True, True, True, False]


@tl.kernel
def conversions(h, bf, f, h_f32, bf_f32, f_h, f_bf, N: tl.constexpr):
    h_f32[0:N] = h[0:N].to(tl.float32)
    bf_f32[0:N] = bf[0:N].to(tl.float32)
    f_h[0:N] = f[0:N]
    f_bf[0:N] = f[0:N]


def test_half_conversions_on_every_bit_pattern() -> None:
    n = 1 << 16
    bits = torch.arange(n, dtype=torch.int32).to(torch.int16)
    h, bf = bits.view(torch.float16), bits.view(torch.bfloat16)
    rng = np.random.default_rng(1)
    f = torch.from_numpy((rng.standard_normal(n) * 2.0 ** rng.integers(-30, 20, n))
                         .astype(np.float32))
    f[:6] = torch.tensor([float("nan"), float("inf"), -float("inf"), 65520.0, 1e-8, -0.0])
    outs = [tessera.empty(n, device=DEV), tessera.empty(n, device=DEV),
            tessera.empty(n, "float16", device=DEV), tessera.empty(n, "bfloat16", device=DEV)]
    conversions[(1,)](on(h), on(bf), on(f), *outs, N=n)
    got = [back(o) for o in outs]
    for g, want in zip(got, [h.float(), bf.float(), f.half(), f.bfloat16()], strict=True):
        assert torch.equal(g.isnan(), want.isnan())
        keep = ~want.isnan()
        assert torch.equal(g[keep].view(torch.int16 if g.element_size() == 2 else torch.int32),
                           want[keep].view(torch.int16 if g.element_size() == 2
                                           else torch.int32))



def test_builtin_math_on_devices_without_doubles() -> None:
    """Without cl_khr_fp64 kernels use tessera_math.cl's builtins instead of tessera_math.h:
    that printing of the same kernel, built and run here, agrees with torch too."""
    import pyopencl as cl

    from tessera.lang.codegen.cstyle import ENTRY
    from tessera.lang.codegen.opencl import OpenCLPrinter
    from tessera.runtime import dtype as dt

    n = 1024
    a = torch.linspace(-9, 9, n)
    b = torch.linspace(0.5, 2, n)
    rows = len(UNARY + BINARY)
    spec = every_function.specialize(TensorSpec(dt.float32, (n,)), TensorSpec(dt.float32, (n,)),
                                     TensorSpec(dt.float32, (rows, n)), N=n)
    source = OpenCLPrinter(spec.function, True, 8, fp64=False).source()
    assert "#define TSR_C_MATH" not in source and "tsr__exp_core" not in source
    dev = tessera.device(DEV)
    kernel = cl.Kernel(dev.build(source, "every_function_builtins"), ENTRY)
    out = tessera.empty((rows, n), device=DEV)
    args = []
    for t in (on(a), on(b), out):
        buffer, offset = dev.locate(t.data_ptr())
        args += [buffer, np.int64(offset // 4), *map(np.int64, (*t.shape, *t.strides))]
    dev.run(kernel, (1, 1, 1), args)
    got = back(out)
    for k, name in enumerate(UNARY + BINARY):
        torch.testing.assert_close(got[k], _reference(name, a, b), rtol=8e-6, atol=2e-6,
                                   equal_nan=True, msg=lambda m, name=name: f"{name}: {m}")

# -- the worked-example kernels ----------------------------------------------------------------


def test_row_kernels_on_device() -> None:
    torch.manual_seed(0)
    x, w, b = torch.randn(13, 300), torch.randn(300), torch.randn(300)
    x[2, 5] = float("inf")
    out = tessera.empty((13, 300), device=DEV)
    softmax_kernel[(13,)](on(x), out, N=300)
    torch.testing.assert_close(back(out), torch.softmax(x, -1), equal_nan=True)
    xd = on(x[3:])
    layer_norm_kernel[(10,)](xd, on(w), on(b), out, 1e-5, N=300, AFFINE=True)
    torch.testing.assert_close(back(out)[:10], F.layer_norm(x[3:], (300,), w, b, 1e-5),
                               atol=2e-5, rtol=2e-5)


def test_matmul_kernel_uses_the_vector_micro_kernel() -> None:
    a, b = torch.randn(70, 130), torch.randn(130, 90)
    c = tessera.empty((70, 90), device=DEV)
    args = (on(a), on(b), c)
    matmul_kernel[(3, 2)](*args, BM=32, BN=64, BK=32)
    torch.testing.assert_close(back(c), a @ b, atol=1e-4, rtol=1e-4)
    src = matmul_kernel.source(*args, BM=32, BN=64, BK=32)
    assert "fma((float" in src and "vload" in src
    assert not any(line.lstrip().startswith("#pragma omp") for line in src.splitlines())


def test_flash_attention_kernel_causal() -> None:
    torch.manual_seed(1)
    q, k, v = (torch.randn(1, 2, 40, 32) for _ in range(3))
    out = tessera.empty((1, 2, 40, 32), device=DEV)
    flash_attention_kernel[(tl.cdiv(40, 16), 2, 1)](on(q), on(k), on(v), out, 32 ** -0.5,
                                                    BM=16, BN=16, D=32, CAUSAL=True)
    torch.testing.assert_close(back(out), F.scaled_dot_product_attention(q, k, v,
                                                                         is_causal=True),
                               atol=1e-4, rtol=1e-4)


# -- device memory: views, offsets, empty launches ------------------------------------------------


@tl.kernel
def scale_rows(x, out, s, BM: tl.constexpr, BN: tl.constexpr):
    i = tl.program_id(0) * BM
    j = tl.program_id(1) * BN
    out[i:i + BM, j:j + BN] = x[i:i + BM, j:j + BN] * s


def test_strided_offset_views_of_device_memory() -> None:
    base = torch.randn(40, 50)
    d = on(base)
    view = d.as_strided((12, 20), (100, 2), offset=5 * 50 + 7)  # rows 5::2, cols 7::2
    out = tessera.empty((20, 12), device=DEV).as_strided((12, 20), (1, 12), offset=0)
    scale_rows[(2, 2)](view, out, 3.0, BM=8, BN=16)
    torch.testing.assert_close(back(out), base[5:29:2, 7:47:2] * 3)
    empty = tessera.empty((0, 4), device=DEV)
    scale_rows[(0, 1)](empty, empty, 1.0, BM=8, BN=16)  # nothing to run, nothing fails


def test_in_place_on_device_compiles_without_restrict() -> None:
    x = on(torch.arange(32, dtype=torch.float32).reshape(4, 8))
    scale_rows[(1, 1)](x, x, 2.0, BM=4, BN=8)
    assert torch.equal(back(x), torch.arange(32, dtype=torch.float32).reshape(4, 8) * 2)
    def signature(*args: tessera.Tensor) -> str:
        return scale_rows.source(*args, 2.0, BM=4, BN=8).split("__kernel void tessera_kernel(")[
            1].split(")")[0]
    assert "restrict" not in signature(x, x)
    assert "__global float *restrict a_out_base" in signature(x, tessera.empty((4, 8),
                                                                                device=DEV))


# -- device_launch: a CPU specialization run on the device ---------------------------------------


def test_device_launch_runs_a_cpu_specialization() -> None:
    spec = scale_rows.specialize(TensorSpec(tessera.float32, (6, 10)),
                                 TensorSpec(tessera.float32, (6, 10)), 1.0, BM=4, BN=8)
    x = on(torch.arange(60, dtype=torch.float32).reshape(6, 10))
    out = tessera.empty((6, 10), device=DEV)
    slots = [x.data_ptr(), 6, 10, 10, 1, out.data_ptr(), 6, 10, 10, 1, -0.5]
    device_launch(spec.address, (2, 2), slots, tessera.device(DEV))
    assert torch.equal(back(out), torch.arange(60, dtype=torch.float32).reshape(6, 10) * -0.5)

    assert runs_on_devices(spec.address) and not runs_on_devices(spec.address + 1)
    with pytest.raises(tl.LaunchError, match="not the entry point of a kernel-language"):
        device_launch(spec.address + 1, (1,), slots, tessera.device(DEV))
    with pytest.raises(tl.LaunchError, match="takes 11 launch slots, got 10"):
        device_launch(spec.address, (1,), slots[:-1], tessera.device(DEV))
    host = np.zeros(60, np.float32)
    with pytest.raises(DeviceError, match="not memory of opencl"):
        device_launch(spec.address, (1,), [host.ctypes.data, *slots[1:]], tessera.device(DEV))
    with pytest.raises(tl.LaunchError, match="grid must be"):
        device_launch(spec.address, (1, 1, 1, 1), slots, tessera.device(DEV))


# -- launches that cannot work ------------------------------------------------------------------


def test_arguments_on_different_devices_are_an_error() -> None:
    x = on(torch.ones(4, 8))
    for host in (np.zeros((4, 8), np.float32), torch.zeros(4, 8),
                 tessera.empty((4, 8))):
        with pytest.raises(tl.LaunchError, match=r"'out' is on host memory \(the CPU\) but "
                                                 r"'x' is on device opencl") as e:
            scale_rows[(1, 1)](x, host, 1.0, BM=4, BN=8)
        assert "move every tensor" in str(e.value)
    with pytest.raises(tl.LaunchError, match="'out' is on device opencl but 'x' is on host"):
        scale_rows[(1, 1)](torch.ones(4, 8), x, 1.0, BM=4, BN=8)


def test_bad_grids_and_expanded_outputs_on_device() -> None:
    x = on(torch.ones(4, 8))
    with pytest.raises(tl.LaunchError, match="grid must be"):
        scale_rows[(1, -1)](x, x, 1.0, BM=4, BN=8)
    row = on(torch.ones(1, 8)).as_strided((4, 8), (0, 1))
    with pytest.raises(tl.LaunchError, match="stride-0"):
        scale_rows[(1, 1)](x, row, 1.0, BM=4, BN=8)


# -- properties --------------------------------------------------------------------------------


@tl.kernel
def masked_axpy(x, y, out, a, BLOCK: tl.constexpr):
    i = tl.program_id(0) * BLOCK
    v = x[i:i + BLOCK]
    out[i:i + BLOCK] = tl.where(v > 0, a * v + y[i:i + BLOCK], -v)


@settings(deadline=None, max_examples=15, suppress_health_check=[HealthCheck.too_slow])
@given(n=st.integers(0, 3000), block=st.sampled_from([64, 256]), a=st.floats(-4, 4, width=32),
       seed=st.integers(0, 2**32 - 1))
def test_property_masked_elementwise(n: int, block: int, a: float, seed: int) -> None:
    rng = np.random.default_rng(seed)
    x, y = (torch.from_numpy(rng.standard_normal(n).astype(np.float32)) for _ in range(2))
    out = tessera.empty(n, device=DEV)
    masked_axpy[(tl.cdiv(n, block),)](on(x), on(y), out, a, BLOCK=block)
    want = torch.where(x > 0, torch.tensor(a, dtype=torch.float32) * x + y, -x)
    torch.testing.assert_close(back(out), want, atol=1e-6, rtol=1e-6)


@tl.kernel
def row_stats(x, out, BN: tl.constexpr):
    r = tl.program_id(0)
    t = tl.load(x[r, 0:BN], other=float("nan"))
    v = tl.load(x[r, 0:BN], other=0.0)
    out[r, 0] = tl.sum(v)
    out[r, 1] = tl.max(tl.where(tl.arange(0, BN) < x.shape[1], t, -float("inf")))


@settings(deadline=None, max_examples=15, suppress_health_check=[HealthCheck.too_slow])
@given(rows=st.integers(1, 9), cols=st.integers(1, 128), nan=st.booleans(),
       seed=st.integers(0, 2**32 - 1))
def test_property_row_reductions_with_nans(rows: int, cols: int, nan: bool, seed: int) -> None:
    rng = np.random.default_rng(seed)
    x = torch.from_numpy(rng.standard_normal((rows, cols)).astype(np.float32))
    if nan:
        x[rng.integers(rows), rng.integers(cols)] = math.nan
    out = tessera.empty((rows, 2), device=DEV)
    row_stats[(rows,)](on(x), out, BN=128)
    got = back(out)
    torch.testing.assert_close(got[:, 0], x.sum(1), atol=1e-4, rtol=1e-5, equal_nan=True)
    torch.testing.assert_close(got[:, 1], x.amax(1), equal_nan=True)

