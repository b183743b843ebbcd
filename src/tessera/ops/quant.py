"""Weight-only quantization as graph ops: `quantize` turns float weights [K, N] or expert
weights [E, K, N] into the GEMM templates' int8/int4 format, as two tensors a torch schema
can carry, and `dequantize` gives back the float matrix they stand for.

The format (`tessera.templates.gemm.quantize`): symmetric, one float32 scale per group of
`group_size` rows of K per column, stored by columns so that decode streams each column
once. `data` is int8 [..., N, Kp] (8 bits) or uint8 [..., N, Kp / 2] (4 bits: 32 rows in
16 bytes, row r of a block in byte r % 16, low nibble for r < 16), `scales` float32
[..., N, Kp / group_size], Kp = K rounded up to the group. The dtype of `data` says the
bit width and the scales' last dim the group size, so only K travels separately.
"""

from __future__ import annotations

import torch

from tessera.errors import ShapeError
from tessera.ops._launch import ArgumentError, check_tensor
from tessera.ops.registry import op
from tessera.templates.gemm import GROUP_SIZES, QuantizedMatrix, gemm
from tessera.templates.gemm import quantize as _template_quantize

__all__ = ["dequantize", "dequantize_reference", "quantize", "quantized_linear",
           "quantized_matrix"]

_BITS = {torch.int8: 8, torch.uint8: 4}
_BLOCK = 32  # int4 rows per 16-byte block


def _padded(k: int, group_size: int) -> int:
    return -(-k // group_size) * group_size


def _check_quantize_args(w: torch.Tensor, bits: int, group_size: int) -> None:
    check_tensor(w, "quantize", "w")
    if bits not in (8, 4):
        raise ArgumentError(f"quantize: bits={bits!r}; it takes 8 or 4")
    if group_size not in GROUP_SIZES:
        raise ArgumentError(f"quantize: group_size={group_size!r}; it takes one of "
                            f"{', '.join(map(str, GROUP_SIZES))}")
    if w.dim() not in (2, 3):
        raise ShapeError(f"quantize: argument 'w' must be [K, N] or [E, K, N], got shape "
                         f"{tuple(w.shape)}", hint="for an nn.Linear weight pass weight.T")


def _quantize_reference(w: torch.Tensor, bits: int = 8, group_size: int = 128
                        ) -> tuple[torch.Tensor, torch.Tensor]:
    k = w.shape[-2]
    cols = torch.nn.functional.pad(w.float().transpose(-1, -2), (0, _padded(k, group_size) - k))
    groups = cols.unflatten(-1, (-1, group_size))
    qmax = 127 if bits == 8 else 7
    scales = groups.abs().amax(-1) / qmax
    safe = torch.where(scales > 0, scales, torch.ones_like(scales))
    q = torch.round(groups / safe[..., None]).clamp(-qmax, qmax).to(torch.int8).flatten(-2)
    if bits == 4:
        nib = (q & 15).to(torch.uint8).unflatten(-1, (-1, 2, _BLOCK // 2))
        q = (nib[..., 0, :] | (nib[..., 1, :] << 4)).flatten(-2)
    return q, scales


def _quantize_meta(w: torch.Tensor, bits: int = 8, group_size: int = 128
                   ) -> tuple[torch.Tensor, torch.Tensor]:
    *lead, k, n = w.shape
    kp = _padded(k, group_size)
    data = w.new_empty((*lead, n, kp if bits == 8 else kp // 2),
                       dtype=torch.int8 if bits == 8 else torch.uint8)
    return data, w.new_empty((*lead, n, kp // group_size), dtype=torch.float32)


@op("quantize(Tensor w, int bits=8, int group_size=128) -> (Tensor data, Tensor scales)",
    kind="quantization", reference=_quantize_reference, meta=_quantize_meta,
    host_reads=True)
def quantize(w: torch.Tensor, bits: int = 8, group_size: int = 128
             ) -> tuple[torch.Tensor, torch.Tensor]:
    """Weight-only symmetric int8/int4 quantization with group scales: (data, scales).

    w [K, N] or [E, K, N] gets one float32 scale per `group_size` rows of K per column
    (scale = max|w| / 127 or / 7, round half to even); data and scales are in the GEMM
    templates' format (see the module docstring)."""
    _check_quantize_args(w, bits, group_size)
    q = _template_quantize(w, bits, group_size)
    return torch.from_numpy(q.data), torch.from_numpy(q.scales)


def quantized_matrix(data: torch.Tensor, scales: torch.Tensor, k: int, op: str, arg: str,
                     scales_arg: str) -> QuantizedMatrix:
    """The template operand behind (data, scales) of a [K, N] or [E, K, N] matrix, checked
    (errors name `op` and the arguments): the GEMM templates take it as b."""
    check_tensor(data, op, arg, tuple(_BITS))
    check_tensor(scales, op, scales_arg, (torch.float32,))
    bits = _BITS[data.dtype]
    kp = data.shape[-1] * (8 // bits) if data.dim() else 0
    groups = scales.shape[-1] if scales.dim() else 0
    if data.dim() not in (2, 3) or scales.shape[:-1] != data.shape[:-1] or \
            (groups == 0) != (kp == 0) or (groups and kp % groups):
        raise ShapeError(f"{op}: quantized {arg!r} {tuple(data.shape)} with {scales_arg!r} "
                         f"{tuple(scales.shape)} are not [E, N, Kp] data with [E, N, groups] "
                         "scales", hint="produce both with tessera.ops.quantize")
    group = kp // groups if groups else GROUP_SIZES[0]  # no rows: any group size
    if group not in GROUP_SIZES or _padded(k, group) != kp:
        raise ShapeError(f"{op}: quantized {arg!r} holds {kp} rows of K in groups of "
                         f"{group}, which does not fit K = {k}",
                         hint="quantize the [K, N] weights these inputs multiply")
    *lead, n, _ = data.shape
    return QuantizedMatrix(bits, group, (*lead, k, n), data.contiguous().numpy(),
                           scales.contiguous().numpy())


def _unpacked(data: torch.Tensor) -> torch.Tensor:
    """The integers of int8 data, or of int4 nibble pairs, as float32 [..., N, Kp]."""
    if data.dtype == torch.int8:
        return data.float()
    signed = data.view(torch.int8)
    lo, hi = (signed << 4) >> 4, signed >> 4
    blocks = torch.stack([lo.unflatten(-1, (-1, _BLOCK // 2)),
                          hi.unflatten(-1, (-1, _BLOCK // 2))], dim=-2)
    return blocks.flatten(-3).float()


def dequantize_reference(data: torch.Tensor, scales: torch.Tensor, k: int) -> torch.Tensor:
    q = _unpacked(data)
    w = q * scales.repeat_interleave(q.shape[-1] // max(scales.shape[-1], 1), dim=-1)
    return w[..., :k].transpose(-1, -2).contiguous()


def _dequantize_meta(data: torch.Tensor, scales: torch.Tensor, k: int) -> torch.Tensor:
    return scales.new_empty((*data.shape[:-2], k, data.shape[-2]))


@op("dequantize(Tensor data, Tensor scales, int k) -> Tensor", kind="quantization",
    reference=dequantize_reference, meta=_dequantize_meta, dtypes=("int8", "uint8"),
    host_reads=True)
def dequantize(data: torch.Tensor, scales: torch.Tensor, k: int) -> torch.Tensor:
    """The float32 [..., K, N] matrix that quantized (data, scales) stand for.

    int8 data is 8 bits, uint8 packed int4; `k` is the K of the weights that were
    quantized."""
    if not isinstance(k, int) or k < 0:
        raise ArgumentError(f"dequantize: k={k!r} must be a non-negative int")
    q = quantized_matrix(data, scales, k, "dequantize", "data", "scales")
    return torch.from_numpy(q.dequantize())



def _quantized_linear_reference(x: torch.Tensor, data: torch.Tensor, scales: torch.Tensor,
                                bias: torch.Tensor | None = None) -> torch.Tensor:
    w = dequantize_reference(data, scales, x.shape[-1])
    out = x.float() @ w + (bias.float() if bias is not None else 0.0)
    return out.to(x.dtype)


@op("quantized_linear(Tensor x, Tensor data, Tensor scales, Tensor? bias=None) -> Tensor",
    kind="contraction", reference=_quantized_linear_reference,
    meta=lambda x, data, scales, bias=None: x.new_empty((*x.shape[:-1], data.shape[-2])))
def quantized_linear(x: torch.Tensor, data: torch.Tensor, scales: torch.Tensor,
                     bias: torch.Tensor | None = None) -> torch.Tensor:
    """x [..., K] @ W + bias with W [K, N] weight-only quantized ((data, scales) from
    `quantize`): the int8/int4 GEMM template, dequantizing in the kernel."""
    check_tensor(x, "quantized_linear", "x")
    if data.dim() != 2:
        raise ShapeError(f"quantized_linear: data must be [N, Kp] (one matrix), got shape "
                         f"{tuple(data.shape)}")
    k = x.shape[-1]
    q = quantized_matrix(data, scales, k, "quantized_linear", "data", "scales")
    n = q.shape[-1]
    if bias is not None:
        check_tensor(bias, "quantized_linear", "bias")
        if tuple(bias.shape) != (n,):
            raise ShapeError(f"quantized_linear: bias has shape {tuple(bias.shape)}; it must "
                             f"be ({n},)")
    rows = x.reshape(-1, k)
    out = gemm(rows, q, bias=bias) if rows.shape[0] else x.new_empty((0, n))
    return out.reshape(*x.shape[:-1], n)
