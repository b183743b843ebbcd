"""MoE blocks written the usual way (a Python loop over experts on data-dependent routing)
are captured whole under torch.compile(backend="tessera") and run as one fused_moe op;
blocks that do not match exactly keep their own forward and stay correct."""

from __future__ import annotations

import inspect
from typing import Any

import pytest
import torch
import torch.nn.functional as F

import tessera
from tessera.graph import compiled, moe
from tessera.graph.executable import Executable

H, INTER, E, K = 32, 48, 8, 2


class Expert(torch.nn.Module):
    def __init__(self, act: str = "silu") -> None:
        super().__init__()
        self.w1 = torch.nn.Linear(H, INTER, bias=False)
        self.w2 = torch.nn.Linear(INTER, H, bias=False)
        self.w3 = torch.nn.Linear(H, INTER, bias=False)
        self.act = getattr(F, act)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.w2(self.act(self.w1(x)) * self.w3(x))


class LoopMoE(torch.nn.Module):
    """Mixtral's block as its reference code (and many models) write it."""

    def __init__(self, act: str = "silu", logits: bool = False, track: bool = False,
                 experts: int = E, shared: bool = False) -> None:
        super().__init__()
        self.num_experts, self.top_k, self.logits, self.track = experts, K, logits, track
        self.gate = torch.nn.Linear(H, experts, bias=False)
        self.experts = torch.nn.ModuleList(Expert(act) for _ in range(experts))
        if shared:  # a shared expert behind a sigmoid gate, as Qwen-MoE has
            self.common = Expert()
            self.common_gate = torch.nn.Linear(H, 1, bias=False)
        if track:  # expert-load statistics: state that fused_moe would not update
            self.register_buffer("load", torch.zeros(experts))

    def forward(self, hidden_states: torch.Tensor) -> Any:
        b, t, h = hidden_states.shape
        x = hidden_states.view(-1, h)
        router_logits = self.gate(x)
        weights = F.softmax(router_logits, dim=1, dtype=torch.float)
        weights, chosen = torch.topk(weights, self.top_k, dim=-1)
        weights /= weights.sum(dim=-1, keepdim=True)
        weights = weights.to(x.dtype)
        out = torch.zeros_like(x)
        mask = F.one_hot(chosen, num_classes=self.num_experts).permute(2, 1, 0)
        if self.track:
            self.load += mask.sum((1, 2))
        for e in range(self.num_experts):
            idx, top_x = torch.where(mask[e])
            y = self.experts[e](x[top_x]) * weights[top_x, idx, None]
            out.index_add_(0, top_x, y.to(x.dtype))
        if hasattr(self, "common"):
            out = out + torch.sigmoid(self.common_gate(x)) * self.common(x)
        out = out.reshape(b, t, h)
        return (out, router_logits) if self.logits else out


class Layer(torch.nn.Module):
    def __init__(self, block: torch.nn.Module) -> None:
        super().__init__()
        self.norm = torch.nn.LayerNorm(H)
        self.moe = block
        self.out = torch.nn.Linear(H, H)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.moe(self.norm(x))
        return self.out(x + (h[0] if isinstance(h, tuple) else h))


def _init(m: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in m.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * 0.3)
    return m.eval()


def _run(model: torch.nn.Module, inputs: list[torch.Tensor], **options: object
         ) -> tuple[list[Executable], int]:
    """Compile with tessera, check every input against eager; the Executables compiled
    and the graph breaks dynamo counted."""
    torch._dynamo.reset()
    before = {id(e) for e in compiled()}
    breaks = sum(torch._dynamo.utils.counters["graph_break"].values())
    fn = torch.compile(model, backend="tessera", options=options or None)
    with torch.no_grad():
        for x in inputs:
            want, got = model(x), fn(x)
            torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)
    new = [e for e in compiled() if id(e) not in before]
    return new, sum(torch._dynamo.utils.counters["graph_break"].values()) - breaks


def _ops(executables: list[Executable]) -> list[str]:
    return [n.op for ex in executables for n in ex.graph.nodes]


def test_loop_block_is_one_fused_moe() -> None:
    model = _init(Layer(LoopMoE()))
    xs = [torch.randn(2, 5, H), torch.randn(1, 3, H)]  # a second shape: dynamic tokens
    exes, breaks = _run(model, xs)
    assert breaks == 0
    ops = _ops(exes)
    assert ops.count("fused_moe") == len(exes) >= 1, ops
    assert not any(op.startswith("torch:") for op in ops), ops  # no nonzero, no index_add
    for ex in exes:  # experts stacked at compile time: nothing stacks weights per call
        assert not {"cat", "stack"} & {n.op for n in ex.graph.nodes}
        (node,) = [n for n in ex.graph.nodes if n.op == "fused_moe"]
        for w in (node.args["w_gate_up"].data, node.args["w_down"].data):
            assert w.transpose(1, 2).is_contiguous()  # nn.Linear order: fastest to stream


def test_tessera_compile_exports_one_fused_moe() -> None:
    """tessera.compile (torch.export) fuses the block too: plans are found with the real
    weights before the export traces with fake ones."""
    model = _init(Layer(LoopMoE()))
    cm = tessera.compile(model, [torch.randn(2, 5, H)])
    assert [n.op for n in cm.executable.graph.nodes].count("fused_moe") == 1
    with torch.no_grad():
        for _ in range(3):  # routing differs per input: nothing data-dependent is replayed
            x = torch.randn(2, 5, H)
            torch.testing.assert_close(cm(x), model(x), rtol=1e-4, atol=1e-5)


def test_block_returning_router_logits_with_a_shared_expert() -> None:
    exes, breaks = _run(_init(LoopMoE(logits=True, shared=True)), [torch.randn(2, 4, H)])
    assert breaks == 0 and _ops(exes).count("fused_moe") == 1


def test_explain_with_the_tessera_backend_sees_one_graph() -> None:
    from torch._dynamo.backends.debugging import ExplainWithBackend

    torch._dynamo.reset()
    explain = ExplainWithBackend("tessera")
    model = _init(Layer(LoopMoE()))
    with torch.no_grad():
        torch.compile(model, backend=explain)(torch.randn(2, 5, H))
    out = explain.output()
    assert (out.graph_count, out.graph_break_count) == (1, 0), out.break_reasons
    assert torch.ops.tessera.fused_moe in {n.target for n in out.graphs[0].graph.nodes}


@pytest.mark.parametrize("block", ["gelu", "stateful"])
def test_blocks_that_differ_keep_their_forward(block: str) -> None:
    """GELU experts (fused_moe is SwiGLU) or a forward with side effects: the probe
    rejects every plan, the block runs as written (graph breaks) and stays correct."""
    m = LoopMoE(act="gelu", experts=4) if block == "gelu" else LoopMoE(track=True, experts=4)
    assert moe.candidates(m), "structurally it looks like an MoE block"
    exes, breaks = _run(_init(m), [torch.randn(2, 5, H)])
    assert breaks > 0 and "fused_moe" not in _ops(exes)


def test_off_and_other_backends_and_grad_keep_the_loop() -> None:
    model = _init(LoopMoE(experts=4))
    x = torch.randn(2, 5, H)
    exes, breaks = _run(model, [x], moe=False)
    assert breaks > 0 and "fused_moe" not in _ops(exes)
    torch._dynamo.reset()
    with torch.no_grad():
        explained = torch._dynamo.explain(model)(x)  # dynamo's own backend: as written
    assert explained.graph_break_count > 0
    with torch.no_grad():  # eager runs the class's own forward, bit for bit
        assert torch.equal(model(x), inspect.unwrap(LoopMoE.forward)(model, x))
    torch._dynamo.reset()
    fn = torch.compile(model, backend="tessera")  # gradients wanted: fused_moe has none
    torch.testing.assert_close(fn(x), model(x), rtol=1e-4, atol=1e-5)


def test_class_defined_late() -> None:
    """A class defined after tessera was imported (and after a dynamo reset) is found
    when its first instance is built, before anything traces it."""
    torch._dynamo.reset()

    class LateMoE(LoopMoE):
        forward = inspect.unwrap(LoopMoE.forward)  # a loop of its own

    loop = LateMoE.__dict__["forward"]
    block = LateMoE()
    assert LateMoE.__dict__["forward"] is not loop
    exes, breaks = _run(_init(Layer(block)), [torch.randn(2, 3, H)])
    assert breaks == 0 and "fused_moe" in _ops(exes)


def test_subclass_calling_super_fuses_the_inherited_block() -> None:
    class Doubled(LoopMoE):  # its forward is not an MoE block; LoopMoE's part is fused
        def forward(self, hidden_states: torch.Tensor) -> Any:
            return super().forward(hidden_states) * 2

    exes, breaks = _run(_init(Layer(Doubled())), [torch.randn(2, 3, H)])
    assert breaks == 0 and "fused_moe" in _ops(exes)


def _transformers_block(kind: str) -> torch.nn.Module:
    pytest.importorskip("transformers", reason="transformers (a dev dependency) is missing")
    if kind == "mixtral":
        from transformers import MixtralConfig
        from transformers.models.mixtral.modeling_mixtral import MixtralSparseMoeBlock
        return MixtralSparseMoeBlock(MixtralConfig(
            hidden_size=H, intermediate_size=INTER, num_local_experts=E,
            num_experts_per_tok=K))
    from transformers import Qwen2MoeConfig
    from transformers.models.qwen2_moe.modeling_qwen2_moe import Qwen2MoeSparseMoeBlock
    return Qwen2MoeSparseMoeBlock(Qwen2MoeConfig(  # shared expert with a sigmoid gate
        hidden_size=H, moe_intermediate_size=INTER, shared_expert_intermediate_size=2 * H,
        num_experts=E, num_experts_per_tok=K, norm_topk_prob=False))


@pytest.mark.parametrize("kind", ["mixtral", "qwen2_moe"])
def test_transformers_blocks(kind: str) -> None:
    block = _init(_transformers_block(kind))
    exes, breaks = _run(Layer(block), [torch.randn(2, 5, H)])
    assert breaks == 0
    assert _ops(exes).count("fused_moe") == 1, _ops(exes)
    (node,) = [n for ex in exes for n in ex.graph.nodes if n.op == "fused_moe"]
    stored = block.experts.gate_up_proj  # used in place: no copy of the expert weights
    assert node.args["w_gate_up"].data.data_ptr() == stored.data_ptr()
