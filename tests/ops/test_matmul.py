"""Matrix products against torch: matmul's 1-D/2-D/batched/broadcast cases, linear over any
leading dims, bmm, baddbmm and addmm with alpha/beta, fused epilogues, views, empty and
size-1 dims, dtypes, the numpy path, bad input."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from opcheck import check, close

import tessera.ops as O
from marks import slow_after
from tessera.errors import DeviceError, DtypeError, ShapeError
from tessera.ops import ArgumentError
from tessera.ops.matmul import fused_linear, fused_matmul

F = torch.nn.functional
HALF = slow_after(1, [torch.bfloat16, torch.float16])
# (x, other): dot, matrix-vector both ways, matrix, batched with broadcast batch dims,
# a shared weight, empty and size-1 dims, a skinny (decode) product
PAIRS = [((7,), (7,)), ((5, 9), (9,)), ((9,), (9, 4)), ((4,), (3, 4, 2)), ((33, 70), (70, 17)),
         ((2, 3, 5, 8), (8, 6)), ((2, 1, 5, 8), (4, 8, 3)), ((3, 5, 8), (8,)), ((0, 4), (4, 3)),
         ((3, 0), (0, 5)), ((1, 1), (1, 1)), ((2, 0, 4), (2, 4, 3)), ((1, 300), (300, 65))]


@pytest.mark.parametrize("shapes", PAIRS)
def test_matmul_shapes(shapes: tuple) -> None:
    x, y = (torch.randn(s) for s in shapes)
    check("matmul", x, y)


def test_matmul_views() -> None:
    a, b = torch.randn(40, 30), torch.randn(50, 40)
    check("matmul", a.t(), b.t())  # both transposed
    check("matmul", a[::2, 1::3], torch.randn(10, 7))  # stepped
    check("matmul", torch.randn(3, 40, 6).transpose(1, 2), torch.randn(40, 5)[:, None, :]
          .expand(40, 3, 5).permute(1, 0, 2))  # an expanded (batch stride 0) other
    check("matmul", torch.randn(4, 6, 2).permute(2, 0, 1), torch.randn(6, 3))  # no fold
    check("matmul", torch.randn(2, 3, 4, 8).transpose(0, 1), torch.randn(3, 1, 8, 2))


@pytest.mark.parametrize("dtype", HALF)
def test_half_dtypes(dtype: torch.dtype) -> None:
    for shapes in [((33, 70), (70, 17)), ((2, 3, 5, 8), (8, 6)), ((5, 9), (9,)), ((9,), (9,))]:
        x, y = (torch.randn(s).to(dtype) for s in shapes)
        check("matmul", x, y)
    x, w, b = torch.randn(3, 4, 64).to(dtype), torch.randn(20, 64).to(dtype), torch.randn(20)
    check("linear", x, w, b.to(dtype))
    check("bmm", x, torch.randn(3, 64, 5).to(dtype))
    check("addmm", torch.randn(20).to(dtype), x[0], w.t(), beta=0.5, alpha=2)


@pytest.mark.parametrize("xshape", [(64,), (3, 64), (2, 3, 64), (0, 64), (1, 64), (40, 64)])
def test_linear(xshape: tuple[int, ...]) -> None:
    x, w, b = torch.randn(xshape), torch.randn(24, 64), torch.randn(24)
    check("linear", x, w, b)
    check("linear", x, w)
    check("linear", x, torch.randn(64, 24).t(), b[:1])  # a row-major B; a bias of one
    check("linear", x, w[0])  # a 1-D weight


def test_linear_views_and_scalar_bias() -> None:
    x = torch.randn(64, 2, 3).permute(1, 2, 0)  # leading dims that do not fold
    check("linear", x, torch.randn(10, 64), torch.randn(10))
    check("linear", torch.randn(6, 64)[::2], torch.randn(10, 128)[:, ::2], torch.tensor(0.5))


def test_bmm_baddbmm_addmm() -> None:
    a, b = torch.randn(3, 7, 40), torch.randn(3, 40, 9)
    check("bmm", a, b)
    check("bmm", a.transpose(1, 2).contiguous().transpose(1, 2), b[:, :, :5])
    check("baddbmm", torch.randn(9), a, b)
    check("baddbmm", torch.randn(3, 7, 9), a, b, beta=0.5, alpha=-2)
    check("baddbmm", torch.full((7, 1), float("nan")), a, b, beta=0)  # input never read
    check("addmm", torch.randn(9), a[0], b[0])
    check("addmm", torch.randn(7, 9).t().contiguous().t(), a[0], b[0], beta=2, alpha=0.5)
    check("addmm", torch.randn(1, 1), torch.randn(4, 0), torch.randn(0, 3))  # k = 0


def test_fused_epilogues() -> None:
    x, w, b = torch.randn(2, 9, 48), torch.randn(20, 48), torch.randn(20)
    r = torch.randn(2, 9, 20)
    close(fused_linear(x, w, b, activation="gelu", residual=r),
          F.gelu(F.linear(x, w, b)) + r)
    close(fused_matmul(x[0, 0], w.t(), b, activation="gelu", residual=r[0, 0]),
          F.gelu(x[0, 0] @ w.t() + b) + r[0, 0])  # a 1-D x: the residual has no M dim
    close(fused_matmul(x, w.t(), b, activation="gelu", residual=r[0, :1]),
          F.gelu(x @ w.t() + b) + r[0, :1])  # a broadcast residual
    m, v, r5 = torch.randn(5, 48), torch.randn(48), torch.randn(5)
    close(fused_matmul(m, v, activation="gelu", residual=r5), F.gelu(m @ v) + r5)


@pytest.mark.parametrize("activation", slow_after(1, ["relu", "silu", "sigmoid", "tanh",
                                                      "gelu_tanh"]))
def test_fused_activations(activation: str) -> None:
    x, w, b = torch.randn(6, 32), torch.randn(16, 32), torch.randn(16)
    want = {"relu": F.relu, "silu": F.silu, "sigmoid": torch.sigmoid, "tanh": torch.tanh,
            "gelu_tanh": lambda t: F.gelu(t, approximate="tanh")}[activation]
    close(fused_linear(x, w, b, activation=activation), want(F.linear(x, w, b)))


def test_numpy_inputs() -> None:
    a = np.random.default_rng(0).standard_normal((5, 8), dtype=np.float32)
    b = np.random.default_rng(1).standard_normal((8, 3), dtype=np.float32)
    out = O.matmul(a, b)
    assert isinstance(out, np.ndarray)
    np.testing.assert_allclose(out, a @ b, rtol=1e-5, atol=1e-5)


def test_bad_inputs() -> None:
    x = torch.randn(3, 4)
    with pytest.raises(DtypeError, match="matmul: argument 'other' has dtype bfloat16"):
        O.matmul(x, torch.randn(4, 2).bfloat16())
    with pytest.raises(DtypeError, match="matmul: argument 'x' has dtype float64"):
        O.matmul(x.double(), torch.randn(4, 2))
    with pytest.raises(DtypeError, match="linear: argument 'weight' has dtype int32"):
        O.linear(x, torch.ones(2, 4, dtype=torch.int32))
    with pytest.raises(DeviceError, match="matmul: argument 'x' is on meta"):
        O.matmul(torch.empty(3, 4, device="meta"), torch.randn(4, 2))
    with pytest.raises(ShapeError, match="matmul: shapes \\(3, 4\\) and \\(5, 2\\) cannot"):
        O.matmul(x, torch.randn(5, 2))
    with pytest.raises(ShapeError, match="at least 1-D"):
        O.matmul(torch.tensor(2.0), x)
    with pytest.raises(ShapeError, match=r"batch dims .* do not broadcast"):
        O.matmul(torch.randn(2, 3, 4), torch.randn(3, 4, 5))
    with pytest.raises(ShapeError, match="linear: x of shape \\(3, 4\\) does not fit"):
        O.linear(x, torch.randn(2, 5))
    with pytest.raises(ShapeError, match="linear: bias of shape \\(3,\\)"):
        O.linear(x, torch.randn(2, 4), torch.randn(3))
    with pytest.raises(DtypeError, match="linear: argument 'bias' has dtype float16"):
        O.linear(x, torch.randn(2, 4), torch.randn(2).half())
    with pytest.raises(ShapeError, match="bmm: x must be 3-D"):
        O.bmm(x, torch.randn(1, 4, 2))
    with pytest.raises(ShapeError, match="bmm: shapes \\(2, 3, 4\\) and \\(3, 4, 2\\)"):
        O.bmm(torch.randn(2, 3, 4), torch.randn(3, 4, 2))
    with pytest.raises(ShapeError, match="addmm: input of shape \\(4,\\) does not broadcast"):
        O.addmm(torch.randn(4), x, torch.randn(4, 2))
    with pytest.raises(DtypeError, match="baddbmm: argument 'input' has dtype bfloat16"):
        O.baddbmm(torch.randn(2).bfloat16(), torch.randn(1, 3, 4), torch.randn(1, 4, 2))
    with pytest.raises(ArgumentError, match="addmm: alpha='2' must be a number"):
        O.addmm(torch.randn(2), x, torch.randn(4, 2), alpha="2")
    with pytest.raises(ArgumentError, match="unknown activation 'swish'"):
        fused_linear(x, torch.randn(2, 4), activation="swish")
    with pytest.raises(ShapeError, match="residual of shape \\(4,\\) does not broadcast"):
        fused_linear(x, torch.randn(2, 4), residual=torch.randn(4))
