"""Pointwise ops against torch: broadcasting, type promotion, dtypes, views, edge values,
bad input."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from opcheck import check, close

import tessera
import tessera.ops as O
from marks import slow_after
from tessera.errors import DeviceError, DtypeError, ShapeError
from tessera.ops import ArgumentError

UNARY = ["neg", "abs", "exp", "log", "sqrt", "rsqrt", "tanh", "sigmoid", "erf", "sin", "cos",
         "relu", "silu", "gelu", "logical_not"]
BINARY = ["add", "sub", "mul", "div", "pow", "maximum", "minimum", "eq", "ne", "lt", "le", "gt",
          "ge", "logical_and", "logical_or", "logical_xor"]
# shapes that coalesce to rank 1, 2 and 3 and more, with broadcasting, size-1 and empty dims
PAIRS = [((7,), (7,)), ((4, 5), (5,)), ((3, 1, 6), (1, 4, 1)), ((2, 3, 4, 5, 6), (6,)),
         ((1,), ()), ((0, 3), (3,)), ((33, 1025), (33, 1))]


def _data(shape: tuple[int, ...], dtype: torch.dtype, positive: bool = False) -> torch.Tensor:
    x = torch.randn(shape) * 3
    if positive:
        x = x.abs() + 0.1
    return x.to(dtype)


@pytest.mark.parametrize("name", UNARY)
@pytest.mark.parametrize("dtype", slow_after(2, [torch.float32, torch.bfloat16, torch.float16,
                                                 torch.int32]))
def test_unary(name: str, dtype: torch.dtype) -> None:
    x = _data((3, 70), dtype, positive=name in ("log", "sqrt", "rsqrt"))
    if name == "gelu" and not dtype.is_floating_point:
        with pytest.raises(DtypeError, match="gelu"):
            O.gelu(x)
        return
    if name == "silu" and not dtype.is_floating_point:
        close(O.silu(x), torch.nn.functional.silu(x.float()))  # torch has no integer silu
        return
    check(name, x)
    check(name, x.t())  # a transposed view
    check(name, x[:, ::3])  # a stepped view


@pytest.mark.parametrize("name", BINARY)
@pytest.mark.parametrize("shapes", PAIRS)
def test_binary_broadcasting(name: str, shapes: tuple) -> None:
    a, b = (_data(s, torch.float32, positive=name == "pow") for s in shapes)
    check(name, a, b)
    check(name, b, a)


@pytest.mark.parametrize("name", BINARY)
@pytest.mark.parametrize("dtypes", slow_after(3, [
    (torch.bfloat16, torch.bfloat16), (torch.int32, torch.int64), (torch.float16, torch.int32),
    (torch.bool, torch.bool), (torch.uint8, torch.int8), (torch.bfloat16, torch.float16)]))
def test_binary_promotion(name: str, dtypes: tuple) -> None:
    a, b = _data((5, 9), dtypes[0]), _data((9,), dtypes[1])
    try:
        want = O.get(name).reference(a, b)
    except RuntimeError:
        with pytest.raises(DtypeError, match=name):
            getattr(O, name)(a, b)
        return
    if name == "pow" and not want.dtype.is_floating_point:
        with pytest.raises(DtypeError, match="integer powers"):
            O.pow(a, b)
        return
    if want.dtype == torch.int16:  # uint8 with int8: no kernel holds int16
        with pytest.raises(DtypeError, match="would be int16"):
            getattr(O, name)(a, b)
        return
    close(getattr(O, name)(a, b), want, what=name)


def test_scalars_are_weak_like_torch() -> None:
    h = torch.randn(4, 5).half()
    i = torch.arange(20, dtype=torch.int32).view(4, 5)
    check("add", h, torch.tensor(2.5))  # float16 stays float16
    check("mul", i, torch.tensor(3))  # int32 stays int32
    check("div", i, torch.tensor(2))  # true division: float32
    close(O.add(h, 2.5), h + 2.5)  # Python numbers become 0-dim tensors
    close(O.add(i, 2, alpha=3), torch.add(i, 2, alpha=3))
    close(O.sub(h, h, alpha=0.5), torch.sub(h, h, alpha=0.5))


def test_where_clamp_and_special_values() -> None:
    x = torch.tensor([[-1.0, 0.0, float("nan"), float("inf"), -float("inf"), 2.0]])
    check("where", x > 0, x, torch.zeros(1))
    check("where", torch.tensor([True, False]).view(2, 1), x, x * 2)
    check("clamp", x, -0.5, 0.5)
    check("clamp", x, None, 0.5)
    check("clamp", x, min=-0.5)
    check("clamp", torch.arange(10, dtype=torch.int64), 2, 5)
    for name in ("relu", "exp", "log", "sqrt", "sigmoid", "tanh", "abs", "neg"):
        check(name, x)
    check("maximum", x, torch.tensor(float("nan")))
    check("minimum", x, x.flip(1))
    check("gelu", x, approximate="tanh")


@pytest.mark.parametrize("dtype", [torch.uint8, torch.int8])
def test_clamp_integer_bounds_convert_as_torch(dtype: torch.dtype) -> None:
    """Bounds outside an integer dtype: torch wraps an unsigned type's negatives (-1 is
    255 in uint8) and refuses what does not fit; so do we."""
    x = torch.arange(0, 120, 7).to(dtype)
    for lo, hi in [(-3, 100), (-1, None), (None, -1), (-100, 50)]:
        check("clamp", x, lo, hi)
    for lo, hi in [(5, 300), (-300, 3)]:
        with pytest.raises(RuntimeError):
            torch.clamp(x, lo, hi)
        with pytest.raises(ArgumentError, match="does not fit"):
            O.clamp(x, lo, hi)


def test_contiguous_copies_any_layout() -> None:
    x = torch.randn(4, 6, 8).permute(2, 0, 1)[:, ::2]
    y = O.contiguous(x)
    assert y.is_contiguous() and torch.equal(y, x) and y.data_ptr() != x.data_ptr()
    b = torch.rand(3, 4) > 0.5
    assert torch.equal(O.contiguous(b.t()), b.t().contiguous())


def test_caller_kinds_round_trip() -> None:
    a = np.linspace(-2, 2, 12, dtype=np.float32).reshape(3, 4)
    got = O.add(a, a)
    assert isinstance(got, np.ndarray) and np.allclose(got, a + a)
    ro = a.copy()
    ro.flags.writeable = False  # inputs are never written: read-only arrays are fine
    assert np.allclose(O.exp(ro), np.exp(ro))
    t = tessera.as_tensor(a)
    got = O.relu(t)
    assert isinstance(got, tessera.Tensor) and np.allclose(got.numpy(), np.maximum(a, 0))
    mixed = O.mul(torch.from_numpy(a), a)  # the first tensor argument decides the kind
    assert isinstance(mixed, torch.Tensor)


def test_bad_inputs_name_the_op_and_argument(entry_path: str) -> None:
    x = torch.randn(3, 4)
    with pytest.raises(ShapeError, match="add: shapes"):
        O.add(x, torch.randn(5))
    with pytest.raises(DtypeError, match="exp: argument 'x' has dtype float64"):
        O.exp(x.double())
    with pytest.raises(DtypeError, match="where: condition must be bool"):
        O.where(x, x, x)
    with pytest.raises(ArgumentError, match="gelu: approximate='fast'"):
        O.gelu(x, approximate="fast")
    with pytest.raises(ArgumentError, match="clamp: at least one"):
        O.clamp(x)
    with pytest.raises(ArgumentError, match="alpha"):
        O.add(torch.arange(3), torch.arange(3), alpha=0.5)
    with pytest.raises(DeviceError, match="mul: argument 'x' is on meta"):
        O.mul(torch.empty(3, device="meta"), torch.empty(3, device="meta"))
    with pytest.raises(DtypeError, match="sub: bool"):
        O.sub(x > 0, x > 1)
    with pytest.raises(DtypeError, match="must be a tensor"):
        O.exp("x")
