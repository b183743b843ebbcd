"""Matrix products on the GEMM templates: matmul (torch.matmul's semantics), linear, bmm,
baddbmm and addmm.

Every op is one launch of the template (`tessera.templates.gemm`, through its launch
entry: a few microseconds, no ctypes) on [B, M, K] x [B, K, N] views of the operands with
their own strides: a transposed nn.Linear weight is read by columns, as the template's
decode path wants, an operand shared by the batch has batch stride 0, and leading dims of
x fold into M when its layout allows. Batch dims that do not fold into one stride are
walked in Python. Products accumulate in float32 and round once to the result's dtype.

The template fuses a bias, an activation and a residual into its final store: linear and
matmul take them as arguments (`activation=`, `residual=`), which is how the graph
compiler's GEMM epilogue rewrites ask for them. On a device that is not the host (OpenCL)
products run the kernel-language GEMM (tiled_gemm.py) with the same epilogue.
"""

from __future__ import annotations

import itertools
from typing import Any

import torch
import torch.nn.functional as F

import tessera.lang as tl
from tessera.errors import DtypeError, ShapeError
from tessera.ops import device, tiled_gemm
from tessera.ops._launch import (
    ArgumentError,
    check_tensor,
    coalesce,
    compiled,
    launch,
    ldtype,
    spec,
)
from tessera.ops.pointwise import _aten
from tessera.ops.registry import op
from tessera.ops.shape import empty
from tessera.templates.gemm import ACTIVATIONS
from tessera.templates.gemm.sgemm import launch as launch_gemm
from tessera.templates.gemm.sgemm import launch_entry

__all__ = ["EPILOGUES", "broadcasts", "fused_linear", "fused_matmul", "gemm_entry", "product"]

EPILOGUES = ("bias", "activation", "residual")

_ENTRIES: dict[tuple, int] = {}


def gemm_entry(a: torch.dtype, b: torch.dtype, c: torch.dtype, *, packed: bool = False,
               bias: bool = False, activation: str | None = None, residual: bool = False,
               bias_rows: bool = False) -> int:
    """The template's launch entry for these operand dtypes and epilogue (cached)."""
    key = (a, b, c, packed, bias, activation, residual, bias_rows)
    address = _ENTRIES.get(key)
    if address is None:
        address = _ENTRIES[key] = launch_entry(
            ldtype(a), ldtype(b), ldtype(c), packed=packed, bias=bias, activation=activation,
            residual=residual, bias_rows=bias_rows)
    return address


def product(a: torch.Tensor, b: torch.Tensor, out: torch.Tensor, *, alpha: float = 1.0,
            beta: float = 0.0, bias: torch.Tensor | None = None,
            activation: str | None = None, residual: torch.Tensor | None = None,
            bias_rows: bool = False) -> None:
    """out = activation(alpha * a @ b + beta * out + bias) + residual over the batch dims
    of out: a [..., M, K] and b [..., K, N] broadcast to them, bias a contiguous float32
    [N] (`bias_rows`: [M]), residual float32 broadcastable to out."""
    if out.numel() == 0:
        return
    if device.current() is not None:  # on OpenCL: the kernel-language GEMM, same epilogue
        tiled_gemm.product(a, b, out, alpha=alpha, beta=beta, bias=bias,
                           activation=activation, residual=residual, bias_rows=bias_rows)
        return
    entry = gemm_entry(a.dtype, b.dtype, out.dtype, bias=bias is not None,
                       activation=activation, residual=residual is not None,
                       bias_rows=bias_rows)
    k = a.shape[-1]
    bias_slots = (0 if bias is None else bias.data_ptr(), 0)
    if out.dim() == 2 and a.dim() == 2 and b.dim() == 2:  # one product: nothing to walk
        res = (0,) * 4 if residual is None else \
            (residual.data_ptr(), 0, *residual.expand(out.shape).stride())
        launch_gemm(entry, 1, *out.shape, k, float(alpha), float(beta),
                    a.data_ptr(), 0, *a.stride(), 0, 0, b.data_ptr(), 0, *b.stride(), 0, 0, 0,
                    out.data_ptr(), 0, *out.stride(), *bias_slots, *res)
        return
    *batch, m, n = out.shape
    ops = [a.expand(*batch, m, k), b.expand(*batch, k, n), out]
    if residual is not None:
        ops.append(residual.expand(out.shape))
    sizes, strides = coalesce(batch, [t.stride()[:-2] for t in ops])
    sizes_of = [t.element_size() for t in ops]
    last = [st[-1] for st in strides]
    (ra, ca), (rb, cb), (rc, cc) = (t.stride()[-2:] for t in ops[:3])
    for index in itertools.product(*(range(s) for s in sizes[:-1])):  # batch dims that
        at = [t.data_ptr() + size * sum(i * s for i, s in zip(index, st, strict=False))
              for t, size, st in zip(ops, sizes_of, strides, strict=True)]  # do not fold
        res = (at[3], last[3], *ops[3].stride()[-2:]) if residual is not None else (0,) * 4
        launch_gemm(entry, sizes[-1], m, n, k, float(alpha), float(beta),
                    at[0], last[0], ra, ca, 0, 0, at[1], 0, rb, cb, 0, last[1], 0,
                    at[2], last[2], rc, cc, *bias_slots, *res)


def _floats(name: str, **tensors: Any) -> torch.dtype:
    """Check that the named tensors are CPU float tensors of the first one's dtype; that
    dtype."""
    first, dtype = None, None
    for arg, t in tensors.items():
        check_tensor(t, name, arg)
        if dtype is None:
            first, dtype = arg, t.dtype
        elif t.dtype != dtype:
            raise DtypeError(f"{name}: argument {arg!r} has dtype {_dt(t.dtype)} but "
                             f"{first!r} has {_dt(dtype)}; the operands must share a dtype",
                             hint=f"convert it first, e.g. {arg}.to({first}.dtype)")
    assert dtype is not None
    return dtype


def _same(name: str, arg: str, t: Any, dtype: torch.dtype) -> None:
    """An epilogue operand: a CPU tensor of the operands' dtype."""
    check_tensor(t, name, arg)
    if t.dtype != dtype:
        raise DtypeError(f"{name}: argument {arg!r} has dtype {_dt(t.dtype)}, the operands "
                         f"{_dt(dtype)}", hint=f"convert it first, e.g. {arg}.to(x.dtype)")


def _dt(d: torch.dtype) -> str:
    return str(d).removeprefix("torch.")


def _epilogue(name: str, dtype: torch.dtype, shape: tuple[int, ...], bias: Any,
              activation: str | None, residual: Any
              ) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """The bias as a contiguous float32 [N] (broadcast from () or [1]) and the residual as
    float32 broadcast to the result `shape`, checked."""
    if activation is not None and activation not in ACTIVATIONS:
        raise ArgumentError(f"{name}: unknown activation {activation!r}",
                            hint=f"one of {', '.join(ACTIVATIONS)}")
    if bias is not None:
        _same(name, "bias", bias, dtype)
        if not shape or bias.dim() > 1 or bias.numel() not in (1, shape[-1]):
            raise ShapeError(f"{name}: bias of shape {tuple(bias.shape)} does not fit a "
                             f"result of shape {shape}",
                             hint="a bias has one value per output feature (the last dim)")
        if bias.dtype != torch.float32 or bias.shape != shape[-1:] or bias.stride() != (1,):
            bias = bias.reshape(-1).to(torch.float32).expand(shape[-1]).contiguous()
    if residual is not None:
        _same(name, "residual", residual, dtype)
        broadcasts(name, "residual", residual, shape, "the result's")
        residual = residual.to(torch.float32).expand(shape)
    return bias, residual


def broadcasts(name: str, arg: str, t: torch.Tensor, shape: tuple[int, ...], what: str
               ) -> None:
    """Check that `t` broadcasts to `shape` (`what`'s shape) without growing it."""
    try:
        if torch.broadcast_shapes(t.shape, shape) == shape:
            return
    except RuntimeError:
        pass
    raise ShapeError(f"{name}: {arg} of shape {tuple(t.shape)} does not broadcast to "
                     f"{what} shape {shape}")


def fused_matmul(x: torch.Tensor, other: torch.Tensor, bias: torch.Tensor | None = None, *,
                 activation: str | None = None, residual: torch.Tensor | None = None,
                 name: str = "matmul") -> torch.Tensor:
    """activation(torch.matmul(x, other) + bias) + residual in one pass over the result
    (bias over its last dim; what the graph compiler fuses into matmul and linear)."""
    dtype = _floats(name, x=x, other=other)
    if x.dim() == 0 or other.dim() == 0:
        raise ShapeError(f"{name}: both arguments must be at least 1-D, got shapes "
                         f"{tuple(x.shape)} and {tuple(other.shape)}")
    k = x.shape[-1]
    if other.shape[0 if other.dim() == 1 else -2] != k:
        raise ShapeError(f"{name}: shapes {tuple(x.shape)} and {tuple(other.shape)} cannot "
                         "be multiplied", hint="x's last dim must match other's "
                                               "second-to-last (its only dim if 1-D)")
    if other.dim() == 1:
        if bias is not None:
            raise ShapeError(f"{name}: a bias needs a matrix `other`, got a vector")
        shape = tuple(x.shape[:-1])
        _, residual = _epilogue(name, dtype, shape, None, activation, residual)
        # x [..., K] @ v: v [1, K] times x's rows as columns, so the template's dot-product
        # path streams each row of x once
        rows = x.reshape(-1, k)
        out = empty((1, rows.shape[0]), dtype)
        res = None if residual is None else residual.reshape(1, -1)
        product(other[None], rows.t(), out, activation=activation, residual=res)
        return out.view(shape)
    a = x if x.dim() > 1 else x[None]
    try:  # torch.broadcast_shapes costs ~10 us: only when both have batch dims
        batch = a.shape[:-2] if other.dim() == 2 else other.shape[:-2] if a.dim() == 2 \
            else torch.broadcast_shapes(a.shape[:-2], other.shape[:-2])
    except RuntimeError:
        raise ShapeError(f"{name}: batch dims of {tuple(x.shape)} and {tuple(other.shape)} "
                         "do not broadcast") from None
    m, n = a.shape[-2], other.shape[-1]
    shape = (*batch, m, n)
    bias, residual = _epilogue(name, dtype, shape if x.dim() > 1 else (*batch, n),
                               bias, activation, residual)
    if residual is not None and x.dim() == 1:
        residual = residual.unsqueeze(-2)
    out = empty(shape, dtype)
    folded = _fold(a, residual) if other.dim() == 2 and a.dim() > 2 else None
    if folded is not None:  # one [B*M, K] @ [K, N] product: the weight is read once
        rows, res = folded
        product(rows, other, out.view(-1, n), bias=bias, activation=activation,
                residual=res)
    else:
        product(a, other, out, bias=bias, activation=activation, residual=residual)
    return out if x.dim() > 1 else out.squeeze(-2)


def _fold(a: torch.Tensor, residual: torch.Tensor | None
          ) -> tuple[torch.Tensor, torch.Tensor | None] | None:
    """a [..., M, K] (and the residual [..., M, N]) as 2-D views [rows, .], if their
    layouts allow it without copying."""
    try:
        rows = a.view(-1, a.shape[-1])
        res = None if residual is None else residual.view(-1, residual.shape[-1])
    except RuntimeError:
        return None
    return rows, res


# the template's activations (sgemm.ACTIVATIONS) as torch computes them: the references
_ACTIVATIONS = {"relu": F.relu, "gelu": F.gelu, "silu": F.silu, "sigmoid": torch.sigmoid,
                "tanh": torch.tanh, "gelu_tanh": lambda y: F.gelu(y, approximate="tanh")}


def _epilogue_reference(y: torch.Tensor, activation: str | None,
                        residual: torch.Tensor | None) -> torch.Tensor:
    if activation is not None:
        y = _ACTIVATIONS[activation](y)
    return y if residual is None else y + residual


def _matmul_reference(x: torch.Tensor, other: torch.Tensor, *, activation: str | None = None,
                      residual: torch.Tensor | None = None) -> torch.Tensor:
    return _epilogue_reference(torch.matmul(x, other), activation, residual)


@op("matmul(Tensor x, Tensor other, *, str? activation=None, Tensor? residual=None) -> Tensor",
    kind="contraction", reference=_matmul_reference, epilogues=EPILOGUES,
    implements=(*_aten("matmul", "default"), *_aten("mm", "default"),
                *_aten("mv", "default"), *_aten("dot", "default")))
def matmul(x: torch.Tensor, other: torch.Tensor, *, activation: str | None = None,
           residual: torch.Tensor | None = None) -> torch.Tensor:
    """torch.matmul: dot, matrix-vector, matrix and batched products with broadcast batch
    dims; then `activation` (relu, gelu, gelu_tanh, silu, sigmoid, tanh) and a `residual`
    added (broadcast to the result), in the GEMM's final store."""
    return fused_matmul(x, other, activation=activation, residual=residual)


def fused_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None, *,
                 activation: str | None = None, residual: torch.Tensor | None = None
                 ) -> torch.Tensor:
    """activation(x @ weight.T + bias) + residual in one pass over the result."""
    _floats("linear", x=x, weight=weight)
    if weight.dim() not in (1, 2):
        raise ShapeError(f"linear: weight must be [out_features, in_features] (or 1-D), got "
                         f"shape {tuple(weight.shape)}")
    if x.dim() == 0 or x.shape[-1] != weight.shape[-1]:
        raise ShapeError(f"linear: x of shape {tuple(x.shape)} does not fit a weight of "
                         f"shape {tuple(weight.shape)}",
                         hint="x's last dim must be the weight's in_features")
    return fused_matmul(x, weight.t() if weight.dim() == 2 else weight, bias,
                        activation=activation, residual=residual, name="linear")


def _linear_reference(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None,
                      *, activation: str | None = None, residual: torch.Tensor | None = None
                      ) -> torch.Tensor:
    return _epilogue_reference(F.linear(x, weight, bias), activation, residual)


@op("linear(Tensor x, Tensor weight, Tensor? bias=None, *, str? activation=None, "
    "Tensor? residual=None) -> Tensor", kind="contraction", reference=_linear_reference,
    epilogues=EPILOGUES, implements=_aten("linear", "default"))
def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None, *,
           activation: str | None = None, residual: torch.Tensor | None = None
           ) -> torch.Tensor:
    """nn.Linear: x @ weight.T + bias for weight [out_features, in_features] and any
    leading dims of x; then `activation` and a `residual` added, as matmul's."""
    return fused_linear(x, weight, bias, activation=activation, residual=residual)


def _batched(name: str, x: torch.Tensor, other: torch.Tensor, ndim: int,
             names: tuple[str, str]) -> torch.dtype:
    """Check two `ndim`-D operands of one dtype whose shapes multiply (same batch)."""
    dtype = _floats(name, **dict(zip(names, (x, other), strict=True)))
    for arg, t in zip(names, (x, other), strict=True):
        if t.dim() != ndim:
            raise ShapeError(f"{name}: {arg} must be {ndim}-D, got shape {tuple(t.shape)}")
    if x.shape[:-2] != other.shape[:-2] or x.shape[-1] != other.shape[-2]:
        raise ShapeError(f"{name}: shapes {tuple(x.shape)} and {tuple(other.shape)} cannot "
                         "be multiplied", hint="[B, M, K] @ [B, K, N]" if ndim == 3
                         else "[M, K] @ [K, N]")
    return dtype


@op("bmm(Tensor x, Tensor other) -> Tensor", kind="contraction", reference=torch.bmm,
    implements=_aten("bmm", "default"))
def bmm(x: torch.Tensor, other: torch.Tensor) -> torch.Tensor:
    """Batched matrix product [B, M, K] @ [B, K, N] (no broadcasting, as torch.bmm)."""
    dtype = _batched("bmm", x, other, 3, ("x", "other"))
    out = empty((x.shape[0], x.shape[1], other.shape[2]), dtype)
    product(x, other, out)
    return out


def _scaled(name: str, input: torch.Tensor, a: torch.Tensor, b: torch.Tensor, beta: Any,
            alpha: Any, ndim: int) -> torch.Tensor:
    """beta * input + alpha * (a @ b): input broadcast into the result, scaled there by the
    template (never read when beta is 0, as in torch)."""
    dtype = _batched(name, a, b, ndim, ("batch1", "batch2") if ndim == 3 else
                     ("mat1", "mat2"))
    _floats(name, **{"batch1" if ndim == 3 else "mat1": a}, input=input)
    for arg, v in (("beta", beta), ("alpha", alpha)):
        if isinstance(v, bool) or not isinstance(v, (int, float)):
            raise ArgumentError(f"{name}: {arg}={v!r} must be a number")
    shape = (*a.shape[:-1], b.shape[-1])
    broadcasts(name, "input", input, shape, "the product's")
    out = empty(shape, dtype)
    if beta != 0 and out.numel():
        _broadcast_into(out, input.expand(shape))
    product(a, b, out, alpha=alpha, beta=beta)
    return out


@tl.kernel
def broadcast_kernel(x, out, BM: tl.constexpr, BN: tl.constexpr):
    """out[q] = x[q] over a [BM, BN] tile (x expanded: strides of 0 repeat it)."""
    q = tl.program_id(2)
    i = tl.program_id(1) * BM
    j = tl.program_id(0) * BN
    out[q, i:i + BM, j:j + BN] = x[q, i:i + BM, j:j + BN]


def _broadcast_into(out: torch.Tensor, x: torch.Tensor) -> None:
    """out (contiguous, 2-D or 3-D) = x, an expanded view of the same shape."""
    o3, x3 = (out[None], x[None]) if out.dim() == 2 else (out, x)
    unit = x3.stride(2) == 1
    sp = compiled(("broadcast", x.dtype, unit), broadcast_kernel, spec(x.dtype, 3, unit),
                  spec(x.dtype, 3), BM=8, BN=64)
    q, m, n = o3.shape
    launch(sp, (-(-n // 64), -(-m // 8), q), x3.data_ptr(), *x3.shape, *x3.stride(),
           o3.data_ptr(), *o3.shape, *o3.stride())


@op("baddbmm(Tensor input, Tensor batch1, Tensor batch2, *, Scalar beta=1, Scalar alpha=1)"
    " -> Tensor", kind="contraction", implements=_aten("baddbmm", "default"),
    reference=lambda input, batch1, batch2, *, beta=1, alpha=1: torch.baddbmm(
        input, batch1, batch2, beta=beta, alpha=alpha))
def baddbmm(input: torch.Tensor, batch1: torch.Tensor, batch2: torch.Tensor, *,
            beta: float = 1, alpha: float = 1) -> torch.Tensor:
    """beta * input + alpha * (batch1 @ batch2), input broadcast to [B, M, N]."""
    return _scaled("baddbmm", input, batch1, batch2, beta, alpha, 3)


@op("addmm(Tensor input, Tensor mat1, Tensor mat2, *, Scalar beta=1, Scalar alpha=1)"
    " -> Tensor", kind="contraction", implements=_aten("addmm", "default"),
    reference=lambda input, mat1, mat2, *, beta=1, alpha=1: torch.addmm(
        input, mat1, mat2, beta=beta, alpha=alpha))
def addmm(input: torch.Tensor, mat1: torch.Tensor, mat2: torch.Tensor, *, beta: float = 1,
          alpha: float = 1) -> torch.Tensor:
    """beta * input + alpha * (mat1 @ mat2), input broadcast to [M, N]."""
    return _scaled("addmm", input, mat1, mat2, beta, alpha, 2)
