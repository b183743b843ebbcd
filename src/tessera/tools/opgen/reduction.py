"""What `tessera opgen NAME --kind reduction` writes: a reduction along one dim, the root
mean square sqrt(mean(x ** 2, dim)), as a row kernel over x seen as [rows, R]
(templates for string.Template: `$name` is the op's name)."""

SUMMARY = "sqrt(mean(x ** 2)) along one dim"

OP = '''"""`$name`: the root mean square of x along one dim,
sqrt(mean(x ** 2, dim)).

Made by `tessera opgen $name --kind reduction` as a working example to edit.
The reduction is `${name}_rows`:
what each element adds (t * t), how a row's columns combine (a float32 sum, whose
identity 0 is what masked loads read past the row's end) and how a row finishes (sqrt
of the sum over R). Change `_reference` with it, and the schema in `@op` if the
arguments change (docs/lang/reference.md is the kernel language).
For the graph compiler to lower torch ops to this one, list their aten overloads in
`implements=` (as tessera/ops/pointwise.py does); none are listed yet.
Its tests are in tests/ops/test_$name.py,
its benchmark in src/tessera/bench/ops/$name.py.
"""

from __future__ import annotations

import math

import torch

import tessera.lang as tl
from tessera.ops._launch import (
    FLOATS,
    ArgumentError,
    check_dim,
    check_tensor,
    compiled,
    launch,
    spec,
)
from tessera.ops.pointwise import contiguous
from tessera.ops.registry import op

_TILE = 4096  # elements of a program's tile: BM rows x BN columns


@tl.kernel
def ${name}_rows(x, out, R, BM: tl.constexpr, BN: tl.constexpr):
    """out[r] = sqrt(sum(x[r, :] ** 2) / R) for this program's BM rows of x [rows, R],
    walking each row BN columns at a time, in float32."""
    i = tl.program_id(0) * BM
    acc = tl.zeros((BM, BN))
    for j in range(0, R, BN):
        t = x[i:i + BM, j:j + BN].to(tl.float32)  # past the row's end: 0
        acc += t * t
    out[i:i + BM] = tl.sqrt(tl.sum(acc, axis=1) / R)


def _reference(x: torch.Tensor, dim: int = -1, keepdim: bool = False) -> torch.Tensor:
    """The tests' ground truth: torch in float32, rounded once to x's dtype."""
    return torch.sqrt(torch.mean(x.float() ** 2, dim, keepdim)).to(x.dtype)


@op("$name(Tensor x, int dim=-1, bool keepdim=False) -> Tensor",
    kind="reduction", reference=_reference, dtypes=("float32", "bfloat16", "float16"))
def $name(x: torch.Tensor, dim: int = -1, keepdim: bool = False) -> torch.Tensor:
    """sqrt(mean(x ** 2)) along dim, in float32 (an example op made by tessera opgen)."""
    check_tensor(x, "$name", "x", FLOATS)
    if isinstance(dim, bool) or not isinstance(dim, int):
        raise ArgumentError(f"$name: dim={dim!r} must be an int (one dim)")
    d = check_dim(dim, x.dim(), "$name")
    rows_of = x.movedim(d, -1) if x.dim() else x.view(1)  # the reduced dim last
    r = rows_of.shape[-1]
    out = torch.empty(rows_of.shape[:-1], dtype=x.dtype)
    if out.numel() and r == 0:
        out.fill_(math.nan)  # the mean of nothing, as torch's
    elif out.numel():
        try:  # [rows, R] with x's own strides where they allow it
            v = rows_of.view(out.numel(), r)
        except RuntimeError:
            v = contiguous(rows_of).view(out.numel(), r)
        bn = min(1024, -(-r // 16) * 16)  # a short row is one tile
        bm = 1 << max(0, (_TILE // bn).bit_length() - 1)
        unit = v.stride(1) == 1  # a unit stride compiles to vector loads
        kernel = ${name}_rows
        s = compiled((kernel, x.dtype, unit, bm, bn), kernel, spec(x.dtype, 2, unit),
                     spec(x.dtype, 1), r, BM=bm, BN=bn)
        launch(s, (-(-v.shape[0] // bm), 1, 1), v.data_ptr(), *v.shape, *v.stride(),
               out.data_ptr(), out.numel(), 1, r)
    return out.unsqueeze(d) if keepdim and x.dim() else out
'''

TEST = '''"""`$name` against its torch reference:
dtypes, dims, layouts (views, rows longer than a tile, empty, 0-dim), bad input.
Made by `tessera opgen`; extend it as the op grows."""

from __future__ import annotations

import pytest
import torch
from opcheck import check
from torch._subclasses.fake_tensor import FakeTensorMode

import tessera.ops as O
from tessera.errors import DtypeError, ShapeError
from tessera.ops import ArgumentError


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_${name}_dtypes(dtype: torch.dtype) -> None:
    x = torch.randn(6, 70).to(dtype)
    check("$name", x)
    check("$name", x.t())  # strided rows


def test_${name}_dims_and_layouts() -> None:
    x = torch.randn(4, 5, 6)
    check("$name", x, 1)  # a middle dim
    check("$name", x, 0, True)  # the first, kept
    check("$name", x[:, ::2], -1, True)  # a stepped view
    check("$name", torch.randn(3, 2000))  # rows longer than one tile
    check("$name", torch.randn(()))  # 0-dim
    check("$name", torch.empty(0, 5))  # no rows
    check("$name", torch.empty(3, 0))  # empty rows: NaN, as torch's mean
    check("$name", torch.tensor([[1.0, float("nan")], [float("inf"), 2.0]]))


def test_${name}_torch_op() -> None:
    x = torch.randn(3, 5)
    got = torch.ops.tessera.$name(x, 0)
    torch.testing.assert_close(got, O.$name(x, 0))
    with FakeTensorMode():  # the fake implementation torch.compile traces with
        half = torch.empty(3, 5, dtype=torch.bfloat16)
        fake = torch.ops.tessera.$name(half, 0, True)
    assert fake.shape == (1, 5) and fake.dtype == torch.bfloat16


def test_${name}_bad_input() -> None:
    with pytest.raises(DtypeError, match="$name"):
        O.$name(torch.ones(3, dtype=torch.int32))
    with pytest.raises(ShapeError, match="dim=2"):
        O.$name(torch.ones(3, 4), 2)
    with pytest.raises(ArgumentError, match="must be an int"):
        O.$name(torch.ones(3, 4), [0, 1])
'''

BENCH_BYTES = "4 * m * n + 4 * m"  # read x, write one value a row (float32)
CASES = "_[0-9]*x[0-9]*"  # the bench cases' names after the op's
