"""One rank of tests/dist/test_moe.py (under mpirun, or alone for one rank): runs every
check of tessera.dist.moe and writes {check: "ok" | failure} to <outdir>/rank<R>.json
after each check, so a hang still leaves the earlier results.

Every rank builds every rank's inputs from (check, rank), so each computes locally what it
must receive and what combine must return. Tokens are small integers, routing weights
quarters and the test experts multiply by small integers, so every reference is exact in
float32 and results are compared bit for bit.
"""

from __future__ import annotations

import importlib.util
import json
import sys
import traceback
import zlib
from collections.abc import Callable
from pathlib import Path

import torch

import tessera.dist as tdist
from tessera.dist import moe
from tessera.dist.moe import DispatchHandle, combine, dispatch
from tessera.errors import CommError, DtypeError, ShapeError, TesseraError

comm = tdist.init()
rank, size = comm.rank, comm.size
outdir = Path(sys.argv[1])
results: dict[str, str] = {}
HIDDEN = 5
Inputs = tuple[torch.Tensor, torch.Tensor, torch.Tensor]


def record(name: str, fn: Callable[[], None]) -> None:
    """Run one check; keep going whatever it does, and flush the results file."""
    try:
        fn()
        results[name] = "ok"
    except BaseException as e:  # reported in the results, not swallowed
        results[name] = f"{type(e).__name__}: {e}\n{traceback.format_exc(limit=6)}"
    (outdir / f"rank{rank}.json").write_text(json.dumps(results, indent=1))


def random_inputs(tag: str, r: int, tokens: int, k: int, experts: int,
                  dtype: torch.dtype) -> Inputs:
    """Rank r's (x, topk_ids, topk_weights): integer tokens, any ids (repeats included),
    weights in quarters."""
    g = torch.Generator().manual_seed(zlib.crc32(f"{tag}/{r}".encode()))
    x = torch.randint(-8, 9, (tokens, HIDDEN), generator=g).to(dtype)
    ids = torch.randint(0, experts, (tokens, k), generator=g)
    weights = torch.randint(1, 9, (tokens, k), generator=g) / 4
    return x, ids, weights


def expert(rows: torch.Tensor, experts: torch.Tensor, wide: bool) -> torch.Tensor:
    """The test's expert e: rows * (e + 1) in float32 (and rows - e beside it if `wide`)."""
    f = experts.float()[:, None]
    y = rows.float() * (f + 1)
    return torch.cat([y, rows.float() - f], 1) if wide else y


def same(got: torch.Tensor, want: torch.Tensor, what: str) -> None:
    if got.dtype != want.dtype or got.shape != want.shape or not torch.equal(got, want):
        raise AssertionError(f"{what}: got {got.dtype} {tuple(got.shape)}\n{got}\nwant "
                             f"{want.dtype} {tuple(want.shape)}\n{want}")


def round_trip(inputs: list[Inputs], experts: int, *, wide: bool = False,
               out_dtype: torch.dtype | None = None) -> None:
    """dispatch this rank's inputs, check what arrives against the reference, apply the test
    experts (output in `out_dtype`, default float32), combine and check the result."""
    local = experts // size
    x, ids, weights = inputs[rank]
    recv_x, recv_ids, counts, handle = dispatch(x, ids, weights, experts, comm)

    # Arrivals: grouped by local expert, then by source rank, then by pair t*k + j.
    rows, want_ids, want_counts = [], [], []
    for e in range(local):
        n = 0
        for rx, rids, _ in inputs:
            pairs = (rids.reshape(-1) == rank * local + e).nonzero().flatten()
            rows.append(rx[pairs // rids.shape[1]])
            n += len(pairs)
        want_ids += [e] * n
        want_counts.append(n)
    same(recv_x, torch.cat(rows), "recv_x")
    same(recv_ids, torch.tensor(want_ids, dtype=torch.int64), "recv_expert_ids")
    same(counts, torch.tensor(want_counts, dtype=torch.int64), "counts")

    y = expert(recv_x, recv_ids + rank * local, wide).to(out_dtype or torch.float32)
    out = combine(y, handle)
    want = sum((weights[:, j, None] * expert(x, ids[:, j], wide) for j in range(ids.shape[1])),
               torch.zeros(x.shape[0], y.shape[1]))
    same(out, want.to(x.dtype), "combine")


def random_case(dtype: torch.dtype, k: int, local: int, wide: bool = False,
                out_dtype: torch.dtype | None = None) -> Callable[[], None]:
    def run() -> None:
        tag = f"random/{dtype}/{k}/{local}/{wide}/{out_dtype}"
        experts = local * size
        inputs = [random_inputs(tag, r, 7 + 3 * r, k, experts, dtype) for r in range(size)]
        round_trip(inputs, experts, wide=wide, out_dtype=out_dtype)
    return run


def check_uneven_one_rank_receives() -> None:
    # Every token picks experts 0 and 1 (both on rank 0): the other ranks receive nothing,
    # experts 2.. get no rows, and rank 1 has no tokens at all.
    experts = 2 * size
    inputs = []
    for r in range(size):
        x, _, w = random_inputs("uneven", r, 0 if r == 1 else 6 + r, 2, experts,
                                torch.float32)
        ids = torch.tensor([[0, 1], [1, 0]]).repeat(x.shape[0], 1)[:x.shape[0]]
        inputs.append((x, ids, w))
    round_trip(inputs, experts)


def check_uneven_empty_local_expert() -> None:
    # Top-1 to the last expert only: the last rank's first expert is empty, its second gets
    # every row, and every other rank receives nothing.
    experts = 2 * size
    inputs = []
    for r in range(size):
        x, ids, w = random_inputs("last", r, 4 + r, 1, experts, torch.bfloat16)
        inputs.append((x, torch.full_like(ids, experts - 1), w))
    round_trip(inputs, experts)


def check_no_tokens() -> None:
    inputs = [random_inputs("none", r, 0, 2, 3 * size, torch.float32) for r in range(size)]
    round_trip(inputs, 3 * size)


def large(fn: Callable[[], None], split: bool = False) -> Callable[[], None]:
    """fn as large calls run it: through the kept scratch buffers, and with `split` one
    exchange per local expert."""
    def run() -> None:
        saved = moe._SCRATCH_MIN_BYTES, moe._SPLIT_MIN_BYTES
        moe._SCRATCH_MIN_BYTES = 0
        if split:
            moe._SPLIT_MIN_BYTES = 0
        try:
            fn()
        finally:
            moe._SCRATCH_MIN_BYTES, moe._SPLIT_MIN_BYTES = saved
    return run


def check_out_buffer() -> None:
    # recv_x is out[:N] when out has room, else a new tensor; the same rows either way.
    x, ids, w = random_inputs("out", rank, 6, 2, 2 * size, torch.float32)
    want, _, _, _ = dispatch(x, ids, w, 2 * size, comm)
    room = torch.full((len(want) + 3, HIDDEN), float("nan"))
    got, recv_ids, _, handle = dispatch(x, ids, w, 2 * size, comm, out=room)
    same(got, want, "recv_x in out")
    assert got.data_ptr() == room.data_ptr() and len(got) == len(want)
    assert torch.isnan(room[len(want):]).all(), "wrote past recv_x"
    y = expert(got, recv_ids + 2 * rank, False)
    same(combine(y, handle), sum(w[:, j, None] * expert(x, ids[:, j], False)
                                 for j in range(2)), "combine")
    small = torch.empty(max(len(want) - 1, 0), HIDDEN)
    got, _, _, _ = dispatch(x, ids, w, 2 * size, comm, out=small)
    same(got, want, "recv_x with too small an out")
    assert len(want) == 0 or got.data_ptr() != small.data_ptr()


def check_bad_out() -> None:
    x, ids, w = good()
    for bad in (torch.empty(64, HIDDEN + 1), torch.empty(64, HIDDEN, dtype=torch.float64),
                torch.empty(HIDDEN, 64).t(), torch.empty(64 * HIDDEN), x,
                torch.empty(64, HIDDEN, requires_grad=True), x.numpy()):
        expect(ShapeError, "out must be",
               lambda bad=bad: dispatch(x, ids, w, 2 * size, comm, out=bad))
    healthy()


def check_grad_and_inference_mode() -> None:
    # x needing grad is sent as data; scratch made in inference mode serves later calls.
    x, ids, w = random_inputs("grad", rank, 5, 2, 2 * size, torch.float32)
    want = sum(w[:, j, None] * expert(x, ids[:, j], False) for j in range(2))
    x.requires_grad_()
    for mode in (torch.inference_mode(), torch.no_grad(), torch.enable_grad()):
        with mode:
            recv_x, recv_ids, _, handle = dispatch(x, ids, w, 2 * size, comm)
            y = expert(recv_x, recv_ids + 2 * rank, False)
            same(combine(y, handle), want, f"combine under {type(mode).__name__}")


def check_int32_ids_and_reuse() -> None:
    # int32 ids and bfloat16 weights are accepted; a handle can combine more than once.
    x, ids, w = random_inputs("i32", rank, 5, 2, 2 * size, torch.float32)
    recv_x, recv_ids, _, handle = dispatch(x, ids.int(), w.bfloat16(), 2 * size, comm)
    y = expert(recv_x, recv_ids + 2 * rank, False)
    first = combine(y, handle)
    same(combine(y, handle), first, "second combine")
    want = sum(w[:, j, None] * expert(x, ids[:, j], False) for j in range(2))
    same(first, want, "combine")


# ------------------------------------------------------------------------- bad inputs


def expect(error: type[TesseraError], text: str, fn: Callable[[], object]) -> None:
    """fn must raise `error` (a TesseraError) whose message contains `text`."""
    try:
        fn()
    except error as e:
        assert isinstance(e, TesseraError) and text in str(e), f"wrong message: {e}"
        return
    raise AssertionError(f"no {error.__name__} ({text!r})")


def healthy() -> None:
    """After a rejected call the communicator still works: a full round trip."""
    check_no_tokens()
    random_case(torch.float32, 2, 2)()


def good(experts: int = 2 * size) -> Inputs:
    return random_inputs("good", rank, 4, 2, experts, torch.float32)


def check_bad_num_experts() -> None:
    x, ids, w = good()
    for bad in ([size + 1] if size > 1 else []) + [0, -size, True, 2.0 * size]:
        expect(ShapeError, "cannot be split evenly",
               lambda bad=bad: dispatch(x, ids, w, bad, comm))
    healthy()


def check_bad_ids() -> None:
    x, ids, w = good()
    for bad in (2 * size, -1):
        wrong = ids.clone()
        wrong[-1, 0] = bad
        expect(ShapeError, "outside 0..", lambda wrong=wrong: dispatch(x, wrong, w, 2 * size,
                                                                       comm))
    expect(DtypeError, "topk_ids is torch.float32",
           lambda: dispatch(x, ids.float(), w, 2 * size, comm))
    for shape in (ids[:-1], ids[:, :0], ids[:, 0]):
        expect(ShapeError, "topk_ids must be",
               lambda shape=shape: dispatch(x, shape, w, 2 * size, comm))
    healthy()


def check_bad_weights() -> None:
    x, ids, w = good()
    for shape in (w[:, :1], w[:-1], w.t()):
        expect(ShapeError, "topk_weights must have",
               lambda shape=shape: dispatch(x, ids, shape, 2 * size, comm))
    expect(DtypeError, "topk_weights is torch.int64",
           lambda: dispatch(x, ids, ids, 2 * size, comm))
    healthy()


def check_bad_x() -> None:
    x, ids, w = good()
    expect(ShapeError, "x must be", lambda: dispatch(x[0], ids, w, 2 * size, comm))
    expect(ShapeError, "x must be", lambda: dispatch(x.numpy(), ids, w, 2 * size, comm))
    expect(DtypeError, "x is torch.int32", lambda: dispatch(x.int(), ids, w, 2 * size, comm))
    expect(CommError, "comm must be", lambda: dispatch(x, ids, w, 2 * size, None))
    healthy()


def check_bad_combine() -> None:
    x, ids, w = good()
    recv_x, _, _, handle = dispatch(x, ids, w, 2 * size, comm)
    expect(ShapeError, "combine: y must be", lambda: combine(recv_x[1:], handle))
    expect(ShapeError, "combine: y must be", lambda: combine(recv_x[:, 0], handle))
    expect(ShapeError, "combine: y must be", lambda: combine(recv_x.numpy(), handle))
    expect(TesseraError, "handle must be", lambda: combine(recv_x, (handle,)))
    assert isinstance(handle, DispatchHandle)
    same(combine(recv_x, handle), sum(w[:, j, None] * x for j in range(2)), "combine")
    healthy()


def check_one_rank_bad() -> None:
    # Only the last rank's ids are out of range: it raises ShapeError, every other rank a
    # CommError naming it, promptly (not after the timeout), and the communicator lives on.
    x, ids, w = good()
    if rank == size - 1:
        ids = ids.clone()
        ids[0, 0] = 2 * size
        expect(ShapeError, "outside 0..", lambda: dispatch(x, ids, w, 2 * size, comm))
    else:
        expect(CommError, f"rank {size - 1} passed invalid inputs",
               lambda: dispatch(x, ids, w, 2 * size, comm))
    healthy()


def check_example() -> None:
    path = Path(__file__).resolve().parents[3] / "examples" / "moe_expert_parallel.py"
    spec = importlib.util.spec_from_file_location("moe_expert_parallel", path)
    assert spec is not None and spec.loader is not None
    example = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(example)
    for argv in (["--tokens", "24"], ["--tokens", "16", "--topk", "1", "--dtype", "bfloat16",
                                      "--experts", str(2 * size)]):
        error = example.main(argv)
        assert 0 <= error <= 1e-4 * (100 if "bfloat16" in argv else 1), error


def main() -> None:
    f32, bf16 = torch.float32, torch.bfloat16
    checks: dict[str, Callable[[], None]] = {
        "float32_top1_one_expert_per_rank": random_case(f32, 1, 1),
        "float32_top2_three_experts_per_rank": random_case(f32, 2, 3),
        "float32_top2_wider_output": random_case(f32, 2, 2, wide=True),
        "bfloat16_top1_float32_output": random_case(bf16, 1, 2),
        "bfloat16_top2_bfloat16_output": random_case(bf16, 2, 1, out_dtype=bf16),
        "uneven_one_rank_receives": check_uneven_one_rank_receives,
        "uneven_empty_local_expert": check_uneven_empty_local_expert,
        "no_tokens": check_no_tokens,
        "int32_ids_and_reuse": check_int32_ids_and_reuse,
        "out_buffer": check_out_buffer,
        "grad_and_inference_mode": large(check_grad_and_inference_mode),
        "large_float32_top2_three_experts_per_rank": large(random_case(f32, 2, 3)),
        "large_bfloat16_top2_bfloat16_output": large(random_case(bf16, 2, 2, out_dtype=bf16)),
        "large_float32_top1_one_expert_per_rank": large(random_case(f32, 1, 1)),
        "split_float32_top2_three_experts_per_rank": large(random_case(f32, 2, 3), True),
        "split_float32_top2_wider_output": large(random_case(f32, 2, 2, wide=True), True),
        "split_bfloat16_top2_bfloat16_output":
            large(random_case(bf16, 2, 2, out_dtype=bf16), True),
        "split_uneven_one_rank_receives": large(check_uneven_one_rank_receives, True),
        "split_uneven_empty_local_expert": large(check_uneven_empty_local_expert, True),
        "split_no_tokens": large(check_no_tokens, True),
        "split_int32_ids_and_reuse": large(check_int32_ids_and_reuse, True),
        "split_out_buffer": large(check_out_buffer, True),
        "bad_num_experts": check_bad_num_experts,
        "bad_ids": check_bad_ids,
        "bad_weights": check_bad_weights,
        "bad_x": check_bad_x,
        "bad_combine": check_bad_combine,
        "bad_out": check_bad_out,
        "one_rank_bad": check_one_rank_bad,
        "example": check_example,
    }
    for name, fn in checks.items():
        record(name, fn)
    tdist.finalize()


if __name__ == "__main__":
    main()
