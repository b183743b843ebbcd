"""Normalizations against torch: every affine combination, one-tile and looped rows, views,
multi-dim normalized shapes, groups, inference batch norm, dtypes, bad input."""

from __future__ import annotations

import pytest
import torch
from opcheck import check

import tessera.ops as O
from marks import slow_after
from tessera.errors import ShapeError
from tessera.ops import ArgumentError

DTYPES = slow_after(2, [torch.float32, torch.bfloat16, torch.float16])


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(5, 7), (3, 4, 384), (2, 5000), (1, 1), (0, 8)])
def test_layer_and_rms_norm(shape: tuple[int, ...], dtype: torch.dtype) -> None:
    n = shape[-1]
    x, w, b = torch.randn(shape).to(dtype), torch.randn(n).to(dtype), torch.randn(n).to(dtype)
    check("layer_norm", x, [n], w, b)
    check("layer_norm", x, [n])
    check("layer_norm", x, [n], w, None, 1e-3)
    check("rms_norm", x, [n], w)
    check("rms_norm", x, [n], w, 1e-6)
    check("rms_norm", x, [n])


def test_norms_of_views_and_trailing_shapes() -> None:
    x = torch.randn(8, 6).t()
    check("layer_norm", x, [8])
    check("rms_norm", x, [8], torch.randn(8))
    y = torch.randn(2, 3, 4, 5)
    check("layer_norm", y, [4, 5], torch.randn(4, 5), torch.randn(4, 5))
    check("rms_norm", y, (3, 4, 5))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape, groups", [((2, 6, 5, 5), 3), ((3, 4, 7), 2), ((2, 8), 4),
                                           ((1, 32, 33, 3), 8)])
def test_group_and_batch_norm(shape: tuple[int, ...], groups: int, dtype: torch.dtype) -> None:
    x, c = torch.randn(shape).to(dtype), shape[1]
    w, b = torch.randn(c).to(dtype), torch.randn(c).to(dtype)
    check("group_norm", x, groups, w, b)
    check("group_norm", x, groups)
    mean, var = torch.randn(c).to(dtype), (torch.rand(c) + 0.5).to(dtype)
    check("batch_norm", x, mean, var, w, b)
    check("batch_norm", x, mean, var, None, None, 1e-3)


def test_bad_inputs(entry_path: str) -> None:
    x = torch.randn(4, 6)
    with pytest.raises(ShapeError, match="layer_norm: normalized_shape"):
        O.layer_norm(x, [5])
    with pytest.raises(ShapeError, match="layer_norm: weight has shape"):
        O.layer_norm(x, [6], torch.randn(5))
    with pytest.raises(ArgumentError, match="rms_norm: eps='small' must be a number"):
        O.rms_norm(x, [6], None, "small")
    with pytest.raises(ArgumentError, match="group_norm: num_groups=4"):
        O.group_norm(x, 4)
    with pytest.raises(ShapeError, match="batch_norm: running_var has shape"):
        O.batch_norm(x, torch.zeros(6), torch.ones(5))
    with pytest.raises(ShapeError, match="group_norm: x must be"):
        O.group_norm(torch.randn(6), 2)
