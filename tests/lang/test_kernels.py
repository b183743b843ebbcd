"""The kernels written in tessera.lang (tessera.kernels), against torch, on awkward shapes
and in every floating dtype (fp16/bf16 stored, fp32 computed)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import tessera.kernels as K
from marks import slow_after
from tessera.errors import ShapeError

SHAPES = [(1, 1), (1, 7), (33, 384), (5, 1000), (3, 4, 33)]
DTYPES = [torch.float32, torch.float16, torch.bfloat16]
# Outputs are rounded once to the storage dtype; fp32 differs only by summation order.
TOL = {torch.float32: dict(atol=2e-5, rtol=2e-5), torch.float16: dict(atol=2e-3, rtol=2e-3),
       torch.bfloat16: dict(atol=2e-2, rtol=2e-2)}


def _close(got: torch.Tensor, want: torch.Tensor, dtype: torch.dtype) -> None:
    assert got.dtype == want.dtype and got.shape == want.shape
    torch.testing.assert_close(got.float(), want.float(), **TOL[dtype])


def _randn(*shape: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    return torch.randn(*shape).to(dtype)


@pytest.mark.parametrize("n", [1, 7, 4096, 1_000_003])
def test_add(n: int) -> None:
    x, y = torch.randn(n), torch.randn(n)
    assert torch.equal(K.add(x, y), x + y)


@pytest.mark.parametrize("dtype", slow_after(2, DTYPES))
@pytest.mark.parametrize("shape", SHAPES)
def test_row_kernels(shape: tuple[int, ...], dtype: torch.dtype) -> None:
    torch.manual_seed(0)
    x, w, b = _randn(*shape, dtype=dtype), _randn(shape[-1]), _randn(shape[-1])
    ref = x.float()
    _close(K.softmax(x), torch.softmax(ref, -1).to(dtype), dtype)
    _close(K.layer_norm(x, w, b), F.layer_norm(ref, shape[-1:], w, b).to(dtype), dtype)
    _close(K.layer_norm(x), F.layer_norm(ref, shape[-1:]).to(dtype), dtype)
    _close(K.rms_norm(x, w), F.rms_norm(ref, shape[-1:], w, 1e-6).to(dtype), dtype)
    for approximate in ("none", "tanh"):
        want = F.gelu((ref + b.to(dtype).float()).to(dtype).float(), approximate=approximate)
        _close(K.bias_gelu(x, b.to(dtype), approximate), want.to(dtype), dtype)


def test_softmax_other_dim_and_strided_input() -> None:
    x = torch.randn(6, 10, 5)
    torch.testing.assert_close(K.softmax(x, dim=1), torch.softmax(x, 1))
    xt = torch.randn(40, 24).t()  # a transposed view: rows are strided
    torch.testing.assert_close(K.softmax(xt), torch.softmax(xt, -1))


def test_softmax_propagates_inf_and_nan() -> None:
    x = torch.tensor([[0.0, float("inf"), 1.0], [0.0, float("nan"), 1.0],
                      [-float("inf")] * 3, [1e30, -1e30, 0.0]])
    torch.testing.assert_close(K.softmax(x), torch.softmax(x, -1), equal_nan=True)


@pytest.mark.parametrize("mnk", [(1, 1, 1), (70, 129, 33), (64, 64, 64), (5, 300, 257)])
@pytest.mark.parametrize("dtype", DTYPES)
def test_matmul(mnk: tuple[int, int, int], dtype: torch.dtype) -> None:
    m, n, k = mnk
    a, b = _randn(m, k, dtype=dtype), _randn(k, n, dtype=dtype)
    want = (a.float() @ b.float()).to(dtype)
    torch.testing.assert_close(K.matmul(a, b).float(), want.float(),
                               atol=TOL[dtype]["atol"] * k ** 0.5, rtol=TOL[dtype]["rtol"])


def test_matmul_transposed_operands() -> None:
    a, b = torch.randn(33, 20).t(), torch.randn(45, 33).t()
    torch.testing.assert_close(K.matmul(a, b), a @ b, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("bhsd", [(1, 1, 1, 8), (1, 2, 37, 16), (2, 3, 128, 64),
                                  (1, 1, 100, 128)])
def test_flash_attention(bhsd: tuple[int, int, int, int], causal: bool) -> None:
    torch.manual_seed(1)
    q, k, v = (torch.randn(*bhsd) for _ in range(3))
    want = F.scaled_dot_product_attention(q, k, v, is_causal=causal)
    torch.testing.assert_close(K.flash_attention(q, k, v, causal), want, atol=2e-5, rtol=2e-5)


def test_flash_attention_cross_lengths_and_views() -> None:
    q = torch.randn(2, 9, 4, 32).transpose(1, 2)  # [B, S, H, D] -> [B, H, S, D] view
    k, v = torch.randn(2, 4, 50, 32), torch.randn(2, 4, 50, 32)
    want = F.scaled_dot_product_attention(q, k, v)
    torch.testing.assert_close(K.flash_attention(q, k, v), want, atol=2e-5, rtol=2e-5)


def test_flash_attention_bf16() -> None:
    q, k, v = (torch.randn(1, 2, 64, 64, dtype=torch.bfloat16) for _ in range(3))
    want = F.scaled_dot_product_attention(q.float(), k.float(), v.float(), is_causal=True)
    got = K.flash_attention(q, k, v, causal=True)
    assert got.dtype == torch.bfloat16
    torch.testing.assert_close(got.float(), want, atol=2e-2, rtol=2e-2)


def test_wrappers_reject_bad_shapes() -> None:
    with pytest.raises(ShapeError, match="weight"):
        K.layer_norm(torch.randn(3, 4), torch.randn(5))
    with pytest.raises(ShapeError, match="matmul"):
        K.matmul(torch.randn(3, 4), torch.randn(5, 6))
    with pytest.raises(ShapeError, match="flash_attention"):
        K.flash_attention(torch.randn(1, 2, 3, 4), torch.randn(1, 2, 3, 5),
                          torch.randn(1, 2, 3, 5))
    with pytest.raises(ShapeError, match="differ"):
        K.add(torch.randn(3), torch.randn(4))
