"""The built-in pattern rewrites (patterns.py), applied by the graph compiler after CSE
and DCE and before fusion, each written the way models write it:

- attention: softmax(q @ k^T * scale [+ mask | masked_fill]) @ v (BERT, GPT-2, Llama, as
  their eager code writes it) -> scaled_dot_product_attention (the flash template: the
  scores never exist); aten's flash attention with its logsumexp unused -> the same op;
- rotary positions written out (x * cos + rotate_half(x) * sin) -> rotary_embedding;
- RMSNorm and LayerNorm written out -> rms_norm / layer_norm; GELU written out -> gelu;
- gate/up projections, SiLU and the product -> one SwiGLU GEMM ([gate | up] weights
  folded into one constant, the pairing done in the GEMM's final store);
- a linear (addmm / mm, as AOTAutograd writes nn.Linear and GPT-2's Conv1D) followed by
  an activation and/or a residual add -> one GEMM with those fused into its epilogue; a
  bias alone too (one pass instead of a broadcast then the product).

Epilogues (activations, residuals, SwiGLU's pairing) are fused only at sizes where that
measured faster than separate kernels (`_epilogue_pays`); a bias always is. When the
compiler fuses pointwise and row-op chains afterwards (its default), written-out norms
and GELU are left to it: its generated kernel for the chain measured faster than the ops
(one thread, interleaved medians, 8 x 128 x 1024: RMSNorm 0.61 ms fused chain vs 0.73
ms rms_norm, LayerNorm 0.89 vs 0.93, GELU-tanh 1.92 vs 2.32).

A pattern is traced the first time a graph holds the ops it `needs` (30-60 ms each).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from functools import cache
from typing import Any

import torch
import torch.nn.functional as F

from tessera.graph.frontend import RESHAPES, place_copies
from tessera.graph.ir import Graph, Node, Value
from tessera.graph.patterns import (
    Match,
    Pattern,
    _dim,
    _equal,
    registered,
    rewrite,
    underlying,
)

__all__ = ["builtins", "run", "swiglu_matmul"]

_tessera = torch.ops.tessera


def run(graph: Graph, fusion: bool = True) -> dict[str, int]:
    """The user's patterns, then the built-in ones, to a fixed point in place; how many
    times each fired. `fusion`: chains are fused afterwards (norms and GELU written out
    are then left alone)."""
    counts = rewrite(graph, [*registered(), *builtins(fusion)])
    grouped = _grouped_queries(graph)
    if grouped:
        counts["grouped_query_attention"] = grouped
    if counts:  # the readers changed: transposes a rewritten reader needed copied may
        place_copies(graph)  # now stay views, as the replacement reads strided tensors
    return counts


def builtins(fusion: bool = True) -> list[Pattern]:
    """The built-in rewrites, in the order they are tried (see `run` for `fusion`)."""
    chains = [] if fusion else [*_norm_patterns(), *_gelu_patterns()]
    return [*_attention_patterns(), *_rotary_patterns(), *chains, *_swiglu_patterns(),
            *_linear_patterns()]


def _empty(*shape: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    return torch.empty(shape, dtype=dtype)


def _same_dtype(*names: str) -> Callable[[Match], bool]:
    """A check: the named tensors share the first one's dtype (the replacement's result
    then has the dtype the pattern computed)."""
    return lambda m: all(m[n].dtype == m[names[0]].dtype for n in names if n in m.values)


# -- attention ------------------------------------------------------------------------------
_B, _H, _SQ, _SK, _D, _DV = 2, 3, 5, 7, 8, 4


def _attention(scale: str, mask: str, half: bool = False) -> Pattern:
    """softmax(q @ k^T <scale> <mask>) @ v. scale: "mul", "div" or "none"; mask: "none",
    "add" (a float mask added) or "fill" (masked_fill(mask, -inf): True drops); half:
    softmax in float32 between casts (Llama in half precision)."""
    def scores(q: Any, k: Any, s: Any, m: Any) -> Any:
        x = torch.matmul(q, k.transpose(-2, -1))
        x = x * s if scale == "mul" else x / s if scale == "div" else x
        if mask == "add":
            x = x + m
        elif mask == "fill":
            x = x.masked_fill(m, float("-inf"))
        p = F.softmax(x, dim=-1, dtype=torch.float32).to(q.dtype) if half else \
            F.softmax(x, dim=-1)
        return p

    def sdpa(q: Any, k: Any, v: Any, s: Any, m: Any) -> Any:
        factor = s if scale == "mul" else 1.0 / s if scale == "div" else 1.0
        keep = None if mask == "none" else m if mask == "add" else torch.logical_not(m)
        return _tessera.scaled_dot_product_attention(q, k, v, keep, False, factor)

    dtype = torch.bfloat16 if half else torch.float32
    qkv = [_empty(_B, _H, _SQ, _D, dtype=dtype), _empty(_B, _H, _SK, _D, dtype=dtype),
           _empty(_B, _H, _SK, _DV, dtype=dtype)]
    mask_example = _empty(_B, _H, _SQ, _SK, dtype=torch.bool if mask == "fill" else dtype)
    name = f"attention_{scale}_{mask}" + ("_half" if half else "")
    needs = ("bmm", "softmax")
    if scale == "none" and mask == "none":
        return Pattern(lambda q, k, v: torch.matmul(scores(q, k, None, None), v), qkv,
                       replace=lambda q, k, v: sdpa(q, k, v, None, None), name=name,
                       needs=needs)
    if scale == "none":
        return Pattern(lambda q, k, v, mask: torch.matmul(scores(q, k, None, mask), v),
                       [*qkv, mask_example], broadcast=("mask",), name=name, needs=needs,
                       replace=lambda q, k, v, mask: sdpa(q, k, v, None, mask))
    if mask == "none":
        return Pattern(lambda q, k, v, scale: torch.matmul(scores(q, k, scale, None), v),
                       [*qkv, 0.125], name=name, needs=needs,
                       replace=lambda q, k, v, scale: sdpa(q, k, v, scale, None))
    return Pattern(lambda q, k, v, mask, scale: torch.matmul(scores(q, k, scale, mask), v),
                   [*qkv, mask_example, 0.125], broadcast=("mask",), name=name, needs=needs,
                   replace=lambda q, k, v, mask, scale: sdpa(q, k, v, scale, mask))


def _drop_lse(masked: bool) -> Pattern:
    """aten's CPU flash attention (scaled_dot_product_attention_lse) whose logsumexp
    nothing reads -> scaled_dot_product_attention, which may then take the decode path;
    grouped-query attention (fewer k/v heads, which aten's op accepts) is kept as such."""
    def build(m: Match) -> Value:
        node = m.node("scaled_dot_product_attention_lse_0")
        args = dict(node.args)
        args["enable_gqa"] = bool(args["enable_gqa"]) or \
            node.args["q"].shape[1] != node.args["k"].shape[1]
        return m.emit("scaled_dot_product_attention", args, like=m.output)

    qkv = [_empty(_B, 6, _SQ, _D), _empty(_B, _H, _SK, _D), _empty(_B, _H, _SK, _DV)]
    ops = {"scaled_dot_product_attention_lse_0": ["scaled_dot_product_attention_lse"]}
    needs = ("scaled_dot_product_attention_lse",)
    if masked:
        return Pattern(lambda q, k, v, mask:
                       _tessera.scaled_dot_product_attention_lse(q, k, v, mask, False, None,
                                                                 True)[0],
                       [*qkv, _empty(_B, 6, _SQ, _SK)], build=build, ops=ops, needs=needs,
                       broadcast=("mask",), name="flash_attention_lse_masked")
    return Pattern(lambda q, k, v:
                   _tessera.scaled_dot_product_attention_lse(q, k, v, None, False, None,
                                                             True)[0],
                   qkv, build=build, ops=ops, needs=needs, name="flash_attention_lse")


@cache
def _attention_patterns() -> list[Pattern]:
    return [*(_attention(s, m) for s in ("mul", "div", "none")
              for m in ("add", "fill", "none")),
            _attention("mul", "add", half=True), _drop_lse(True), _drop_lse(False)]


def _grouped_queries(graph: Graph) -> int:
    """Attention on keys and values repeated per query group (repeat_interleave(k, G, 1),
    Hugging Face's repeat_kv: unsqueeze, expand, reshape) -> attention on the keys and
    values as they are with enable_gqa (query head h reads kv head h // G, as repeated),
    so the repeats are never materialized. In place; how many attention nodes changed."""
    changed = 0
    for n in graph.nodes:
        if n.op not in _ATTENTION:
            continue
        k, v = _unrepeated(n.args["k"]), _unrepeated(n.args["v"])
        if k is not None and v is not None and _equal(k.shape[1], v.shape[1]):
            n.args.update(k=k, v=v, enable_gqa=True)
            changed += 1
    return changed


_ATTENTION = ("scaled_dot_product_attention", "scaled_dot_product_attention_lse")


def _unrepeated(r: Any) -> Value | None:
    """x where r [B, H * G, S, D] is x [B, H, S, D] with each head repeated G times in
    place (x.unsqueeze(2).expand(B, H, G, S, D) reshaped), else None."""
    if not isinstance(r, Value) or len(r.shape) != 4 or r.producer is None or \
            r.producer.op not in RESHAPES:
        return None
    e = underlying(r.producer.args["args"][0])
    if e.producer is None or e.producer.op != "view:expand.default":
        return None
    u = underlying(e.producer.args["args"][0])
    if u.producer is None or u.producer.op != "view:unsqueeze.default":
        return None
    x, dim = u.producer.args["args"][:2]
    if not isinstance(x, Value) or len(x.shape) != 4 or dim not in (2, -3):
        return None
    b, h, s, d = x.shape
    group = e.shape[2]
    want = {0: b, 1: h, 3: s, 4: d}
    if not all(_equal(e.shape[i], size) for i, size in want.items()):
        return None
    rows = _dim(h) * _dim(group)
    if not all(_equal(a, w) for a, w in zip(r.shape, (b, rows, s, d), strict=True)):
        return None
    return x


# -- rotary embeddings ---------------------------------------------------------------------
def _rotate_chunks(x: Any) -> Any:
    a, b = x.chunk(2, dim=-1)
    return torch.cat((-b, a), dim=-1)


def _rotate_slices(x: Any) -> Any:
    """Hugging Face's rotate_half."""
    return torch.cat((-x[..., x.shape[-1] // 2:], x[..., :x.shape[-1] // 2]), dim=-1)


def _rotary_check(m: Match) -> bool:
    """cos and sin broadcast to x the way the op reads them ([S, D], or 4-D; a 3-D table
    is [B, S, D] to the op) over all of x's features."""
    x = m["x"]
    return _same_dtype("x", "cos", "sin")(m) and all(
        (len(t.shape) in (2, 4) or (len(t.shape) == 3 and t.shape[0] == 1))
        and _equal(t.shape[-1], x.shape[-1]) for t in (m["cos"], m["sin"]))


@cache
def _rotary_patterns() -> list[Pattern]:
    """x * cos + rotate_half(x) * sin (Llama / GPT-NeoX rotary positions, written out) ->
    rotary_embedding: one kernel instead of a negation, a concatenation and the products;
    it reads x in any layout (heads transposed from the projection: no copy) and gives its
    result in x's."""
    def rotary(rotate: Callable[[Any], Any]) -> Pattern:
        def fn(x: Any, cos: Any, sin: Any) -> Any:
            return x * cos + rotate(x) * sin

        x, table = _empty(_B, _H, _SQ, _D), _empty(_B, _H, _SQ, _D)
        return Pattern(fn, [x, table, table], broadcast=("cos", "sin"), check=_rotary_check,
                       name=f"rotary{rotate.__name__.removeprefix('_rotate')}",
                       needs=("cat", "neg"),
                       replace=lambda x, cos, sin: _tessera.rotary_embedding(x, cos, sin))
    return [rotary(_rotate_chunks), rotary(_rotate_slices)]


# -- normalizations -----------------------------------------------------------------------
def _rms(x: Any, w: Any, eps: float) -> Any:
    return w * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps))


def _rms_sqrt(x: Any, w: Any, eps: float) -> Any:
    return w * (x / torch.sqrt(x.pow(2).mean(-1, keepdim=True) + eps))


def _rms_half(x: Any, w: Any, eps: float) -> Any:
    """Hugging Face's LlamaRMSNorm: statistics in float32, weight applied after the cast
    back."""
    h = x.to(torch.float32)
    h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)
    return w * h.to(x.dtype)


def _rms_plain(x: Any, eps: float) -> Any:
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps)


def _layer_norm(x: Any, w: Any, b: Any, eps: float) -> Any:
    """The original BERT / GPT-2 LayerNorm modules."""
    u = x.mean(-1, keepdim=True)
    s = (x - u).pow(2).mean(-1, keepdim=True)
    return w * ((x - u) / torch.sqrt(s + eps)) + b


def _layer_norm_var(x: Any, w: Any, b: Any, eps: float) -> Any:
    u = x.mean(-1, keepdim=True)
    return (x - u) / torch.sqrt(x.var(-1, keepdim=True, unbiased=False) + eps) * w + b


def _layer_norm_rsqrt(x: Any, w: Any, b: Any, eps: float) -> Any:
    u = x.mean(-1, keepdim=True)
    return (x - u) * torch.rsqrt(x.var(-1, keepdim=True, unbiased=False) + eps) * w + b


@cache
def _norm_patterns() -> list[Pattern]:
    found = []  # LayerNorm first: it is an RMSNorm of x - mean
    for rows in ((6,), (2, 3)):
        x = _empty(*rows, 16)
        found += [
            Pattern(fn, [x, _empty(16), _empty(16), 1e-5],
                    name=f"{fn.__name__[1:]}_{len(rows) + 1}d",
                    check=_same_dtype("x", "w", "b"), needs=needs,
                    replace=lambda x, w, b, eps: _tessera.layer_norm(x, [x.shape[-1]], w, b,
                                                                     eps))
            for fn, needs in ((_layer_norm, ("mean", "sqrt")), (_layer_norm_var, ("var", "sqrt")),
                              (_layer_norm_rsqrt, ("var", "rsqrt")))]
        found += [
            Pattern(fn, [x, _empty(16), 1e-6], name=f"{fn.__name__[1:]}_{len(rows) + 1}d",
                    check=_same_dtype("x", "w"), needs=("mean", root),
                    replace=lambda x, w, eps: _tessera.rms_norm(x, [x.shape[-1]], w, eps))
            for fn, root in ((_rms, "rsqrt"), (_rms_sqrt, "sqrt"))]
        found.append(Pattern(_rms_half, [x.bfloat16(), _empty(16).bfloat16(), 1e-6],
                             name=f"rms_half_{len(rows) + 1}d", check=_same_dtype("x", "w"),
                             needs=("mean", "rsqrt"),
                             replace=lambda x, w, eps: _tessera.rms_norm(
                                 x, [x.shape[-1]], w, eps)))
        found.append(Pattern(_rms_plain, [x, 1e-6], name=f"rms_plain_{len(rows) + 1}d",
                             needs=("mean", "rsqrt"),
                             replace=lambda x, eps: _tessera.rms_norm(x, [x.shape[-1]],
                                                                      None, eps)))
    return found


# -- GELU written out -------------------------------------------------------------------------
def _gelu_tanh(x: Any) -> Any:
    """GPT-2's (Hugging Face's NewGELUActivation)."""
    return 0.5 * x * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) *
                                       (x + 0.044715 * torch.pow(x, 3.0))))


def _gelu_erf(x: Any) -> Any:
    """The original BERT's."""
    return x * 0.5 * (1.0 + torch.erf(x / math.sqrt(2.0)))


@cache
def _gelu_patterns() -> list[Pattern]:
    found = []
    for shape in ((6, 16), (2, 3, 16)):
        found.append(Pattern(_gelu_tanh, [_empty(*shape)], name=f"gelu_tanh_{len(shape)}d",
                             needs=("tanh",), replace=lambda x: F.gelu(x, approximate="tanh")))
        found.append(Pattern(_gelu_erf, [_empty(*shape)], name=f"gelu_erf_{len(shape)}d",
                             needs=("erf",), replace=F.gelu))
    return found


# -- GEMMs with epilogues ----------------------------------------------------------------------
_M, _S, _K, _N = 6, 3, 5, 7  # 2-D rows M; 3-D [2, S, K]

# When an epilogue (activation, residual, SwiGLU's pairing) pays, measured on this machine
# (AVX2, one thread, interleaved medians). A product of few rows runs on the template's
# dot-product path (up to DOT_ROWS = 48 rows with an nn.Linear weight, up to STRIP_ROWS =
# 4 with a row-major one; sgemm.c), which applies the epilogue element by element: there
# a separate kernel is faster (32 x 256 -> 1024: gelu 884 us fused, 596 apart; SwiGLU
# 2.27 ms fused, 1.54 ms apart), except on one row (SwiGLU 116 us fused, 153 apart). A
# residual did not pay at any size (32 rows: 708 us fused, 470 apart; 1024 rows: equal,
# and apart the add can join the next norm's kernel): it is fused only past the
# dot-product path. A bias always pays (it replaces a broadcast pass: 848 -> 440 us).
_DOT_ROWS, _STRIP_ROWS = 48, 4


def _rows(x: Value) -> int | None:
    """The rows of a product with left operand x (None if symbolic)."""
    lead = x.shape[:-1]
    return math.prod(lead) if all(isinstance(d, int) for d in lead) else None


def _by_columns(w: Value) -> bool:
    """Whether the weight is stored by columns (an nn.Linear weight's transpose); unknown
    layouts count as such."""
    data = _constant_data(w)
    return data is None or data.dim() != 2 or data.stride(1) != 1


def _epilogue_pays(x: Value, w: Value, residual: bool) -> bool:
    rows = _rows(x)
    if rows is None:
        return False
    if residual:
        return rows > _DOT_ROWS
    return rows == 1 or rows > (_DOT_ROWS if _by_columns(w) else _STRIP_ROWS)


def swiglu_matmul(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """silu(x @ w[:, :N]) * (x @ w[:, N:]) for w = [gate | up] ([K, 2N], any strides) in
    one GEMM whose final store pairs the halves (x [..., K]; the intermediate [.., 2N]
    never exists)."""
    from tessera.ops._launch import ldtype
    from tessera.ops.matmul import _floats
    from tessera.ops.shape import empty
    from tessera.templates.gemm.sgemm import launch, launch_entry

    dtype = _floats("swiglu_matmul", x=x, w=w)
    rows = x.reshape(-1, x.shape[-1])
    (k, n2), m = w.shape, rows.shape[0]
    n = n2 // 2
    out = empty((m, n), dtype)
    if out.numel():
        entry = launch_entry(ldtype(dtype), ldtype(dtype), ldtype(dtype), swiglu=True)
        launch(entry, 1, m, n, k, 1.0, 0.0, rows.data_ptr(), 0, *rows.stride(), 0, 0,
               w.data_ptr(), 0, *w.stride(), 0, 0, 0, out.data_ptr(), 0, *out.stride(),
               0, 0, 0, 0, 0, 0)
    return out.view(*x.shape[:-1], n)


def _constant_data(v: Value) -> torch.Tensor | None:
    """The data of a constant, or of views of one (a weight's transpose), else None."""
    if v.kind == "const":
        return v.data
    n = v.producer
    if n is None or n.kind != "view" or len(n.outputs) != 1:
        return None
    inputs = {u: _constant_data(u) for u in n.inputs()}
    if any(d is None for d in inputs.values()):
        return None
    from tessera.graph.interpreter import node_function
    from tessera.graph.passes import _substitute
    return node_function(n)(_substitute(n.args, inputs))


def _swiglu_build(m: Match) -> Value:
    gate, up = _constant_data(m["wg"]), _constant_data(m["wu"])
    assert gate is not None and up is not None  # _swiglu_check
    # [gate | up] as [K, 2N] stored by columns (as nn.Linear's weights, which the
    # template's skinny path reads best)
    both = torch.cat([gate.t(), up.t()], 0).contiguous().t()
    return m.emit("fused:swiglu", {"args": [m["x"], m.constant(both, "gate_up")],
                                   "kwargs": {}}, fn=swiglu_matmul, like=m.output)


def _swiglu_check(m: Match) -> bool:
    """Constant weights of the input's dtype, and a size where the pairing pays (the
    combined weight is stored by columns)."""
    return _same_dtype("x", "wg", "wu")(m) and _constant_data(m["wg"]) is not None and \
        _constant_data(m["wu"]) is not None and _epilogue_pays(m["x"], m["wg"], False)


@cache
def _swiglu_patterns() -> list[Pattern]:
    def flat(x: Any, wg: Any, wu: Any) -> Any:
        return F.silu(torch.mm(x, wg)) * torch.mm(x, wu)

    def rows(x: Any, wg: Any, wu: Any) -> Any:
        x2 = x.reshape(-1, x.shape[-1])
        lead = x.shape[:-1]
        return F.silu(torch.mm(x2, wg).view(*lead, -1)) * torch.mm(x2, wu).view(*lead, -1)

    w = _empty(_K, _N)
    return [Pattern(flat, [_empty(_M, _K), w, w], name="swiglu_2d", build=_swiglu_build,
                    check=_swiglu_check, needs=("silu", "matmul")),
            Pattern(rows, [_empty(2, _S, _K), w, w], name="swiglu_3d", build=_swiglu_build,
                    check=_swiglu_check, needs=("silu", "matmul"))]


def _activation(n: Node) -> str:
    """The GEMM epilogue's name for an activation node."""
    if n.op == "gelu":
        return "gelu" if n.args.get("approximate", "none") == "none" else "gelu_tanh"
    return n.op


def _linear_build(m: Match) -> Value:
    """linear(x, weight, b, activation=, residual=) on the weight w [K, N] transposes (an
    nn.Linear weight itself where w is its view)."""
    act = _activation(m.node("relu")) if "relu" in m.by_name else None
    w = m["w"]
    n = w.producer
    if n is not None and n.op == "view:t.default" and len(w.shape) == 2:
        weight = n.args["args"][0]
    else:
        weight = m.emit("view:t.default", {"args": [w], "kwargs": {}}, fn=torch.t,
                        like=(w.dtype, w.shape[::-1]), name="weight")
    return m.emit("linear", {"x": m["x"], "weight": weight, "bias": m.values.get("b"),
                             "activation": act, "residual": m.values.get("r")},
                  like=m.output)


def _linear(form: str, act: bool, res: bool) -> Pattern:
    """A linear as AOTAutograd writes it — addmm(b, x, w) or mm(x, w) on x [M, K], or on
    x [.., K] viewed as rows and the result viewed back — then an activation (any the GEMM
    fuses) and/or a residual added."""
    bias = form.startswith("addmm")

    def product(x: Any, w: Any, b: Any) -> Any:
        x2 = x if form.endswith("2d") else x.reshape(-1, x.shape[-1])
        y = torch.addmm(b, x2, w) if bias else torch.mm(x2, w)
        y = y if form.endswith("2d") else y.view(*x.shape[:-1], -1)
        return F.relu(y) if act else y

    x = _empty(_M, _K) if form.endswith("2d") else _empty(2, _S, _K)
    out = (*x.shape[:-1], _N)
    if bias and res:
        fn, examples = (lambda x, w, b, r: product(x, w, b) + r), \
            [x, _empty(_K, _N), _empty(_N), _empty(*out)]
    elif bias:
        fn, examples = (lambda x, w, b: product(x, w, b)), [x, _empty(_K, _N), _empty(_N)]
    elif res:
        fn, examples = (lambda x, w, r: product(x, w, None) + r), \
            [x, _empty(_K, _N), _empty(*out)]
    else:
        fn, examples = (lambda x, w: product(x, w, None)), [x, _empty(_K, _N)]
    name = f"linear_{form}" + ("_act" if act else "") + ("_residual" if res else "")
    same = _same_dtype("x", "w", "b", "r")

    def check(m: Match) -> bool:
        return same(m) and (not (act or res) or _epilogue_pays(m["x"], m["w"], res))

    return Pattern(fn, examples, build=_linear_build, name=name, check=check,
                   broadcast=("r",) if res else (),
                   needs=("addmm" if bias else "matmul", *(("add",) if res else ())),
                   ops={"relu": ["gelu", "silu", "sigmoid", "tanh"]} if act else None)


@cache
def _linear_patterns() -> list[Pattern]:
    forms = ("addmm_3d", "mm_3d", "addmm_2d", "mm_2d")
    return [*(_linear(f, act, res) for act, res in ((True, True), (True, False),
                                                    (False, True)) for f in forms),
            _linear("addmm_3d", False, False), _linear("addmm_2d", False, False)]
