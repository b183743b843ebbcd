"""Collective checks run inside every rank of a launched job (mpirun or torchrun).

`python cases.py OUTDIR [CASE ...]` initializes tessera.dist, runs the cases (all by
default), and writes OUTDIR/rank<r>.json: {case: "ok" or the traceback}. Each rank builds
every rank's input from a seed, so it can compute the expected result alone.
"""

from __future__ import annotations

import json
import os
import sys
import traceback
from pathlib import Path

import numpy as np
import torch

import tessera.dist as tdist

DTYPES = ["float32", "float16", "bfloat16", "int32", "int64", "float64", "uint8"]
SIZES = [0, 1, 13, 1000, 70001]


def data(rank: int, n: int, dtype: str, op: str = "sum", lib: str = "numpy", salt: int = 0):
    """Rank `rank`'s input: small integers (exact in every dtype, also multiplied), plus
    halves for float max/min so ordering is tested on non-integers."""
    rng = np.random.default_rng(rank * 7919 + n * 31 + salt)
    lo, hi = (1, 3) if op == "prod" else (0, 9)
    v = rng.integers(lo, hi, n).astype(np.float64)
    if op in ("max", "min") and dtype.startswith(("float", "bfloat")):
        v = v - 4.5 * rng.integers(0, 2, n)
    return convert(v, dtype, lib)


def convert(v: np.ndarray, dtype: str, lib: str):
    t = torch.from_numpy(np.ascontiguousarray(v)).to(getattr(torch, dtype))
    return t if lib == "torch" else t.numpy()


def reference(arrays: list[np.ndarray], op: str) -> np.ndarray:
    stack = np.stack(arrays).astype(np.float64)
    return {"sum": stack.sum(0), "prod": stack.prod(0), "max": stack.max(0),
            "min": stack.min(0)}[op]


def as_f64(x) -> np.ndarray:
    if isinstance(x, torch.Tensor):
        return x.double().numpy()
    return x.astype(np.float64)


def check(got, want: np.ndarray, what: str) -> None:
    got = as_f64(got).reshape(-1)
    want = np.asarray(want, np.float64).reshape(-1)
    assert got.shape == want.shape, f"{what}: shape {got.shape} != {want.shape}"
    bad = np.flatnonzero(got != want)
    assert bad.size == 0, f"{what}: {bad.size} wrong, first at {bad[0]}: {got[bad[0]]} != " \
                          f"{want[bad[0]]}"


def libs(dtype: str) -> list[str]:
    return ["torch"] if dtype == "bfloat16" else ["numpy", "torch"]


def all_inputs(c, n, dtype, op, lib, salt=0):
    """Every rank's input as float64, and this rank's own in its dtype."""
    mine = data(c.rank, n, dtype, op, lib, salt)
    everyone = [as_f64(data(r, n, dtype, op, "torch", salt)) for r in range(c.size)]
    return mine, everyone


# ---------------------------------------------------------------------------- cases

def case_allreduce(c):
    for dtype in DTYPES:
        for op in tdist.OPS:
            if dtype == "uint8" and op == "prod":
                continue
            for n in SIZES:
                for lib in libs(dtype):
                    x, xs = all_inputs(c, n, dtype, op, lib)
                    want = reference(xs, op)
                    check(c.allreduce(x, op), want, f"allreduce {dtype} {op} n={n} {lib}")
                    c.allreduce(x, op, out=x)                     # in place
                    check(x, want, f"allreduce in place {dtype} {op} n={n} {lib}")


def case_allreduce_shapes(c):
    x = torch.arange(24.0).reshape(2, 3, 4) + c.rank
    y = c.allreduce(x)
    assert y.shape == (2, 3, 4)
    check(y, sum(np.arange(24.0).reshape(2, 3, 4) + r for r in range(c.size)), "3-d")
    base = np.arange(40.0).reshape(8, 5) + c.rank
    strided = base[:, 1:4]                                        # not contiguous
    check(c.allreduce(strided), sum((np.arange(40.0).reshape(8, 5) + r)[:, 1:4]
                                    for r in range(c.size)), "strided input")
    out = np.zeros((5, 8)).T                                       # strided output
    c.allreduce(base, out=out)
    check(out, sum(np.arange(40.0).reshape(8, 5) + r for r in range(c.size)), "strided out")
    t = torch.ones(6, 4)[:, ::2] * (c.rank + 1)                    # strided torch in place
    c.allreduce(t, out=t)
    check(t, np.full((6, 2), c.size * (c.size + 1) / 2), "strided torch in place")


def case_reduce(c):
    for root in range(c.size):
        for dtype in ("float32", "bfloat16", "int64"):
            for n in (5, 70001):
                x, xs = all_inputs(c, n, dtype, "max", "torch", salt=root)
                got = c.reduce(x, root=root, op="max")
                if c.rank == root:
                    check(got, reference(xs, "max"), f"reduce root {root} {dtype} n={n}")
                else:
                    assert got is None


def case_broadcast(c):
    for root in range(c.size):
        for n in (0, 3, 300001):
            for dtype in ("float32", "float16", "int32"):
                x = data(c.rank, n, dtype, salt=root)
                assert c.broadcast(x, root=root) is x
                check(x, as_f64(data(root, n, dtype, "sum", "torch", salt=root)),
                      f"broadcast root {root} {dtype} n={n}")
    t = torch.zeros(4, 6)[:, 1:5]
    if c.rank == 0:
        t.fill_(7)
    c.broadcast(t)
    check(t, np.full((4, 4), 7.0), "broadcast strided")


def case_allgather(c):
    for n in (0, 1, 7, 100003):
        for lib in ("numpy", "torch"):
            x = data(c.rank, n, "float32", lib=lib)
            got = c.allgather(x)
            assert tuple(got.shape) == (c.size, n)
            check(got, np.stack([as_f64(data(r, n, "float32")) for r in range(c.size)]),
                  f"allgather n={n} {lib}")


def _uneven(c, scale):
    return [(r * 5 + 3) % 4 * scale + (r == 1) for r in range(c.size)]


def case_allgatherv(c):
    for scale in (1, 5000):
        counts = _uneven(c, scale)
        x = np.full((counts[c.rank], 3), c.rank, np.int64)
        want = np.concatenate([np.full((k, 3), r) for r, k in enumerate(counts)])
        check(c.allgatherv(x, counts), want, f"allgatherv scale {scale}")
        check(c.allgatherv(torch.from_numpy(x)), want, f"allgatherv counts exchanged {scale}")


def case_reduce_scatter(c):
    for n in (1, 4, 20001):
        for dtype in ("float32", "bfloat16", "int32"):
            x, xs = all_inputs(c, n * c.size, dtype, "sum", "torch")
            got = c.reduce_scatter(x)
            check(got, reference(xs, "sum")[c.rank * n:(c.rank + 1) * n],
                  f"reduce_scatter {dtype} n={n}")
    counts = _uneven(c, 3000)
    total = sum(counts)
    x, xs = all_inputs(c, total * 2, "float64", "min", "numpy")
    got = c.reduce_scatterv(x.reshape(total, 2), counts, op="min")
    lo = sum(counts[:c.rank])
    check(got, reference(xs, "min").reshape(total, 2)[lo:lo + counts[c.rank]],
          "reduce_scatterv")


def case_alltoall(c):
    for n in (1, 3, 40000):
        x = (np.arange(c.size * n, dtype=np.float32) + 1000 * c.rank).reshape(c.size, n)
        got = c.alltoall(x)
        want = np.stack([np.arange(c.size * n).reshape(c.size, n)[c.rank] + 1000 * r
                         for r in range(c.size)])
        check(got, want, f"alltoall n={n}")
        c.alltoall(x, out=x)                                          # in place
        check(x, want, f"alltoall in place n={n}")
        y = (np.arange(c.size * n, dtype=np.float32) + 1000 * c.rank).reshape(c.size, n)
        c.alltoall(y, out=y.view())                                   # a view of x as out
        check(y, want, f"alltoall into a view of its input n={n}")


def case_alltoallv(c):
    def counts(r):  # what rank r sends each rank: uneven, some zero
        return [(r * 3 + q * 5) % 4 * 2500 for q in range(c.size)]
    mine = counts(c.rank)
    x = np.concatenate([np.full((k, 2), 100 * c.rank + q, np.int32)
                        for q, k in enumerate(mine)])
    want = np.concatenate([np.full((counts(r)[c.rank], 2), 100 * r + c.rank)
                           for r in range(c.size)])
    check(c.alltoallv(x, mine), want, "alltoallv")
    check(c.alltoallv(torch.from_numpy(x), mine,
                      [counts(r)[c.rank] for r in range(c.size)]), want, "alltoallv recv given")


def case_alltoallv_small_and_large_blocks(c):
    """Blocks below the direct-copy threshold (they travel in the segment) beside larger
    ones (read straight from the sender) in one call, counts given on both sides."""
    def rows(src, dst):
        return [0, 700, 3000][(src + 2 * dst) % 3]          # 0, 5.6 KB, 24 KB of int32 x 2
    mine = [rows(c.rank, q) for q in range(c.size)]
    x = np.concatenate([np.full((k, 2), 100 * c.rank + q, np.int32) for q, k in enumerate(mine)])
    recv = [rows(r, c.rank) for r in range(c.size)]
    want = np.concatenate([np.full((k, 2), 100 * r + c.rank) for r, k in enumerate(recv)])
    for _ in range(3):                                       # slots reused across calls
        check(c.alltoallv(x, mine, recv), want, "alltoallv mixed blocks")
        check(c.alltoallv(torch.from_numpy(x), mine, recv), want, "alltoallv mixed torch")


def case_send_recv(c):
    right, left = (c.rank + 1) % c.size, (c.rank - 1) % c.size
    for n in (0, 5, 1 << 20):                                        # 4 MB: many pieces
        x = np.arange(n, dtype=np.float32) + c.rank
        got = np.empty(n, np.float32)
        work = c.isend(x, right, tag=n % 7)
        c.recv(got, left, tag=n % 7)
        work.wait()
        check(got, np.arange(n) + left, f"ring n={n}")
    if c.rank == 0:
        c.send(torch.arange(10), 1 % c.size if c.size > 1 else 0, tag=1)
    if c.rank == 1:
        check(c.recv(torch.empty(10, dtype=torch.int64), 0, tag=1), np.arange(10), "send")


def case_barrier_and_async(c):
    c.barrier()
    works = [c.allreduce(np.full(1000, c.rank + i, np.float32), async_op=True)
             for i in range(8)]
    mid = c.allgather(np.array([c.rank]))                            # sync after async
    check(mid, np.arange(c.size)[:, None], "sync after async")
    for i, w in enumerate(works):
        check(w.wait(), np.full(1000, sum(r + i for r in range(c.size))), f"async {i}")
        assert w.is_completed()
    c.barrier(async_op=True).wait()


def case_split(c):
    sub = c.split(c.rank % 2, key=-c.rank)                            # reversed order
    members = [r for r in range(c.size) if r % 2 == c.rank % 2]
    assert sub.size == len(members)
    assert sub.rank == sorted(members, reverse=True).index(c.rank)
    got = sub.allgather(np.array([c.rank]))[:, 0].tolist()
    assert got == sorted(members, reverse=True), got
    check(sub.allreduce(np.ones(70001)), np.full(70001, len(members)), "split allreduce")
    none = c.split(None if c.rank == 0 else 1)
    assert (none is None) == (c.rank == 0)
    if none is not None:
        assert none.size == c.size - 1
        check(none.allreduce(np.array([c.rank])), [sum(range(1, c.size))], "split without 0")
    c.barrier()                                                       # parent still in step


def case_allgather_object(c):
    got = c.allgather_object({"rank": c.rank, "blob": "x" * (c.rank * 10000)})
    assert [g["rank"] for g in got] == list(range(c.size))
    assert [len(g["blob"]) for g in got] == [r * 10000 for r in range(c.size)]


CASES = {name[5:]: fn for name, fn in globals().items() if name.startswith("case_")}


def main() -> None:
    out = Path(sys.argv[1])
    names = sys.argv[2:] or list(CASES)
    comm = tdist.init()
    results = {"size": comm.size, "nodes": comm.nodes, "transport": repr(comm)}
    path = out / f"rank{comm.rank}.json"
    for name in names:
        try:
            CASES[name](comm)
            results[name] = "ok"
        except Exception:
            results[name] = traceback.format_exc()
        path.write_text(json.dumps(results))  # what is done survives the launcher's kill
        if results[name] != "ok":       # ranks may be out of step: leave at once (no MPI
            os._exit(1)                 # finalize waiting for them); peers see this rank die


if __name__ == "__main__":
    main()
