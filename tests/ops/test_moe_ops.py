"""MoE ops against torch: topk (ties and NaN included), routing, the permutation into expert
groups and back, grouped expert GEMMs, and fused_moe against Hugging Face Mixtral's eager
loop over the experts (fp32, bf16, int8/int4 experts against their dequantized values);
fake implementations; bad input."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from opcheck import check, close

import tessera.ops as O
from marks import slow_after
from tessera.errors import DtypeError, ShapeError
from tessera.ops import ArgumentError

NAN, INF = float("nan"), float("inf")


@pytest.fixture(autouse=True)
def _seed() -> None:
    """The same random inputs whatever order (and worker) the tests run in."""
    torch.manual_seed(0)


def hf_moe(x: torch.Tensor, logits: torch.Tensor, w_gate_up: torch.Tensor,
           w_down: torch.Tensor, top_k: int) -> torch.Tensor:
    """transformers' MixtralSparseMoeBlock.forward after the router: softmax, top-k,
    renormalize, then a loop over all experts with torch.where on the one-hot mask, the
    expert MLP w2(silu(w1(x)) * w3(x)) in x's dtype, index_add_ into the output. Here w1
    and w3 are the gate and up halves of w_gate_up [E, H, 2I], w2 is w_down [E, I, H]."""
    num_experts, hidden_dim = w_gate_up.shape[0], x.shape[-1]
    inter = w_down.shape[1]
    hidden_states = x.reshape(-1, hidden_dim)
    routing_weights = F.softmax(logits.reshape(-1, num_experts), dim=1, dtype=torch.float)
    routing_weights, selected_experts = torch.topk(routing_weights, top_k, dim=-1)
    routing_weights /= routing_weights.sum(dim=-1, keepdim=True)
    routing_weights = routing_weights.to(hidden_states.dtype)
    final_hidden_states = torch.zeros_like(hidden_states)
    expert_mask = F.one_hot(selected_experts, num_classes=num_experts).permute(2, 1, 0)
    for expert_idx in range(num_experts):
        idx, top_x = torch.where(expert_mask[expert_idx])
        if top_x.numel() == 0:
            continue
        current_state = hidden_states[None, top_x].reshape(-1, hidden_dim)
        w1 = w_gate_up[expert_idx, :, :inter].to(x.dtype)
        w3 = w_gate_up[expert_idx, :, inter:].to(x.dtype)
        w2 = w_down[expert_idx].to(x.dtype)
        current_hidden_states = (F.silu(current_state @ w1) * (current_state @ w3)) @ w2
        current_hidden_states = current_hidden_states * routing_weights[top_x, idx, None]
        final_hidden_states.index_add_(0, top_x, current_hidden_states.to(x.dtype))
    return final_hidden_states.view(x.shape)


def _experts(e: int, h: int, inter: int, dtype: torch.dtype = torch.float32
             ) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(e * 1000 + h)
    return ((torch.randn(e, h, 2 * inter, generator=g) / h ** 0.5).to(dtype),
            (torch.randn(e, inter, h, generator=g) / inter ** 0.5).to(dtype))


# -- topk ----------------------------------------------------------------------------------
def _stable_topk(x: torch.Tensor, k: int, dim: int, largest: bool
                 ) -> tuple[torch.Tensor, torch.Tensor]:
    """torch.topk with ties to the lowest index: a stable sort (NaN above all numbers)."""
    v, i = torch.sort(x, dim=dim, descending=largest, stable=True)
    return v.narrow(dim, 0, k), i.narrow(dim, 0, k)


@pytest.mark.parametrize("shape,dim,k", [((6, 50), -1, 5), ((50,), 0, 50), ((3, 40, 5), 1, 7),
                                         ((4, 9), 0, 1), ((2, 3, 1000), -1, 64),
                                         ((3, 0), 0, 2), ((0, 8), 1, 3), ((5, 7), 1, 0)])
@pytest.mark.parametrize("largest", [True, False])
@pytest.mark.parametrize("dtype", slow_after(2, [torch.float32, torch.bfloat16, torch.int32,
                                                 torch.float16, torch.int8]))
def test_topk(shape: tuple[int, ...], dim: int, k: int, largest: bool,
              dtype: torch.dtype) -> None:
    x = (torch.randn(shape) * 50).to(dtype)  # integer and 16-bit dtypes: many ties
    close(O.topk(x, k, dim, largest), _stable_topk(x, k, dim, largest), what="topk")
    if dtype == torch.float32:  # distinct values: exactly torch's answer
        distinct = torch.randperm(x.numel()).view(shape) * 0.37 - 5
        check("topk", distinct, k, dim, largest)


def test_topk_nan_inf_and_ties_as_torch() -> None:
    x = torch.tensor([1.0, 3, 3, 2, 3, NAN, NAN, -INF, INF, -INF])
    for k in range(11):
        for largest in (True, False):
            got = O.topk(x, k, largest=largest)
            close(got, _stable_topk(x, k, 0, largest))
            want = torch.topk(x, k, largest=largest).values  # torch's values, any tie order
            close(got[0], want)


def test_topk_unsorted_views_and_scalars() -> None:
    x = torch.randn(40, 30).t()  # non-contiguous, topk along the strided dim
    v, i = O.topk(x, 6, dim=1, sorted=False)
    want_v, want_i = torch.topk(x, 6, dim=1)
    order = i.argsort(dim=1)
    close(v.gather(1, order), want_v.gather(1, want_i.argsort(dim=1)))
    assert torch.equal(i.sort(dim=1).values, want_i.sort(dim=1).values)
    check("topk", torch.tensor(2.5), 1)
    check("topk", torch.tensor(2.5), 0, 0, False)
    v, i = O.topk(np.array([3.0, 1.0, 2.0], np.float32), 2)  # numpy in, numpy out
    assert isinstance(v, np.ndarray) and v.tolist() == [3.0, 2.0] and i.tolist() == [0, 2]


def test_topk_bad_input() -> None:
    x = torch.randn(4, 5)
    with pytest.raises(ArgumentError, match="topk: k=6"):
        O.topk(x, 6)
    with pytest.raises(ArgumentError, match="topk: k=-1"):
        O.topk(x, -1)
    with pytest.raises(ShapeError, match="topk: dim=2"):
        O.topk(x, 1, dim=2)
    with pytest.raises(DtypeError, match="topk: argument 'x' has dtype float64"):
        O.topk(x.double(), 1)


# -- routing ---------------------------------------------------------------------------------
@pytest.mark.parametrize("tokens,experts,top_k", [(1, 8, 2), (37, 64, 8), (5, 60, 6),
                                                  (0, 8, 2), (9, 3, 3), (4, 256, 8)])
@pytest.mark.parametrize("renormalize", [True, False])
def test_moe_route(tokens: int, experts: int, top_k: int, renormalize: bool) -> None:
    logits = torch.randn(tokens, experts) * 3
    check("moe_route", logits, top_k, renormalize)


def test_moe_route_sigmoid_bias_scaling_and_dtypes() -> None:
    logits = torch.randn(2, 7, 16)
    bias = torch.randn(16) * 0.1
    check("moe_route", logits, 4, True, scoring="sigmoid", correction_bias=bias,
          routed_scaling=2.5)
    check("moe_route", logits, 4, False, scoring="sigmoid")
    # 16-bit logits: distinct values in every row (ties would leave torch's choice open)
    distinct = (torch.stack([torch.randperm(32) for _ in range(6)]) / 8).to(torch.bfloat16)
    check("moe_route", distinct, 5)
    check("moe_route", distinct.to(torch.float16)[:, ::2], 3)  # and a strided view


def test_moe_route_group_limited() -> None:
    """DeepSeek-V3 (sigmoid, bias, groups scored by their two best) and V2 (softmax,
    groups scored by their best)."""
    check("moe_route", torch.randn(9, 256), 8, True, scoring="sigmoid",
          correction_bias=torch.randn(256) * 0.1, routed_scaling=2.5, n_group=8,
          topk_group=4)
    check("moe_route", torch.randn(9, 64), 6, False, n_group=8, topk_group=3)
    check("moe_route", torch.randn(3, 16), 4, n_group=4, topk_group=1)  # one group


def test_moe_route_refuses_nan_and_inf() -> None:
    logits = torch.randn(5, 8)
    for bad in (NAN, INF, -INF):
        z = logits.clone()
        z[3, 6] = bad
        with pytest.raises(ArgumentError, match="moe_route: argument 'router_logits' has "
                                                "NaN or infinity in row 3"):
            O.moe_route(z, 2)
        with pytest.raises(ArgumentError, match=r"fused_moe: .* row 3"):
            O.fused_moe(torch.randn(5, 16), z, *_experts(8, 16, 8), 2)
    with pytest.raises(ArgumentError, match="correction_bias"):
        O.moe_route(logits, 2, correction_bias=torch.full((8,), NAN))


def test_moe_route_bad_input() -> None:
    logits = torch.randn(4, 8)
    with pytest.raises(ArgumentError, match="moe_route: top_k=9 is out of range for 8"):
        O.moe_route(logits, 9)
    with pytest.raises(ArgumentError, match="top_k=0"):
        O.moe_route(logits, 0)
    with pytest.raises(ArgumentError, match="scoring='relu'"):
        O.moe_route(logits, 2, scoring="relu")
    with pytest.raises(ShapeError, match="correction_bias' must have shape \\(8,\\)"):
        O.moe_route(logits, 2, correction_bias=torch.zeros(7))
    with pytest.raises(DtypeError, match="'router_logits' has dtype int64"):
        O.moe_route(torch.ones(4, 8, dtype=torch.int64), 2)
    with pytest.raises(ArgumentError, match="n_group=3 must divide the 8 experts"):
        O.moe_route(logits, 2, n_group=3)
    for topk_group, top_k in ((5, 2), (0, 2), (1, 3)):
        with pytest.raises(ArgumentError, match=f"topk_group={topk_group} of 4 groups of 2 "
                                                f"experts cannot supply top_k={top_k}"):
            O.moe_route(logits, top_k, n_group=4, topk_group=topk_group)
    with pytest.raises(ShapeError, match="65537 experts; routing takes at most 65536"):
        O.moe_route(torch.zeros(1, 65537), 2)


# -- permutation ---------------------------------------------------------------------------
@pytest.mark.parametrize("tokens,experts,top_k", [(1, 8, 2), (33, 8, 2), (20, 64, 8),
                                                  (0, 4, 2), (7, 3, 3)])
@pytest.mark.parametrize("dtype", slow_after(1, [torch.float32, torch.bfloat16]))
def test_permute_unpermute(tokens: int, experts: int, top_k: int, dtype: torch.dtype) -> None:
    x = torch.randn(tokens, 40).to(dtype)
    weights, ids = O.moe_route(torch.randn(tokens, experts), top_k)
    rows, counts, row_map = check("moe_permute", x, ids, experts)
    assert counts.sum() == tokens * top_k and counts.dtype == torch.int64
    check("moe_unpermute", rows, row_map, weights)
    # unpermuting the permuted rows with weights summing to 1 gives the tokens back
    close(O.moe_unpermute(rows, row_map, weights), x, what="round trip")


def test_permute_int32_ids_views_and_unsorted_choices() -> None:
    x = torch.randn(30, 6)[::2]  # strided rows
    ids = torch.tensor([[2, 0], [0, 2], [1, 1]] * 5, dtype=torch.int32)  # repeats allowed
    check("moe_permute", x, ids, 3)
    y = torch.randn(64, 30)[:, ::2]
    check("moe_unpermute", y[:30], torch.randperm(30).view(15, 2),
          torch.rand(15, 2, dtype=torch.float64).float())


def test_permute_bad_input() -> None:
    x = torch.randn(4, 8)
    for bad in (-1, 5):
        ids = torch.tensor([[0, 1], [2, bad], [1, 0], [3, 4]])
        with pytest.raises(ArgumentError, match=f"moe_permute: argument 'topk_ids' holds "
                                                f"expert {bad}, out of range for "
                                                "num_experts=5"):
            O.moe_permute(x, ids, 5)
    with pytest.raises(ShapeError, match="'topk_ids' must be \\[T, k\\] for the 4 tokens"):
        O.moe_permute(x, torch.zeros(3, 2, dtype=torch.int64), 4)
    with pytest.raises(DtypeError, match="'topk_ids' has dtype float32"):
        O.moe_permute(x, torch.zeros(4, 2), 4)
    with pytest.raises(ArgumentError, match="num_experts=0"):
        O.moe_permute(x, torch.zeros(4, 2, dtype=torch.int64), 0)
    rows, w = torch.randn(8, 8), torch.rand(4, 2)
    with pytest.raises(ArgumentError, match="'row_map' names row 8, out of range for the 8"):
        O.moe_unpermute(rows, torch.tensor([[0, 1], [2, 3], [4, 5], [6, 8]]), w)
    with pytest.raises(ArgumentError, match="names row -1"):
        O.moe_unpermute(rows, torch.tensor([[0, 1], [2, 3], [4, 5], [6, -1]]), w)
    with pytest.raises(ShapeError, match="must both be \\[T, k\\]"):
        O.moe_unpermute(rows, torch.zeros(4, 2, dtype=torch.int64), torch.rand(4, 3))


# -- grouped GEMMs ---------------------------------------------------------------------------
@pytest.mark.parametrize("swiglu", [False, True])
@pytest.mark.parametrize("fmt", slow_after(3, ["float32", "int8", "int4", "bfloat16"]))
def test_grouped_matmul(swiglu: bool, fmt: str) -> None:
    counts = torch.tensor([5, 0, 17, 1, 0, 40])  # idle experts, a busy one
    x = torch.randn(int(counts.sum()), 96)
    w = torch.randn(6, 96, 64) / 10
    if fmt in ("int8", "int4"):
        data, scales = O.quantize(w, 8 if fmt == "int8" else 4, 32)
        check("grouped_matmul", x, data, counts, scales, swiglu=swiglu, atol=1e-4, rtol=1e-4)
    elif fmt == "bfloat16":
        check("grouped_matmul", x.bfloat16(), w.bfloat16(), counts, swiglu=swiglu)
    else:
        check("grouped_matmul", x, w, counts, swiglu=swiglu, atol=1e-4, rtol=1e-4)
        # stacked nn.Linear weights [E, N, K], transposed: no copy
        check("grouped_matmul", x, w.transpose(1, 2).contiguous().transpose(1, 2), counts,
              swiglu=swiglu, atol=1e-4, rtol=1e-4)


def test_grouped_matmul_bad_input() -> None:
    x, w = torch.randn(6, 8), torch.randn(3, 8, 4)
    with pytest.raises(ShapeError, match="'counts' must be 3 non-negative row counts summing "
                                         "to the 6 rows"):
        O.grouped_matmul(x, w, torch.tensor([1, 2, 2]))
    with pytest.raises(ShapeError, match="'counts' must be 3"):
        O.grouped_matmul(x, w, torch.tensor([7, -1, 0]))
    with pytest.raises(ShapeError, match="argument 'w' must be \\[E, 8, N\\]"):
        O.grouped_matmul(x, torch.randn(3, 9, 4), torch.tensor([2, 2, 2]))
    with pytest.raises(ShapeError, match="even N"):
        O.grouped_matmul(x, torch.randn(3, 8, 5), torch.tensor([2, 2, 2]), swiglu=True)
    with pytest.raises(DtypeError, match="scales is given, so argument 'w' must be"):
        O.grouped_matmul(x, w, torch.tensor([2, 2, 2]), torch.ones(3, 4, 1))
    data, scales = O.quantize(torch.randn(3, 40, 4), 8, 32)
    with pytest.raises(ShapeError, match="holds 64 rows of K in groups of 32, which does not "
                                         "fit K = 8"):
        O.grouped_matmul(x, data, torch.tensor([2, 2, 2]), scales)
    with pytest.raises(DtypeError, match="'counts' has dtype float32"):
        O.grouped_matmul(x, w, torch.ones(3) * 2)


# -- the whole layer -----------------------------------------------------------------------
@pytest.mark.parametrize("tokens", [1, 0, 16, 45])
@pytest.mark.parametrize("experts,top_k", [(8, 2), (16, 4), (4, 1), (6, 6)])
def test_fused_moe_vs_mixtral_loop(tokens: int, experts: int, top_k: int) -> None:
    w_gate_up, w_down = _experts(experts, 64, 48)
    x, logits = torch.randn(tokens, 64), torch.randn(tokens, experts)
    close(O.fused_moe(x, logits, w_gate_up, w_down, top_k),
          hf_moe(x, logits, w_gate_up, w_down, top_k), atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("tokens", slow_after(2, [1, 13, 64]))
@pytest.mark.parametrize("dtype", slow_after(1, [torch.bfloat16, torch.float16]))
def test_fused_moe_16bit(dtype: torch.dtype, tokens: int) -> None:
    w_gate_up, w_down = _experts(8, 64, 48, dtype)
    x, logits = torch.randn(tokens, 64).to(dtype), torch.randn(tokens, 8)
    got = O.fused_moe(x, logits, w_gate_up, w_down, 2)
    assert got.dtype == dtype
    # float32 products of the 16-bit values, rounded once: within one step of the dtype
    exact = hf_moe(x.float(), logits, w_gate_up.float(), w_down.float(), 2)
    close(got, exact.to(dtype))
    # Mixtral's 16-bit loop rounds every intermediate: further off, by a few steps
    loose = 6e-2 if dtype == torch.bfloat16 else 1e-2
    close(got, hf_moe(x, logits, w_gate_up, w_down, 2), atol=loose, rtol=loose)


@pytest.mark.parametrize("bits", [8, 4])
@pytest.mark.parametrize("tokens", [1, 5, 40])
def test_fused_moe_quantized(bits: int, tokens: int) -> None:
    """int8/int4 experts (decode: the dot-product path; more rows: dequantized packing)
    against the loop on the weights they stand for."""
    w_gate_up, w_down = _experts(8, 64, 48)
    gu, gu_scales = O.quantize(w_gate_up, bits, 32)
    d, d_scales = O.quantize(w_down, bits, 32)
    x, logits = torch.randn(tokens, 64), torch.randn(tokens, 8)
    want = hf_moe(x, logits, O.dequantize(gu, gu_scales, 64), O.dequantize(d, d_scales, 48), 2)
    close(O.fused_moe(x, logits, gu, d, 2, gate_up_scales=gu_scales, down_scales=d_scales),
          want, atol=1e-5, rtol=1e-4)
    # one side quantized, the other float
    check("fused_moe", x, logits, gu, w_down, 2, gate_up_scales=gu_scales)


def test_fused_moe_layouts_and_routing_options() -> None:
    w_gate_up, w_down = _experts(8, 64, 48)
    x, logits = torch.randn(2, 5, 64), torch.randn(2, 5, 8)  # [batch, seq, hidden]
    close(O.fused_moe(x, logits, w_gate_up, w_down, 2), hf_moe(x, logits, w_gate_up, w_down, 2),
          atol=1e-5, rtol=1e-4)
    # nn.Linear layouts, stacked [E, out, in] and transposed; a strided x
    linear_gu = w_gate_up.transpose(1, 2).contiguous().transpose(1, 2)
    linear_d = w_down.transpose(1, 2).contiguous().transpose(1, 2)
    xs = torch.randn(10, 128)[:, ::2]
    check("fused_moe", xs, logits.view(10, 8), linear_gu, linear_d, 2, atol=1e-5, rtol=1e-4)
    check("fused_moe", xs, logits.view(10, 8), w_gate_up, w_down, 3, False, scoring="sigmoid",
          correction_bias=torch.randn(8) * 0.1, routed_scaling=2.0, n_group=4, topk_group=2,
          atol=1e-5, rtol=1e-4)


def test_fused_moe_bad_input() -> None:
    w_gate_up, w_down = _experts(8, 16, 8)
    x, logits = torch.randn(3, 16), torch.randn(3, 8)
    with pytest.raises(ArgumentError, match="fused_moe: top_k=9 is out of range for 8"):
        O.fused_moe(x, logits, w_gate_up, w_down, 9)
    with pytest.raises(ShapeError, match="'w_gate_up' must be \\[8, 16, N\\]"):
        O.fused_moe(x, logits, w_gate_up[:7], w_down, 2)
    with pytest.raises(ShapeError, match="'w_down' must be \\[8, 8, N\\]"):
        O.fused_moe(x, logits, w_gate_up, w_down[:, :7], 2)
    with pytest.raises(ShapeError, match="'w_down' gives 12 outputs per expert; x has hidden "
                                         "size 16"):
        O.fused_moe(x, logits, w_gate_up, torch.randn(8, 8, 12), 2)
    with pytest.raises(ShapeError, match="'w_gate_up' must hold \\[gate \\| up\\] columns"):
        O.fused_moe(x, logits, torch.randn(8, 16, 15), w_down, 2)
    with pytest.raises(ShapeError, match="one row of E logits per token"):
        O.fused_moe(x, logits[:2], w_gate_up, w_down, 2)
    data, scales = O.quantize(w_gate_up, 8, 32)
    with pytest.raises(DtypeError, match="'w_gate_up' has dtype int8"):
        O.fused_moe(x, logits, data, w_down, 2)  # quantized without its scales
    with pytest.raises(DtypeError, match="gate_up_scales is given"):
        O.fused_moe(x, logits, w_gate_up, w_down, 2, gate_up_scales=scales)
    with pytest.raises(ShapeError, match="quantized 'w_gate_up'"):
        O.fused_moe(x, logits, data, w_down, 2, gate_up_scales=scales[:, :, :0])
    with pytest.raises(DtypeError, match="'gate_up_scales' has dtype bfloat16"):
        O.fused_moe(x, logits, data, w_down, 2, gate_up_scales=scales.bfloat16())
    with pytest.raises(DtypeError, match="'x' has dtype float64"):
        O.fused_moe(x.double(), logits, w_gate_up, w_down, 2)


def test_fake_implementations() -> None:
    """Each op's meta gives the eager result's shapes and dtypes (torch.compile traces with
    them)."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    w_gate_up, w_down = _experts(8, 16, 8)
    x, logits = torch.randn(5, 16), torch.randn(5, 8)
    weights, ids = O.moe_route(logits, 2)
    rows, counts, row_map = O.moe_permute(x, ids, 8)
    calls = [("moe_route", (logits, 2)), ("moe_permute", (x, ids, 8)),
             ("moe_unpermute", (rows, row_map, weights)), ("topk", (x, 3, 0)),
             ("grouped_matmul", (rows, w_gate_up, counts)),
             ("fused_moe", (x, logits, w_gate_up, w_down, 2))]
    for name, args in calls:
        want = getattr(O, name)(*args)
        with FakeTensorMode(allow_non_fake_inputs=True) as mode:
            fake = getattr(torch.ops.tessera, name)(*(mode.from_tensor(a) if isinstance(
                a, torch.Tensor) else a for a in args))
        for g, w in zip(fake if isinstance(fake, tuple) else (fake,),
                        want if isinstance(want, tuple) else (want,), strict=True):
            assert (g.shape, g.dtype) == (w.shape, w.dtype), name


def test_fused_moe_inside_torch_compile() -> None:
    torch._dynamo.reset()
    w_gate_up, w_down = _experts(8, 16, 8)

    def layer(x: torch.Tensor, gate: torch.Tensor) -> torch.Tensor:
        return x + torch.ops.tessera.fused_moe(x, x @ gate, w_gate_up, w_down, 2)

    # AOTAutograd traces the op through its fake implementation (Inductor adds nothing here)
    compiled = torch.compile(layer, fullgraph=True, dynamic=True, backend="aot_eager")
    gate = torch.randn(16, 8)
    for tokens in (3, 7):
        x = torch.randn(tokens, 16)
        close(compiled(x, gate), x + hf_moe(x, x @ gate, w_gate_up, w_down, 2),
              atol=1e-5, rtol=1e-4)


# -- decode: up to 16 tokens in one launch, a plan per call signature -----------------------
@pytest.mark.parametrize("fmt", ["fp32", "int8", "int4"])
def test_fused_moe_decode_matches_the_grouped_path(fmt: str) -> None:
    """Up to 16 tokens take the decode launch, more the grouped GEMMs: the same tokens
    agree either way. Experts big enough for the threads to split their columns, in
    nn.Linear layout (float) and with int8/int4 data of both projections."""
    g = torch.Generator().manual_seed(7)
    w_gate_up = (torch.randn(8, 192, 256, generator=g) / 16).transpose(1, 2)
    w_down = (torch.randn(8, 256, 96, generator=g) / 10).transpose(1, 2)
    args: tuple = (w_gate_up, w_down)
    kwargs: dict = {}
    if fmt != "fp32":
        bits = 8 if fmt == "int8" else 4
        (gu, gu_scales), (d, d_scales) = (O.quantize(w, bits, 32) for w in (w_gate_up, w_down))
        args, kwargs = (gu, d), {"gate_up_scales": gu_scales, "down_scales": d_scales}
    x, logits = torch.randn(40, 256, generator=g), torch.randn(40, 8, generator=g)
    grouped = O.fused_moe(x, logits, *args, 2, **kwargs)  # 40 tokens: the grouped path
    for tokens in (1, 4, 16):
        close(O.fused_moe(x[:tokens], logits[:tokens], *args, 2, **kwargs), grouped[:tokens],
              atol=1e-5, rtol=1e-4, what=f"{tokens} tokens")


def test_fused_moe_decode_plans_never_serve_stale_weights() -> None:
    """A signature's plan is made once and reused; it reads the caller's weights, so
    weights changed in place or new tensors count; quantized data that is not contiguous
    (copied for the launch) gets no plan."""
    from tessera.ops import moe

    w_gate_up, w_down = _experts(8, 64, 48)
    x, logits = torch.randn(3, 64), torch.randn(3, 8)
    moe._DECODES.clear()
    first = O.fused_moe(x, logits, w_gate_up, w_down, 2)
    close(O.fused_moe(x, logits, w_gate_up, w_down, 2), first)
    assert len(moe._DECODES) == 1
    w_gate_up.mul_(2)  # in place: the same plan, new values
    close(O.fused_moe(x, logits, w_gate_up, w_down, 2),
          hf_moe(x, logits, w_gate_up, w_down, 2), atol=1e-5, rtol=1e-4)
    other = torch.randn_like(w_down)  # another tensor: another plan
    close(O.fused_moe(x, logits, w_gate_up, other, 2), hf_moe(x, logits, w_gate_up, other, 2),
          atol=1e-5, rtol=1e-4)
    assert len(moe._DECODES) == 2
    data, scales = O.quantize(w_gate_up, 8, 32)
    strided = torch.cat([data, data], dim=-1)[..., :data.shape[-1]]
    for _ in range(2):
        close(O.fused_moe(x, logits, strided, w_down, 2, gate_up_scales=scales),
              hf_moe(x, logits, O.dequantize(data, scales, 64), w_down, 2),
              atol=1e-5, rtol=1e-4)
    assert len(moe._DECODES) == 2


def test_fused_moe_decode_layouts_and_nan_on_a_planned_call() -> None:
    """Rows of x and logits that are no view of them (copied each call), weights with no
    unit stride; NaN logits, a NaN correction bias and a float top_k are refused on calls
    that would reuse a plan too."""
    w_gate_up, w_down = _experts(8, 64, 48)
    x = torch.randn(3, 2, 64).transpose(0, 1)  # [2, 3, 64]: its rows do not merge
    logits = torch.randn(3, 2, 8).transpose(0, 1)
    for _ in range(2):
        close(O.fused_moe(x, logits, w_gate_up, w_down, 2),
              hf_moe(x.contiguous(), logits.contiguous(), w_gate_up, w_down, 2),
              atol=1e-5, rtol=1e-4)
    with pytest.raises(ArgumentError, match=r"top_k=2\.0"):  # equal to a planned 2, refused
        O.fused_moe(x, logits, w_gate_up, w_down, 2.0)
    # weights with no unit stride take the grouped path, planned or not
    spread = torch.randn(8, 128, 192)[:, ::2, ::2]
    close(O.fused_moe(x, logits, spread, w_down, 2),
          hf_moe(x.contiguous(), logits.contiguous(), spread, w_down, 2), atol=1e-5, rtol=1e-4)
    bad = logits.clone()
    bad[1, 0, 5] = NAN  # token 3 of the [6, 8] rows
    with pytest.raises(ArgumentError, match="fused_moe: argument 'router_logits' has NaN or "
                                            "infinity in row 3"):
        O.fused_moe(x, bad, w_gate_up, w_down, 2)
    bias = torch.zeros(8)
    O.fused_moe(x, logits, w_gate_up, w_down, 2, correction_bias=bias)
    bias[2] = NAN
    with pytest.raises(ArgumentError, match="'correction_bias' has NaN or infinity"):
        O.fused_moe(x, logits, w_gate_up, w_down, 2, correction_bias=bias)


def test_moe_decode_launch_refuses_bad_ids_and_flags() -> None:
    """The template's launch checks what it is given: ids in [0, E) and no flagged token."""
    from tessera.errors import TesseraError
    from tessera.templates.gemm import moe_decode

    w_gate_up, w_down = _experts(4, 16, 8)
    run = moe_decode(torch.float32, w_gate_up, w_down)
    x, weights, out = torch.randn(1, 16), torch.ones(1, 2), torch.empty(1, 16)
    flags = torch.tensor([1], dtype=torch.int32)
    for ids in (torch.tensor([[0, 4]]), torch.tensor([[-1, 0]])):
        with pytest.raises(TesseraError, match="moe_decode: an expert id is out of range"):
            run(1, 2, x.data_ptr(), 16, 1, ids.data_ptr(), weights.data_ptr(), 0,
                out.data_ptr(), lambda: ArgumentError("refused"))
    with pytest.raises(ArgumentError, match="refused"):
        run(1, 2, x.data_ptr(), 16, 1, torch.tensor([[0, 1]]).data_ptr(), weights.data_ptr(),
            flags.data_ptr(), out.data_ptr(), lambda: ArgumentError("refused"))
