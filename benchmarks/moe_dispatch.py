"""MoE dispatch/combine against the bare all-to-all of the same rows.

    OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1 \
        mpirun -np 2 .venv/bin/python benchmarks/moe_dispatch.py [--tokens 4096 --hidden 1024
        --topk 2 --experts 8 --dtype float32 --repeats 20]

Each repeat runs `dispatch` into a new recv_x and into a reused `out=`, each followed by
`combine` (of y = recv_x), and a bare `comm.alltoallv` of the same rows (dispatch's row
counts) into a new tensor and into a reused `out=`, in an order that rotates every repeat
(a dispatch stays before its combine), each call between barriers; the slowest rank's
time of each call counts. Rank 0 prints the medians (and the spread: min and max) in
milliseconds. Share the machine? Look at the spread, and compare runs made the same way.

A new tensor of more than 32 MB costs its page faults (glibc maps it fresh every time):
about as long as the copy into it. `THP_MEM_ALLOC_ENABLE=1` (torch: huge pages for large
tensors) or `MALLOC_MMAP_THRESHOLD_=1000000000 MALLOC_TRIM_THRESHOLD_=1000000000` (keep
freed memory in malloc) in the environment mostly remove that cost, in MoE and elsewhere.
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import torch

import tessera.dist as tdist
from tessera.dist.moe import combine, dispatch

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--tokens", type=int, default=4096, help="tokens per rank")
    p.add_argument("--hidden", type=int, default=1024)
    p.add_argument("--topk", type=int, default=2)
    p.add_argument("--experts", type=int, default=8)
    p.add_argument("--dtype", choices=DTYPES, default="float32")
    p.add_argument("--repeats", type=int, default=20)
    p.add_argument("--warmup", type=int, default=3)
    args = p.parse_args(argv)
    comm = tdist.init()
    dtype = DTYPES[args.dtype]

    g = torch.Generator().manual_seed(comm.rank)
    x = torch.randn(args.tokens, args.hidden, generator=g).to(dtype)
    logits = torch.randn(args.tokens, args.experts, generator=g)
    top, ids = logits.topk(args.topk, dim=1)
    weights = top.softmax(dim=1)

    recv_x, _, _, handle = dispatch(x, ids, weights, args.experts, comm)
    send_counts, recv_counts = handle.send_counts, handle.recv_counts
    rows = torch.randn(sum(send_counts), args.hidden, generator=g).to(dtype)
    reused = torch.empty(sum(recv_counts), args.hidden, dtype=dtype)
    room = torch.empty_like(recv_x)  # the routing is the same every repeat
    state: dict[str, tuple[torch.Tensor, object]] = {}

    def run_dispatch(key: str, out: torch.Tensor | None) -> Callable[[], None]:
        def run() -> None:
            y, _, _, h = dispatch(x, ids, weights, args.experts, comm, out=out)
            state[key] = (y, h)
        return run

    def run_combine(key: str) -> Callable[[], None]:
        return lambda: combine(*state.pop(key))

    pairs = [
        [("dispatch", run_dispatch("new", None)), ("combine", run_combine("new"))],
        [("dispatch out=", run_dispatch("out", room)), ("combine after out=",
                                                        run_combine("out"))],
        [("alltoallv", lambda: comm.alltoallv(rows, send_counts, recv_counts))],
        [("alltoallv out=",
          lambda: comm.alltoallv(rows, send_counts, recv_counts, out=reused))],
    ]
    times: dict[str, list[float]] = {name: [] for pair in pairs for name, _ in pair}
    for i in range(args.warmup + args.repeats):
        shift = i % len(pairs)
        for name, call in [c for pair in pairs[shift:] + pairs[:shift] for c in pair]:
            comm.barrier()
            t0 = time.perf_counter()
            call()
            took = torch.tensor([time.perf_counter() - t0])
            slowest = float(comm.allreduce(took, op="max"))
            if i >= args.warmup:
                times[name].append(slowest * 1e3)
    if comm.rank == 0:
        nbytes = sum(send_counts) * args.hidden * x.element_size()
        split = len(handle.sends) > 1
        print(f"{comm.size} ranks, {args.tokens} tokens/rank x {args.hidden} {args.dtype}, "
              f"top-{args.topk} of {args.experts} experts: rank 0 sends "
              f"{nbytes / 1e6:.1f} MB; ms over {args.repeats} repeats "
              f"(torch threads {torch.get_num_threads()}; "
              f"{'one exchange per local expert' if split else 'one exchange'})")
        times["dispatch + combine"] = [a + b for a, b in zip(times["dispatch"],
                                                             times["combine"], strict=True)]
        times["2 x alltoallv"] = [2 * a for a in times["alltoallv"]]
        for name, t in times.items():
            print(f"  {name:18s} median {statistics.median(t):7.2f}   "
                  f"min {min(t):7.2f}   max {max(t):7.2f}")
    tdist.finalize()


if __name__ == "__main__":
    main()
