"""Layouts in compiled graphs (tessera.graph.frontend.place_copies, rewrites'
grouped-query attention): transposes stay views where their readers take strided tensors,
a copy is placed only where a reader needs one, repeated k/v heads become enable_gqa;
numerics against eager, and the plans run with no Python step for layouts."""

from __future__ import annotations

import random
import warnings
from collections import Counter
from typing import Any

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from tessera.graph import compiled
from tessera.graph.executable import Executable
from tessera.graph.frontend import _STRIDED, _view_strides
from tessera.graph.record import Recorder
from tessera.ops import registry

COPIES = ("transpose", "permute", "contiguous")


def _compile(fn: Any, *args: torch.Tensor, dynamic: bool = False, calls: int = 3
             ) -> tuple[Any, Executable]:
    """fn compiled with the tessera backend, called `calls` times on args (so a plan is
    recorded); its output and its one executable."""
    torch._dynamo.reset()
    before = {id(e) for e in compiled()}
    f = torch.compile(fn, backend="tessera", dynamic=dynamic)
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for _ in range(calls):
            out = f(*args)
    (ex,) = [e for e in compiled() if id(e) not in before]
    return out, ex


def _ops(ex: Executable) -> Counter[str]:
    return Counter(n.op for n in ex.graph.nodes)


def _python_steps(ex: Executable) -> list[str]:
    return [s.node.op for p in ex.plans.values() if p for s in p.steps if s.node is not None]


def _transposed(*shape: int) -> torch.Tensor:
    """A [B, H, S, D] tensor as a [B, S, H, D] projection's transpose (no copy)."""
    b, h, s, d = shape
    return torch.randn(b, s, h, d).transpose(1, 2)


# -- the ops a transpose may feed as a view ------------------------------------------------
_SAMPLES: dict[str, Any] = {
    "matmul": lambda: (_transposed(2, 3, 5, 4), torch.randn(4, 6)),
    "linear": lambda: (_transposed(2, 3, 5, 4), torch.randn(6, 4), torch.randn(6)),
    "bmm": lambda: (_transposed(1, 3, 5, 4)[0], _transposed(1, 3, 4, 6)[0]),
    "addmm": lambda: (torch.randn(6), torch.randn(4, 5).t(), torch.randn(6, 4).t()),
    "baddbmm": lambda: (torch.randn(5, 6), _transposed(1, 3, 5, 4)[0],
                        _transposed(1, 3, 4, 6)[0]),
    "cat": lambda: ([_transposed(2, 3, 5, 4), _transposed(2, 3, 5, 4)], 2),
    "embedding": lambda: (torch.randn(10, 4), torch.randint(0, 10, (5, 3)).t()),
    "scaled_dot_product_attention": lambda: (_transposed(2, 4, 6, 8), _transposed(2, 2, 6, 8),
                                             _transposed(2, 2, 6, 8), None, True, None, True),
    "scaled_dot_product_attention_lse": lambda: (_transposed(2, 4, 6, 8),
                                                 _transposed(2, 4, 6, 8),
                                                 _transposed(2, 4, 6, 8)),
    "rotary_embedding": lambda: (_transposed(2, 3, 5, 8), torch.randn(5, 8),
                                 torch.randn(5, 8)),
    "transpose": lambda: (_transposed(2, 3, 5, 4), 1, 3),
    "permute": lambda: (_transposed(2, 3, 5, 4), [3, 1, 0, 2]),
}


def test_every_strided_reader_has_a_sample() -> None:
    assert set(_SAMPLES) == set(_STRIDED)


@pytest.mark.parametrize("name", sorted(_STRIDED))
def test_strided_readers_launch_without_torch(name: str) -> None:
    """The ops place_copies lets read a transpose as a view compute eager's result from
    transposed operands with kernel launches alone (the recorder sees no torch call that
    would make the node a Python step)."""
    torch.manual_seed(0)
    d = registry.get(name)
    args = _SAMPLES[name]()
    rec = Recorder()
    with rec, rec.node(0):
        out = d.impl(*args)
    assert rec.records[0].why is None
    got, want = (o if isinstance(o, tuple) else (o,) for o in (out, d.reference(*args)))
    for g, w in zip(got, want, strict=True):
        torch.testing.assert_close(g, w, rtol=1e-5, atol=1e-5)


def test_view_strides_are_torchs() -> None:
    """_view_strides says whether (and how) torch views a strided tensor as a new shape."""
    rng = random.Random(0)
    for _ in range(300):
        shape = [rng.choice((1, 2, 3, 4, 6)) for _ in range(rng.randint(1, 4))]
        perm = list(range(len(shape)))
        rng.shuffle(perm)
        x = torch.empty(shape).permute(perm)
        new = list(x.shape)
        while len(new) > 1 and rng.random() < 0.5:  # merge some neighbours
            i = rng.randrange(len(new) - 1)
            new[i:i + 2] = [new[i] * new[i + 1]]
        if rng.random() < 0.3:
            new.insert(rng.randint(0, len(new)), 1)
        try:
            want = x.view(new).stride()
        except RuntimeError:
            want = None
        got = _view_strides(tuple(x.shape), x.stride(), tuple(new))
        assert (got is None) == (want is None), (x.shape, x.stride(), new)
        if want is not None:
            assert tuple(
                g for g, n in zip(got, new, strict=True) if n != 1) == tuple(
                w for w, n in zip(want, new, strict=True) if n != 1)


# -- models --------------------------------------------------------------------------------
class Attention(nn.Module):
    """Grouped-query attention as Llama-style code writes it: projections viewed as heads
    and transposed, keys and values repeated per query group (`repeat`: "interleave",
    "hf" for Hugging Face's repeat_kv, "none": F.sdpa's own enable_gqa), attention, the
    heads transposed back and reshaped into the output projection."""

    def __init__(self, d: int = 32, heads: int = 4, kv_heads: int = 2, repeat: str = "interleave",
                 explicit: bool = False) -> None:
        super().__init__()
        self.h, self.kv, self.repeat, self.explicit = heads, kv_heads, repeat, explicit
        self.hd = d // heads
        self.q = nn.Linear(d, d, bias=False)
        self.k = nn.Linear(d, kv_heads * self.hd, bias=False)
        self.v = nn.Linear(d, kv_heads * self.hd, bias=False)
        self.o = nn.Linear(d, d, bias=False)

    def _repeat(self, x: torch.Tensor) -> torch.Tensor:
        g = self.h // self.kv
        if self.repeat == "interleave":
            return x.repeat_interleave(g, dim=1)
        if self.repeat == "hf":
            b, kv, s, d = x.shape
            return x[:, :, None, :, :].expand(b, kv, g, s, d).reshape(b, kv * g, s, d)
        if self.repeat == "tile":  # heads in another order: not grouped-query attention
            return x.repeat(1, g, 1, 1)
        return x

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, c = x.shape
        q = self.q(x).view(b, t, self.h, self.hd).transpose(1, 2)
        k = self.k(x).view(b, t, self.kv, self.hd).transpose(1, 2)
        v = self.v(x).view(b, t, self.kv, self.hd).transpose(1, 2)
        k, v = self._repeat(k), self._repeat(v)
        if self.explicit:
            w = F.softmax(torch.matmul(q, k.transpose(2, 3)) / self.hd ** 0.5, dim=-1)
            out = torch.matmul(w, v)
        else:
            out = F.scaled_dot_product_attention(q, k, v, is_causal=True,
                                                 enable_gqa=self.repeat == "none")
        return self.o(out.transpose(1, 2).reshape(b, t, c))


@pytest.mark.parametrize("repeat,explicit", [("interleave", False), ("hf", False),
                                             ("none", False), ("interleave", True)])
def test_attention_copies_nothing(repeat: str, explicit: bool) -> None:
    """q, k and v reach attention as transposed views, repeated keys and values as they
    are (enable_gqa), the output goes back through views: no copy, no Python step."""
    torch.manual_seed(0)
    model = Attention(repeat=repeat, explicit=explicit).eval()
    x = torch.randn(2, 8, 32)
    out, ex = _compile(model, x)
    torch.testing.assert_close(out, model(x), rtol=1e-5, atol=1e-5)
    ops = _ops(ex)
    assert not any(ops[c] for c in COPIES), ops
    (attn,) = [n for n in ex.graph.nodes if n.op == "scaled_dot_product_attention"]
    assert attn.args["enable_gqa"] and attn.args["k"].shape[1] == 2
    assert _python_steps(ex) == []


def test_tiled_heads_are_not_grouped_queries() -> None:
    """x.repeat(1, G, 1, 1) orders heads otherwise than grouped-query attention: left as
    it is, and right."""
    torch.manual_seed(0)
    model = Attention(repeat="tile").eval()
    x = torch.randn(2, 8, 32)
    out, ex = _compile(model, x)
    torch.testing.assert_close(out, model(x), rtol=1e-5, atol=1e-5)
    (attn,) = [n for n in ex.graph.nodes if n.op == "scaled_dot_product_attention"]
    assert attn.args["k"].shape[1] == 4


def test_symbolic_sizes() -> None:
    """With symbolic batch and sequence, the same: views, no copies, eager's numerics for
    every length."""
    torch.manual_seed(0)
    model = Attention(repeat="hf").eval()
    torch._dynamo.reset()
    before = {id(e) for e in compiled()}
    f = torch.compile(model, backend="tessera", dynamic=True)
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for t in (5, 9, 12):
            x = torch.randn(3, t, 32)
            torch.testing.assert_close(f(x), model(x), rtol=1e-5, atol=1e-5)
    (ex,) = [e for e in compiled() if id(e) not in before]
    assert any(isinstance(d, str) for v in ex.graph.inputs for d in v.shape)
    ops = _ops(ex)
    assert not any(ops[c] for c in COPIES), ops


class Readers(nn.Module):
    """A transposed projection read by a reshape that cannot view it, by pointwise ops in
    3 coalesced dims (a view serves) and in 4 (a copy does), and by a matmul."""

    def __init__(self) -> None:
        super().__init__()
        self.p = nn.Linear(16, 16)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        b, t, _ = x.shape
        y = self.p(x)
        flat = y.transpose(1, 2).reshape(b, -1)  # [b, 16 * t]: no view of the transpose
        three = torch.sigmoid(y.transpose(1, 2))  # [b, 16, t]
        heads = y.view(b, t, 4, 4).transpose(1, 2)
        four = torch.exp(heads)  # [b, 4, t, 4]: 4 dims
        return flat, three, four, heads @ heads.transpose(2, 3)


def test_a_copy_only_where_a_reader_needs_one() -> None:
    torch.manual_seed(0)
    model = Readers().eval()
    x = torch.randn(2, 6, 16)
    out, ex = _compile(model, x)
    for got, want in zip(out, model(x), strict=True):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    # eager's reshapes copy (aten's clones) straight from the transposed views; the 4-dim
    # exp reads a copy of the heads (which the product's reshape then views); the 3-dim
    # sigmoid reads the view
    ops = _ops(ex)
    assert (ops["transpose"], ops["contiguous"], ops["view:transpose.int"]) == (1, 2, 2)
    (copy,) = [n for n in ex.graph.nodes if n.op == "transpose"]
    assert copy.outputs[0].shape == (2, 4, 6, 4)
    assert _python_steps(ex) == []


# -- GEMM epilogues on the registry's linear and matmul ----------------------------------------
@pytest.mark.parametrize("name", ["linear", "matmul"])
def test_linear_and_matmul_take_epilogues(name: str) -> None:
    """activation= and residual= (what the GEMM epilogue rewrite emits) as eager computes
    them; an unknown activation is an error naming it."""
    from tessera.errors import TesseraError
    torch.manual_seed(0)
    d = registry.get(name)
    x, r = torch.randn(2, 64, 32), torch.randn(64, 48)
    w = torch.randn(48, 32) if name == "linear" else torch.randn(32, 48)
    extra = (torch.randn(48),) if name == "linear" else ()
    # (each epilogue is a template variant: the two the graph tests compile anyway)
    epilogue = {"activation": "gelu"} if name == "linear" else {"residual": r}
    got = d.impl(x, w, *extra, **epilogue)
    torch.testing.assert_close(got, d.reference(x, w, *extra, **epilogue), rtol=1e-5,
                               atol=1e-5)
    with pytest.raises(TesseraError, match="softsign"):
        d.impl(x, w, activation="softsign")


def test_epilogue_rewrite_emits_linear() -> None:
    """A linear then GELU then a residual add (past the dot-product path's rows) becomes
    one registry linear whose weight is the module's own (no transpose of it)."""
    torch.manual_seed(0)
    up = nn.Linear(32, 32).eval()

    def block(x: torch.Tensor) -> torch.Tensor:
        return F.gelu(up(x)) + x

    x = torch.randn(2, 64, 32)
    out, ex = _compile(block, x, calls=1)
    torch.testing.assert_close(out, block(x), rtol=1e-5, atol=1e-5)
    (node,) = [n for n in ex.graph.nodes if n.op == "linear"]
    assert node.args["activation"] == "gelu" and node.args["residual"] is not None
    assert node.args["weight"].kind == "const" and node.args["weight"].shape == (32, 32)
    assert len(ex.graph.nodes) == 1


# -- floats dynamo passes as inputs ------------------------------------------------------------
class NormAttention(nn.Module):
    """An RMSNorm with its eps and attention written out with its scale, both module
    attributes: with dynamic shapes dynamo passes them as inputs."""

    def __init__(self, d: int = 32, heads: int = 4) -> None:
        super().__init__()
        self.h, self.eps, self.scale = heads, 1e-6, (d // heads) ** -0.5
        self.w = nn.Parameter(1 + 0.1 * torch.randn(d))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, c = x.shape
        x = self.w * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps))
        q = x.view(b, t, self.h, -1).transpose(1, 2)
        p = F.softmax(torch.matmul(q, q.transpose(2, 3)) * self.scale, dim=-1)
        return torch.matmul(p, q).transpose(1, 2).reshape(b, t, c)


def test_dynamic_floats_become_constants() -> None:
    """eps and the scale are constants of the graph (the RMSNorm and attention patterns
    match, no torch step casts them), guarded: another eps compiles again, right."""
    torch.manual_seed(0)
    model = NormAttention().eval()
    torch._dynamo.reset()
    before = {id(e) for e in compiled()}
    f = torch.compile(model, backend="tessera", dynamic=True, options={"fusion": False})
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for t in (5, 9):
            x = torch.randn(2, t, 32)
            torch.testing.assert_close(f(x), model(x), rtol=1e-5, atol=1e-5)
        (ex,) = [e for e in compiled() if id(e) not in before]
        ops = _ops(ex)
        assert ops["rms_norm"] == 1 and ops["scaled_dot_product_attention"] == 1, ops
        assert not any(n.kind == "torch" for n in ex.graph.nodes)
        (norm,) = [n for n in ex.graph.nodes if n.op == "rms_norm"]
        (attn,) = [n for n in ex.graph.nodes if n.op == "scaled_dot_product_attention"]
        # (the numbers as the graph computed with them: rounded to float32)
        assert norm.args["eps"] == pytest.approx(1e-6, rel=1e-7)
        assert attn.args["scale"] == pytest.approx(model.scale, rel=1e-7)
        model.eps = 0.5
        x = torch.randn(2, 7, 32)
        torch.testing.assert_close(f(x), model(x), rtol=1e-5, atol=1e-5)
    (again,) = [e for e in compiled() if id(e) not in before and e is not ex]
    assert [n.args["eps"] for n in again.graph.nodes if n.op == "rms_norm"] == [0.5]


# -- the zoo -------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["gpt2", "moe_lm"])
def test_zoo_copies(name: str) -> None:
    """No layout copy is left in these zoo models (2 layers; before transposes were views,
    GPT-2 had 8 and moe_lm 12): moe_lm's written-out rotary positions become
    rotary_embedding, which reads the transposed heads (and gives q in their layout, so
    attention's output transposes back as a view); its repeated k/v are read as
    grouped-query attention."""
    from tessera.bench import zoo

    z = zoo.build(name, "tiny")
    args = z.inputs(2, 16)
    out, ex = _compile(z.model, *args)
    with torch.no_grad():
        want = z.model(*args)
    torch.testing.assert_close(out[0], want[0], rtol=1e-4, atol=1e-4)
    ops = _ops(ex)
    assert not any(ops[c] for c in COPIES), ops
    if name == "moe_lm":
        assert ops["rotary_embedding"] == 4 and not ops["neg"]
        attn = [n for n in ex.graph.nodes if n.op == "scaled_dot_product_attention"]
        assert len(attn) == 2 and all(n.args["enable_gqa"] and n.args["k"].shape[1] == 2
                                      for n in attn)


# -- rotary positions written out ----------------------------------------------------------------
def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    """Hugging Face's."""
    return torch.cat((-x[..., x.shape[-1] // 2:], x[..., :x.shape[-1] // 2]), dim=-1)


@pytest.mark.parametrize("table", ["hf", "2d", "heads"])
def test_rotary_written_out(table: str) -> None:
    """x * cos + rotate_half(x) * sin on transposed heads -> rotary_embedding reading them
    as they are, for cos/sin as Hugging Face passes them ([B, 1, S, D]) or [S, D]; a 3-D
    table whose first dim is the heads broadcasts otherwise than the op reads it: left
    alone (and right)."""
    torch.manual_seed(0)
    proj = nn.Linear(32, 32, bias=False).eval()
    b, t = 2, 6
    cos, sin = torch.randn(b, t, 8), torch.randn(b, t, 8)
    if table == "2d":
        cos, sin = cos[0], sin[0]
    elif table == "heads":
        cos, sin = torch.randn(4, t, 8), torch.randn(4, t, 8)

    def rope(x: torch.Tensor) -> torch.Tensor:
        q = proj(x).view(b, t, 4, 8).transpose(1, 2)
        c, s = (cos[:, None], sin[:, None]) if table == "hf" else (cos, sin)
        q = q * c + _rotate_half(q) * s
        return q.transpose(1, 2).reshape(b, t, 32)

    x = torch.randn(b, t, 32)
    out, ex = _compile(rope, x)
    torch.testing.assert_close(out, rope(x), rtol=1e-5, atol=1e-5)
    ops = _ops(ex)
    if table == "heads":
        assert not ops["rotary_embedding"]
    else:
        assert ops["rotary_embedding"] == 1 and not any(ops[c] for c in COPIES), ops
