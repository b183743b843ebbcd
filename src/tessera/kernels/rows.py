"""Row kernels: softmax, LayerNorm and RMSNorm over the last dimension. One program per
row holds the whole row in one tile; statistics are float32, results are written in the
input's dtype."""

from __future__ import annotations

from typing import Any

import tessera.lang as tl
from tessera.errors import ShapeError
from tessera.kernels._util import check_vector, empty, like, rows, zeros


@tl.kernel
def softmax_kernel(x, out, N: tl.constexpr):
    r = tl.program_id(0)
    row = tl.load(x[r, 0:N], other=-float("inf"))
    e = tl.exp(row - tl.max(row))
    out[r, 0:N] = e / tl.sum(e)


def softmax(x: Any, dim: int = -1) -> Any:
    """torch.softmax(x, dim) (computed in float32, stored in x's dtype)."""
    last = dim in (-1, x.ndim - 1)
    if not last and not hasattr(x, "movedim"):
        raise ShapeError(f"softmax over dim {dim} of a {x.device.name} tensor: only the last "
                         "dimension is supported there", hint="pass dim=-1")
    xt = x if last else x.movedim(dim, -1)
    x2, m, n = rows(xt, "softmax")
    out = empty((m, n), x)
    softmax_kernel[(m,)](x2, out, N=n)
    return like(out, xt) if last else out.view(xt.shape).movedim(-1, dim)


@tl.kernel
def layer_norm_kernel(x, weight, bias, out, eps, N: tl.constexpr, AFFINE: tl.constexpr):
    r = tl.program_id(0)
    row = x[r, 0:N].to(tl.float32)
    centered = row - tl.sum(row) / N
    y = centered * tl.rsqrt(tl.sum(centered * centered) / N + eps)
    if AFFINE:
        y = y * weight[0:N] + bias[0:N]
    out[r, 0:N] = y


@tl.kernel
def rms_norm_kernel(x, weight, out, eps, N: tl.constexpr):
    r = tl.program_id(0)
    row = x[r, 0:N].to(tl.float32)
    out[r, 0:N] = row * tl.rsqrt(tl.sum(row * row) / N + eps) * weight[0:N]


def layer_norm(x: Any, weight: Any = None, bias: Any = None, eps: float = 1e-5) -> Any:
    """torch.nn.functional.layer_norm(x, x.shape[-1:], weight, bias, eps)."""
    x2, m, n = rows(x, "layer_norm")
    check_vector(weight, n, "layer_norm", "weight")
    check_vector(bias, n, "layer_norm", "bias")
    affine = weight is not None
    if affine and bias is None:
        bias = zeros((n,), weight)
    out = empty((m, n), x)
    w = weight if affine else x2
    layer_norm_kernel[(m,)](x2, w, bias if affine else x2, out, float(eps), N=n,
                            AFFINE=affine)
    return like(out, x)


def rms_norm(x: Any, weight: Any, eps: float = 1e-6) -> Any:
    """x / sqrt(mean(x**2) + eps) * weight over the last dimension (Llama's RMSNorm)."""
    x2, m, n = rows(x, "rms_norm")
    check_vector(weight, n, "rms_norm", "weight")
    out = empty((m, n), x)
    rms_norm_kernel[(m,)](x2, weight, out, float(eps), N=n)
    return like(out, x)
