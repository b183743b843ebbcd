"""quantize / dequantize against a torch implementation of the same format, against the GEMM
templates' own quantizer, the round-trip error bound, numpy callers, and bad input."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from opcheck import check, close

import tessera.ops as O
from tessera.errors import DtypeError, ShapeError, TesseraError
from tessera.ops import ArgumentError
from tessera.templates.gemm import quantize as template_quantize


@pytest.fixture(autouse=True)
def _seed() -> None:
    """The same random inputs whatever order (and worker) the tests run in."""
    torch.manual_seed(0)


@pytest.mark.parametrize("shape", [(64, 24), (3, 100, 17), (1, 1), (2, 0, 5), (256, 3)])
@pytest.mark.parametrize("bits", [8, 4])
@pytest.mark.parametrize("group_size", [32, 128])
def test_quantize_dequantize(shape: tuple[int, ...], bits: int, group_size: int) -> None:
    w = torch.randn(shape) * 0.2
    data, scales = check("quantize", w, bits, group_size)
    want = template_quantize(w, bits, group_size)
    assert np.array_equal(data.numpy(), want.data) and np.array_equal(scales.numpy(),
                                                                      want.scales)
    k = shape[-2]
    w_hat = check("dequantize", data, scales, k)
    assert np.array_equal(w_hat.numpy(), want.dequantize())
    # symmetric rounding: off by at most half a step of the element's group
    step = scales.repeat_interleave(group_size, -1)[..., :k].transpose(-1, -2)
    assert ((w_hat - w).abs() <= step / 2 + 1e-7).all()


def test_quantize_16bit_views_and_numpy() -> None:
    w = torch.randn(96, 40)
    check("quantize", w.bfloat16(), 8, 32)
    check("quantize", w.half().t(), 4, 64)  # a transposed view: [40, 96]
    data, scales = O.quantize(w.numpy(), 4, 32)  # numpy in, numpy out
    assert isinstance(data, np.ndarray) and data.dtype == np.uint8 and data.shape == (40, 48)
    assert O.dequantize(data, scales, 96).shape == (96, 40)


def test_quantize_bad_input() -> None:
    w = torch.randn(64, 8)
    with pytest.raises(ArgumentError, match="quantize: bits=3"):
        O.quantize(w, 3)
    with pytest.raises(ArgumentError, match="quantize: group_size=16"):
        O.quantize(w, 8, 16)
    with pytest.raises(ShapeError, match="quantize: argument 'w' must be \\[K, N\\] or"):
        O.quantize(torch.randn(64))
    with pytest.raises(DtypeError, match="quantize: argument 'w' has dtype float64"):
        O.quantize(w.double())
    with pytest.raises(TesseraError, match="quantize: the weights contain NaN"):
        O.quantize(torch.full((4, 4), float("nan")))


def test_dequantize_bad_input() -> None:
    data, scales = O.quantize(torch.randn(100, 8), 8, 32)  # K = 100 -> 128 rows in 4 groups
    with pytest.raises(ShapeError, match="holds 128 rows of K in groups of 32, which does not "
                                         "fit K = 96"):
        O.dequantize(data, scales, 96)
    with pytest.raises(ShapeError, match="are not \\[E, N, Kp\\] data"):
        O.dequantize(data, scales[:4], 100)
    with pytest.raises(ShapeError, match="groups of 42"):
        O.dequantize(data[:, :126], scales[:, :3], 100)
    with pytest.raises(DtypeError, match="dequantize: argument 'data' has dtype float32"):
        O.dequantize(data.float(), scales, 100)
    with pytest.raises(DtypeError, match="argument 'scales' has dtype float16"):
        O.dequantize(data, scales.half(), 100)
    with pytest.raises(ArgumentError, match="k=-1"):
        O.dequantize(data, scales, -1)
    close(O.dequantize(data, scales, 100), O.get("dequantize").reference(data, scales, 100))
