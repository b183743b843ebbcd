"""Weight-only quantization for the GEMM template: int8 or int4 weights with one float32
scale per group of 32/64/128 consecutive rows of K (symmetric, round half to even),
stored by columns so that decode streams each column's bytes once."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from tessera.errors import ShapeError, TesseraError

__all__ = ["GROUP_SIZES", "QuantizedMatrix", "quantize"]

GROUP_SIZES = (32, 64, 128)
# int4: rows per block of 16 bytes (row r in byte r % 16, high nibble for r >= 16; two's
# complement nibbles)
_BLOCK = 32


@dataclass(frozen=True)
class QuantizedMatrix:
    """A [K, N] (or [E, K, N]) matrix as `bits`-bit integers and group scales: column j's
    rows (zero-padded to a multiple of group_size) in `data[..., j, :]`, scale of rows
    g * group_size .. in `scales[..., j, g]`. Element (p, j) = q * scale."""

    bits: int
    group_size: int
    shape: tuple[int, ...]
    data: np.ndarray  # int8 [..., N, Kp], or uint8 [..., N, Kp / 2] of nibble pairs
    scales: np.ndarray  # float32 [..., N, Kp / group_size]

    @property
    def nbytes(self) -> int:
        """Bytes a product streams: the integers and their scales."""
        return self.data.nbytes + self.scales.nbytes

    def dequantize(self) -> np.ndarray:
        """The float32 [..., K, N] matrix these integers and scales stand for."""
        if self.bits == 8:
            q = self.data.astype(np.float32)
        else:
            lo, hi = (self.data << 4).view(np.int8) >> 4, self.data.view(np.int8) >> 4
            blocks = (*self.data.shape[:-1], -1, _BLOCK // 2)
            q = np.concatenate([lo.reshape(blocks), hi.reshape(blocks)], axis=-1)
            q = q.reshape((*self.data.shape[:-1], -1)).astype(np.float32)
        w = q * np.repeat(self.scales, self.group_size, axis=-1)
        return np.ascontiguousarray(np.swapaxes(w[..., :self.shape[-2]], -1, -2))


def quantize(b: Any, bits: int = 8, group_size: int = 128) -> QuantizedMatrix:
    """Quantize float weights b [K, N] or [E, K, N] (numpy or torch; for an nn.Linear,
    pass `weight.T`) to `bits` = 8 or 4 with one scale per `group_size` rows of K per
    column: scale = max|w| / 127 (int8) or / 7 (int4), q = round(w / scale)."""
    if bits not in (8, 4):
        raise TesseraError(f"quantize: bits must be 8 or 4, got {bits!r}")
    if group_size not in GROUP_SIZES:
        raise TesseraError(f"quantize: group_size must be one of {GROUP_SIZES}, got "
                           f"{group_size!r}")
    w = _as_float32(b)
    if w.ndim not in (2, 3):
        raise ShapeError(f"quantize: weights must be [K, N] or [E, K, N], got shape {w.shape}")
    if not np.isfinite(w).all():
        raise TesseraError("quantize: the weights contain NaN or infinity",
                           hint="a scale cannot represent them; check the weights")
    k = w.shape[-2]
    kp = -(-k // group_size) * group_size
    cols = np.zeros((*w.shape[:-2], w.shape[-1], kp), np.float32)
    cols[..., :k] = np.swapaxes(w, -1, -2)
    groups = cols.reshape((*cols.shape[:-1], kp // group_size, group_size))
    qmax = 127 if bits == 8 else 7
    scales = np.abs(groups).max(axis=-1) / np.float32(qmax)
    safe = np.where(scales > 0, scales, np.float32(1))[..., None]
    q = np.clip(np.rint(groups / safe), -qmax, qmax).astype(np.int8).reshape(cols.shape)
    if bits == 4:
        nib = (q.view(np.uint8) & 15).reshape((*q.shape[:-1], -1, 2, _BLOCK // 2))
        q = (nib[..., 0, :] | (nib[..., 1, :] << 4)).reshape((*q.shape[:-1], -1))
    return QuantizedMatrix(bits, group_size, tuple(w.shape), np.ascontiguousarray(q),
                           np.ascontiguousarray(scales, dtype=np.float32))


def _as_float32(b: Any) -> np.ndarray:
    if type(b).__module__.startswith("torch"):
        return b.detach().to("cpu").float().numpy()
    try:
        return np.asarray(b, dtype=np.float32)
    except (TypeError, ValueError) as e:
        raise TesseraError(f"quantize: cannot read {type(b).__name__} as float weights: {e}"
                           ) from e
