"""Attention: rotary position embeddings, scaled dot-product attention and decode attention
over a KV cache.

Attention runs on the attention template (templates/attention): FlashAttention for
prefill (the S x S scores never exist; the rows of a group sit in vector lanes, so the
online softmax needs no horizontal reductions) and flash-decoding for a few queries over
a long cache (each sequence's keys split into chunks across the threads, then combined).
Layout is torch's: q [B, H, S, D] (SDPA broadcasts other ranks as torch does); a
[B, S, H, D] projection is passed as its transpose (`x.transpose(1, 2)`, no copy), since
every stride is honored.
Everything accumulates in float32; results are in the inputs' dtype.
On a device that is not the host (OpenCL), SDPA runs the kernel-language attention
(tiled_attention.py) instead of the C template.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F

import tessera.lang as tl
from tessera.errors import DtypeError, ShapeError
from tessera.ops import device, tiled_attention
from tessera.ops._launch import FLOATS, ArgumentError, check_tensor, compiled, launch, spec
from tessera.ops.registry import op
from tessera.templates import attention as template

_BLOCK = 2048  # rotary: elements per program
_DECODE_ROWS = 8  # SDPA with at most this many query rows per kv head runs as decoding


# -- rotary position embedding --------------------------------------------------------------
@tl.kernel
def _rotary(a, b, ca, cb, sa, sb, oa, ob, xr, outr, BH: tl.constexpr, BS: tl.constexpr,
            W: tl.constexpr, REST: tl.constexpr):
    """BH heads x BS positions of one batch row: each rotated pair (a, b) becomes
    (a cos_a - b sin_a, b cos_b + a sin_b); features past the rotary ones are copied. W and
    REST are powers of two covering the pairs and the copied features (edges masked)."""
    n, h, s = tl.program_id(2), tl.program_id(1) * BH, tl.program_id(0) * BS
    x1, x2 = a[n, h:h + BH, s:s + BS, 0:W], b[n, h:h + BH, s:s + BS, 0:W]  # (float32 math)
    oa[n, h:h + BH, s:s + BS, 0:W] = x1 * ca[n, h:h + BH, s:s + BS, 0:W] - \
        x2 * sa[n, h:h + BH, s:s + BS, 0:W]
    ob[n, h:h + BH, s:s + BS, 0:W] = x2 * cb[n, h:h + BH, s:s + BS, 0:W] + \
        x1 * sb[n, h:h + BH, s:s + BS, 0:W]
    if REST > 0:
        outr[n, h:h + BH, s:s + BS, 0:REST] = xr[n, h:h + BH, s:s + BS, 0:REST]


def _pow2(n: int) -> int:
    return 1 << (n - 1).bit_length()


def _four_dims(t: torch.Tensor) -> torch.Tensor:
    """A cos or sin table as 4-D: [S, R] serves every batch row and head, [B, S, R] every
    head (as Hugging Face's cos[:, None])."""
    return t[None, None] if t.dim() == 2 else t[:, None] if t.dim() == 3 else t


def _rotary_tables(t: torch.Tensor, x: torch.Tensor, name: str, arg: str) -> torch.Tensor:
    """cos or sin checked and broadcast (by strides) to [B, H, S, R]."""
    check_tensor(t, name, arg, FLOATS)
    if t.dim() not in (2, 3, 4):
        raise ShapeError(f"{name}: {arg} must be [S, R], [B, S, R] or [B, H, S, R], got "
                         f"shape {tuple(t.shape)}")
    try:
        return _four_dims(t).expand(*x.shape[:3], t.shape[-1])
    except RuntimeError:
        raise ShapeError(f"{name}: {arg} of shape {tuple(t.shape)} does not broadcast to x "
                         f"{tuple(x.shape)} (as [B, H, S, rotary dims])",
                         hint="cos/sin are [S, R], [B, S, R] or [B, H, S, R]") from None


def _rotary_reference(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, *,
                      interleaved: bool = False) -> torch.Tensor:
    r, c, s = cos.shape[-1], _four_dims(cos), _four_dims(sin)
    xf = x.float()
    xr = xf[..., :r]
    if interleaved:
        rot = torch.stack((-xr[..., 1::2], xr[..., 0::2]), dim=-1).flatten(-2)
    else:
        rot = torch.cat((-xr[..., r // 2:], xr[..., :r // 2]), dim=-1)
    return torch.cat((xr * c.float() + rot * s.float(), xf[..., r:]), dim=-1).to(x.dtype)


@op("rotary_embedding(Tensor x, Tensor cos, Tensor sin, *, bool interleaved=False) -> Tensor",
    kind="attention", reference=_rotary_reference)
def rotary_embedding(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, *,
                     interleaved: bool = False) -> torch.Tensor:
    """Rotary position embedding of x [B, H, S, D]: x * cos + rotate(x) * sin on the first
    R = cos.shape[-1] features (partial rotary when R < D; the rest are copied). rotate is
    Llama/GPT-NeoX's rotate_half, or GPT-J's pairs (x[2i], x[2i+1]) with interleaved=True.
    cos/sin are [S, R], [B, S, R] or broadcast to [B, H, S, R]; computed in float32, the
    result has x's dtype and layout. A [B, S, H, D] tensor goes in as x.transpose(1, 2)."""
    name = "rotary_embedding"
    check_tensor(x, name, "x", FLOATS)
    if x.dim() != 4:
        raise ShapeError(f"{name}: x must be 4-D [B, H, S, D], got shape {tuple(x.shape)}",
                         hint="a [B, S, H, D] tensor goes in as x.transpose(1, 2)")
    c, s = _rotary_tables(cos, x, name, "cos"), _rotary_tables(sin, x, name, "sin")
    r, d = cos.shape[-1], x.shape[-1]
    if sin.shape[-1] != r or r % 2 or not 2 <= r <= d:
        raise ShapeError(f"{name}: cos and sin must have the same even number of rotary "
                         f"features, at most x's {d}; got {r} and {sin.shape[-1]}")
    out = torch.empty_like(x)
    if out.numel() == 0:
        return out
    half = r // 2
    pick = (slice(0, r, 2), slice(1, r, 2)) if interleaved else \
        (slice(0, half), slice(half, r))
    pairs = [t[..., p] for t in (x, c, s, out) for p in pick]  # a, b, ca, cb, sa, sb, oa, ob
    copied = (x[..., r:], out[..., r:]) if r < d else (x[..., :1], out[..., :1])  # unused
    args = [*pairs, *copied]
    w, rest = _pow2(half), _pow2(d - r) if d > r else 0
    bs = min(_pow2(x.shape[2]), max(1, _BLOCK // w))  # positions, then heads, per tile
    bh = min(_pow2(x.shape[1]), max(1, _BLOCK // (w * bs)))
    key = ("rotary", bh, bs, w, rest, *((t.dtype, t.stride(-1) == 1) for t in args))
    k = compiled(key, _rotary, *(spec(t.dtype, 4, t.stride(-1) == 1) for t in args), BH=bh,
                 BS=bs, W=w, REST=rest)
    flat = [v for t in args for v in (t.data_ptr(), *t.shape, *t.stride())]
    launch(k, (-(-x.shape[2] // bs), -(-x.shape[1] // bh), x.shape[0]), *flat)
    return out


# -- scaled dot-product attention -----------------------------------------------------------
def _floats(ts: dict[str, torch.Tensor], name: str, least: int) -> None:
    """Tensors of at least `least` dims and one float dtype."""
    for arg, t in ts.items():
        check_tensor(t, name, arg, FLOATS)
        if t.dim() < least:
            raise ShapeError(f"{name}: {arg} must have at least {least} dims, got shape "
                             f"{tuple(t.shape)}")
    if len({t.dtype for t in ts.values()}) > 1:
        raise DtypeError(f"{name}: {', '.join(ts)} must have one dtype, got "
                         + ", ".join(str(t.dtype)[6:] for t in ts.values()))


def _fit(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, name: str) -> None:
    if k.shape[-1] != q.shape[-1] or k.shape[-2] != v.shape[-2]:
        raise ShapeError(f"{name}: q {tuple(q.shape)}, k {tuple(k.shape)} and v "
                         f"{tuple(v.shape)} do not fit", hint="q [B, Hq, Sq, D], k [B, Hkv, "
                                                             "Sk, D], v [B, Hkv, Sk, Dv]")


def _heads(hq: int, hkv: int, gqa: bool, name: str, arg: str = "k") -> None:
    if hq != hkv and hkv != 1 and not (gqa and hkv > 0 and hq % hkv == 0):
        raise ShapeError(f"{name}: q has {hq} heads and {arg} has {hkv}; "
                         + ("q's heads must be a multiple of them" if gqa else
                            "they must match (or pass enable_gqa=True for grouped-query "
                            "attention)"))


def _sdpa_operands(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, gqa: bool, name: str
                   ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, tuple[int, ...]]:
    """q, k, v as 4-D [B, H, S, D] views, as torch broadcasts them: batch dims broadcast
    (several flattened into one), a single head serves all, Hkv divides Hq under GQA.
    Returns them and the output's shape without its last two dims."""
    _floats({"q": q, "k": k, "v": v}, name, 2)
    _fit(q, k, v, name)
    q3, k3, v3 = (t if t.dim() >= 3 else t[None] for t in (q, k, v))
    hk, hv = k3.shape[-3], v3.shape[-3]
    if hk != hv and 1 not in (hk, hv):
        raise ShapeError(f"{name}: k has {hk} heads and v has {hv}")
    hkv, hq = max(hk, hv), q3.shape[-3]
    if hq == 1 and hkv > 1 and not gqa:
        hq = hkv  # one query head broadcast to every kv head
    _heads(hq, hkv, gqa, name)
    try:
        lead = tuple(torch.broadcast_shapes(q3.shape[:-3], k3.shape[:-3], v3.shape[:-3]))
    except RuntimeError:
        raise ShapeError(f"{name}: the batch dims of q {tuple(q.shape)}, k {tuple(k.shape)} "
                         f"and v {tuple(v.shape)} do not broadcast") from None

    def four(t: torch.Tensor, h: int) -> torch.Tensor:
        t = t.expand(*lead, h, *t.shape[-2:])
        return t.reshape(-1, *t.shape[-3:]) if len(lead) != 1 else t
    head = (hq,) if max(q.dim(), k.dim(), v.dim()) > 2 else ()
    return four(q3, hq), four(k3, hkv), four(v3, hkv), (*lead, *head)


def _scale(scale: float | None, d: int) -> float:
    """The scores' factor: torch's default 1/sqrt(D) (any, for D = 0: the scores are 0)."""
    return float(scale) if scale is not None else 1.0 / math.sqrt(d) if d else 1.0


def _like_q(q: torch.Tensor, dv: int) -> torch.Tensor:
    """The output [B, H, Sq, Dv] in q's layout, as torch's: [B, S, H, D] memory if q is a
    transposed [B, S, H, D] projection, else contiguous."""
    b, h, s = q.shape[:3]
    if q.stride(1) < q.stride(2) and h > 1 and s > 1:
        return torch.empty(b, s, h, dv, dtype=q.dtype).transpose(1, 2)
    return torch.empty(b, h, s, dv, dtype=q.dtype)


def _mask(mask: torch.Tensor, q: torch.Tensor, lead: tuple[int, ...], sk: int, name: str
          ) -> torch.Tensor:
    """attn_mask checked and broadcast (by strides) to the scores [B, Hq, Sq, Sk]."""
    check_tensor(mask, name, "attn_mask", (torch.bool, torch.float32, q.dtype))
    scores = (*lead, q.shape[2], sk)
    try:
        full = mask.expand(scores)
    except RuntimeError:
        raise ShapeError(f"{name}: attn_mask of shape {tuple(mask.shape)} does not broadcast "
                         f"to the scores {scores}",
                         hint="dims must match or be 1, aligned from the right") from None
    return full.reshape(*q.shape[:3], sk) if full.dim() != 4 else full


def _sdpa_reference(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                    attn_mask: torch.Tensor | None = None, is_causal: bool = False,
                    scale: float | None = None, enable_gqa: bool = False) -> torch.Tensor:
    if attn_mask is not None and is_causal:  # both apply, as in torch's CPU flash kernel
        seen = torch.ones(q.shape[-2], k.shape[-2], dtype=torch.bool).tril()
        attn_mask = attn_mask & seen if attn_mask.dtype == torch.bool else \
            attn_mask.masked_fill(~seen, -float("inf"))
        is_causal = False
    return F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, is_causal=is_causal,
                                          scale=scale, enable_gqa=enable_gqa)


@op("scaled_dot_product_attention(Tensor q, Tensor k, Tensor v, Tensor? attn_mask=None, "
    "bool is_causal=False, float? scale=None, bool enable_gqa=False) -> Tensor",
    kind="attention", reference=_sdpa_reference,
    implements=(torch.ops.aten.scaled_dot_product_attention.default,))
def scaled_dot_product_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                                 attn_mask: torch.Tensor | None = None,
                                 is_causal: bool = False, scale: float | None = None,
                                 enable_gqa: bool = False) -> torch.Tensor:
    """softmax(q k^T * scale + mask) v, as torch.nn.functional.scaled_dot_product_attention
    (inference, no dropout): q [B, Hq, Sq, D], k [B, Hkv, Sk, D], v [B, Hkv, Sk, Dv];
    is_causal masks keys after the query's position (top-left aligned); attn_mask is bool
    (False drops) or float (added), broadcast to [B, Hq, Sq, Sk]; both may be given.
    enable_gqa lets Hkv divide Hq. Rows left with no key give 0, as torch."""
    return _sdpa(q, k, v, attn_mask, is_causal, scale, enable_gqa, False)


def _sdpa_lse_reference(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                        attn_mask: torch.Tensor | None = None, is_causal: bool = False,
                        scale: float | None = None, enable_gqa: bool = False
                        ) -> tuple[torch.Tensor, torch.Tensor]:
    if attn_mask is not None:  # the aten op takes an additive mask of q's dtype
        attn_mask = torch.zeros(attn_mask.shape, dtype=q.dtype).masked_fill(
            ~attn_mask, -float("inf")) if attn_mask.dtype == torch.bool else \
            attn_mask.to(q.dtype)
    return torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(
        q, k, v, is_causal=is_causal, attn_mask=attn_mask, scale=scale)


@op("scaled_dot_product_attention_lse(Tensor q, Tensor k, Tensor v, Tensor? attn_mask=None, "
    "bool is_causal=False, float? scale=None, bool enable_gqa=False) -> (Tensor, Tensor)",
    kind="attention", reference=_sdpa_lse_reference,
    implements=(torch.ops.aten._scaled_dot_product_flash_attention_for_cpu.default,))
def scaled_dot_product_attention_lse(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                                     attn_mask: torch.Tensor | None = None,
                                     is_causal: bool = False, scale: float | None = None,
                                     enable_gqa: bool = False
                                     ) -> tuple[torch.Tensor, torch.Tensor]:
    """scaled_dot_product_attention of 4-D inputs and the logsumexp of each row's scaled,
    masked scores [B, Hq, Sq] (float32; 0 for a row that sees no key), as
    aten._scaled_dot_product_flash_attention_for_cpu returns them."""
    name = "scaled_dot_product_attention_lse"
    _floats({"q": q, "k": k, "v": v}, name, 4)
    if not q.dim() == k.dim() == v.dim() == 4:
        raise ShapeError(f"{name}: q, k and v must be 4-D [B, H, S, D], got shapes "
                         f"{tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}")
    return _sdpa(q, k, v, attn_mask, is_causal, scale, enable_gqa, True)


def _sdpa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, attn_mask: torch.Tensor | None,
          is_causal: bool, scale: float | None, gqa: bool, lse: bool) -> Any:
    """Both SDPA ops: the output (and the logsumexp, if `lse`)."""
    name = "scaled_dot_product_attention" + ("_lse" if lse else "")
    q, k, v, lead = _sdpa_operands(q, k, v, gqa, name)
    sk, dv = k.shape[2], v.shape[3]
    mask = _mask(attn_mask, q, lead, sk, name) if attn_mask is not None else None
    scale = _scale(scale, q.shape[3])
    out = _like_q(q, dv) if len(lead) == 2 else torch.empty(*q.shape[:3], dv, dtype=q.dtype)
    sums = torch.empty(q.shape[:3], dtype=torch.float32) if lse else None
    rows = q.shape[2] * (q.shape[1] // max(k.shape[1], 1))  # query rows per kv head
    if not (out.numel() or (lse and sums.numel())):
        pass
    elif device.current() is not None:  # on OpenCL: the kernel-language attention
        tiled_attention.attention(q, k, v, out, scale=scale, causal=bool(is_causal),
                                  mask=mask, lse=sums)
    elif not is_causal and rows <= _DECODE_ROWS and sk and not lse:
        # a few queries: split the keys across the threads instead of the query rows
        lens = torch.tensor([sk] * q.shape[0], dtype=torch.int64)  # replayable: no fill
        template.decode(q, k, v, lens, out, scale=scale, mask=mask,
                        chunk=_chunk(sk, q.shape[0] * k.shape[1]), who=name)
    else:
        template.attention(q, k, v, out, scale=scale, causal=bool(is_causal), mask=mask,
                           lse=sums, who=name)
    if lse:
        return out, sums
    return out.view(*lead, *out.shape[2:]) if len(lead) != 2 else out


# -- decode attention over a KV cache -------------------------------------------------------
def _decode_reference(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                      cache_lens: torch.Tensor, scale: float | None = None,
                      is_causal: bool = False) -> torch.Tensor:
    sq, s = q.shape[2], k_cache.shape[2]
    lens = cache_lens.long()[:, None, None, None]
    pos = torch.arange(s)
    seen = pos <= lens - sq + torch.arange(sq)[:, None] if is_causal else pos < lens
    return F.scaled_dot_product_attention(q, k_cache, v_cache, attn_mask=seen, scale=scale,
                                          enable_gqa=True)


def _chunk(longest: int, items: int) -> int:
    """Keys per decode chunk: enough chunks that the (batch row, kv head, chunk) items give
    every thread four, but no fewer than 64 keys each (a chunk's partial result costs a
    combine step)."""
    per_sequence = -(-4 * torch.get_num_threads() // max(items, 1))
    return max(64, -(-longest // per_sequence))


@op("decode_attention(Tensor q, Tensor k_cache, Tensor v_cache, Tensor cache_lens, "
    "float? scale=None, bool is_causal=False) -> Tensor", kind="attention",
    reference=_decode_reference)
def decode_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                     cache_lens: torch.Tensor, scale: float | None = None,
                     is_causal: bool = False) -> torch.Tensor:
    """Attention of a few new queries per sequence, q [B, Hq, Sq, D] (Sq typically 1), over
    a KV cache k_cache [B, Hkv, S, D], v_cache [B, Hkv, S, Dv] of which the first
    cache_lens[b] positions are valid (Hkv divides Hq: GQA/MQA). is_causal: the queries are
    the last Sq valid positions and query i sees keys up to its own (bottom-right aligned),
    for speculative or chunked decoding. Flash-decoding: each sequence's keys are split
    into chunks across the threads, then combined. A query with no valid key gives 0."""
    name = "decode_attention"
    _floats({"q": q, "k_cache": k_cache, "v_cache": v_cache}, name, 4)
    _fit(q, k_cache, v_cache, name)
    if not q.dim() == k_cache.dim() == v_cache.dim() == 4 or k_cache.shape[:3] != \
            v_cache.shape[:3] or q.shape[0] != k_cache.shape[0]:
        raise ShapeError(f"{name}: q {tuple(q.shape)}, k_cache {tuple(k_cache.shape)} and "
                         f"v_cache {tuple(v_cache.shape)} must be [B, Hq, Sq, D], "
                         "[B, Hkv, S, D] and [B, Hkv, S, Dv]")
    _heads(q.shape[1], k_cache.shape[1], True, name, "k_cache")
    check_tensor(cache_lens, name, "cache_lens", (torch.int32, torch.int64))
    b, s = q.shape[0], k_cache.shape[2]
    if tuple(cache_lens.shape) != (b,):
        raise ShapeError(f"{name}: cache_lens must have shape ({b},), one length per batch "
                         f"row, got {tuple(cache_lens.shape)}")
    lens = cache_lens.to(torch.int64).contiguous()
    longest = int(lens.max()) if b else 0
    if b and (int(lens.min()) < 0 or longest > s):
        raise ArgumentError(f"{name}: cache_lens must be in [0, {s}] (the cache's length), "
                            f"got values in [{int(lens.min())}, {longest}]")
    scale = _scale(scale, q.shape[-1])
    out = _like_q(q, v_cache.shape[-1])
    if out.numel():
        template.decode(q, k_cache, v_cache, lens, out, scale=scale, causal=bool(is_causal),
                        chunk=_chunk(max(longest, 1), b * k_cache.shape[1]), who=name)
    return out
