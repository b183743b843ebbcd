"""Attention against torch: rotary embeddings (vs a Llama-style rotate_half written here),
scaled_dot_product_attention (vs torch's SDPA: causal, masks of each kind, GQA/MQA,
Sq != Sk, head dims 64/80/128, views, dtypes, fully masked rows, empty sizes) and decode
attention over a KV cache (vs SDPA with a length mask), and bad input."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from opcheck import check, close

import tessera.ops as O
from marks import slow_after
from tessera.errors import DtypeError, OutOfMemoryError, ShapeError
from tessera.ops import ArgumentError

DTYPES = slow_after(1, [torch.float32, torch.bfloat16, torch.float16])
SDPA = "scaled_dot_product_attention"


def _randn(*shape: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    return torch.randn(*shape).to(dtype)


# -- rotary embedding -------------------------------------------------------------------------
def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def _llama_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """transformers' apply_rotary_pos_emb, in float32, on the first cos.shape[-1] dims."""
    r = cos.shape[-1]
    c = cos[None, None] if cos.dim() == 2 else cos[:, None] if cos.dim() == 3 else cos
    s = sin[None, None] if sin.dim() == 2 else sin[:, None] if sin.dim() == 3 else sin
    xf = x.float()
    rot = xf[..., :r] * c.float() + _rotate_half(xf[..., :r]) * s.float()
    return torch.cat((rot, xf[..., r:]), dim=-1).to(x.dtype)


def _gptj_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """GPT-J's rotate_every_two with [S, R] tables."""
    xf = x.float()
    rot = torch.stack((-xf[..., 1::2], xf[..., 0::2]), dim=-1).flatten(-2)
    return (xf * cos.float() + rot * sin.float()).to(x.dtype)


def _tables(s: int, r: int, base: float = 10000.0) -> tuple[torch.Tensor, torch.Tensor]:
    inv = 1.0 / base ** (torch.arange(0, r, 2).float() / r)
    freqs = torch.outer(torch.arange(s).float(), inv)
    emb = torch.cat((freqs, freqs), dim=-1)
    return emb.cos(), emb.sin()


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(1, 1, 1, 64), (2, 4, 37, 128), (1, 3, 300, 80)])
def test_rotary_matches_llama(shape: tuple[int, ...], dtype: torch.dtype) -> None:
    s, d = shape[2:]
    x = _randn(*shape, dtype=dtype)
    cos, sin = (t.to(dtype) for t in _tables(s, d))
    close(O.rotary_embedding(x, cos, sin), _llama_rope(x, cos, sin))
    check("rotary_embedding", x, cos, sin)


def test_rotary_table_shapes_partial_and_views() -> None:
    b, s, h, d = 2, 19, 3, 64
    x = torch.randn(b, s, h, d).transpose(1, 2)  # a [B, S, H, D] projection
    cos, sin = _tables(s, d)
    got = O.rotary_embedding(x, cos, sin)
    close(got, _llama_rope(x, cos, sin))
    assert got.stride() == x.stride()  # x's layout is kept
    pos = torch.randint(0, s, (b, s))  # [B, S, D] tables from position ids
    close(O.rotary_embedding(x, cos[pos], sin[pos]), _llama_rope(x, cos[pos], sin[pos]))
    close(O.rotary_embedding(x, cos[None, None], sin[None, None]), _llama_rope(x, cos, sin))
    pc, ps = _tables(s, 32)  # partial rotary: the first 32 of 64 features
    close(O.rotary_embedding(x, pc, ps), _llama_rope(x, pc, ps))
    check("rotary_embedding", x[..., :48], pc, ps)  # a strided x


@pytest.mark.parametrize("dtype", DTYPES)
def test_rotary_interleaved_matches_gptj(dtype: torch.dtype) -> None:
    x = _randn(2, 4, 33, 64, dtype=dtype)
    c, s = (t[:, :32].repeat_interleave(2, dim=-1).to(dtype) for t in _tables(33, 64))
    close(O.rotary_embedding(x, c, s, interleaved=True), _gptj_rope(x, c, s))
    check("rotary_embedding", x, c, s, interleaved=True)
    check("rotary_embedding", x, c[:, :16], s[:, :16], interleaved=True)


def test_rotary_bad_inputs() -> None:
    x, (c, s) = torch.randn(1, 2, 8, 64), _tables(8, 64)
    with pytest.raises(ShapeError, match="rotary_embedding: x must be 4-D"):
        O.rotary_embedding(x[0], c, s)
    with pytest.raises(ShapeError, match="rotary_embedding: cos of shape"):
        O.rotary_embedding(x, c[:5], s)
    with pytest.raises(ShapeError, match="rotary_embedding: cos and sin"):
        O.rotary_embedding(x, c[:, :7], s[:, :7])
    with pytest.raises(ShapeError, match="rotary_embedding: cos and sin"):
        O.rotary_embedding(x[..., :16], c, s)
    with pytest.raises(DtypeError, match="rotary_embedding: argument 'sin'"):
        O.rotary_embedding(x, c, s.double())
    with pytest.raises(DtypeError, match="rotary_embedding: argument 'x'"):
        O.rotary_embedding(x.int(), c, s)


# -- scaled dot-product attention -------------------------------------------------------------
SHAPES = slow_after(4, [  # (B, Hq, Hkv, Sq, Sk, D)
    (1, 2, 2, 1, 1, 64), (2, 4, 4, 37, 37, 64), (1, 8, 2, 100, 77, 128),
    (1, 4, 1, 64, 200, 80), (2, 2, 2, 130, 50, 64), (1, 1, 1, 1, 300, 64),
    (1, 3, 3, 250, 250, 32)])


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("shape", SHAPES)
def test_sdpa_shapes(shape: tuple[int, ...], causal: bool) -> None:
    b, hq, hkv, sq, sk, d = shape
    q, k, v = _randn(b, hq, sq, d), _randn(b, hkv, sk, d), _randn(b, hkv, sk, d)
    check(SDPA, q, k, v, None, causal, None, hq != hkv)


@pytest.mark.parametrize("dtype", DTYPES[1:])
@pytest.mark.parametrize("causal", [False, True])
def test_sdpa_half_dtypes(dtype: torch.dtype, causal: bool) -> None:
    q, k, v = _randn(2, 4, 70, 64, dtype=dtype), _randn(2, 2, 90, 64, dtype=dtype), \
        _randn(2, 2, 90, 64, dtype=dtype)
    check(SDPA, q, k, v, None, causal, None, True)
    mask = torch.randn(70, 90).to(dtype)
    check(SDPA, q, k, v, mask, False, None, True)
    check(SDPA, q, k, v, mask.float(), causal, None, True)  # a float32 mask, as torch allows


@pytest.mark.parametrize("causal", [False, True])
def test_sdpa_masks(causal: bool) -> None:
    b, h, sq, sk, d = 2, 3, 45, 61, 64
    q, k, v = _randn(b, h, sq, d), _randn(b, h, sk, d), _randn(b, h, sk, d)
    for mask in (torch.rand(sq, sk) > 0.3, torch.randn(b, 1, sq, sk), torch.randn(1, sk),
                 torch.rand(b, h, sq, sk) > 0.5, torch.randn(h, 1, 1),
                 torch.randn(sk, b * h * sq).t().reshape(b, h, sq, sk)):  # strided
        check(SDPA, q, k, v, mask, causal)


def test_sdpa_masks_of_a_few_queries() -> None:  # the split-KV path, as in generation
    b, hq, hkv, sk, d = 2, 8, 2, 300, 64
    for sq in (1, 3):
        q, k, v = _randn(b, hq, sq, d), _randn(b, hkv, sk, d), _randn(b, hkv, sk, d)
        pad = torch.arange(sk) < torch.tensor([[sk], [170]])  # right-padded batch rows
        check(SDPA, q, k, v, pad[:, None, None], False, None, True)
        check(SDPA, q, k, v, torch.randn(b, hq, sq, sk), False, None, True)


def test_sdpa_fully_masked_rows_give_zero() -> None:
    q, k, v = _randn(1, 2, 5, 64), _randn(1, 2, 7, 64), _randn(1, 2, 7, 64)
    drop = torch.ones(5, 7, dtype=torch.bool)
    drop[1] = False
    neg = torch.zeros(5, 7).masked_fill(~drop, -float("inf"))
    for mask in (drop, neg):
        got = check(SDPA, q, k, v, mask)
        assert got[:, :, 1].eq(0).all()
    check(SDPA, q, k[:, :, :0], v[:, :, :0])  # no keys at all


def test_sdpa_views_layouts_and_options() -> None:
    b, s, h, d = 2, 33, 4, 64
    proj = torch.randn(b, s, 3, h, d)  # a fused qkv projection [B, S, 3, H, D]
    q, k, v = (proj[:, :, i].transpose(1, 2) for i in range(3))
    got = check(SDPA, q, k, v, None, True)
    assert got.stride() == F.scaled_dot_product_attention(q, k, v).stride()
    check(SDPA, q[..., ::2], k[..., ::2], v[..., ::2])  # strided features
    check(SDPA, q[0], k[0], v[0], None, True)  # 3-D [H, S, D]
    check(SDPA, q, k, torch.randn(b, h, s, 40))  # Dv != D
    check(SDPA, q, k, v, None, False, 0.3)  # explicit scale
    # peaked softmax: scores of ~300 carry ~3e-5 absolute float32 error into the weights
    check(SDPA, q * 40, k, v, atol=1e-4, rtol=1e-3)
    check(SDPA, q[:, :, :0], k, v)  # no queries
    check(SDPA, q[..., :0], k[..., :0], v, None, True)  # no features: uniform weights


def test_sdpa_broadcasts_as_torch() -> None:
    q, k, v = _randn(4, 3, 8), _randn(4, 4, 6, 8), _randn(4, 4, 6, 8)
    check(SDPA, q, k, v)  # q's batch dims broadcast against k's
    check(SDPA, _randn(2, 1, 5, 8), k[:2], v[:2], None, True)  # one query head for all
    check(SDPA, _randn(2, 4, 5, 8), k[:2, :1], v[:2, :1])  # one kv head for all
    check(SDPA, _randn(5, 8), _randn(6, 8), _randn(6, 3))  # 2-D: no heads
    check(SDPA, _randn(2, 3, 2, 5, 8), _randn(3, 2, 6, 8), _randn(3, 2, 6, 8),
          torch.rand(5, 6) > 0.2)  # 5-D


@pytest.mark.slow  # importing torch's OpInfo database takes seconds
def test_sdpa_opinfo_samples() -> None:
    from torch.testing._internal.common_methods_invocations import op_db
    info = next(o for o in op_db if o.name == "nn.functional.scaled_dot_product_attention")
    compared = 0
    for s in info.sample_inputs("cpu", torch.float32):
        kw = dict(s.kwargs)
        if kw.pop("dropout_p", 0.0):
            continue  # inference only
        check(SDPA, s.input, *s.args, kw.get("attn_mask"), kw.get("is_causal", False),
              kw.get("scale"), kw.get("enable_gqa", False))
        compared += 1
    assert compared >= 8


@pytest.mark.parametrize("dtype", DTYPES)
def test_sdpa_with_logsumexp(dtype: torch.dtype) -> None:
    q, k, v = _randn(2, 4, 37, 64, dtype=dtype), _randn(2, 2, 50, 64, dtype=dtype), \
        _randn(2, 2, 50, 64, dtype=dtype)
    name = "scaled_dot_product_attention_lse"
    drop = torch.rand(37, 50) > 0.4
    drop[3] = False  # a row that sees no key: output 0, logsumexp 0, as torch
    for mask, causal in ((None, True), (drop, False), (torch.randn(2, 1, 37, 50).to(dtype), True)):
        args = (q, k, v, mask, causal, None, True)
        (out, sums), (want, want_sums) = getattr(O, name)(*args), O.get(name).reference(*args)
        close(out, want)
        # the half-precision inputs' scores are rounded differently by torch's kernel
        close(sums, want_sums, atol=None if dtype == torch.float32 else 2e-4, rtol=2e-3)
        if mask is drop:
            assert out[:, :, 3].eq(0).all() and sums[:, :, 3].eq(0).all()
    out, sums = O.scaled_dot_product_attention_lse(q, k[:, :, :0], v[:, :, :0], None, False,
                                                   None, True)  # no keys at all
    assert out.eq(0).all() and sums.eq(0).all()  # (torch's kernel divides by zero here)
    with pytest.raises(ShapeError, match="scaled_dot_product_attention_lse: q, k and v must "
                                         "be 4-D"):
        O.scaled_dot_product_attention_lse(q[None], k[None], v[None])


def test_sdpa_scores_growing_along_the_keys() -> None:
    # later keys score far above the running max of earlier blocks (> 2^64 apart): the
    # lazily kept max must be raised mid-sequence
    q, v = _randn(1, 2, 40, 64), _randn(1, 2, 500, 64)
    k = _randn(1, 2, 500, 64) * torch.linspace(0.05, 30, 500)[:, None]
    for causal in (False, True):
        check(SDPA, q, k, v, None, causal, None, False, atol=1e-4, rtol=1e-3)


def test_sdpa_nan_propagates() -> None:
    q, k, v = _randn(1, 1, 4, 64), _randn(1, 1, 9, 64), _randn(1, 1, 9, 64)
    q[0, 0, 2, 5] = float("nan")
    for causal in (False, True):  # the decoding and the prefill kernel
        got = check(SDPA, q, k, v, None, causal)
        assert got[0, 0, 2].isnan().all() and not got[0, 0, 1].isnan().any()


def test_sdpa_out_of_memory_is_an_error() -> None:
    # bfloat16 keys are copied to float32 per thread: 2^40 of them (a stride-0 view) cannot be
    k = torch.zeros(1, 1, 1, 128, dtype=torch.bfloat16).expand(1, 1, 1 << 40, 128)
    q = torch.zeros(1, 1, 4, 128, dtype=torch.bfloat16)
    with pytest.raises(OutOfMemoryError, match="scaled_dot_product_attention: out of memory"):
        O.scaled_dot_product_attention(q, k, k, is_causal=True)


def test_sdpa_bad_inputs() -> None:
    q, k = torch.randn(1, 4, 8, 64), torch.randn(1, 2, 8, 64)
    with pytest.raises(ShapeError, match="scaled_dot_product_attention: q has 4 heads and k "
                                         "has 2; they must match"):
        O.scaled_dot_product_attention(q, k, k)
    with pytest.raises(ShapeError, match="q's heads must be a multiple"):
        O.scaled_dot_product_attention(q, torch.randn(1, 3, 8, 64), torch.randn(1, 3, 8, 64),
                                       enable_gqa=True)
    with pytest.raises(ShapeError, match="do not fit"):
        O.scaled_dot_product_attention(q, q[..., :32], q)
    with pytest.raises(ShapeError, match="do not fit"):
        O.scaled_dot_product_attention(q, q, q[:, :, :5])
    with pytest.raises(ShapeError, match="q must have at least 2 dims"):
        O.scaled_dot_product_attention(q[0, 0, 0], q[0, 0], q[0, 0])
    with pytest.raises(ShapeError, match="batch dims of q"):
        O.scaled_dot_product_attention(torch.randn(3, 4, 8, 64), torch.randn(2, 4, 8, 64),
                                       torch.randn(2, 4, 8, 64))
    with pytest.raises(ShapeError, match="attn_mask of shape"):
        O.scaled_dot_product_attention(q, q, q, torch.ones(3, 8, dtype=torch.bool))
    with pytest.raises(DtypeError, match="argument 'attn_mask'"):
        O.scaled_dot_product_attention(q, q, q, torch.ones(8, 8, dtype=torch.int32))
    with pytest.raises(DtypeError, match="argument 'attn_mask'"):
        O.scaled_dot_product_attention(q, q, q, torch.ones(8, 8, dtype=torch.float16))
    with pytest.raises(DtypeError, match="q, k, v must have one dtype"):
        O.scaled_dot_product_attention(q, q.half(), q)
    with pytest.raises(DtypeError, match="argument 'v'"):
        O.scaled_dot_product_attention(q, q, q.double())


# -- decode attention --------------------------------------------------------------------------
DECODE = slow_after(3, [  # (B, Hq, Hkv, Sq, S, D), cache lengths
    ((1, 4, 4, 1, 64, 64), [64]), ((3, 8, 2, 1, 300, 128), [300, 1, 157]),
    ((2, 4, 1, 3, 100, 64), [0, 99]), ((2, 32, 8, 1, 700, 80), [700, 513]),
    ((1, 2, 2, 5, 5000, 64), [4321])])


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("case", DECODE)
def test_decode(case: tuple[tuple[int, ...], list[int]], causal: bool) -> None:
    (b, hq, hkv, sq, s, d), lens = case
    q, k, v = _randn(b, hq, sq, d), _randn(b, hkv, s, d), _randn(b, hkv, s, d)
    got = check("decode_attention", q, k, v, torch.tensor(lens), None, causal)
    if 0 in lens:
        assert got[lens.index(0)].eq(0).all()


def test_decode_combines_chunks() -> None:
    # the template directly, with small chunks: sequences of 0, 1, 64 and 300 keys in 0 to
    # 5 chunks, whatever the thread count
    from tessera.templates.attention import decode
    q, k, v = _randn(4, 4, 2, 32), _randn(4, 2, 300, 32), _randn(4, 2, 300, 32)
    lens = torch.tensor([0, 1, 64, 300])
    for causal in (False, True):
        out = torch.empty(4, 4, 2, 32)
        decode(q, k, v, lens, out, scale=0.3, causal=causal, chunk=64)
        close(out, O.get("decode_attention").reference(q, k, v, lens, 0.3, causal))


@pytest.mark.parametrize("dtype", DTYPES)
def test_decode_dtypes_and_cache_layouts(dtype: torch.dtype) -> None:
    b, s, hkv, d = 2, 200, 2, 64
    cache = torch.randn(b, s, 2, hkv, d).to(dtype)  # [B, S, (k, v), H, D] slots
    k, v = cache[:, :, 0].transpose(1, 2), cache[:, :, 1].transpose(1, 2)
    q = torch.randn(b, 1, 8, d).to(dtype).transpose(1, 2)  # [B, 1, H, D] projection
    lens = torch.tensor([150, 200], dtype=torch.int32)
    check("decode_attention", q, k, v, lens)
    check("decode_attention", q, k, v, lens, 0.2)


def test_the_avx512_blocking_runs_here_too() -> None:
    # 16-lane vectors (GCC's generic vectors split them on AVX2): the blocking an AVX-512
    # machine gets, checked on any machine
    from tessera.templates.attention import Blocking, attention, decode
    wide = Blocking(vl=16, rv=2, mr=8, bn=96, ng=4)
    q, k, v = _randn(2, 4, 70, 80), _randn(2, 2, 130, 80), _randn(2, 2, 130, 48)
    mask = torch.randn(2, 1, 70, 130).expand(2, 4, 70, 130)
    for causal, m in ((True, None), (False, mask)):
        out = torch.empty(2, 4, 70, 48)
        attention(q, k, v, out, scale=0.1, causal=causal, mask=m, config=wide)
        close(out, F.scaled_dot_product_attention(q, k, v, m, is_causal=causal, scale=0.1,
                                                  enable_gqa=True))
    lens, out = torch.tensor([130, 37]), torch.empty(2, 4, 70, 48)
    decode(q, k, v, lens, out, scale=0.1, chunk=32, config=wide)
    close(out, O.get("decode_attention").reference(q, k, v, lens, 0.1))


def test_fake_tensors_give_the_shapes() -> None:
    from torch._subclasses.fake_tensor import FakeTensorMode
    with FakeTensorMode():  # what torch.compile and torch.export trace through
        q, k, v = torch.empty(2, 8, 5, 64), torch.empty(2, 2, 30, 64), torch.empty(2, 2, 30, 48)
        lens, cos = torch.empty(2, dtype=torch.int64), torch.empty(5, 64)
        t = torch.ops.tessera
        assert t.scaled_dot_product_attention(q, k, v, None, True, None, True).shape == \
            (2, 8, 5, 48)
        assert t.decode_attention(q, k, v, lens).shape == (2, 8, 5, 48)
        assert t.rotary_embedding(q, cos, cos).shape == q.shape


def test_decode_bad_inputs() -> None:
    q, k = torch.randn(2, 4, 1, 64), torch.randn(2, 2, 10, 64)
    with pytest.raises(ArgumentError, match=r"decode_attention: cache_lens must be in \[0, 10\]"):
        O.decode_attention(q, k, k, torch.tensor([3, 11]))
    with pytest.raises(ArgumentError, match="cache_lens must be in"):
        O.decode_attention(q, k, k, torch.tensor([-1, 2]))
    with pytest.raises(ShapeError, match="cache_lens must have shape"):
        O.decode_attention(q, k, k, torch.tensor([3]))
    with pytest.raises(DtypeError, match="argument 'cache_lens'"):
        O.decode_attention(q, k, k, torch.tensor([3.0, 2.0]))
    with pytest.raises(ShapeError, match="q has 4 heads and k_cache has 3"):
        O.decode_attention(q, torch.randn(2, 3, 10, 64), torch.randn(2, 3, 10, 64),
                           torch.tensor([3, 2]))
    with pytest.raises(ShapeError, match="do not fit"):
        O.decode_attention(q, k, k[:, :, :5], torch.tensor([3, 2]))
    with pytest.raises(ShapeError, match="decode_attention: q must have at least 4 dims"):
        O.decode_attention(q[0], k[0], k[0], torch.tensor([3]))
    with pytest.raises(ShapeError, match="must be \\[B, Hq, Sq, D\\]"):
        O.decode_attention(q, k[:1], k[:1], torch.tensor([3, 2]))
