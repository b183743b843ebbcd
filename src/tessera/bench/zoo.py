"""The model zoo: small models with seeded random weights (no downloads) for the graph
compiler's end-to-end tests and the `models` benchmark suite.

Every entry is a `ZooModel`: the model in eval mode with gradients off, and builders of its
example inputs for a batch x sequence (prefill; for the CNN, `batch` images of seq x seq)
and, for language models, for a 1-token decode step against a KV cache of a given length.
The language models share one calling convention, so `greedy_decode` drives them all:
`model(input_ids, keys, values) -> (logits, keys, values)`, where keys and values are the
whole cache, stacked over layers ([layers, batch, kv_heads, length, head_dim]), and the
returned cache is the input cache with this call's tokens appended (a new tensor: calls
never mutate their inputs, so a step can be timed or replayed with the same arguments).

Sizes: "tiny" (hidden 64, 2 layers, 4 experts: tests) and "small" (hidden 256, 4 layers,
8 experts: benchmarks)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from tessera.errors import TesseraError

__all__ = ["MODELS", "SIZES", "ZooError", "ZooModel", "build", "greedy_decode", "param_count"]


class ZooError(TesseraError):
    """An unknown zoo model or size, or inputs a zoo model cannot take."""


@dataclass(frozen=True)
class Size:
    hidden: int
    layers: int
    heads: int
    kv_heads: int
    experts: int
    top_k: int
    vocab: int
    max_positions: int = 512


SIZES = {"tiny": Size(hidden=64, layers=2, heads=4, kv_heads=2, experts=4, top_k=2, vocab=512),
         "small": Size(hidden=256, layers=4, heads=8, kv_heads=4, experts=8, top_k=2,
                       vocab=4096)}


@dataclass(frozen=True)
class ZooModel:
    """A model and builders of its example inputs: `inputs(batch, seq)` gives the
    arguments of a forward (prefill for language models); `decode(batch, cache_len)` those
    of a 1-token decode step (language models only). `positions`: the tokens a language
    model takes in all (prompt and cache)."""

    name: str
    model: nn.Module
    make_inputs: Callable[[int, int], tuple[Any, ...]]
    make_decode: Callable[[int, int], tuple[Any, ...]] | None = None
    positions: int = 0

    @property
    def is_lm(self) -> bool:
        return self.make_decode is not None

    def inputs(self, batch: int, seq: int) -> tuple[Any, ...]:
        # a language model's seq 0 is its empty cache (what a prefill starts from)
        self._check("inputs", batch, seq, 0 if self.is_lm else 1)
        return self.make_inputs(batch, seq)

    def decode(self, batch: int, cache_len: int) -> tuple[Any, ...]:
        if self.make_decode is None:
            raise ZooError(f"zoo model {self.name} is not a language model: it does not "
                           "decode")
        self._check("decode", batch, cache_len + 1, 1)
        return self.make_decode(batch, cache_len)

    def _check(self, what: str, batch: int, seq: int, least: int) -> None:
        limit = self.positions or None
        if batch < 1 or seq < least or (limit is not None and seq > limit):
            raise ZooError(f"zoo model {self.name}: {what} for batch {batch} and "
                           f"{seq} tokens", hint=f"batch >= 1, {least} <= tokens"
                           + (f" <= {limit}" if limit else ""))


def _generator(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _ids(vocab: int, batch: int, seq: int, seed: int) -> torch.Tensor:
    return torch.randint(0, vocab, (batch, seq), generator=_generator(seed))


def _frozen(model: nn.Module) -> nn.Module:
    return model.eval().requires_grad_(False)


# -- BERT ---------------------------------------------------------------------------------
class Bert(nn.Module):
    """transformers' BertModel; returns (last_hidden_state, pooler_output)."""

    def __init__(self, s: Size) -> None:
        super().__init__()
        from transformers import BertConfig, BertModel
        torch.manual_seed(0)
        config = BertConfig(vocab_size=s.vocab, hidden_size=s.hidden,
                            num_hidden_layers=s.layers, num_attention_heads=s.heads,
                            intermediate_size=4 * s.hidden,
                            max_position_embeddings=s.max_positions)
        self.bert = BertModel(config)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor
                ) -> tuple[torch.Tensor, torch.Tensor]:
        out = self.bert(input_ids=input_ids, attention_mask=attention_mask)
        return out.last_hidden_state, out.pooler_output


def _bert(s: Size) -> ZooModel:
    model = _frozen(Bert(s))

    def inputs(batch: int, seq: int) -> tuple[Any, ...]:
        # sequence b > 0 keeps its first seq - b * seq // (2 * batch) tokens, sequence 0
        # all but one: the last ones pad
        lengths = torch.tensor([seq - b * seq // (2 * batch) - (b == 0 and seq > 1)
                                for b in range(batch)])
        mask = (torch.arange(seq)[None, :] < lengths[:, None]).long()
        return _ids(s.vocab, batch, seq, seq), mask

    return ZooModel("bert", model, inputs, positions=s.max_positions)


# -- language models: one calling convention ------------------------------------------------
def _lm(name: str, model: nn.Module, s: Size, kv_heads: int, head_dim: int) -> ZooModel:
    layers = s.layers

    def cache(batch: int, length: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
        shape = (layers, batch, kv_heads, length, head_dim)
        g = _generator(seed)
        return torch.randn(shape, generator=g), torch.randn(shape, generator=g)

    def inputs(batch: int, seq: int) -> tuple[Any, ...]:
        return (_ids(s.vocab, batch, seq, seq), *cache(batch, 0, 0))

    def decode(batch: int, cache_len: int) -> tuple[Any, ...]:
        return (_ids(s.vocab, batch, 1, cache_len), *cache(batch, cache_len, cache_len))

    return ZooModel(name, model, inputs, decode, s.max_positions)


class HFCausalLM(nn.Module):
    """A transformers causal LM behind the zoo's convention: the stacked cache tensors
    become a DynamicCache inside the forward, and the grown cache comes back stacked."""

    def __init__(self, lm: nn.Module) -> None:
        super().__init__()
        self.lm = lm

    def forward(self, input_ids: torch.Tensor, keys: torch.Tensor, values: torch.Tensor
                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        from transformers import DynamicCache
        cache = DynamicCache(list(zip(keys, values, strict=True))) if keys.shape[3] \
            else DynamicCache(config=self.lm.config)
        out = self.lm(input_ids=input_ids, cache=cache, use_cache=True)
        layers = out.cache.layers
        return (out.logits, torch.stack([la.keys for la in layers]),
                torch.stack([la.values for la in layers]))


def _gpt2(s: Size) -> ZooModel:
    from transformers import GPT2Config, GPT2LMHeadModel
    torch.manual_seed(1)
    config = GPT2Config(vocab_size=s.vocab, n_embd=s.hidden, n_layer=s.layers, n_head=s.heads,
                        n_positions=s.max_positions)
    model = _frozen(HFCausalLM(GPT2LMHeadModel(config)))
    return _lm("gpt2", model, s, s.heads, s.hidden // s.heads)


def _mixtral(s: Size) -> ZooModel:
    """transformers' MixtralForCausalLM with its experts run the eager way (the loop over
    the experts some token picked), which is what the graph compiler must capture."""
    from transformers import MixtralConfig, MixtralForCausalLM
    torch.manual_seed(2)
    config = MixtralConfig(vocab_size=s.vocab, hidden_size=s.hidden,
                           intermediate_size=2 * s.hidden, num_hidden_layers=s.layers,
                           num_attention_heads=s.heads, num_key_value_heads=s.kv_heads,
                           num_local_experts=s.experts, num_experts_per_tok=s.top_k,
                           max_position_embeddings=s.max_positions,
                           experts_implementation="eager")
    model = _frozen(HFCausalLM(MixtralForCausalLM(config)))
    return _lm("mixtral", model, s, s.kv_heads, s.hidden // s.heads)


# -- an MoE decoder LM written in torch (Mixtral / Qwen-MoE style) ------------------------
class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.weight * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps))


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    a, b = x.chunk(2, dim=-1)
    return torch.cat((-b, a), dim=-1)


class Attention(nn.Module):
    """Grouped-query attention with rotary positions; the new keys and values are
    appended to the cache passed in."""

    def __init__(self, s: Size) -> None:
        super().__init__()
        self.heads, self.kv_heads, self.head_dim = s.heads, s.kv_heads, s.hidden // s.heads
        self.q = nn.Linear(s.hidden, s.heads * self.head_dim, bias=False)
        self.k = nn.Linear(s.hidden, s.kv_heads * self.head_dim, bias=False)
        self.v = nn.Linear(s.hidden, s.kv_heads * self.head_dim, bias=False)
        self.o = nn.Linear(s.heads * self.head_dim, s.hidden, bias=False)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                k_cache: torch.Tensor, v_cache: torch.Tensor
                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        b, t, _ = x.shape
        q = self.q(x).view(b, t, self.heads, self.head_dim).transpose(1, 2)
        k = self.k(x).view(b, t, self.kv_heads, self.head_dim).transpose(1, 2)
        v = self.v(x).view(b, t, self.kv_heads, self.head_dim).transpose(1, 2)
        q = q * cos + _rotate_half(q) * sin
        k = k * cos + _rotate_half(k) * sin
        k = torch.cat((k_cache, k), dim=2)
        v = torch.cat((v_cache, v), dim=2)
        group = self.heads // self.kv_heads
        kk = k.repeat_interleave(group, dim=1)
        vv = v.repeat_interleave(group, dim=1)
        # causal over the new tokens, which come after the whole cache
        out = F.scaled_dot_product_attention(q, kk, vv, is_causal=t > 1 and k_cache.shape[2] == 0)
        return self.o(out.transpose(1, 2).reshape(b, t, -1)), k, v


class Expert(nn.Module):
    def __init__(self, hidden: int, inter: int) -> None:
        super().__init__()
        self.w1 = nn.Linear(hidden, inter, bias=False)
        self.w3 = nn.Linear(hidden, inter, bias=False)
        self.w2 = nn.Linear(inter, hidden, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.w2(F.silu(self.w1(x)) * self.w3(x))


class SparseMoe(nn.Module):
    """The MoE block as Mixtral's and Qwen-MoE's reference code writes it: router softmax
    and top-k, renormalized; a Python loop over the experts, each taking its tokens with
    torch.where and adding its weighted output back with index_add_; plus a shared expert
    behind a sigmoid gate (Qwen-MoE)."""

    def __init__(self, s: Size) -> None:
        super().__init__()
        self.top_k = s.top_k
        self.gate = nn.Linear(s.hidden, s.experts, bias=False)
        self.experts = nn.ModuleList(Expert(s.hidden, 2 * s.hidden) for _ in range(s.experts))
        self.shared = Expert(s.hidden, 2 * s.hidden)
        self.shared_gate = nn.Linear(s.hidden, 1, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, h = x.shape
        x = x.reshape(-1, h)
        weights = F.softmax(self.gate(x), dim=-1, dtype=torch.float)
        weights, chosen = torch.topk(weights, self.top_k, dim=-1)
        weights = (weights / weights.sum(dim=-1, keepdim=True)).to(x.dtype)
        out = torch.zeros_like(x)
        mask = F.one_hot(chosen, num_classes=len(self.experts)).permute(2, 1, 0)
        for e, expert in enumerate(self.experts):
            slot, token = torch.where(mask[e])
            y = expert(x[token]) * weights[token, slot, None]
            out.index_add_(0, token, y.to(x.dtype))
        out = out + torch.sigmoid(self.shared_gate(x)) * self.shared(x)
        return out.reshape(b, t, h)


class MoeLM(nn.Module):
    """A decoder LM: embedding, pre-norm blocks of rotary attention and sparse MoE,
    RMSNorm, an LM head. Positions continue after the cache."""

    def __init__(self, s: Size, theta: float = 10000.0) -> None:
        super().__init__()
        torch.manual_seed(3)
        head_dim = s.hidden // s.heads
        self.embed = nn.Embedding(s.vocab, s.hidden)
        self.blocks = nn.ModuleList(nn.ModuleDict({
            "norm1": RMSNorm(s.hidden), "attn": Attention(s), "norm2": RMSNorm(s.hidden),
            "moe": SparseMoe(s)}) for _ in range(s.layers))
        self.norm = RMSNorm(s.hidden)
        self.head = nn.Linear(s.hidden, s.vocab, bias=False)
        self.register_buffer("inv_freq", 1.0 / theta ** (torch.arange(0, head_dim, 2).float()
                                                         / head_dim), persistent=False)

    def forward(self, input_ids: torch.Tensor, keys: torch.Tensor, values: torch.Tensor
                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        t = input_ids.shape[1]
        start = keys.shape[3]
        freqs = torch.arange(start, start + t, dtype=torch.float32)[:, None] * self.inv_freq
        emb = torch.cat((freqs, freqs), dim=-1)
        cos, sin = emb.cos(), emb.sin()
        x = self.embed(input_ids)
        new_k, new_v = [], []
        for i, blk in enumerate(self.blocks):
            a, k, v = blk["attn"](blk["norm1"](x), cos, sin, keys[i], values[i])
            x = x + a
            x = x + blk["moe"](blk["norm2"](x))
            new_k.append(k)
            new_v.append(v)
        return self.head(self.norm(x)), torch.stack(new_k), torch.stack(new_v)


def _moe_lm(s: Size) -> ZooModel:
    return _lm("moe_lm", _frozen(MoeLM(s)), s, s.kv_heads, s.hidden // s.heads)


# -- a ResNet-style CNN -------------------------------------------------------------------
class BasicBlock(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.down = None if stride == 1 and cin == cout else nn.Sequential(
            nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.relu(self.bn1(self.conv1(x)))
        y = self.bn2(self.conv2(y))
        return F.relu(y + (x if self.down is None else self.down(x)))


class ResNet(nn.Module):
    """Stem conv 3x3, max-pool, `layers` stages of two basic blocks (channels doubling,
    stride 2 after the first), global average pool, a classifier."""

    def __init__(self, s: Size, classes: int = 100) -> None:
        super().__init__()
        torch.manual_seed(4)
        width = s.hidden // 4
        self.stem = nn.Sequential(nn.Conv2d(3, width, 3, 1, 1, bias=False),
                                  nn.BatchNorm2d(width), nn.ReLU(),
                                  nn.MaxPool2d(3, 2, 1))
        stages, cin = [], width
        for i in range(s.layers):
            cout = width * 2 ** i
            stages += [BasicBlock(cin, cout, 1 if i == 0 else 2), BasicBlock(cout, cout, 1)]
            cin = cout
        self.stages = nn.Sequential(*stages)
        self.fc = nn.Linear(cin, classes)
        for m in self.modules():  # running statistics that are not the identity
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.uniform_(-0.1, 0.1)
                m.running_var.uniform_(0.5, 1.5)
                m.weight.data.uniform_(0.5, 1.5)
                m.bias.data.uniform_(-0.1, 0.1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stages(self.stem(x))
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(x, 1), 1))


def _resnet(s: Size) -> ZooModel:
    model = _frozen(ResNet(s))

    def inputs(batch: int, seq: int) -> tuple[Any, ...]:
        return (torch.randn(batch, 3, seq, seq, generator=_generator(seq)),)

    return ZooModel("resnet", model, inputs)


MODELS: dict[str, Callable[[Size], ZooModel]] = {
    "bert": _bert, "gpt2": _gpt2, "resnet": _resnet, "moe_lm": _moe_lm, "mixtral": _mixtral}


def build(name: str, size: str = "tiny") -> ZooModel:
    """The zoo model `name` (one of MODELS) at `size` (one of SIZES), weights seeded."""
    if name not in MODELS:
        raise ZooError(f"no zoo model {name!r}", hint=f"models: {', '.join(MODELS)}")
    if size not in SIZES:
        raise ZooError(f"no zoo size {size!r}", hint=f"sizes: {', '.join(SIZES)}")
    return MODELS[name](SIZES[size])


def greedy_decode(step: Callable[..., Any], zoo: ZooModel, prompt: torch.Tensor, tokens: int
                  ) -> torch.Tensor:
    """`tokens` new token ids [batch, tokens] picked greedily by `step` (the zoo language
    model, eager or compiled): a prefill of `prompt`, then one call per token against the
    grown cache."""
    if not zoo.is_lm:
        raise ZooError(f"zoo model {zoo.name} is not a language model: it does not decode")
    if tokens < 1 or prompt.ndim != 2 or prompt.shape[1] < 1:
        raise ZooError(f"greedy_decode takes a prompt [batch, >=1 tokens] and tokens >= 1; "
                       f"got prompt {list(prompt.shape)}, tokens={tokens}")
    zoo._check("greedy_decode", prompt.shape[0], prompt.shape[1] + tokens - 1, 1)
    _, k, v = zoo.inputs(prompt.shape[0], 0)
    ids, out = prompt, []
    for _ in range(tokens):
        logits, k, v = step(ids, k, v)
        ids = logits[:, -1].argmax(-1, keepdim=True)
        out.append(ids)
    return torch.cat(out, dim=1)


def param_count(model: nn.Module) -> int:
    """Parameters of `model` (tied weights once)."""
    return sum(p.numel() for p in {id(p): p for p in model.parameters()}.values())
