"""Convolution and pooling against torch: conv2d over kernels, strides, padding, dilation,
groups (depthwise and channel multipliers), batches, channels-last and unbatched inputs,
fused epilogues; max/avg pooling with padding, ceil_mode and divisors; adaptive average
pooling; dtypes, empty batches, the numpy path, bad input."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from opcheck import check, close

import tessera.ops as O
from marks import slow_after
from tessera.errors import DeviceError, DtypeError, ShapeError
from tessera.ops import ArgumentError
from tessera.ops.conv import fused_conv2d

F = torch.nn.functional
# (N, C, H, W, out channels, kernel, stride, padding, dilation, groups)
CONVS = [(1, 3, 9, 11, 5, 3, 1, 1, 1, 1),
         (1, 16, 7, 7, 24, 1, 1, 0, 1, 1),  # 1x1
         (1, 3, 20, 20, 16, 7, 2, 3, 1, 1),  # a stem
         (1, 4, 10, 7, 6, 3, 2, 1, 1, 2),  # groups, stride 2
         (1, 4, 9, 9, 8, 3, 2, 2, 2, 4),  # dilation
         (1, 8, 12, 12, 8, 3, 1, 1, 1, 8),  # depthwise
         (1, 4, 9, 13, 8, (3, 1), (1, 2), (1, 0), (2, 1), 4),  # depthwise x2, uneven
         (1, 6, 8, 8, 12, (2, 3), (2, 1), (0, 2), 1, 3),
         (1, 1, 5, 5, 3, 5, 1, 0, 1, 1),  # one input channel, a 1x1 output
         (1, 96, 6, 6, 80, 3, 1, 1, 1, 1),  # more than 64 output channels: A packed
         (2, 16, 12, 12, 24, 1, 1, 0, 1, 1)]  # 1x1 over 144 pixels: W @ x per image


def _conv_args(case: tuple, dtype: torch.dtype = torch.float32) -> tuple:
    n, c, h, w, co, k, s, p, d, g = case
    kh, kw = (k, k) if isinstance(k, int) else k
    x = torch.randn(n, c, h, w).to(dtype)
    return x, torch.randn(co, c // g, kh, kw).to(dtype), torch.randn(co).to(dtype), s, p, d, g


def _tol(w: torch.Tensor) -> dict[str, float]:
    """float32 sums of C/g * kH * kW terms in another order than torch's."""
    k = w[0].numel()
    return {"atol": 2e-6 * k ** 0.5 + 1e-5, "rtol": 2e-5} if w.dtype == torch.float32 else {}


@pytest.mark.parametrize("case", CONVS)
def test_conv2d(case: tuple) -> None:
    x, w, b, s, p, d, g = _conv_args(case)
    check("conv2d", x, w, b, s, p, d, g, **_tol(w))
    check("conv2d", x.contiguous(memory_format=torch.channels_last), w, b, s, p, d, g,
          **_tol(w))
    check("conv2d", x[0], w, b, s, p, d, g, **_tol(w))  # unbatched [C, H, W]


@pytest.mark.filterwarnings("ignore:Using padding='same'")  # torch's, about its reference
def test_conv2d_batches_and_views() -> None:
    x, w, b, s, p, d, g = _conv_args((3, 8, 9, 9, 16, 3, 1, 1, 1, 2))
    check("conv2d", x, w, b, s, p, d, g)  # weights packed once for the three images
    check("conv2d", x[:1], w, None, 2, 0, 1, 2)
    check("conv2d", x.contiguous(memory_format=torch.channels_last), w, b, s, p, d, g)
    check("conv2d", torch.randn(8, 3, 11, 9).transpose(0, 1)[:, :, ::2], w, b, 1, 0, 1, 2)
    check("conv2d", x, w.transpose(2, 3).contiguous().transpose(2, 3), b, s, p, d, g)
    check("conv2d", x[:0], w, b, s, p, d, g)  # an empty batch
    check("conv2d", x, torch.randn(16, 4, 2, 3), b, 1, "same", [2, 1], 2)  # odd totals
    check("conv2d", x, w, b, 1, "valid", 1, 2)
    dw = torch.randn(8, 1, 3, 3)
    check("conv2d", x, dw, None, 1, 1, 1, 8)
    check("conv2d", x, torch.randn(8, 1, 2, 2), None, 1, "same", 1, 8)
    check("conv2d", x.contiguous(memory_format=torch.channels_last), dw, None, 2, 1, 1, 8)


@pytest.mark.parametrize("dtype", slow_after(1, [torch.bfloat16, torch.float16]))
def test_conv2d_half(dtype: torch.dtype) -> None:
    for case in (CONVS[0], CONVS[3], CONVS[5], CONVS[9]):
        x, w, b, s, p, d, g = _conv_args(case, dtype)
        check("conv2d", x, w, b, s, p, d, g, **_tol(w))


def test_fused_conv2d() -> None:
    x, w, b, s, p, d, g = _conv_args((2, 8, 10, 10, 16, 3, 1, 1, 1, 2))
    want = F.conv2d(x, w, b, s, p, d, g)
    last = x.contiguous(memory_format=torch.channels_last)
    for r in (torch.randn(2, 16, 10, 10), torch.randn(16, 1, 1), torch.randn(2, 16, 10, 10)
              .transpose(2, 3)):
        close(fused_conv2d(x[1:], w, b, s, p, d, g, activation="relu", residual=r[-1:]),
              F.relu(want[1:]) + r[-1:])
        close(fused_conv2d(last, w, b, s, p, d, g, activation="relu", residual=r),
              F.relu(want) + r)
    pw = torch.randn(16, 8, 1, 1)  # 1x1: rows of C are output planes, the bias by rows
    for r in (torch.randn(2, 16, 10, 10), torch.randn(16, 10, 1).transpose(1, 2)):
        close(fused_conv2d(x, pw, b, activation="relu", residual=r),
              F.relu(F.conv2d(x, pw, b)) + r)
    dw, r = torch.randn(16, 1, 3, 3), torch.randn(2, 16, 5, 5)
    close(fused_conv2d(x, dw, b, 2, 1, 1, 8, activation="relu", residual=r),
          F.relu(F.conv2d(x, dw, b, 2, 1, 1, 8)) + r)


def test_max_pool2d() -> None:
    x = torch.randn(2, 3, 11, 9)
    check("max_pool2d", x, 3)
    check("max_pool2d", x, 3, 2, 1)
    check("max_pool2d", x, [3, 2], [2, 1], [1, 1], [2, 1], True)
    check("max_pool2d", x, 2, 2, 0, 1, True)
    check("max_pool2d", x.contiguous(memory_format=torch.channels_last)[0], 3, 1, 1)
    check("max_pool2d", x[:0], 2)
    y = x.clone()
    y[0, 1, 4, 4], y[1, 2, 0, 0] = float("nan"), float("-inf")
    check("max_pool2d", y, 3, 2, 1)  # NaN wins its windows, -inf does not


def test_avg_pool2d() -> None:
    x = torch.randn(2, 3, 11, 9)
    check("avg_pool2d", x, 3)
    check("avg_pool2d", x, 3, 2, 1)
    check("avg_pool2d", x, 3, 2, 1, True, False)
    check("avg_pool2d", x, [2, 3], 1, [1, 1], False, False)
    check("avg_pool2d", x, [2, 3], [3, 2], [1, 1], True, True, 5)
    check("avg_pool2d", x[0, :, ::2], 2)


def test_adaptive_avg_pool2d() -> None:
    x = torch.randn(2, 5, 11, 9)
    check("adaptive_avg_pool2d", x, 1)
    check("adaptive_avg_pool2d", x, [4, 3])
    check("adaptive_avg_pool2d", x, [13, 20])  # larger than the input
    check("adaptive_avg_pool2d", x.contiguous(memory_format=torch.channels_last), [5, 1])
    check("adaptive_avg_pool2d", x[1], [0, 2])
    check("adaptive_avg_pool2d", x, [None, 4])  # None keeps that dim


@pytest.mark.parametrize("dtype", slow_after(1, [torch.bfloat16, torch.float16]))
def test_pools_half(dtype: torch.dtype) -> None:
    x = torch.randn(2, 3, 11, 9).to(dtype)
    check("max_pool2d", x, 3, 2, 1)
    check("avg_pool2d", x, 3, 2, 1, True, False)
    check("adaptive_avg_pool2d", x, 1)
    check("adaptive_avg_pool2d", x, [4, 3])


def test_numpy_inputs() -> None:
    x = np.random.default_rng(0).standard_normal((1, 3, 8, 8), dtype=np.float32)
    w = np.random.default_rng(1).standard_normal((4, 3, 3, 3), dtype=np.float32)
    out = O.conv2d(x, w, None, 1, 1)
    assert isinstance(out, np.ndarray)
    np.testing.assert_allclose(out, F.conv2d(torch.from_numpy(x), torch.from_numpy(w),
                                             padding=1).numpy(), rtol=1e-5, atol=1e-5)


def test_bad_inputs() -> None:
    x, w = torch.randn(1, 4, 8, 8), torch.randn(6, 4, 3, 3)
    with pytest.raises(ShapeError, match="conv2d: weight of shape \\(6, 3, 3, 3\\) does not"):
        O.conv2d(x, torch.randn(6, 3, 3, 3))
    with pytest.raises(ShapeError, match="conv2d: x has 4 channels, which 3 groups"):
        O.conv2d(x, torch.randn(6, 1, 3, 3), None, 1, 0, 1, 3)
    with pytest.raises(ShapeError, match="conv2d: weight of shape \\(5, 2, 3, 3\\)"):
        O.conv2d(x, torch.randn(5, 2, 3, 3), None, 1, 0, 1, 2)
    with pytest.raises(ArgumentError, match="conv2d: stride=0; it must be at least 1"):
        O.conv2d(x, w, None, 0)
    with pytest.raises(ArgumentError, match="conv2d: padding=\\[1, -1\\]"):
        O.conv2d(x, w, None, 1, [1, -1])
    with pytest.raises(ArgumentError, match="conv2d: padding='full'; it takes numbers"):
        O.conv2d(x, w, None, 1, "full")
    with pytest.raises(ArgumentError, match="conv2d: padding='same' needs stride 1"):
        O.conv2d(x, w, None, 2, "same")
    with pytest.raises(ArgumentError, match="conv2d: groups=0"):
        O.conv2d(x, w, None, 1, 0, 1, 0)
    with pytest.raises(ShapeError, match=r"conv2d: a window of 3 .* does not fit"):
        O.conv2d(torch.randn(1, 4, 2, 8), w)
    with pytest.raises(ShapeError, match="conv2d: x must be \\[N, C, H, W\\]"):
        O.conv2d(torch.randn(4, 8), w)
    with pytest.raises(ShapeError, match="conv2d: bias must be \\[6\\]"):
        O.conv2d(x, w, torch.randn(4))
    with pytest.raises(DtypeError, match="conv2d: argument 'weight' has dtype bfloat16"):
        O.conv2d(x, w.bfloat16())
    with pytest.raises(DtypeError, match="conv2d: argument 'x' has dtype float64"):
        O.conv2d(x.double(), w)
    with pytest.raises(DtypeError, match="conv2d: argument 'bias' has dtype float16"):
        O.conv2d(x, w, torch.randn(6).half())
    with pytest.raises(DeviceError, match="conv2d: argument 'x' is on meta"):
        O.conv2d(torch.empty(1, 4, 8, 8, device="meta"), w)
    with pytest.raises(ArgumentError, match="unknown activation"):
        fused_conv2d(x, w, activation="elu")
    with pytest.raises(ShapeError, match="residual of shape \\(6, 8, 8\\) does not"):
        fused_conv2d(x, w, residual=torch.randn(6, 8, 8))
    with pytest.raises(ArgumentError, match="max_pool2d: padding=\\[2, 2\\] is more than half"):
        O.max_pool2d(x, 3, 1, 2)
    with pytest.raises(ArgumentError, match="avg_pool2d: stride=\\[0, 1\\]"):
        O.avg_pool2d(x, 3, [0, 1])
    with pytest.raises(ArgumentError, match="max_pool2d: kernel_size=0"):
        O.max_pool2d(x, 0)
    with pytest.raises(ShapeError, match="max_pool2d: a window of 9"):
        O.max_pool2d(x, 9)
    with pytest.raises(ArgumentError, match="avg_pool2d: divisor_override=0"):
        O.avg_pool2d(x, 2, divisor_override=0)
    with pytest.raises(ShapeError, match="max_pool2d: x of shape \\(1, 0, 8, 8\\)"):
        O.max_pool2d(torch.randn(1, 0, 8, 8), 2)
    with pytest.raises(DtypeError, match="max_pool2d: argument 'x' has dtype int32"):
        O.max_pool2d(torch.ones(1, 1, 4, 4, dtype=torch.int32), 2)
    with pytest.raises(ArgumentError, match="adaptive_avg_pool2d: output_size=\\[-1, 2\\]"):
        O.adaptive_avg_pool2d(x, [-1, 2])
    with pytest.raises(ShapeError, match="adaptive_avg_pool2d: x of shape \\(1, 4, 0, 8\\)"):
        O.adaptive_avg_pool2d(torch.randn(1, 4, 0, 8), 2)
