"""Fault scenarios run inside each rank: `python faults.py SCENARIO OUTDIR`.

Every rank that survives writes OUTDIR/rank<r>.json with what its collectives raised:
{"error": class name, "rank": the rank the error names, "message", "seconds": how long the
failing call took, "after": what the next call raised}.
"""

from __future__ import annotations

import json
import os
import signal
import sys
import time
from pathlib import Path

import numpy as np

import tessera.dist as tdist


def outcome(fn) -> dict:
    t0 = time.perf_counter()
    try:
        fn()
    except Exception as e:
        return {"error": type(e).__name__, "rank": getattr(e, "rank", None),
                "message": str(e), "seconds": time.perf_counter() - t0}
    return {"error": None, "seconds": time.perf_counter() - t0}


def scenario(name: str, c) -> dict | None:
    r = c.rank
    ones = np.ones(10, np.float32)
    if name in ("dead", "killed"):
        c.barrier()
        if r == 1:
            if name == "killed":
                os.kill(os.getpid(), signal.SIGKILL)
            os._exit(0)
        return outcome(lambda: c.allreduce(np.ones(1 << 20, np.float32)))
    if name in ("stuck", "stuck_two_nodes"):
        c.barrier()
        if r == 1:
            time.sleep(6)                       # alive but silent past rank 0's timeout
        return outcome(lambda: c.allreduce(ones))
    if name == "mismatch_size":                 # rank 2 of 3 passes one more element
        return outcome(lambda: c.allreduce(np.ones(10 + (r == 2), np.float32)))
    if name == "mismatch_large":                # two-shot: chunks of 1 MiB
        return outcome(lambda: c.allreduce(np.ones((1 << 20) + r, np.float32)))
    if name == "mismatch_dtype":
        return outcome(lambda: c.allreduce(ones.astype(np.int32) if r else ones))
    if name == "mismatch_op":
        return outcome(lambda: c.allreduce(ones, op="max" if r else "sum"))
    if name == "mismatch_kind":
        return outcome(lambda: c.broadcast(ones) if r else c.allreduce(ones))
    if name == "mismatch_root":
        return outcome(lambda: c.broadcast(ones, root=r))
    if name == "mismatch_alltoallv":            # rank 1 expects two rows from rank 0
        recv = [2, 1] if r == 1 else [1, 1]
        return outcome(lambda: c.alltoallv(np.ones((2, 3), np.float32), [1, 1], recv))
    if name == "recv_mismatch":
        if r == 0:
            return outcome(lambda: c.send(np.ones(10, np.float32), 1, tag=4))
        return outcome(lambda: c.recv(np.ones(12, np.float32), 0, tag=4))
    raise SystemExit(f"unknown scenario {name}")


def main() -> None:
    name, out = sys.argv[1], Path(sys.argv[2])
    timeout = 2.0 if name.startswith("stuck") else 60.0
    c = tdist.init(timeout=timeout)
    result = scenario(name, c)
    result["after"] = outcome(lambda: c.allreduce(np.ones(4, np.float32)))["error"]
    (out / f"rank{c.rank}.json").write_text(json.dumps(result))


if __name__ == "__main__":
    main()
