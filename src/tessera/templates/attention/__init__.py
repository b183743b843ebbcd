"""Attention template: FlashAttention forward and split-KV decoding in C (attention.c) on the
GEMM template's micro-kernel step. One build per blocking serves every dtype and mask kind
(run-time arguments); it is compiled once per machine through the compile cache and
launched on CPU torch tensors through the kernel launcher (no ctypes marshalling).

Callers check shapes and dtypes (tessera.ops.attention does); these functions only map
tensors to the template's arguments.
"""

from __future__ import annotations

import ctypes
from dataclasses import dataclass
from functools import cache
from pathlib import Path

import torch

from tessera.errors import OutOfMemoryError
from tessera.lang.codegen import MATH_HEADER, TILE_HEADER
from tessera.runtime.cpu.launch import check, launcher
from tessera.runtime.toolchain import compile_c
from tessera.templates.gemm.tuning import vector_lanes

__all__ = ["Blocking", "attention", "blocking", "decode"]

_SOURCE = Path(__file__).with_name("attention.c")
_FORMATS = {torch.float32: 0, torch.bfloat16: 1, torch.float16: 2, torch.bool: 3}
_NONE = 4


@dataclass(frozen=True)
class Blocking:
    """Rows in RV vectors of VL lanes per group, MR keys (or output features) per
    micro-tile, BN keys per softmax block, NG groups sharing each block of keys."""

    vl: int
    rv: int
    mr: int
    bn: int
    ng: int


@cache
def blocking() -> Blocking:
    """This CPU's blocking: groups of 2 x 8 rows by 6 keys or features (12 accumulators of
    AVX2's 16 registers; 2 x 16 by 8 with AVX-512's 32), 96 keys per block, 4 groups
    sharing each block."""
    vl = vector_lanes()
    return Blocking(vl, 2, 8 if vl == 16 else 6, 96, 4)


@cache
def _entry(b: Blocking, name: str) -> int:
    defines = {"VL": b.vl, "RV": b.rv, "MR": b.mr, "BN": b.bn, "NG": b.ng, "TSR_VL": b.vl}
    source = ("".join(f"#define {k} {v}\n" for k, v in defines.items())
              + "#include <stdint.h>\n#include <stdbool.h>\n#include <string.h>\n"
                "#include <math.h>\n"
              + TILE_HEADER.read_text() + MATH_HEADER.read_text() + _SOURCE.read_text())
    fn = compile_c(source, name="attention", openmp=True).function(name)
    return ctypes.cast(fn, ctypes.c_void_p).value or 0


def _strides(t: torch.Tensor | None) -> tuple[int, ...]:
    return tuple(t.stride()) if t is not None else (0, 0, 0, 0)


def _ptr(t: torch.Tensor | None) -> int:
    return t.data_ptr() if t is not None else 0


def _launch(name: str, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
            out: torch.Tensor, mask: torch.Tensor | None, lse: torch.Tensor | None,
            lens: torch.Tensor | None, ws: torch.Tensor | None, causal: bool, chunk: int,
            scale: float, config: Blocking | None, who: str) -> None:
    entry = _entry(config or blocking(), name)
    batch, hq, sq, d = q.shape
    hkv, sk, dv = k.shape[1], k.shape[2], v.shape[3]
    status = torch.zeros(1 + (batch * hkv if lens is not None else 0), dtype=torch.int64)
    launcher()(entry, 1, 1, 1, q.data_ptr(), k.data_ptr(), v.data_ptr(), out.data_ptr(),
               _ptr(mask), _ptr(lse), _ptr(lens), _ptr(ws), status.data_ptr(), *q.stride(),
               *k.stride(), *v.stride(), *out.stride(), *_strides(mask), batch, hq, hkv, sq,
               sk, d, dv, _FORMATS[q.dtype],
               _FORMATS[mask.dtype] if mask is not None else _NONE, int(causal), chunk,
               float(scale))
    check(status.data_ptr(), lambda: OutOfMemoryError(
        f"{who}: out of memory for the scratch buffers (per thread, float32 copies of up to "
        f"{sk} keys and values of {d} + {dv} features)",
        hint="pass float32 keys and values with unit feature stride (read in place), or "
             "fewer keys"))


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, out: torch.Tensor, *,
              scale: float, causal: bool = False, mask: torch.Tensor | None = None,
              lse: torch.Tensor | None = None, config: Blocking | None = None,
              who: str = "attention") -> None:
    """out = softmax(q k^T * scale + mask) v for q [B, Hq, Sq, D], k [B, Hkv, Sk, D],
    v [B, Hkv, Sk, Dv] (Hq a multiple of Hkv; query head h uses kv head h // (Hq / Hkv)),
    out [B, Hq, Sq, Dv], all of one float dtype and any strides. `causal`: query i sees keys
    <= i (top-left aligned). `mask` [B, Hq, Sq, Sk] by strides (0 to broadcast): bool
    (False drops the key) or float (added). `lse` [B, Hq, Sq] float32, contiguous, gets
    each row's natural-log logsumexp. Rows that see no key get zeros (lse 0, as torch).
    Raises OutOfMemoryError (naming `who`) if its scratch buffers cannot be had."""
    _launch("tsr_attention", q, k, v, out, mask, lse, None, None, causal, 0, scale, config,
            who)


def decode(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, lens: torch.Tensor,
           out: torch.Tensor, *, scale: float, causal: bool = False,
           mask: torch.Tensor | None = None, chunk: int = 256, config: Blocking | None = None,
           who: str = "decode") -> None:
    """Attention of a few queries per sequence over a KV cache, flash-decoding style:
    q [B, Hq, Sq, D] against the first lens[b] (int64, contiguous, each <= S) positions of
    k [B, Hkv, S, D] and v [B, Hkv, S, Dv]; the keys of each (batch row, kv head) are split
    into chunks of `chunk` spread over the threads, then combined. `causal`: query i sees
    keys < lens[b] - Sq + 1 + i (the queries are the last Sq positions). `mask` as in
    `attention`, [B, Hq, Sq, S] by strides."""
    batch, hkv, s = k.shape[:3]
    rows = q.shape[1] // hkv * q.shape[2]
    chunks = -(-s // chunk)
    ws = torch.empty(batch * hkv * chunks * rows * (2 + v.shape[3]), dtype=torch.float32)
    _launch("tsr_decode", q, k, v, out, mask, None, lens, ws, causal, chunk, scale, config,
            who)
