"""Convolution and pooling: conv2d, max_pool2d, avg_pool2d, adaptive_avg_pool2d (NCHW in
and out, as torch; channels-last inputs give channels-last outputs).

conv2d is an implicit GEMM on the templates: output pixels are the rows of A, (input
channel, kernel tap) pairs its columns, and A is never built: the template reads it in
place through two offset tables (a row's pixel, a column's channel and tap) from the
input (a zero-padded copy if there is padding), so the product is C [pixels, out
channels] = A @ W.T, stored straight into NCHW (C by columns). Groups are a batch of
products. A 1x1 convolution of large NCHW planes is simply W @ x per image (C's rows
are the output planes). Depthwise convolutions (one input channel per group), where a
GEMM would have one column, and the pools run on one windowed kernel in the kernel
language instead. adaptive_avg_pool2d is two small products with averaging matrices.

The GEMM's fused epilogues (bias, activation, residual) serve conv2d too:
`fused_conv2d` is how the graph compiler asks for them.
"""

from __future__ import annotations

import functools
import math
from typing import Any

import numpy as np
import torch

import tessera.lang as tl
from tessera.errors import ShapeError
from tessera.ops._launch import ArgumentError, check_tensor, compiled, launch, spec
from tessera.ops.matmul import EPILOGUES, _floats, _same, broadcasts, gemm_entry, product
from tessera.ops.pointwise import UNARY, _aten
from tessera.ops.registry import op
from tessera.ops.shape import empty
from tessera.runtime.cpu import launch as cpu_launch
from tessera.templates.gemm import ACTIVATIONS, pack
from tessera.templates.gemm.sgemm import launch as launch_gemm

__all__ = ["fused_conv2d"]


def _pair(v: Any, name: str, arg: str, low: int) -> tuple[int, int]:
    """An int or a list of one or two ints, each at least `low`, as a pair."""
    if type(v) is int and v >= low:  # the common cases, quickly
        return v, v
    if type(v) in (list, tuple) and len(v) == 2 and type(v[0]) is type(v[1]) is int \
            and min(v) >= low:
        return v[0], v[1]
    vals = [v] if isinstance(v, int) else list(v) if isinstance(v, (list, tuple)) else None
    if vals is not None and len(vals) == 1:
        vals = vals * 2
    if vals is None or len(vals) != 2 or not all(
            isinstance(i, int) and not isinstance(i, bool) for i in vals):
        raise ArgumentError(f"{name}: {arg} must be an int or a pair of ints, got {v!r}")
    if min(vals) < low:
        raise ArgumentError(f"{name}: {arg}={v!r}; it must be at least {low}")
    return vals[0], vals[1]


def _image(x: Any, name: str) -> tuple[torch.Tensor, bool]:
    """x as a 4-D float tensor, and whether it was an unbatched 3-D one."""
    check_tensor(x, name, "x")
    if x.dim() not in (3, 4):
        raise ShapeError(f"{name}: x must be [N, C, H, W] or [C, H, W], got shape "
                         f"{tuple(x.shape)}")
    return (x[None], True) if x.dim() == 3 else (x, False)


def _channels_last(x: torch.Tensor) -> bool:
    return not x.is_contiguous() and x.is_contiguous(memory_format=torch.channels_last)


def _out_size(name: str, size: int, k: int, s: int, p: int, d: int, ceil: bool = False,
              after: int | None = None) -> int:
    """Output length along one dim, as torch computes it, for padding p before the input
    and `after` (default p) after it (ceil_mode: a last window may start in the right
    padding only if it starts inside the input or left padding)."""
    span = size + p + (p if after is None else after) - d * (k - 1) - 1
    n = (span + (s - 1 if ceil else 0)) // s + 1
    if ceil and (n - 1) * s >= size + p:
        n -= 1
    if span < 0 or n < 1:
        raise ShapeError(f"{name}: a window of {k} (dilation {d}) does not fit an input of "
                         f"{size} with padding {p}: the output would be empty",
                         hint="use a smaller kernel, more padding or a larger input")
    return n


def _conv_padding(name: str, padding: Any, s: tuple[int, int], d: tuple[int, int],
                  k: tuple[int, int]) -> tuple[tuple[int, int], tuple[int, int]]:
    """(before, after) padding per spatial dim: numbers, or torch's 'valid' (none) and
    'same' (stride 1; an odd total puts the extra row and column after)."""
    if padding == "valid":
        return (0, 0), (0, 0)
    if padding == "same":
        if s != (1, 1):
            raise ArgumentError(f"{name}: padding='same' needs stride 1, got {list(s)}")
        return tuple((d[i] * (k[i] - 1) // 2, d[i] * (k[i] - 1) - d[i] * (k[i] - 1) // 2)
                     for i in range(2))  # type: ignore[return-value]
    if isinstance(padding, str):
        raise ArgumentError(f"{name}: padding={padding!r}; it takes numbers, 'valid' or "
                            "'same'")
    p = _pair(padding, name, "padding", 0)
    return (p[0], p[0]), (p[1], p[1])


# -- windowed kernel: depthwise conv2d, max and average pooling ------------------------------
@tl.kernel
def window_kernel(x, w, b, res, dh, dw, out, C, COUT, MULT, MODE: tl.constexpr,
                  KH: tl.constexpr, KW: tl.constexpr, SH: tl.constexpr, SW: tl.constexpr,
                  DH: tl.constexpr, DW: tl.constexpr, BIAS: tl.constexpr,
                  ACT: tl.constexpr, RES: tl.constexpr, BH: tl.constexpr, BW: tl.constexpr):
    """A [BH, BW] tile of output plane q of a window op over x, the padded input viewed as
    [planes, H / SH, SH, W / SW, SW] so that window taps are unit-stride slices. MODE
    "conv": depthwise, weights w [COUT, KH, KW], output channel c reads input channel
    c // MULT, then bias, activation, residual; "max"; "avg": sum / (dh[oh] * dw[ow])."""
    q = tl.program_id(2)
    oh = tl.program_id(1) * BH
    ow = tl.program_id(0) * BW
    plane = (q // COUT) * C + (q % COUT) // MULT if MODE == "conv" else q
    acc = tl.full((BH, BW), -float("inf")) if MODE == "max" else tl.zeros((BH, BW))
    for ky in tl.static_range(KH):
        for kx in tl.static_range(KW):
            i, ri = oh + ky * DH // SH, ky * DH % SH
            j, rj = ow + kx * DW // SW, kx * DW % SW
            t = x[plane, i:i + BH, ri, j:j + BW, rj].to(tl.float32)
            if MODE == "conv":
                acc = acc + t * w[q % COUT, ky, kx]
            elif MODE == "max":
                acc = tl.maximum(acc, t)
            else:
                acc = acc + t
    if MODE == "avg":
        acc = acc / (dh[oh:oh + BH][:, None] * dw[ow:ow + BW][None, :])
    if BIAS:
        acc = acc + b[q % COUT]
    if ACT is not None:
        acc = UNARY[ACT](acc, 0.0, 0.0)
    if RES:
        acc = acc + res[q, oh:oh + BH, ow:ow + BW]
    out[q, oh:oh + BH, ow:ow + BW] = acc


@tl.kernel
def place_kernel(x, out, top, left, BH: tl.constexpr, BW: tl.constexpr):
    """out[q, top + i, left + j] = x[q, i, j] for BH rows of plane q, in [BH, BW] pieces;
    the last piece of a row (and the last block of rows) ends at x's edge, overlapping the
    one before, so every piece is whole and copied without masks (needs H >= BH,
    W >= BW)."""
    q = tl.program_id(1)
    h = x.shape[1]
    w = x.shape[2]
    i = tl.minimum(tl.program_id(0) * BH, h - BH)
    for j in range(0, w - BW, BW):
        out[q, top + i:top + i + BH, left + j:left + j + BW] = x[q, i:i + BH, j:j + BW]
    out[q, top + i:top + i + BH, left + w - BW:left + w] = x[q, i:i + BH, w - BW:w]


def _padded(x: torch.Tensor, rows: int, cols: int, ph: int, pw: int, fill: float
            ) -> torch.Tensor:
    """x [N, C, H, W] placed at (ph, pw) in a [N, C, rows, cols] tensor of `fill` (in x's
    layout, NCHW or channels-last), cropped to it; x itself (a view) when that changes
    nothing."""
    n, c, h, w = x.shape
    if (ph, pw) == (0, 0) and rows <= h and cols <= w:
        return x[:, :, :rows, :cols]
    last = _channels_last(x)
    buf = torch.empty((n, c, rows, cols), dtype=x.dtype, memory_format=torch.channels_last
                      if last else torch.contiguous_format)
    # zero_ of a dense buffer is what a recorded plan can replay (a memset); fill_ is not
    buf = buf.zero_() if fill == 0.0 else buf.fill_(fill)
    hh, ww = min(h, rows - ph), min(w, cols - pw)  # what of x fits (cropped)
    if x.numel() == 0:
        return buf
    if last:  # planes are images, rows hold (column, channel) pairs
        src, dst = x.permute(0, 2, 3, 1).reshape(n, h, w * c), \
            buf.permute(0, 2, 3, 1).view(n, rows, cols * c)
        left = pw * c
    else:
        src, dst, left = x.reshape(n * c, h, w), buf.view(n * c, rows, cols), pw
    ww *= c if last else 1
    bw = next(b for b in (64, 16, 4, 1) if b <= ww)
    bh = next(b for b in (8, 1) if b <= hh)
    unit = src.stride(2) == 1
    sp = compiled(("place", bh, bw, x.dtype, unit), place_kernel,
                  lambda: spec(x.dtype, 3, unit), lambda: spec(x.dtype, 3), 0, 0, BH=bh, BW=bw)
    launch(sp, (-(-hh // bh), src.shape[0], 1), src.data_ptr(), src.shape[0], hh, ww,
           *src.stride(), dst.data_ptr(), *dst.shape, *dst.stride(), ph, left)
    return buf


def _window(mode: str, name: str, x: torch.Tensor, k: tuple[int, int], s: tuple[int, int],
            p: tuple[int, int], d: tuple[int, int], out_hw: tuple[int, int], *,
            w: torch.Tensor | None = None, bias: torch.Tensor | None = None,
            activation: str | None = None, residual: torch.Tensor | None = None,
            divisors: tuple[torch.Tensor, torch.Tensor] | None = None, cout: int = 0
            ) -> torch.Tensor:
    """Run window_kernel over x [N, C, H, W]; out [N, cout or C, Ho, Wo]."""
    n, c, _, _ = x.shape
    cout = cout or c
    ho, wo = out_hw
    out = empty((n, cout, ho, wo), x.dtype)
    if out.numel() == 0:
        return out
    qh, qw = ho + (k[0] - 1) * d[0] // s[0], wo + (k[1] - 1) * d[1] // s[1]
    xp = _padded(x, qh * s[0], qw * s[1], p[0], p[1], -math.inf if mode == "max" else 0.0)
    if not xp.is_contiguous():
        xp = xp.contiguous()
    xv = xp.view(n * c, qh, s[0], qw, s[1])
    bh, bw = _tile(ho, wo)
    wt = w.reshape(cout, k[0], k[1]) if w is not None else xv
    dh, dw = divisors if divisors is not None else (xv, xv)
    b = bias if bias is not None else xv
    res = residual.reshape(n * cout, ho, wo) if residual is not None else xv
    o = out.view(n * cout, ho, wo)
    key = ("window", mode, k, s, d, bias is not None, activation, residual is not None,
           bh, bw, x.dtype, wt.dtype)
    tensors = (xv, wt, b, res, dh, dw, o)
    sp = compiled(key, window_kernel, *(lambda t=t: spec(t.dtype, t.dim()) for t in tensors),
                  0, 0, 0, MODE=mode, KH=k[0], KW=k[1], SH=s[0], SW=s[1], DH=d[0], DW=d[1],
                  BIAS=bias is not None, ACT=activation, RES=residual is not None,
                  BH=bh, BW=bw)
    args: list[Any] = []
    for t in tensors:
        args += (t.data_ptr(), *t.shape, *t.stride())
    launch(sp, (-(-wo // bw), -(-ho // bh), n * cout), *args, c, cout, cout // c or 1)
    return out


def _tile(ho: int, wo: int) -> tuple[int, int]:
    """(BH, BW) for an Ho x Wo output plane: 8 or 16 wide, about 128 elements."""
    bw = 8 if wo <= 8 else 16
    return min(128 // bw, 1 << max(ho - 1, 0).bit_length()), bw


# -- conv2d ------------------------------------------------------------------------------------
_TABLES: dict[tuple, tuple[torch.Tensor, torch.Tensor]] = {}


def _tables(key: tuple) -> tuple[torch.Tensor, torch.Tensor]:
    """The gathered A's offset tables for a convolution geometry `key`: row i (output pixel
    n, oh, ow of `images` images) starts at n * sn + oh * SH * sh + ow * SW * sw, column
    (c, ky, kx) is c * sc + ky * DH * sh + kx * DW * sw further."""
    t = _TABLES.get(key)
    if t is None:
        images, ho, wo, cg, (kh, kw), (sh_, sw_), (dh, dw), (sn, sc, sh, sw) = key
        n, oh, ow = np.meshgrid(np.arange(images), np.arange(ho), np.arange(wo),
                                indexing="ij")
        rows = n * sn + oh * sh_ * sh + ow * sw_ * sw
        c, ky, kx = np.meshgrid(np.arange(cg), np.arange(kh), np.arange(kw), indexing="ij")
        cols = c * sc + ky * dh * sh + kx * dw * sw
        t = _TABLES[key] = (torch.from_numpy(rows.reshape(-1).astype(np.int64)),
                            torch.from_numpy(cols.reshape(-1).astype(np.int64)))
        for table in t:  # kept for the process: a recorded launch may point into them
            cpu_launch.lasting(table.data_ptr(), table.numel() * 8)
    return t


def _conv_gemm(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
               s: tuple[int, int], p: tuple[tuple[int, int], tuple[int, int]],
               d: tuple[int, int], groups: int,
               out_hw: tuple[int, int], activation: str | None,
               residual: torch.Tensor | None) -> torch.Tensor:
    """conv2d as an implicit GEMM per image and group (see the module's docstring)."""
    n, _, h, w = x.shape
    cout, cg, kh, kw = weight.shape
    og, ho, wo = cout // groups, *out_hw
    pixels, k = ho * wo, cg * kh * kw
    last = _channels_last(x)
    out = torch.empty((n, cout, ho, wo), dtype=x.dtype,
                      memory_format=torch.channels_last if last else torch.contiguous_format)
    if out.numel() == 0:
        return out
    xp = _padded(x, h + sum(p[0]), w + sum(p[1]), p[0][0], p[1][0], 0.0)
    # channels-last: one product over the pixels of all images (rows of C contiguous);
    # else one per image, C [pixels, channels] stored by columns into the NCHW planes
    images = n if last else 1
    ro, co = _tables((images, ho, wo, cg, (kh, kw), s, d, xp.stride()))
    wt = weight.contiguous()
    # the weights are packed once per call when several products share them; not while
    # the graph compiler records launches: packing is host work a replay would not redo
    packed = _pack(wt, groups, og, k) if not last and n > 1 and \
        cpu_launch._recorder is None else None
    entry = gemm_entry(x.dtype, torch.float32 if packed is not None else x.dtype, x.dtype,
                       packed=packed is not None, bias=bias is not None,
                       activation=activation, residual=residual is not None)
    if packed is not None:
        b = (packed.ctypes.data, 0, 0, 0, 0, packed.shape[1], 0)
    else:
        b = (wt.data_ptr(), 0, 1, k, 0, og * k, 0)
    c_strides = (og, cout, 1) if last else (og * pixels, 1, pixels)
    if residual is not None:
        residual = _flat_pixels(residual, out, last)
        rs = residual.stride()
    size = x.element_size()
    for i in range(n // images):
        res = (residual.data_ptr() + i * rs[0] * 4, og * rs[1], rs[3], rs[1]) \
            if residual is not None else (0, 0, 0, 0)
        launch_gemm(entry, groups, pixels * images, og, k, 1.0, 0.0,
                    xp.data_ptr() + i * xp.stride(0) * size, cg * xp.stride(1), 0, 0,
                    ro.data_ptr(), co.data_ptr(), *b,
                    out.data_ptr() + i * out.stride(0) * size, *c_strides,
                    0 if bias is None else bias.data_ptr(), og, *res)
    return out


def _pack(wt: torch.Tensor, groups: int, og: int, k: int) -> np.ndarray:
    """Each group's weights [og, k] packed as the template's B = W.T, one row per group."""
    return np.stack([pack(wt[g * og:(g + 1) * og].reshape(og, k).t()).data
                     for g in range(groups)])


def _flat_pixels(residual: torch.Tensor, out: torch.Tensor, last: bool) -> torch.Tensor:
    """The residual as float32 in which the pixels (and, channels-last, the images) of
    each channel are one stride apart, as the GEMM's rows are: a copy in out's layout if
    its own does not allow it."""
    r = residual.to(torch.float32).expand(out.shape)
    n, _, ho, wo = out.shape
    sn, _, sh, sw = r.stride()
    if (ho == 1 or sh == wo * sw) and (not last or n == 1 or sn == ho * sh):
        return r
    return r.contiguous(memory_format=torch.channels_last if last else torch.contiguous_format)


def fused_conv2d(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None,
                 stride: Any = 1, padding: Any = 0, dilation: Any = 1, groups: int = 1, *,
                 activation: str | None = None, residual: torch.Tensor | None = None
                 ) -> torch.Tensor:
    """activation(conv2d(x, weight, bias, ...)) + residual, fused into the convolution's
    store (what the graph compiler fuses into conv2d)."""
    name = "conv2d"
    x4, unbatched = _image(x, name)
    dtype = _floats(name, x=x4, weight=weight)
    if weight.dim() != 4:
        raise ShapeError(f"{name}: weight must be [out_channels, in_channels / groups, kH, "
                         f"kW], got shape {tuple(weight.shape)}")
    s = _pair(stride, name, "stride", 1)
    d = _pair(dilation, name, "dilation", 1)
    if isinstance(groups, bool) or not isinstance(groups, int) or groups < 1:
        raise ArgumentError(f"{name}: groups={groups!r} must be a positive int")
    n, c, h, w = x4.shape
    cout, cg, kh, kw = weight.shape
    if c == 0 or c % groups:
        raise ShapeError(f"{name}: x has {c} channels, which {groups} groups do not divide"
                         if c else f"{name}: x has no channels")
    if cout == 0 or cout % groups or cg != c // groups or not kh or not kw:
        raise ShapeError(f"{name}: weight of shape {tuple(weight.shape)} does not fit x with "
                         f"{c} channels in {groups} groups",
                         hint=f"expected [k * {groups}, {c // groups}, kH, kW], k >= 1")
    ph, pw = _conv_padding(name, padding, s, d, (kh, kw))
    ho = _out_size(name, h, kh, s[0], ph[0], d[0], after=ph[1])
    wo = _out_size(name, w, kw, s[1], pw[0], d[1], after=pw[1])
    if activation is not None and activation not in ACTIVATIONS:
        raise ArgumentError(f"{name}: unknown activation {activation!r}",
                            hint=f"one of {', '.join(ACTIVATIONS)}")
    if bias is not None:
        _same(name, "bias", bias, dtype)
        if bias.shape != (cout,):
            raise ShapeError(f"{name}: bias must be [{cout}], got shape {tuple(bias.shape)}")
        bias = bias.to(torch.float32).contiguous()
    shape = (n, cout, ho, wo)
    if residual is not None:
        _same(name, "residual", residual, dtype)
        broadcasts(name, "residual", residual, shape[1:] if unbatched else shape,
                   "the result's")
    if cg == 1 and groups > 1:  # depthwise: a windowed kernel, not a one-column GEMM
        res = None if residual is None else \
            residual.to(torch.float32).expand(shape).contiguous()
        out = _window("conv", name, x4, (kh, kw), s, (ph[0], pw[0]), d, (ho, wo),
                      w=weight.contiguous(),
                      bias=bias, activation=activation, residual=res, cout=cout)
    elif (kh, kw, s, ph, pw, groups) == (1, 1, (1, 1), (0, 0), (0, 0), 1) and \
            ho * wo >= _PLANE_ROWS and not _channels_last(x4) and \
            (ho == 1 or x4.stride(2) == wo * x4.stride(3)):
        out = _pointwise_conv(x4, weight, bias, activation, residual)
    else:
        out = _conv_gemm(x4, weight, bias, s, (ph, pw), d, groups, (ho, wo), activation,
                         residual)
    return out[0] if unbatched else out


# A 1x1 convolution of NCHW planes of at least this many pixels is W [out, in] @ x [in,
# pixels] per image: C's rows are the output planes (no stores by columns, no gathering);
# smaller planes would leave the micro-tile's columns idle.
_PLANE_ROWS = 128


def _pointwise_conv(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                    activation: str | None, residual: torch.Tensor | None) -> torch.Tensor:
    """A 1x1, stride-1, unpadded, ungrouped conv2d of NCHW x as per-image products."""
    n, c, h, w = x.shape
    cout = weight.shape[0]
    out = torch.empty((n, cout, h, w), dtype=x.dtype)
    res = None
    if residual is not None:
        r = _flat_pixels(residual, out, False)
        res = r.as_strided((n, cout, h * w), (r.stride(0), r.stride(1), r.stride(3)))
    planes = x.as_strided((n, c, h * w), (x.stride(0), x.stride(1), x.stride(3)))
    product(weight.reshape(cout, c), planes, out.view(n, cout, h * w), bias=bias,
            activation=activation, residual=res, bias_rows=True)
    return out


@op("conv2d(Tensor x, Tensor weight, Tensor? bias=None, int[2] stride=1, int[2] padding=0, "
    "int[2] dilation=1, int groups=1) -> Tensor", kind="convolution",
    reference=torch.nn.functional.conv2d, epilogues=EPILOGUES,
    implements=_aten("conv2d", "default"))
def conv2d(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None,
           stride: Any = 1, padding: Any = 0, dilation: Any = 1, groups: int = 1
           ) -> torch.Tensor:
    """2-D convolution (cross-correlation) as torch's, with stride, padding (also 'valid'
    and 'same' eagerly), dilation and groups (depthwise included)."""
    return fused_conv2d(x, weight, bias, stride, padding, dilation, groups)


# -- pooling -----------------------------------------------------------------------------------
def _pool_args(name: str, x: Any, kernel_size: Any, stride: Any, padding: Any,
               dilation: Any) -> tuple[Any, ...]:
    """x as 4-D (and whether it was 3-D), kernel, stride (default: the kernel), padding,
    dilation, checked as torch checks them (padding at most half the window)."""
    x4, unbatched = _image(x, name)
    if 0 in x4.shape[1:]:
        raise ShapeError(f"{name}: x of shape {tuple(x.shape)} has an empty channel or "
                         "spatial dim")
    k = _pair(kernel_size, name, "kernel_size", 1)
    s = _pair(stride, name, "stride", 1) if stride not in (None, [], ()) else k
    p = _pair(padding, name, "padding", 0)
    d = _pair(dilation, name, "dilation", 1)
    for i in range(2):
        if 2 * p[i] > (k[i] - 1) * d[i] + 1:
            raise ArgumentError(f"{name}: padding={list(p)} is more than half the window "
                                f"{list(k)} (dilation {list(d)})",
                                hint="padding may be at most half the window size")
    return x4, unbatched, k, s, p, d


@op("max_pool2d(Tensor x, int[2] kernel_size, int[2] stride=[], int[2] padding=0, "
    "int[2] dilation=1, bool ceil_mode=False) -> Tensor", kind="pooling",
    reference=lambda x, kernel_size, stride=(), padding=0, dilation=1, ceil_mode=False:
        torch.nn.functional.max_pool2d(x, kernel_size, stride or None, padding, dilation,
                                       ceil_mode),
    implements=_aten("max_pool2d", "default"))
def max_pool2d(x: torch.Tensor, kernel_size: Any, stride: Any = (), padding: Any = 0,
               dilation: Any = 1, ceil_mode: bool = False) -> torch.Tensor:
    """Max over windows (NaN if the window holds one), as torch.nn.functional.max_pool2d."""
    x4, unbatched, k, s, p, d = _pool_args("max_pool2d", x, kernel_size, stride, padding,
                                           dilation)
    hw = [_out_size("max_pool2d", x4.shape[2 + i], k[i], s[i], p[i], d[i], ceil_mode)
          for i in range(2)]
    out = _window("max", "max_pool2d", x4, k, s, p, d, (hw[0], hw[1]))
    return out[0] if unbatched else out


@functools.lru_cache(maxsize=256)
def _divisors(size: int, out: int, k: int, s: int, p: int, include_pad: bool
              ) -> torch.Tensor:
    """Window lengths along one dim of an average pool, as torch divides by them: clipped
    to the padded input (include_pad), or to the input (cached: never written)."""
    start = np.arange(out) * s - p
    end = np.minimum(start + k, size + p)
    if not include_pad:
        start, end = np.maximum(start, 0), np.minimum(end, size)
    return torch.from_numpy((end - start).astype(np.float32))


@op("avg_pool2d(Tensor x, int[2] kernel_size, int[2] stride=[], int[2] padding=0, "
    "bool ceil_mode=False, bool count_include_pad=True, int? divisor_override=None) -> Tensor",
    kind="pooling",
    reference=lambda x, kernel_size, stride=(), padding=0, ceil_mode=False,
    count_include_pad=True, divisor_override=None: torch.nn.functional.avg_pool2d(
        x, kernel_size, stride or None, padding, ceil_mode, count_include_pad,
        divisor_override),
    implements=_aten("avg_pool2d", "default"))
def avg_pool2d(x: torch.Tensor, kernel_size: Any, stride: Any = (), padding: Any = 0,
               ceil_mode: bool = False, count_include_pad: bool = True,
               divisor_override: int | None = None) -> torch.Tensor:
    """Mean over windows, as torch.nn.functional.avg_pool2d (count_include_pad: padding
    counts in the divisor; divisor_override replaces it)."""
    name = "avg_pool2d"
    x4, unbatched, k, s, p, d = _pool_args(name, x, kernel_size, stride, padding, 1)
    if divisor_override is not None and (isinstance(divisor_override, bool) or not isinstance(
            divisor_override, int) or divisor_override == 0):
        raise ArgumentError(f"{name}: divisor_override={divisor_override!r} must be a "
                            "non-zero int")
    hw = [_out_size(name, x4.shape[2 + i], k[i], s[i], p[i], 1, ceil_mode) for i in range(2)]
    if divisor_override is not None:
        dh, dw = torch.full((hw[0],), float(divisor_override)), torch.ones(hw[1])
    else:
        dh, dw = (_divisors(x4.shape[2 + i], hw[i], k[i], s[i], p[i], count_include_pad)
                  for i in range(2))
    out = _window("avg", name, x4, k, s, p, d, (hw[0], hw[1]), divisors=(dh, dw))
    return out[0] if unbatched else out


def _averaging(size: int, out: int) -> torch.Tensor:
    """[out, size]: row i averages torch's adaptive window floor(i * size / out) ..
    ceil((i + 1) * size / out)."""
    i = np.arange(out)
    start, end = i * size // out, -(-(i + 1) * size // out)
    cols = np.arange(size)
    inside = (cols >= start[:, None]) & (cols < end[:, None])
    return torch.from_numpy(inside / (end - start)[:, None]).to(torch.float32)


@op("adaptive_avg_pool2d(Tensor x, int[2] output_size) -> Tensor", kind="pooling",
    reference=torch.nn.functional.adaptive_avg_pool2d,
    implements=(*_aten("adaptive_avg_pool2d", "default"),
                *_aten("_adaptive_avg_pool2d", "default")))
def adaptive_avg_pool2d(x: torch.Tensor, output_size: Any) -> torch.Tensor:
    """Mean over the adaptive windows of torch.nn.functional.adaptive_avg_pool2d, as two
    products with averaging matrices (one dot product per plane for a global pool)."""
    name = "adaptive_avg_pool2d"
    x4, unbatched = _image(x, name)
    if 0 in x4.shape[1:]:
        raise ShapeError(f"{name}: x of shape {tuple(x.shape)} has an empty channel or "
                         "spatial dim")
    n, c, h, w = x4.shape
    if isinstance(output_size, (list, tuple)) and None in output_size:  # None: keep that dim
        output_size = [v if v is not None else x4.shape[2 + i]
                       for i, v in enumerate(output_size)]
    ho, wo = _pair(output_size, name, "output_size", 0)
    out = empty((n, c, ho, wo), x4.dtype)
    if out.numel() == 0:
        return out[0] if unbatched else out
    planes = x4.reshape(n * c, h, w)
    if (ho, wo) == (1, 1):  # global: [1, H * W] averaging row @ the planes as columns
        mean = torch.full((1, h * w), 1.0 / (h * w))
        product(mean, planes.reshape(n * c, h * w).t(), out.view(1, n * c))
    else:  # rows then columns: (A_h @ (planes @ A_w.T))
        across = torch.empty((n * c, h, wo))
        product(planes.reshape(n * c * h, w), _averaging(w, wo).t(),
                across.view(n * c * h, wo))
        product(_averaging(h, ho), across, out.view(n * c, ho, wo))
    return out[0] if unbatched else out
