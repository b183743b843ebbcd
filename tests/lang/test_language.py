"""The kernel language's surface, feature by feature, against numpy/torch references."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
import torch

import tessera
import tessera.lang as tl

# -- dtypes: storage and arithmetic ------------------------------------------------------


@tl.kernel
def axpb(x, out, a, b, BLOCK: tl.constexpr):
    i = tl.program_id(0) * BLOCK
    out[i:i + BLOCK] = x[i:i + BLOCK] * a + b


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16, torch.int8,
                                   torch.uint8, torch.int32, torch.int64])
def test_every_storage_dtype(dtype: torch.dtype, device) -> None:
    x = torch.arange(-50, 50).to(dtype) if dtype != torch.uint8 else torch.arange(100).to(dtype)
    out = torch.empty_like(x)
    device.launch(axpb, (tl.cdiv(x.numel(), 16),), x, out, 3, 1, BLOCK=16)
    want = (x.to(torch.float64) * 3 + 1).to(dtype) if dtype.is_floating_point else \
        (x.to(torch.int64) * 3 + 1).to(dtype)  # integer results wrap as in torch
    assert torch.equal(out, want)


@tl.kernel
def mask_ops(x, y, out, N: tl.constexpr):
    a = x[0:N]
    b = y[0:N]
    out[0:N] = (a & b) | ~(a ^ b)


def test_bool_tensors(device) -> None:
    x = torch.rand(77) > 0.5
    y = torch.rand(77) > 0.5
    out = torch.empty(77, dtype=torch.bool)
    device.launch(mask_ops, (1,), x, y, out, N=128)
    assert torch.equal(out, (x & y) | ~(x ^ y))


@tl.kernel
def float_div_int(x, out, N: tl.constexpr):
    v = x[0:N]
    out[0:N] = v / 2 + v // 3 + v % 3


def test_int_promotion_follows_torch(device) -> None:
    x = torch.arange(-10, 10, dtype=torch.int32)
    out = torch.empty(20)
    device.launch(float_div_int, (1,), x, out, N=20)
    want = x / 2 + torch.div(x, 3, rounding_mode="floor") + torch.remainder(x, 3)
    assert torch.equal(out, want.float())


@tl.kernel
def cast_to(x, out, N: tl.constexpr, DTYPE: tl.constexpr):
    out[0:N] = x[0:N].to(DTYPE).to(tl.float32)


@pytest.mark.parametrize("dtype", ["float16", "bfloat16", "int32", "int8", "bool"])
def test_casts_round_like_torch(dtype: str, device) -> None:
    x = torch.randn(1000) * 100
    out = torch.empty(1000)
    device.launch(cast_to, (1,), x, out, N=1000, DTYPE=getattr(tl, dtype))
    tdt = getattr(torch, dtype)
    want = x.to(tdt).float()  # int8: wraps modulo 256, as torch does
    assert torch.equal(out, want)


# -- inputs: numpy, tessera, views ----------------------------------------------------------


def test_numpy_and_tessera_tensors() -> None:
    x = np.arange(100, dtype=np.float32)
    out = np.empty_like(x)
    axpb[(7,)](x, out, 2.0, 0.5, BLOCK=16)
    np.testing.assert_array_equal(out, x * 2 + 0.5)
    t = tessera.as_tensor(x)
    o = tessera.empty(100)
    axpb[(7,)](t, o, 2.0, 0.5, BLOCK=16)
    np.testing.assert_array_equal(o.numpy(), x * 2 + 0.5)


@tl.kernel
def copy2d(x, out, BM: tl.constexpr, BN: tl.constexpr):
    i = tl.program_id(0) * BM
    j = tl.program_id(1) * BN
    out[i:i + BM, j:j + BN] = x[i:i + BM, j:j + BN]


@pytest.mark.parametrize("view", ["t", "step", "offset", "negative_numpy"])
def test_strided_and_offset_views(view: str) -> None:
    base = np.random.default_rng(0).standard_normal((40, 50)).astype(np.float32)
    x = {"t": base.T, "step": base[::3, ::2], "offset": base[5:, 7:],
         "negative_numpy": base[::-1, ::-2]}[view]
    out = np.zeros(x.shape, np.float32)
    copy2d[(tl.cdiv(x.shape[0], 8), tl.cdiv(x.shape[1], 16))](x, out, BM=8, BN=16)
    np.testing.assert_array_equal(out, x)
    out_t = np.zeros(x.shape[::-1], np.float32).T  # a strided output
    copy2d[(tl.cdiv(x.shape[0], 8), tl.cdiv(x.shape[1], 16))](x, out_t, BM=8, BN=16)
    np.testing.assert_array_equal(out_t, x)


def test_in_place_update_with_aliasing_arguments() -> None:
    x = torch.arange(64, dtype=torch.float32)
    axpb[(4,)](x, x, 2.0, 1.0, BLOCK=16)  # out is x: no `restrict` in that build
    assert torch.equal(x, torch.arange(64, dtype=torch.float32) * 2 + 1)
    assert "restrict" not in axpb.source(x, x, 2.0, 1.0, BLOCK=16).split("tsr_run(")[1] \
        .split(")")[0]


def test_empty_tensors_and_empty_grid() -> None:
    x = torch.empty(0)
    axpb[(0,)](x, x, 1.0, 1.0, BLOCK=16)
    y = torch.ones(10)
    axpb[(0,)](y, y, 5.0, 5.0, BLOCK=16)
    assert torch.equal(y, torch.ones(10))


# -- grids -------------------------------------------------------------------------------------


@tl.kernel
def grid_ids(out):
    a, b, c = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    n0, n1 = tl.num_programs(0), tl.num_programs(1)
    out[c, b, a] = a + n0 * (b + n1 * c)


def test_three_axis_grid(device) -> None:
    out = torch.full((4, 3, 5), -1, dtype=torch.int64)
    device.launch(grid_ids, (5, 3, 4), out)
    assert torch.equal(out.flatten(), torch.arange(60))


def test_grid_callable_sees_arguments() -> None:
    x = torch.randn(1000)
    out = torch.empty(1000)
    axpb[lambda meta: (tl.cdiv(meta["x"].numel(), meta["BLOCK"]),)](x, out, 1.0, 0.0,
                                                                     BLOCK=64)
    assert torch.equal(out, x)


# -- control flow ---------------------------------------------------------------------------


@tl.kernel
def row_sums_loop(x, out, BN: tl.constexpr):
    r = tl.program_id(0)
    acc = tl.zeros((BN,))
    for j in range(0, x.shape[1], BN):
        acc += x[r, j:j + BN]
    out[r] = tl.sum(acc)


def test_for_loop_with_carried_tile_and_runtime_bound(device) -> None:
    x = torch.randn(5, 1001)
    out = torch.empty(5)
    device.launch(row_sums_loop, (5,), x, out, BN=64)
    torch.testing.assert_close(out, x.sum(1), atol=1e-4, rtol=1e-5)


@tl.kernel
def collatz_steps(n, out):
    i = tl.program_id(0)
    v = n[i]
    steps = 0
    while v != 1:
        if v % 2 == 0:
            v = v // 2
        else:
            v = 3 * v + 1
        steps += 1
    out[i] = steps


def test_while_and_if_on_scalars(device) -> None:
    n = torch.tensor([1, 2, 3, 6, 7, 27], dtype=torch.int64)
    out = torch.empty(6, dtype=torch.int32)
    device.launch(collatz_steps, (6,), n, out)
    assert out.tolist() == [0, 1, 7, 8, 16, 111]


@tl.kernel
def unrolled(x, out, K: tl.constexpr):
    acc = 0.0
    for k in tl.static_range(K):
        if k % 2 == 0:  # a compile-time branch: k is a constant
            acc += x[k] * (k + 1)
    for k in tl.range(0, K, 2, unroll=4):
        acc += x[k]
    out[0] = acc


def test_static_range_and_unroll_hint(device) -> None:
    x = torch.arange(8, dtype=torch.float32)
    out = torch.empty(1)
    device.launch(unrolled, (1,), x, out, K=8)
    assert out.item() == sum(x[k] * (k + 1) for k in range(0, 8, 2)) + x[::2].sum()
    if device.name == "cpu":
        assert "#pragma GCC unroll 4" in unrolled.source(x, out, K=8)
    else:
        xd, od = tessera.as_tensor(x).to(device.name), tessera.empty(1, device=device.name)
        assert "#pragma unroll 4" in unrolled.source(xd, od, K=8)


# -- reductions, argmax, dot ------------------------------------------------------------------


@tl.kernel
def reductions(x, s, mx, mn, mean, am, an, BM: tl.constexpr, BN: tl.constexpr,
               AXIS: tl.constexpr):
    t = tl.load(x[0:BM, 0:BN], other=float("nan"))
    s[0:BM, 0:BN] = tl.sum(t, axis=AXIS, keepdims=True)
    mx[0:BM, 0:BN] = t.max(axis=AXIS, keepdims=True)
    mn[0:BM, 0:BN] = tl.min(t, AXIS, True)
    mean[0:BM, 0:BN] = t.mean(axis=AXIS, keepdims=True)
    am[0:BM, 0:BN] = tl.argmax(t, axis=AXIS, keepdims=True)
    an[0:BM, 0:BN] = tl.argmin(t, axis=AXIS, keepdims=True)


@pytest.mark.parametrize("axis", [0, 1])
def test_reductions_keepdims_nan_and_ties(axis: int, device) -> None:
    x = torch.randint(-3, 4, (6, 9)).float()  # many ties: the first index must win
    x[2, 3] = float("nan")
    outs = [torch.empty(6, 9) for _ in range(4)] + [torch.empty(6, 9, dtype=torch.int64)
                                                    for _ in range(2)]
    device.launch(reductions, (1,), x, *outs, BM=6, BN=9, AXIS=axis)
    s, mx, mn, mean, am, an = outs
    e = {"equal_nan": True}
    torch.testing.assert_close(s, x.sum(axis, keepdim=True).expand(6, 9), **e)
    torch.testing.assert_close(mx, x.amax(axis, keepdim=True).expand(6, 9), **e)
    torch.testing.assert_close(mn, x.amin(axis, keepdim=True).expand(6, 9), **e)
    torch.testing.assert_close(mean, x.mean(axis, keepdim=True).expand(6, 9), **e)
    assert torch.equal(am, x.argmax(axis, keepdim=True).expand(6, 9))
    assert torch.equal(an, x.argmin(axis, keepdim=True).expand(6, 9))


@tl.kernel
def int_dot(a, b, c, M: tl.constexpr, N: tl.constexpr, K: tl.constexpr):
    c[0:M, 0:N] = tl.dot(a[0:M, 0:K], b[0:K, 0:N])


def test_integer_dot_accumulates_in_int32(device) -> None:
    a = torch.randint(-128, 128, (7, 40), dtype=torch.int8)
    b = torch.randint(-128, 128, (40, 5), dtype=torch.int8)
    c = torch.empty(7, 5, dtype=torch.int32)
    device.launch(int_dot, (1,), a, b, c, M=7, N=5, K=40)
    assert torch.equal(c, a.int() @ b.int())


# -- inspection --------------------------------------------------------------------------------


def test_source_ir_and_dump(tmp_path) -> None:
    x = torch.randn(10)
    src = axpb.source(x, x.clone(), 1.0, 2.0, BLOCK=16)
    assert "void tessera_kernel(" in src and "#pragma omp simd" in src
    ir = axpb.ir(x, x.clone(), 1.0, 2.0, BLOCK=16)
    assert "load(" in ir and "store(" in ir
    script = tmp_path / "dump.py"
    script.write_text(
        "import torch, tessera.lang as tl\n"
        "@tl.kernel\n"
        "def k(x, B: tl.constexpr):\n"
        "    x[0:B] = x[0:B] + 1\n"
        "k[(1,)](torch.zeros(4), B=4)\n")
    run = subprocess.run([sys.executable, str(script)], capture_output=True, text=True,
                         env={**__import__("os").environ, "TESSERA_DUMP": "1"}, check=True)
    assert "void tessera_kernel(" in run.stderr


# -- autotune ------------------------------------------------------------------------------


@tl.autotune(configs=[tl.Config(BLOCK=16), tl.Config(BLOCK=256), {"BLOCK": 4096}],
             key=["x"], restore=["out"])
@tl.kernel
def accumulate(x, out, BLOCK: tl.constexpr):
    i = tl.program_id(0) * BLOCK
    out[i:i + BLOCK] = out[i:i + BLOCK] + x[i:i + BLOCK]


def _grid(meta):
    return (tl.cdiv(meta["x"].shape[0], meta["BLOCK"]),)


def test_autotune_picks_times_and_restores(device) -> None:
    x = torch.ones(5000)
    out = torch.zeros(5000)
    if device.name != "cpu":  # tensors that stay on the device across launches
        x, out = (tessera.as_tensor(t).to(device.name) for t in (x, out))
    accumulate[_grid](x, out)
    # every config ran several times, but `restore` undid each timed run
    assert torch.equal(out.cpu().torch() if device.name != "cpu" else out, torch.ones(5000))
    key = (("torch.float32", (5000,)),) if device.name == "cpu" else \
        (("tessera.float32", (5000,), device.name),)
    assert set(accumulate.timings[key]) == {tl.Config(BLOCK=b) for b in (16, 256, 4096)}
    assert accumulate.best[key] in accumulate.timings[key]
    accumulate[_grid](x, out)
    assert torch.equal(out.cpu().torch() if device.name != "cpu" else out,
                       torch.full((5000,), 2.0))


def test_autotune_winner_persists_across_processes(tmp_path) -> None:
    script = tmp_path / "tuned.py"
    script.write_text(
        "import json, torch, tessera.lang as tl\n"
        "@tl.autotune(configs=[tl.Config(B=8), tl.Config(B=64)], key=['x'])\n"
        "@tl.kernel\n"
        "def k(x, B: tl.constexpr):\n"
        "    i = tl.program_id(0) * B\n"
        "    x[i:i + B] = x[i:i + B] * 1\n"
        "x = torch.zeros(1000)\n"
        "k[lambda m: (tl.cdiv(1000, m['B']),)](x)\n"
        "print(json.dumps([[c.kwargs, t] for c, t in\n"
        "                  next(iter(k.timings.values())).items()]))\n")
    runs = [subprocess.run([sys.executable, str(script)], capture_output=True, text=True,
                           check=True).stdout for _ in range(2)]
    assert json.loads(runs[0]) == json.loads(runs[1])  # the second read the first's record


def test_autotune_rejects_bad_configs() -> None:
    with pytest.raises(tl.LaunchError, match="not one of its parameters"):
        tl.autotune(configs=[tl.Config(NOPE=1)])(axpb)
    with pytest.raises(tl.LaunchError, match=r"not tl\.constexpr"):
        tl.autotune(configs=[tl.Config(a=1)])(axpb)
    with pytest.raises(tl.LaunchError, match=r"above @tl\.kernel"):
        tl.autotune(configs=[tl.Config(BLOCK=1)])(lambda x: x)
    with pytest.raises(tl.LaunchError, match="do not pass"):
        accumulate[_grid](torch.ones(4), torch.zeros(4), BLOCK=16)


@tl.kernel
def pipelined_matmul(a, b, c, BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr,
                     AHEAD: tl.constexpr):
    i = tl.program_id(0) * BM
    j = tl.program_id(1) * BN
    acc = tl.zeros((BM, BN))
    for k in tl.range(0, a.shape[1], BK, pipeline=AHEAD):
        acc = tl.dot(a[i:i + BM, k:k + BK], b[k:k + BK, j:j + BN], acc)
    c[i:i + BM, j:j + BN] = acc


def test_pipeline_hint_prefetches_next_tiles(device) -> None:
    a, b, c = torch.randn(100, 300), torch.randn(300, 70), torch.empty(100, 70)
    args = (a, b, c)
    device.launch(pipelined_matmul, (4, 3), *args, BM=32, BN=32, BK=64, AHEAD=2)
    torch.testing.assert_close(c, a @ b, atol=1e-4, rtol=1e-4)
    if device.name != "cpu":
        return  # OpenCL has no prefetch here: the hint changes nothing
    src = pipelined_matmul.source(*args, BM=32, BN=32, BK=64, AHEAD=2)
    assert src.count("__builtin_prefetch") == 2  # both operands, two iterations ahead
    assert "2 * v" in src.split("__builtin_prefetch")[1]
    with pytest.raises(tl.KernelSyntaxError, match="pipeline= must be a positive"):
        pipelined_matmul[(1, 1)](*args, BM=32, BN=32, BK=64, AHEAD=0)


@tl.kernel
def stepped_sum(x, out, step):
    acc = 0
    for i in range(0, 10, step):
        acc += x[i]
    out[0] = acc


def test_runtime_zero_step_runs_no_iterations(device) -> None:
    x, out = torch.arange(10), torch.full((1,), -1)
    device.launch(stepped_sum, (1,), x, out, 0)  # Python would raise; a kernel must not hang
    assert out.item() == 0
    device.launch(stepped_sum, (1,), x, out, 3)
    assert out.item() == 0 + 3 + 6 + 9


@tl.kernel
def int_sum_and_wrap(x, total, wrapped, N: tl.constexpr):
    v = x[0:N]
    total[0] = tl.sum(v)
    wrapped[0:N] = v * 3


def test_integer_sums_widen_and_overflow_wraps_like_torch(device) -> None:
    x = torch.full((64,), 2**30, dtype=torch.int32)
    total, wrapped = torch.empty(1, dtype=torch.int64), torch.empty(64, dtype=torch.int32)
    device.launch(int_sum_and_wrap, (1,), x, total, wrapped, N=64)
    assert total.item() == x.sum().item() == 64 * 2**30  # int64, as torch.sum
    assert torch.equal(wrapped, x * 3)  # int32 overflow wraps, as in torch


def test_tiles_too_big_for_a_thread_stack_run() -> None:
    import tessera.kernels as K
    x = torch.randn(3, 200_000)  # 800 KB rows: kept in thread-local storage, not the stack
    torch.testing.assert_close(K.softmax(x), torch.softmax(x, -1))


# -- kernels calling kernels -------------------------------------------------------------------


@tl.kernel
def swish(x, beta=1.0):
    return x * tl.sigmoid(beta * x)


@tl.kernel
def load_row(t, r, N: tl.constexpr):
    return tl.load(t[r, 0:N], other=0.0)


@tl.kernel
def gated_rows(x, gate, out, N: tl.constexpr):
    r = tl.program_id(0)
    out[r, 0:N] = swish(load_row(x, r, N), beta=2.0) * load_row(gate, r, N=N)


@tl.kernel
def forever(x):
    return forever(x)


@tl.kernel
def calls_forever(x, out):
    out[0] = forever(x[0])


def test_kernels_call_kernels_inline(device) -> None:
    x, gate, out = torch.randn(5, 70), torch.randn(5, 70), torch.empty(5, 70)
    device.launch(gated_rows, (5,), x, gate, out, N=70)
    torch.testing.assert_close(out, x * torch.sigmoid(2 * x) * gate)
    if device.name == "cpu":
        assert "swish" not in gated_rows.source(x, gate, out, N=70).split("tsr_run")[1]


def test_kernel_calls_that_cannot_work_are_errors() -> None:
    with pytest.raises(tl.KernelSyntaxError, match="nest deeper"):
        calls_forever[(1,)](torch.ones(1), torch.ones(1))
    with pytest.raises(tl.KernelSyntaxError, match="returns nothing"):
        swish[(1,)](torch.ones(1))


@tl.kernel
def normalize_rows(x, out, BM: tl.constexpr):
    r = tl.program_id(0) * BM
    t = x[r:r + BM, :]  # `:` slices the whole dimension: its size is specialized
    out[r:r + BM, :] = t / tl.sum(t * t, axis=1, keepdims=True)


def test_whole_dimension_slices_specialize_on_size(device) -> None:
    for m, n in [(37, 50), (5, 7), (37, 50)]:
        x = torch.randn(m, n)
        out = torch.empty_like(x)
        device.launch(normalize_rows, (tl.cdiv(m, 8),), x, out, BM=8)
        torch.testing.assert_close(out, x / (x * x).sum(1, keepdim=True))
    builds = normalize_rows._compiled if device.name == "cpu" else normalize_rows._device_builds
    assert len(builds) == 2  # one build per column count


@tl.kernel
def centered_rows(x, out, mx, BM: tl.constexpr, BN: tl.constexpr):
    i = tl.program_id(0) * BM
    t = tl.load(x[i:i + BM, 0:BN], other=-float("inf")) * 2.0  # used twice: materialized
    m = tl.max(t, axis=1, keepdims=True)  # fused into t's loop
    s = tl.sum(tl.exp(t - m), axis=1, keepdims=True)
    out[i:i + BM, 0:BN] = t - m
    mx[i:i + BM, 0:1] = m + s


def test_row_reductions_fused_into_materialization(device) -> None:
    x = torch.randn(37, 50)
    x[3, 7] = float("nan")
    x[5] = float("-inf")
    out, mx = torch.empty(37, 50), torch.empty(37, 1)
    device.launch(centered_rows, (tl.cdiv(37, 8),), x, out, mx, BM=8, BN=64)
    t = x * 2
    m = t.amax(1, keepdim=True)
    torch.testing.assert_close(out, t - m, equal_nan=True)
    torch.testing.assert_close(mx, m + torch.exp(t - m).sum(1, keepdim=True), equal_nan=True)
    assert device.name != "cpu" or "reduction(max:" in centered_rows.source(x, out, mx, BM=8,
                                                                             BN=64)


def test_reduction_of_a_dot_whose_operand_is_read_in_place() -> None:
    """The operand's edge copy is not where the dot's row reduction can run (the dot has no
    value yet there); it once was, and the C did not compile."""
    @tl.kernel
    def dot_max(a, b, out, N: tl.constexpr):
        s = tl.dot(a[0:N, 0:N], b[0:N, 0:N])
        out[0:N] = tl.max(s, axis=1)

    a, b, out = torch.randn(16, 16), torch.randn(16, 16), torch.empty(16)
    dot_max[(1,)](a, b, out, N=16)
    torch.testing.assert_close(out, (a @ b).amax(1), atol=1e-5, rtol=1e-5)
