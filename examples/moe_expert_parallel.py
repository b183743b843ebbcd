"""Expert-parallel mixture-of-experts layer over tessera.dist, checked against the whole
layer run in one process.

    mpirun -np 2 .venv/bin/python examples/moe_expert_parallel.py
    torchrun --nproc-per-node 2 examples/moe_expert_parallel.py
    .venv/bin/python examples/moe_expert_parallel.py             # one process, all experts

Options: --experts 8 --topk 2 --tokens 64 (per rank) --hidden 64 --ffn 96
--dtype float32|bfloat16 --seed 0. More ranks than cores needs `mpirun --oversubscribe`;
as root, Open MPI also wants OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1.

The layer: a router (linear, softmax over the top-k logits) picks k of E experts per
token; each expert is a SwiGLU MLP, down(silu(x @ gate) * (x @ up)). Rank r holds only
experts [r*E/size, (r+1)*E/size) and its own slice of the tokens: it routes them,
`dispatch`es each (token, expert) pair to the expert's rank, runs its experts as two
grouped GEMMs over the rows it received, and `combine`s the results back into its tokens.
Every rank then builds the full layer (all experts, from the same seeds) and runs it on
every rank's tokens in plain torch, and compares its slice; the largest error over all
ranks is printed and must be within float32 rounding (plus bfloat16's for --dtype
bfloat16, whose output is rounded to bfloat16).
"""

from __future__ import annotations

import argparse

import torch
import torch.nn.functional as F

import tessera.dist as tdist
from tessera.dist.moe import combine, dispatch
from tessera.templates.gemm import grouped_gemm

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


def expert_weights(seed: int, expert: int, hidden: int, ffn: int
                   ) -> tuple[torch.Tensor, torch.Tensor]:
    """Expert `expert`'s ([gate | up] [H, 2F], down [F, H]), from its own seed, so a rank
    can build just its experts and the reference all of them."""
    g = torch.Generator().manual_seed(seed * 1000 + expert + 1)
    gate_up = torch.randn(hidden, 2 * ffn, generator=g) / hidden ** 0.5
    down = torch.randn(ffn, hidden, generator=g) / ffn ** 0.5
    return gate_up, down


def route(x: torch.Tensor, router: torch.Tensor, topk: int
          ) -> tuple[torch.Tensor, torch.Tensor]:
    """(expert ids [T, k], weights [T, k]): the top-k router logits, softmaxed over k."""
    logits, ids = (x.float() @ router).topk(topk, dim=1)
    return ids, logits.softmax(dim=1)


def reference_layer(x: torch.Tensor, router: torch.Tensor,
                    experts: list[tuple[torch.Tensor, torch.Tensor]], topk: int) -> torch.Tensor:
    """The whole layer in one process, in float32 torch: every expert on its tokens."""
    ids, weights = route(x, router, topk)
    xf = x.float()
    out = torch.zeros_like(xf)
    for e, (gate_up, down) in enumerate(experts):
        token, slot = (ids == e).nonzero(as_tuple=True)
        gate, up = (xf[token] @ gate_up).chunk(2, dim=1)
        out.index_add_(0, token, weights[token, slot, None] * ((F.silu(gate) * up) @ down))
    return out


def _largest(t: torch.Tensor) -> float:
    """max |t|, 0 for an empty tensor (a rank may have no tokens)."""
    return float(t.abs().max()) if t.numel() else 0.0


def main(argv: list[str] | None = None) -> float:
    """Run the check; return the largest error over all ranks (it must be within
    tolerance, else AssertionError)."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--experts", type=int, default=8)
    p.add_argument("--topk", type=int, default=2)
    p.add_argument("--tokens", type=int, default=64, help="tokens per rank")
    p.add_argument("--hidden", type=int, default=64)
    p.add_argument("--ffn", type=int, default=96)
    p.add_argument("--dtype", choices=DTYPES, default="float32")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    comm = tdist.init()
    dtype = DTYPES[args.dtype]
    if args.experts % comm.size:
        raise SystemExit(f"--experts {args.experts} must be a multiple of the "
                         f"{comm.size} ranks")

    # Inputs every rank can rebuild: all ranks' tokens and the router (replicated).
    g = torch.Generator().manual_seed(args.seed)
    router = torch.randn(args.hidden, args.experts, generator=g) / args.hidden ** 0.5
    x_all = torch.randn(comm.size * args.tokens, args.hidden, generator=g).to(dtype)
    mine = slice(comm.rank * args.tokens, (comm.rank + 1) * args.tokens)

    # This rank's experts only, stacked for the grouped GEMMs.
    per_rank = args.experts // comm.size
    local = [expert_weights(args.seed, e, args.hidden, args.ffn)
             for e in range(comm.rank * per_rank, (comm.rank + 1) * per_rank)]
    gate_up = torch.stack([w for w, _ in local])   # [L, H, 2F]
    down = torch.stack([w for _, w in local])      # [L, F, H]

    x = x_all[mine]
    ids, weights = route(x, router, args.topk)
    recv_x, _, counts, handle = dispatch(x, ids, weights, args.experts, comm)
    hidden = grouped_gemm(recv_x, gate_up, counts, swiglu=True)
    out = combine(grouped_gemm(hidden, down, counts), handle)

    experts = [expert_weights(args.seed, e, args.hidden, args.ffn)
               for e in range(args.experts)]
    want = reference_layer(x_all, router, experts, args.topk)[mine]
    # The largest error and the largest output over all ranks, in one allreduce.
    worst, scale = comm.allreduce(torch.tensor([_largest(out.float() - want),
                                                _largest(want)]), op="max").tolist()
    rounding = 2.0 ** -8 if dtype == torch.bfloat16 else 0.0
    tolerance = (1e-5 + rounding) * max(1.0, scale)
    if comm.rank == 0:
        print(f"MoE layer: {args.experts} experts over {comm.size} rank(s), top-{args.topk}, "
              f"{args.tokens} tokens/rank, {args.dtype}: max abs error {worst:.3g} "
              f"(tolerance {tolerance:.3g}, largest output {scale:.3g})")
    if not worst <= tolerance:
        raise AssertionError(f"max abs error {worst} exceeds the tolerance {tolerance}")
    return worst


if __name__ == "__main__":
    main()
