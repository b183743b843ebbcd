"""What `tessera opgen NAME --kind pointwise` writes: an elementwise op, x * sigmoid(alpha * x),
as a tile function applied by a 2-D tile kernel to inputs of any layout (templates for
string.Template: `$name` is the op's name)."""

SUMMARY = "x * sigmoid(alpha * x), elementwise"

OP = '''"""`$name`: x * sigmoid(alpha * x), elementwise
(alpha 1.702 is "quick GELU", 1 is SiLU).

Made by `tessera opgen $name --kind pointwise` as a working example to edit.
The computation is `${name}_tile`, on float32 tiles:
change it, `_reference` with it, and the schema in `@op` if the arguments change.
`${name}_kernel` applies it to [BM, BN] tiles of x
seen with its own strides (docs/lang/reference.md is the kernel language).
For the graph compiler to lower torch ops to this one, list their aten overloads in
`implements=` (as tessera/ops/pointwise.py does); none are listed yet.
Its tests are in tests/ops/test_$name.py,
its benchmark in src/tessera/bench/ops/$name.py.
"""

from __future__ import annotations

import torch

import tessera.lang as tl
from tessera.ops._launch import (
    FLOATS,
    ArgumentError,
    check_tensor,
    coalesce,
    compiled,
    launch,
    spec,
)
from tessera.ops.pointwise import contiguous
from tessera.ops.registry import op

_BLOCK = 2048  # elements per program


@tl.kernel
def ${name}_tile(x, alpha):
    """The computation on one float32 tile of x: edit this."""
    return x * tl.sigmoid(alpha * x)


@tl.kernel
def ${name}_kernel(x, out, alpha, BM: tl.constexpr, BN: tl.constexpr):
    """out = ${name}_tile(x) on this program's [BM, BN] tile,
    computed in float32 and rounded once on store (the compiler masks what lies past
    the edges)."""
    i = tl.program_id(1) * BM
    j = tl.program_id(0) * BN
    t = x[i:i + BM, j:j + BN].to(tl.float32)
    out[i:i + BM, j:j + BN] = ${name}_tile(t, alpha)


def _reference(x: torch.Tensor, alpha: float = 1.702) -> torch.Tensor:
    """The tests' ground truth: torch in float32, rounded once to x's dtype."""
    xf = x.float()
    return (xf * torch.sigmoid(alpha * xf)).to(x.dtype)


@op("$name(Tensor x, float alpha=1.702) -> Tensor", kind="pointwise",
    reference=_reference, dtypes=("float32", "bfloat16", "float16"))
def $name(x: torch.Tensor, alpha: float = 1.702) -> torch.Tensor:
    """x * sigmoid(alpha * x), elementwise (an example op made by tessera opgen)."""
    check_tensor(x, "$name", "x", FLOATS)
    if isinstance(alpha, bool) or not isinstance(alpha, (int, float)):
        raise ArgumentError(f"$name: alpha={alpha!r} must be a number")
    out = torch.empty(x.shape, dtype=x.dtype)
    if out.numel() == 0:
        return out
    # x's dims merged where its strides allow: [n] or [m, n] for almost every layout
    sizes, (strides, _) = coalesce(x.shape, [x.stride(), out.stride()])
    if len(sizes) > 2:  # dims that do not merge: walk a contiguous copy
        x = contiguous(x)
        sizes, strides = [x.numel()], [1]
    if len(sizes) == 1:
        sizes, strides, bm, bn = [1, *sizes], [0, *strides], 1, _BLOCK
    else:
        bn = min(1024, 1 << (sizes[1] - 1).bit_length())
        bm = _BLOCK // bn
    unit = strides[1] == 1  # a unit stride compiles to vector loads
    kernel = ${name}_kernel
    s = compiled((kernel, x.dtype, unit, bm, bn), kernel, spec(x.dtype, 2, unit),
                 spec(x.dtype, 2), 0.0, BM=bm, BN=bn)
    m, n = sizes
    launch(s, (-(-n // bn), -(-m // bm), 1), x.data_ptr(), m, n, *strides,
           out.data_ptr(), m, n, n, 1, float(alpha))
    return out
'''

TEST = '''"""`$name` against its torch reference:
dtypes, layouts (views, broadcast, empty, 0-dim), its scalar argument, bad input.
Made by `tessera opgen`; extend it as the op grows."""

from __future__ import annotations

import pytest
import torch
from opcheck import check
from torch._subclasses.fake_tensor import FakeTensorMode

import tessera.ops as O
from tessera.errors import DtypeError
from tessera.ops import ArgumentError


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_${name}_dtypes(dtype: torch.dtype) -> None:
    x = (torch.randn(6, 70) * 4).to(dtype)
    check("$name", x)
    check("$name", x.t())  # a transposed view


def test_${name}_layouts() -> None:
    x = torch.randn(6, 70) * 4
    check("$name", x[:, ::3])  # a stepped view
    check("$name", x[:, :1].expand(6, 5))  # a broadcast (stride-0) view
    unmerged = x.reshape(2, 3, 70).permute(2, 0, 1)[:, :, :2]
    check("$name", unmerged)  # dims that do not merge
    check("$name", x[0])  # 1-D
    check("$name", torch.randn(()))  # 0-dim
    check("$name", torch.empty(0, 4))  # empty
    inf = float("inf")
    check("$name", torch.tensor([float("nan"), inf, -inf, 0.0]))
    check("$name", x, alpha=1.0)
    check("$name", x, 2)  # an int scalar


def test_${name}_torch_op() -> None:
    x = torch.randn(3, 5)
    got = torch.ops.tessera.$name(x, 1.5)
    torch.testing.assert_close(got, O.$name(x, alpha=1.5))
    with FakeTensorMode():  # the fake implementation torch.compile traces with
        half = torch.empty(3, 5, dtype=torch.bfloat16)
        fake = torch.ops.tessera.$name(half)
    assert fake.shape == (3, 5) and fake.dtype == torch.bfloat16


def test_${name}_bad_input() -> None:
    with pytest.raises(DtypeError, match="$name"):
        O.$name(torch.ones(3, dtype=torch.int32))
    with pytest.raises(ArgumentError, match="alpha"):
        O.$name(torch.ones(3), alpha="big")
'''

BENCH_BYTES = "8 * m * n"  # read x, write the result (float32)
CASES = "_[0-9]*x[0-9]*"  # the bench cases' names after the op's
