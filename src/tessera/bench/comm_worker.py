"""One rank of `tessera bench comm`, started under mpirun by tessera.bench.comm: times
tessera.dist, Open MPI (mpi4py) and gloo (torch.distributed) on the same buffers, in step
with the other ranks, and rank 0 writes the rows (or the error) to a JSON file.

    python -m mpi4py -m tessera.bench.comm_worker OUT.json [--quick] [--only PATTERNS]

Rank, size and the gloo rendezvous come from mpirun's environment plus MASTER_ADDR and
MASTER_PORT, which the launching process sets.
"""

from __future__ import annotations

import argparse
import fnmatch
import json
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from mpi4py import MPI

import tessera.dist as tdist
from tessera.bench.runner import BenchError, Case, run_case

KB, MB = 1 << 10, 1 << 20
LATENCY = {"8B": 8, "256B": 256, "4KB": 4 * KB, "64KB": 64 * KB}
BANDWIDTH = {"1MB": MB, "16MB": 16 * MB, "64MB": 64 * MB}
ALLTOALL = {"4KB": 4 * KB, "1MB": MB, "16MB": 16 * MB}
QUICK_SKIP = 16 * MB  # --quick: sizes below this only (a check, not a measurement)


class SyncedClock:
    """A clock for runner.time_case that gives every rank the same sample time: the first
    read of a sample waits at a barrier, the second returns the start plus the slowest
    rank's elapsed time. So all ranks calibrate the same calls per sample and stay in step,
    and a sample measures the collective until its last rank is done."""

    def __init__(self, comm: Any):
        self._comm = comm
        self._start: int | None = None
        self._elapsed = np.zeros(1, np.int64)

    def __call__(self) -> int:
        if self._start is None:
            self._comm.Barrier()
            self._start = time.perf_counter_ns()
            return self._start
        self._elapsed[0] = time.perf_counter_ns() - self._start
        self._comm.Allreduce(MPI.IN_PLACE, self._elapsed, op=MPI.MAX)
        start, self._start = self._start, None
        return start + int(self._elapsed[0])


def _agree(comm: Any, errors: list[str]) -> None:
    """Raise AssertionError on every rank if any rank found a wrong result, so all ranks
    leave the benchmark together instead of waiting in the next collective."""
    found = [f"rank {r}: {e}" for r, errs in enumerate(comm.allgather(errors)) for e in errs]
    if found:
        raise AssertionError("; ".join(found[:4]))


def _mismatch(impl: str, what: str, got: np.ndarray, want: np.ndarray) -> list[str]:
    """[] if `got` is `want`, else the first wrong element, named."""
    if np.array_equal(got, want):
        return []
    i = int(np.flatnonzero(got != want)[0])
    return [f"{what} by {impl}: element {i} is {got[i]}, expected {want[i]}"]


def _allreduce_case(name: str, nbytes: int, tcomm: tdist.Communicator, mcomm: Any,
                    latency: bool) -> Case:
    """In-place sum of `nbytes` of float32 per rank, reported as microseconds (`latency`)
    or GB/s per rank. The check sums small rank-dependent integers (exact in float32);
    timing then sums zeros, which neither overflow nor turn denormal however often."""
    n = max(1, nbytes // 4)
    buf = np.zeros(n, np.float32)
    tbuf = torch.from_numpy(buf)
    base = (np.arange(n) % 7).astype(np.float32)
    size = tcomm.size
    want = size * base + size * (size + 1) // 2
    impls = {"tessera": lambda: tcomm.allreduce(buf, out=buf),
             "mpi": lambda: mcomm.Allreduce(MPI.IN_PLACE, buf),
             "gloo": lambda: dist.all_reduce(tbuf)}

    def check() -> None:
        errors = []
        for impl, fn in impls.items():
            buf[:] = base + tcomm.rank + 1
            fn()
            errors += _mismatch(impl, "allreduce", buf, want)
        buf.fill(0)
        _agree(mcomm, errors)

    def extra(impl: str, t: float) -> dict[str, float]:
        return {"us": t * 1e6} if latency else {"gb_per_s": buf.nbytes / t / 1e9}

    return Case(name, impls, check=check, extra=extra,
                meta={"ranks": size, "bytes": buf.nbytes})


def _alltoall_case(name: str, nbytes: int, tcomm: tdist.Communicator, mcomm: Any) -> Case:
    """All-to-all of `nbytes` of float32 per rank in total (`size` equal blocks). The check
    sends block j of rank r the value (r * size + j) * 8 + k % 8 at offset k."""
    size, rank = tcomm.size, tcomm.rank
    block = max(1, nbytes // 4 // size)
    k = np.arange(block) % 8
    src = np.concatenate([(rank * size + j) * 8 + k for j in range(size)]).astype(np.float32)
    want = np.concatenate([(j * size + rank) * 8 + k for j in range(size)]).astype(np.float32)
    dst = np.empty_like(src)
    tsrc, tdst = torch.from_numpy(src), torch.from_numpy(dst)
    impls = {"tessera": lambda: tcomm.alltoall(src, out=dst),
             "mpi": lambda: mcomm.Alltoall(src, dst),
             "gloo": lambda: dist.all_to_all_single(tdst, tsrc)}

    def check() -> None:
        errors = []
        for impl, fn in impls.items():
            dst.fill(np.nan)
            fn()
            errors += _mismatch(impl, "alltoall", dst, want)
        _agree(mcomm, errors)

    return Case(name, impls, check=check,
                extra=lambda impl, t: {"gb_per_s": src.nbytes / t / 1e9},
                meta={"ranks": size, "bytes": src.nbytes})


def cases(quick: bool, tcomm: tdist.Communicator, mcomm: Any, only: list[str] | None = None
          ) -> Iterator[Case]:
    """The suite's cases whose names match a pattern of `only` (fnmatch; all if None),
    built one at a time so earlier cases' buffers can be freed."""
    def wanted(name: str, nbytes: int) -> bool:
        return not (quick and nbytes >= QUICK_SKIP) and (
            only is None or any(fnmatch.fnmatchcase(name, p) for p in only))

    for label, nbytes in LATENCY.items():
        if wanted(name := f"allreduce_{label}", nbytes):
            yield _allreduce_case(name, nbytes, tcomm, mcomm, latency=True)
    for label, nbytes in BANDWIDTH.items():
        if wanted(name := f"allreduce_{label}", nbytes):
            yield _allreduce_case(name, nbytes, tcomm, mcomm, latency=False)
    for label, nbytes in ALLTOALL.items():
        if wanted(name := f"alltoall_{label}", nbytes):
            yield _alltoall_case(name, nbytes, tcomm, mcomm)


def main(argv: list[str] | None = None) -> None:
    """Run every case on this rank; rank 0 writes {"rows": [...]} or {"error", "hint"}."""
    parser = argparse.ArgumentParser(prog="tessera.bench.comm_worker")
    parser.add_argument("out", type=Path)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--only", help="comma-separated fnmatch patterns of case names")
    args = parser.parse_args(argv)
    mcomm = MPI.COMM_WORLD
    tcomm = tdist.init("mpi")
    dist.init_process_group("gloo", init_method="env://", rank=mcomm.rank,
                            world_size=mcomm.size)
    clock = SyncedClock(mcomm)
    result: dict[str, Any]
    try:
        rows = []
        only = [p.strip() for p in args.only.split(",") if p.strip()] if args.only else None
        for case in cases(args.quick, tcomm, mcomm, only):
            rows += run_case("comm", case, rounds=7 if args.quick else 21,
                             min_sample_s=0.01 if args.quick else 0.02, clock=clock)
        result = {"rows": rows}
    except BenchError as e:  # raised on every rank alike (see _agree)
        result = {"error": e.message, "hint": e.hint}
    if mcomm.rank == 0:
        args.out.write_text(json.dumps(result))
    dist.destroy_process_group()
    tdist.finalize()


if __name__ == "__main__":
    main()
