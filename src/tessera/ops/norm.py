"""Normalizations: layer_norm, rms_norm, group_norm, and batch_norm for inference.

Statistics are float32; results are stored in the input's dtype. Rows up to 4096 wide are
one tile (one pass over memory); longer rows take a statistics pass and a writing pass.
batch_norm with running statistics is one per-channel multiply-add (pointwise `fma`).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

import tessera.lang as tl
from tessera.errors import ShapeError
from tessera.ops import _fastpath
from tessera.ops._launch import (
    FLOATS,
    ArgumentError,
    check_tensor,
    compiled,
    launch,
    spec,
)
from tessera.ops.pointwise import run
from tessera.ops.reduce import _width, native_rows, row_tile
from tessera.ops.registry import op

_ONE_ROW = 4096  # rows up to this long are one tile


@tl.kernel
def _normalize(t, n, eps, RMS: tl.constexpr, MASK: tl.constexpr):
    """(x - mean) / sqrt(var + eps) of each row of tile t (n valid columns), or
    x / sqrt(mean(x^2) + eps) if RMS; masked columns are zero in t."""
    if RMS:
        r = t * tl.rsqrt(tl.sum(t * t, axis=1) / n + eps)[:, None]
    else:
        d = t - (tl.sum(t, axis=1) / n)[:, None]
        if MASK:
            d = tl.where(tl.arange(0, t.shape[1])[None, :] < n, d, 0.0)
        r = d * tl.rsqrt(tl.sum(d * d, axis=1) / n + eps)[:, None]
    return r


@tl.kernel
def norm_rows(x, w, b, out, N, eps, RMS: tl.constexpr, W: tl.constexpr, B: tl.constexpr,
              BM: tl.constexpr, BN: tl.constexpr, ONE: tl.constexpr, EXACT: tl.constexpr):
    """LayerNorm (or RMSNorm) of BM rows per program, with optional weight and bias.
    EXACT: rows are exactly BN long (no padding columns to mask out of the variance)."""
    i = tl.program_id(0) * BM
    if ONE:
        y = _normalize(x[i:i + BM, 0:BN].to(tl.float32), N, eps, RMS, not EXACT)
        if W:
            y = y * w[0:BN][None, :]
        if B:
            y = y + b[0:BN][None, :]
        out[i:i + BM, 0:BN] = y
    else:
        s = tl.zeros((BM, BN))
        for j in range(0, N, BN):
            s += x[i:i + BM, j:j + BN].to(tl.float32)
        mean = tl.zeros((BM,)) if RMS else tl.sum(s, axis=1) / N
        q = tl.zeros((BM, BN))
        for j in range(0, N, BN):
            d = x[i:i + BM, j:j + BN].to(tl.float32) - mean[:, None]
            d = tl.where(j + tl.arange(0, BN)[None, :] < N, d, 0.0)
            q += d * d
        rstd = tl.rsqrt(tl.sum(q, axis=1) / N + eps)
        for j in range(0, N, BN):
            y = (x[i:i + BM, j:j + BN].to(tl.float32) - mean[:, None]) * rstd[:, None]
            if W:
                y = y * w[j:j + BN][None, :]
            if B:
                y = y + b[j:j + BN][None, :]
            out[i:i + BM, j:j + BN] = y


def _rows(x: torch.Tensor, shape: Sequence[int], name: str) -> tuple[torch.Tensor, int, int]:
    """x as [M, N] rows over its last len(shape) dims, which must equal `shape`."""
    shape = [int(s) for s in ([shape] if isinstance(shape, int) else shape)]
    if not shape or list(x.shape[x.dim() - len(shape):]) != shape or len(shape) > x.dim():
        raise ShapeError(f"{name}: normalized_shape {tuple(shape)} is not the trailing shape "
                         f"of the input {tuple(x.shape)}")
    n = math.prod(shape)
    m = x.numel() // n if n else 0
    x2 = x.reshape(m, n) if x.is_contiguous() else x.contiguous().view(m, n)
    return x2, m, n


def _vector(v: torch.Tensor | None, n: int, shape: Sequence[int], name: str, arg: str
            ) -> torch.Tensor | None:
    if v is None:
        return None
    check_tensor(v, name, arg, FLOATS)
    if v.numel() != n or list(v.shape) != [int(s) for s in shape]:
        raise ShapeError(f"{name}: {arg} has shape {tuple(v.shape)}; it must be "
                         f"normalized_shape {tuple(shape)}")
    return v.reshape(n) if v.is_contiguous() else v.contiguous().view(n)


def _norm(x: torch.Tensor, shape: Sequence[int], w: torch.Tensor | None,
          b: torch.Tensor | None, eps: float, rms: bool, name: str) -> torch.Tensor:
    check_tensor(x, name, "x", FLOATS)
    shape = [shape] if isinstance(shape, int) else list(shape)
    x2, m, n = _rows(x, shape, name)
    wv, bv = _vector(w, n, shape, name, "weight"), _vector(b, n, shape, name, "bias")
    _check_eps(eps, name)
    out = torch.empty(x.shape, dtype=x.dtype)
    if m == 0 or n == 0:
        return out
    one = n <= _ONE_ROW
    bm, bn = row_tile(name, m, n, x.dtype, _ONE_ROW if one else 1024, one)
    exact = one and n == bn
    wt = wv if wv is not None else x2
    bt = bv if bv is not None else x2
    key = ("norm_rows", rms, wv is not None, bv is not None, bm, bn, one, exact, x.dtype,
           wt.dtype, bt.dtype, wt.dim(), bt.dim())
    s = compiled(key, norm_rows, spec(x.dtype, 2), spec(wt.dtype, wt.dim()),
                 spec(bt.dtype, bt.dim()), spec(x.dtype, 2), n, float(eps), RMS=rms,
                 W=wv is not None, B=bv is not None, BM=bm, BN=bn, ONE=one, EXACT=exact)
    if x.is_contiguous() and native_rows(name, n, x.dtype, (bm, bn), _ONE_ROW if one else 1024):
        _fastpath.add_plan(name, s.address, (x.dtype, wt.dtype, bt.dtype), x.dtype, rows=(
            wv is not None, bv is not None, wt.dtype, bt.dtype, bm, bn, one, exact))
    launch(s, (-(-m // bm), 1, 1), x2.data_ptr(), m, n, n, 1, *_flat(wt), *_flat(bt),
           out.data_ptr(), m, n, n, 1, n, float(eps))
    return out


def _check_eps(eps: object, name: str) -> None:
    """eps must be a number (a negative one gives NaN, as in torch)."""
    if not isinstance(eps, (int, float)) or isinstance(eps, bool):
        raise ArgumentError(f"{name}: eps={eps!r} must be a number")


def _flat(t: torch.Tensor) -> tuple[int, ...]:
    return (t.data_ptr(), *t.shape, *t.stride())


@op("layer_norm(Tensor x, int[] normalized_shape, Tensor? weight=None, Tensor? bias=None, "
    "float eps=1e-05) -> Tensor", kind="normalization",
    reference=lambda x, normalized_shape, weight=None, bias=None, eps=1e-5:
    torch.nn.functional.layer_norm(x, normalized_shape, weight, bias, eps),
    epilogues=("activation", "residual"),
    fast="_rows(@layer_norm, x, weight, bias, eps, normalized_shape)",
    implements=(torch.ops.aten.layer_norm.default,
                torch.ops.aten.native_layer_norm.default))
def layer_norm(x: torch.Tensor, normalized_shape: Sequence[int],
               weight: torch.Tensor | None = None, bias: torch.Tensor | None = None,
               eps: float = 1e-5) -> torch.Tensor:
    """(x - mean) / sqrt(var + eps) * weight + bias over the trailing normalized_shape."""
    return _norm(x, normalized_shape, weight, bias, eps, False, "layer_norm")


@op("rms_norm(Tensor x, int[] normalized_shape, Tensor? weight=None, float? eps=None) -> "
    "Tensor", kind="normalization",
    reference=lambda x, normalized_shape, weight=None, eps=None:
    torch.nn.functional.rms_norm(x, normalized_shape, weight, eps),
    epilogues=("activation", "residual"), implements=(torch.ops.aten.rms_norm.default,),
    fast="_rows(@rms_norm, x, weight, None, eps, normalized_shape)")
def rms_norm(x: torch.Tensor, normalized_shape: Sequence[int],
             weight: torch.Tensor | None = None, eps: float | None = None) -> torch.Tensor:
    """x / sqrt(mean(x^2) + eps) * weight over the trailing normalized_shape (Llama's
    RMSNorm); eps defaults to float32's machine epsilon (torch's: that of the compute
    type, also for half inputs)."""
    if eps is None:  # torch's: the epsilon of the type it computes in, float32
        eps = torch.finfo(torch.float32).eps
    return _norm(x, normalized_shape, weight, None, eps, True, "rms_norm")


@tl.kernel
def group_norm_kernel(x, x3, w, b, out, G, eps, W: tl.constexpr, B: tl.constexpr,
                      BN: tl.constexpr):
    """One program per (sample, group) row: the group's statistics over its row of x
    ([N * G, CG * HW]), then each channel's affine map over x3, the same memory seen as
    [N * G, CG, HW] (so a tile never runs into the next channel)."""
    r = tl.program_id(0)
    n = x.shape[1]
    s = tl.zeros((BN,))
    for j in range(0, n, BN):
        s += x[r, j:j + BN].to(tl.float32)
    mean = tl.sum(s) / n
    q = tl.zeros((BN,))
    for j in range(0, n, BN):
        d = tl.where(j + tl.arange(0, BN) < n, x[r, j:j + BN].to(tl.float32) - mean, 0.0)
        q += d * d
    rstd = tl.rsqrt(tl.sum(q) / n + eps)
    cg = x3.shape[1]
    first = (r % G) * cg
    for ci in range(0, cg):
        scale = rstd
        if W:
            scale = rstd * w[first + ci].to(tl.float32)
        shift = -mean * scale
        if B:
            shift = shift + b[first + ci].to(tl.float32)
        for j in range(0, x3.shape[2], BN):
            out[r, ci, j:j + BN] = x3[r, ci, j:j + BN].to(tl.float32) * scale + shift


@op("group_norm(Tensor x, int num_groups, Tensor? weight=None, Tensor? bias=None, "
    "float eps=1e-05) -> Tensor", kind="normalization",
    reference=lambda x, num_groups, weight=None, bias=None, eps=1e-5:
    torch.nn.functional.group_norm(x, num_groups, weight, bias, eps),
    implements=(torch.ops.aten.group_norm.default,
                torch.ops.aten.native_group_norm.default))
def group_norm(x: torch.Tensor, num_groups: int, weight: torch.Tensor | None = None,
               bias: torch.Tensor | None = None, eps: float = 1e-5) -> torch.Tensor:
    """Normalize each group of num_groups channel groups of x [N, C, *] over its channels
    and positions, then a per-channel affine map."""
    name = "group_norm"
    check_tensor(x, name, "x", FLOATS)
    if x.dim() < 2:
        raise ShapeError(f"{name}: x must be [N, C, *], got shape {tuple(x.shape)}")
    c = x.shape[1]
    if not isinstance(num_groups, int) or num_groups <= 0 or c % num_groups:
        raise ArgumentError(f"{name}: num_groups={num_groups!r} must be a positive divisor "
                            f"of the {c} channels")
    for arg, v in (("weight", weight), ("bias", bias)):
        if v is not None:
            check_tensor(v, name, arg, FLOATS)
            if tuple(v.shape) != (c,):
                raise ShapeError(f"{name}: {arg} has shape {tuple(v.shape)}; it must be ({c},)")
    _check_eps(eps, name)
    out = torch.empty(x.shape, dtype=x.dtype)
    if x.numel() == 0:
        return out
    rows, cg, hw = x.shape[0] * num_groups, c // num_groups, x.numel() // (x.shape[0] * c)
    xc = x.contiguous()
    wt = weight.contiguous() if weight is not None else xc.view(-1)
    bt = bias.contiguous() if bias is not None else xc.view(-1)
    bn = _width(cg * hw, 1024)
    key = ("group_norm", weight is not None, bias is not None, bn, x.dtype, wt.dtype,
           bt.dtype)
    s = compiled(key, group_norm_kernel, spec(x.dtype, 2), spec(x.dtype, 3),
                 spec(wt.dtype, 1), spec(bt.dtype, 1), spec(x.dtype, 3), num_groups,
                 float(eps), W=weight is not None, B=bias is not None, BN=bn)
    launch(s, (rows, 1, 1), xc.data_ptr(), rows, cg * hw, cg * hw, 1,
           xc.data_ptr(), rows, cg, hw, cg * hw, hw, 1, *_flat(wt), *_flat(bt),
           out.data_ptr(), rows, cg, hw, cg * hw, hw, 1, num_groups, float(eps))
    return out


@op("batch_norm(Tensor x, Tensor running_mean, Tensor running_var, Tensor? weight=None, "
    "Tensor? bias=None, float eps=1e-05) -> Tensor", kind="normalization",
    reference=lambda x, running_mean, running_var, weight=None, bias=None, eps=1e-5:
    torch.nn.functional.batch_norm(x, running_mean, running_var, weight, bias, False, 0.0,
                                   eps),
    epilogues=("activation", "residual"),
    implements=(torch.ops.aten._native_batch_norm_legit_no_training.default,))
def batch_norm(x: torch.Tensor, running_mean: torch.Tensor, running_var: torch.Tensor,
               weight: torch.Tensor | None = None, bias: torch.Tensor | None = None,
               eps: float = 1e-5) -> torch.Tensor:
    """Inference batch norm of x [N, C, *] with running statistics: one per-channel
    multiply-add, x * scale + shift, scale = weight / sqrt(var + eps)."""
    name = "batch_norm"
    check_tensor(x, name, "x", FLOATS)
    if x.dim() < 2 and x.numel():
        raise ShapeError(f"{name}: x must be [N, C, *], got shape {tuple(x.shape)}")
    c = x.shape[1] if x.dim() > 1 else 0
    stats = {"running_mean": running_mean, "running_var": running_var, "weight": weight,
             "bias": bias}
    for arg, v in stats.items():
        if v is not None:
            check_tensor(v, name, arg, FLOATS)
            if tuple(v.shape) != (c,):
                raise ShapeError(f"{name}: {arg} has shape {tuple(v.shape)}; it must be ({c},)")
    _check_eps(eps, name)
    scale = torch.rsqrt(running_var.float() + eps)
    if weight is not None:
        scale = scale * weight.float()
    shift = -running_mean.float() * scale
    if bias is not None:
        shift = shift + bias.float()
    view = [c] + [1] * (x.dim() - 2)
    return run("fma", [x, scale.view(view), shift.view(view)], x.dtype, name=name)
