"""Family `moe`: tessera.ops.fused_moe (a whole MoE layer: routing, SwiGLU experts,
weighted combine) against the usual eager layer, Hugging Face Mixtral's loop over the
experts some token picked (torch.where, three nn.Linear, index_add_), and that module
under torch.compile. Expert weights fp32, int8 and int4; the quantized cases run the same
fp32 eager loop, on the dequantized weights (so the check compares like with like).

Sizes (fp32 experts fit comfortably in RAM): E8 top-2 with hidden 1024, intermediate 2816
(8 x 34.6 MB = 277 MB), E64 top-8 with hidden 1024, intermediate 512 (64 x 6.3 MB =
403 MB); 1, 16 and 512 tokens; and a small decode layer, E8 top-2 with hidden 256,
intermediate 512 (1.5 MB per expert; cases `..._h256_t*`), at 1, 4 and 16 tokens, where
per-call overhead shows. Decode cases report weight GB/s over the experts hit, prefill
GFLOPS. Goal: fused_moe >= 2.4x the eager loop."""

from __future__ import annotations

from typing import Any

from tessera.bench.cases import op_case
from tessera.bench.runner import Case

# experts, top-k, hidden, intermediate, token counts (quick runs take the first two)
CONFIGS = ((8, 2, 1024, 2816, (1, 16, 512)), (64, 8, 1024, 512, (1, 16, 512)),
           (8, 2, 256, 512, (1, 4, 16)))
FORMATS = ("fp32", "int8", "int4")


def cases(quick: bool) -> list[Case]:
    import torch

    from tessera.runtime.cpu.probe import measured_peaks

    bandwidth = measured_peaks()["read_bandwidth_gbs"]
    out = []
    for experts, top_k, hidden, inter, tokens_run in CONFIGS:
        gen = torch.Generator().manual_seed(experts)
        # stored as a checkpoint stores them, stacked nn.Linear weights [E, out, in];
        # fused_moe takes them as [E, in, out] views
        w_gate_up = (torch.randn(experts, 2 * inter, hidden, generator=gen)
                     / hidden ** 0.5).transpose(1, 2)
        w_down = (torch.randn(experts, hidden, inter, generator=gen)
                  / inter ** 0.5).transpose(1, 2)
        for fmt in FORMATS:
            weights = _weights(fmt, w_gate_up, w_down)
            eager = _eager_moe(weights["fp32"][0], weights["fp32"][1], top_k)
            for tokens in tokens_run[:2] if quick else tokens_run:
                out.append(_case(fmt, experts, top_k, tokens, weights, eager, bandwidth,
                                 quick))
    return out


def _weights(fmt: str, w_gate_up: Any, w_down: Any) -> dict[str, Any]:
    """The operands of fused_moe in format `fmt` (keyword arguments included) and, as
    "fp32", the float weights they stand for."""
    import tessera.ops as O

    if fmt == "fp32":
        return {"args": (w_gate_up, w_down), "kwargs": {}, "fp32": (w_gate_up, w_down),
                "bytes_per_expert": (w_gate_up[0].numel() + w_down[0].numel()) * 4}
    bits = 8 if fmt == "int8" else 4
    gu, gu_scales = O.quantize(w_gate_up, bits)
    d, d_scales = O.quantize(w_down, bits)
    per_expert = sum(t[0].numel() * t.element_size() for t in (gu, gu_scales, d, d_scales))
    # the eager loop's weights: the dequantized values, stored as the fp32 ones are
    fp32 = tuple(O.dequantize(q, scales, w.shape[1]).transpose(1, 2).contiguous()
                 .transpose(1, 2) for q, scales, w in ((gu, gu_scales, w_gate_up),
                                                       (d, d_scales, w_down)))
    return {"args": (gu, d), "kwargs": {"gate_up_scales": gu_scales, "down_scales": d_scales},
            "fp32": fp32, "bytes_per_expert": per_expert}


def _case(fmt: str, experts: int, top_k: int, tokens: int, weights: dict[str, Any],
          eager: Any, bandwidth: float, quick: bool) -> Case:
    import torch

    import tessera.ops as O

    hidden, inter = weights["fp32"][1].shape[2], weights["fp32"][1].shape[1]
    gen = torch.Generator().manual_seed(tokens)
    x = torch.randn(tokens, hidden, generator=gen)
    logits = torch.randn(tokens, experts, generator=gen)
    hit = O.moe_route(logits, top_k)[1].unique().numel()
    scales = weights["kwargs"]
    size = "" if hidden == 1024 else f"_h{hidden}"  # the large layers' names stay as they were
    name = f"fused_moe_{'' if fmt == 'fp32' else fmt + '_'}e{experts}k{top_k}{size}_t{tokens}"
    flops = 2 * tokens * top_k * 3 * hidden * inter
    meta = {"experts_hit": hit, "weight_mb_read": hit * weights["bytes_per_expert"] / 1e6,
            "read_bandwidth_gbs": bandwidth}
    measure = {"flops": flops} if tokens > 16 else \
        {"bytes_moved": hit * weights["bytes_per_expert"]}
    def ours(x: Any, logits: Any, w_gate_up: Any, w_down: Any, gate_up_scales: Any,
             down_scales: Any) -> Any:
        return O.fused_moe(x, logits, w_gate_up, w_down, top_k,
                           gate_up_scales=gate_up_scales, down_scales=down_scales)
    return op_case(name, ours, eager, (x, logits), quick,
                   ours_args=(x, logits, *weights["args"], scales.get("gate_up_scales"),
                              scales.get("down_scales")),
                   atol=2e-3, rtol=2e-3, meta=meta, **measure)


def _eager_moe(w_gate_up: Any, w_down: Any, top_k: int) -> Any:
    """Hugging Face Mixtral's sparse MoE block after its router (MixtralSparseMoeBlock):
    softmax, top-k, renormalize, then for each expert some token picked: torch.where on
    the one-hot mask, the expert MLP w2(silu(w1(x)) * w3(x)) on nn.Linear weights stored
    [out, in], scaled by the routing weight, index_add_ into the output."""
    import torch
    from torch import nn

    def linear(w: torch.Tensor) -> nn.Linear:  # w [in, out] -> nn.Linear's [out, in]
        lin = nn.Linear(w.shape[0], w.shape[1], bias=False)
        lin.weight.data = w.t().contiguous()
        return lin

    class Expert(nn.Module):
        def __init__(self, gate_up: torch.Tensor, down: torch.Tensor):
            super().__init__()
            inter = down.shape[0]
            self.w1, self.w3 = linear(gate_up[:, :inter]), linear(gate_up[:, inter:])
            self.w2 = linear(down)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.w2(nn.functional.silu(self.w1(x)) * self.w3(x))

    class SparseMoe(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.num_experts, self.top_k = w_gate_up.shape[0], top_k
            self.experts = nn.ModuleList(Expert(gu, d) for gu, d in
                                         zip(w_gate_up, w_down, strict=True))

        def forward(self, hidden_states: torch.Tensor, router_logits: torch.Tensor
                    ) -> torch.Tensor:
            hidden_dim = hidden_states.shape[-1]
            routing_weights = nn.functional.softmax(router_logits, dim=1, dtype=torch.float)
            routing_weights, selected_experts = torch.topk(routing_weights, self.top_k, dim=-1)
            routing_weights /= routing_weights.sum(dim=-1, keepdim=True)
            routing_weights = routing_weights.to(hidden_states.dtype)
            final_hidden_states = torch.zeros_like(hidden_states)
            expert_mask = nn.functional.one_hot(selected_experts,
                                                num_classes=self.num_experts).permute(2, 1, 0)
            expert_hit = torch.greater(expert_mask.sum(dim=(-1, -2)), 0).nonzero()
            for expert_idx in expert_hit.flatten().tolist():
                idx, top_x = torch.where(expert_mask[expert_idx])
                current_state = hidden_states[None, top_x].reshape(-1, hidden_dim)
                current_hidden_states = self.experts[expert_idx](current_state) \
                    * routing_weights[top_x, idx, None]
                final_hidden_states.index_add_(0, top_x, current_hidden_states)
            return final_hidden_states

    return SparseMoe().requires_grad_(False)
