"""Reductions and softmax against torch: every dim, keepdim, views, NaN and ties, empty
and size-1 dims, long rows (the looped kernels), dtypes, bad input."""

from __future__ import annotations

import pytest
import torch
from opcheck import check

import tessera.ops as O
from marks import slow_after
from tessera.errors import DtypeError, ShapeError
from tessera.ops import ArgumentError

CASES = [((5, 7), 1), ((5, 7), 0), ((3, 4, 5), 1), ((3, 4, 5), (0, 2)), ((3, 4, 5), (1, 2)),
         ((3, 4, 5), None), ((2, 3000), -1), ((4,), 0), ((), None), ((1, 1), 0)]
DTYPES = slow_after(2, [torch.float32, torch.bfloat16, torch.int32, torch.float16])


def _x(shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
    return (torch.randn(shape) * 10).to(dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape, dim", CASES)
def test_sum_mean_var_amax(shape: tuple, dim: object, dtype: torch.dtype) -> None:
    x = _x(shape, dtype)
    tol = {"atol": 1e-3, "rtol": 1e-4} if dtype == torch.float32 else {}
    check("sum", x, dim, **tol)
    check("sum", x, dim, True, **tol)
    check("amax", x, dim)
    check("amin", x, dim, True)
    if dtype.is_floating_point:
        check("mean", x, dim)
        if x.numel() > 1 or dim is not None:
            check("var", x, dim, correction=0, keepdim=True)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape, dim", [c for c in CASES if isinstance(c[1], int)])
def test_arg_reductions_and_softmax(shape: tuple, dim: int, dtype: torch.dtype) -> None:
    x = _x(shape, dtype)
    for name in ("argmax", "argmin"):
        check(name, x, dim)
        check(name, x, dim, True)
    check("max", x, dim)
    check("min", x, dim, True)
    if dtype.is_floating_point:
        check("softmax", x, dim)
        check("log_softmax", x, dim)


def test_flattened_argmax_views_and_long_rows() -> None:
    x = torch.randn(6, 8).t()
    check("argmax", x)
    check("argmin", x, None, True)
    check("sum", x, 1)
    check("softmax", x, 1)
    long_rows = torch.randn(3, 9000)
    check("softmax", long_rows, -1)
    check("log_softmax", long_rows, 1)
    check("var", long_rows, 1)


def test_nan_inf_and_ties() -> None:
    x = torch.tensor([[1.0, float("nan"), 3.0, float("nan")], [-float("inf")] * 4,
                      [2.0, 5.0, 5.0, 1.0]])
    for name in ("argmax", "argmin", "amax", "amin", "softmax", "log_softmax"):
        check(name, x, 1)
    check("max", x, 1)
    check("argmax", x, 0)  # column reductions take the same rules
    check("argmax", torch.tensor([3, 7, 7, 1], dtype=torch.int64), 0)


def test_empty_and_degenerate() -> None:
    e = torch.empty(0, 4)
    check("sum", e, 0)
    check("mean", e, 0)
    check("softmax", e, 1)
    check("sum", torch.ones(3, 4, dtype=torch.bool), 1)  # bools count, as int64
    with pytest.raises(ShapeError, match="amax: cannot reduce over a dimension of size 0"):
        O.amax(e, 0)


def test_bad_inputs(entry_path: str) -> None:
    x = torch.randn(3, 4)
    with pytest.raises(ShapeError, match="sum: dim=2 is out of range"):
        O.sum(x, 2)
    with pytest.raises(ShapeError, match="names a dimension twice"):
        O.sum(x, (1, -1))
    with pytest.raises(DtypeError, match="mean: argument 'x' has dtype int64"):
        O.mean(torch.arange(4))
    with pytest.raises(ArgumentError, match="var: correction"):
        O.var(x, 1, correction=0.5)
    with pytest.raises(DtypeError, match="softmax"):
        O.softmax(x.double())
