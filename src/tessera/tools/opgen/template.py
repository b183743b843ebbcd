"""What `tessera opgen NAME --kind template` writes: a GEMM-template-backed op with a fused
epilogue, silu(x @ weight.T + bias), following tessera/ops/matmul.py (templates for
string.Template: `$name` is the op's name)."""

SUMMARY = "silu(x @ weight.T + bias) on the GEMM template, its activation fused"
CASES = "_m[0-9]*_k[0-9]*_n[0-9]*"  # the bench cases' names after the op's

OP = '''"""`$name`: silu(x @ weight.T + bias),
a linear layer whose bias and activation are fused into the GEMM template's store.

Made by `tessera opgen $name --kind template` as a working example to edit,
following tessera/ops/matmul.py: the product is one launch of the GEMM template
(tessera.templates.gemm, through `product`) on x's rows and the weight read in place,
and the template's epilogue adds the bias, applies ACTIVATION and can add a residual
(`product(..., residual=r)`) in the same pass over the result. Change ACTIVATION to
another of tessera.templates.gemm.ACTIVATIONS (relu, gelu, gelu_tanh, silu, sigmoid,
tanh) and `_reference` with it, and the schema in `@op` if the arguments change.
For the graph compiler to lower torch ops to this one, list their aten overloads in
`implements=` (as tessera/ops/pointwise.py does); none are listed yet.
Its tests are in tests/ops/test_$name.py,
its benchmark in src/tessera/bench/ops/$name.py.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from tessera.errors import ShapeError
from tessera.ops._launch import FLOATS, check_tensor
from tessera.ops.matmul import product
from tessera.ops.pointwise import contiguous
from tessera.ops.registry import op

ACTIVATION = "silu"  # the epilogue's activation, applied after the bias


def _reference(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None
               ) -> torch.Tensor:
    """The tests' ground truth: torch in float32 (as the template accumulates), rounded
    once to x's dtype."""
    y = F.linear(x.float(), weight.float(), None if bias is None else bias.float())
    return F.silu(y).to(x.dtype)  # ACTIVATION, as torch computes it


@op("$name(Tensor x, Tensor weight, Tensor? bias=None) -> Tensor",
    kind="contraction", reference=_reference, dtypes=("float32", "bfloat16", "float16"))
def $name(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None
          ) -> torch.Tensor:
    """silu(x @ weight.T + bias) for weight [out, in], on the GEMM template (an example op
    made by tessera opgen)."""
    check_tensor(x, "$name", "x", FLOATS)
    check_tensor(weight, "$name", "weight", (x.dtype,))
    if weight.dim() != 2 or x.dim() == 0 or x.shape[-1] != weight.shape[1]:
        raise ShapeError(f"$name: x of shape {tuple(x.shape)} does not fit "
                         f"a weight of shape {tuple(weight.shape)}",
                         hint="weight is [out_features, in_features], x [..., in_features]")
    n, k = weight.shape
    if bias is not None:
        check_tensor(bias, "$name", "bias", (x.dtype,))
        if bias.shape != (n,):
            raise ShapeError(f"$name: bias of shape {tuple(bias.shape)} "
                             f"does not fit {n} output features")
        bias = bias.to(torch.float32).contiguous()  # the epilogue reads a float32 [N]
    m = math.prod(x.shape[:-1])
    try:  # x's leading dims folded into the rows of one product, without a copy
        rows = x.view(m, k)
    except RuntimeError:
        rows = contiguous(x).view(m, k)
    out = torch.empty((m, n), dtype=x.dtype)
    product(rows, weight.t(), out, bias=bias, activation=ACTIVATION)
    return out.view(*x.shape[:-1], n)
'''

TEST = '''"""`$name` against its torch reference:
layouts of x and the weight (leading dims, transposed, stepped, copied), no bias, empty
products, dtypes, bad input. Made by `tessera opgen`; extend it as the op grows.
Each dtype and bias/no-bias pair compiles one variant of the GEMM template (seconds,
once per machine: cached), so the tests use three: float32 with a bias, bfloat16
without, float16 with."""

from __future__ import annotations

import pytest
import torch
from opcheck import check
from torch._subclasses.fake_tensor import FakeTensorMode

import tessera.ops as O
from tessera.errors import DtypeError, ShapeError


def test_${name}_layouts() -> None:
    x, w, b = torch.randn(6, 40), torch.randn(24, 40), torch.randn(24)
    check("$name", x, w, b)
    check("$name", x.reshape(2, 3, 40), w, b)  # leading dims fold into rows
    unfolded = torch.randn(3, 40, 2).permute(0, 2, 1)
    check("$name", unfolded, w, b)  # dims that do not fold: a copy
    check("$name", torch.randn(40, 6).t(), w, b)  # a transposed x
    check("$name", x, torch.randn(40, 24).t(), b)  # a weight stored transposed
    check("$name", x[:, ::2], w[:, ::2], b)  # stepped views
    check("$name", torch.empty(0, 40), w, b)  # no rows
    check("$name", torch.empty(6, 0), torch.empty(24, 0), b)  # k = 0: silu(bias)
    check("$name", x[0], w, b)  # a single vector


@pytest.mark.parametrize(("dtype", "bias"), [(torch.bfloat16, False),
                                             (torch.float16, True)])
def test_${name}_half_and_no_bias(dtype: torch.dtype, bias: bool) -> None:
    x, w, b = torch.randn(6, 40), torch.randn(24, 40), torch.randn(24)
    check("$name", x.to(dtype), w.to(dtype), b.to(dtype) if bias else None)


def test_${name}_torch_op() -> None:
    x, w, b = torch.randn(3, 40), torch.randn(24, 40), torch.randn(24)
    got = torch.ops.tessera.$name(x, w, b)
    torch.testing.assert_close(got, O.$name(x, w, b))
    with FakeTensorMode():  # the fake implementation torch.compile traces with
        x, w = torch.empty(3, 40), torch.empty(24, 40)
        fake = torch.ops.tessera.$name(x.bfloat16(), w.bfloat16())
    assert fake.shape == (3, 24) and fake.dtype == torch.bfloat16


def test_${name}_bad_input() -> None:
    x, w = torch.randn(3, 40), torch.randn(24, 40)
    with pytest.raises(DtypeError, match="weight"):
        O.$name(x, w.half())
    with pytest.raises(DtypeError, match="$name"):
        O.$name(x.int(), w.int())
    with pytest.raises(ShapeError, match="does not fit"):
        O.$name(x, w.t())
    with pytest.raises(ShapeError, match="bias"):
        O.$name(x, w, torch.randn(5))
'''

BENCH = '''"""Benchmark of `$name` (made by `tessera opgen`)
against torch eager, its reference, reporting GFLOPS:
`tessera bench ops --quick --only '${name}${cases}'`."""

from __future__ import annotations

from tessera.bench.cases import torch_case
from tessera.bench.runner import Case


def cases(quick: bool) -> list[Case]:
    import torch

    import tessera.ops as O

    torch.manual_seed(0)
    reference = O.get("$name").reference
    out: list[Case] = []
    for m, k, n in ((8, 256, 256), (32, 1024, 1024) if quick else (256, 4096, 4096)):
        x, w, b = torch.randn(m, k), torch.randn(n, k) / k ** 0.5, torch.randn(n)
        ours = lambda x=x, w=w, b=b: O.$name(x, w, b)
        out.append(torch_case(f"${name}_m{m}_k{k}_n{n}", ours, reference,
                              (x, w, b), quick, flops=2 * m * n * k))
    return out
'''
