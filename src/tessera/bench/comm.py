"""Suite `comm`: tessera.dist collectives against Open MPI (mpi4py) and gloo
(torch.distributed), all three in the same ranks on the same float32 buffers: allreduce
latency at 8 B..64 KB per rank (goal: no slower than Open MPI, under 10% of gloo's time),
allreduce bandwidth at 1..64 MB (goal at 16 MB: >= 1.5x Open MPI's), alltoall at 4 KB..16 MB.
Sizes are bytes per rank; GB/s is that size over the time (algorithm bandwidth).

Ranks are processes, so this suite launches `mpirun -np RANKS` workers
(tessera.bench.comm_worker) and gets finished rows back. `--quick` skips 16 MB and up.
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

from tessera.bench.runner import BenchError

_INSTALL = ("install Open MPI and mpi4py: apt-get install openmpi-bin libopenmpi-dev, "
            "then pip install mpi4py")
_TIMEOUT_S = 1800.0


def rows(quick: bool, ranks: int, only: str | None = None) -> list[dict[str, Any]]:
    """Run the suite in `ranks` processes under mpirun; the rows rank 0 reports. `only`:
    comma-separated name patterns (as `tessera bench --only`): the ranks build and time
    the matching cases alone."""
    if ranks < 2:
        raise BenchError(f"bench comm needs at least 2 ranks, got {ranks}",
                         hint="pass --ranks 2 or more")
    mpirun = shutil.which("mpirun")
    if mpirun is None:
        raise BenchError("bench comm launches its ranks with mpirun, which is not on PATH",
                         hint=_INSTALL)
    if importlib.util.find_spec("mpi4py") is None:
        raise BenchError("bench comm compares against mpi4py, which is not installed",
                         hint=_INSTALL)
    from tessera.runtime.cpu.device import usable_cores

    with tempfile.TemporaryDirectory(prefix="tessera-bench-comm-") as tmp:
        out = Path(tmp) / "rows.json"
        command = [mpirun, "-np", str(ranks),
                   *(["--oversubscribe"] if ranks > usable_cores() else []),
                   sys.executable, "-m", "mpi4py", "-m", "tessera.bench.comm_worker", str(out),
                   *(["--quick"] if quick else []), *(["--only", only] if only else [])]
        code, output = _launch(command)
        if not out.exists():
            tail = "\n".join(output.strip().splitlines()[-25:])
            raise BenchError(f"the {ranks} benchmark ranks failed (mpirun exit status "
                             f"{code}):\n{tail}", hint=f"command: {' '.join(command)}")
        result = json.loads(out.read_text())
    if "error" in result:
        raise BenchError(result["error"], hint=result["hint"])
    return result["rows"]


def _launch(command: list[str]) -> tuple[int, str]:
    """Run mpirun with a gloo rendezvous address; (exit status, its merged output).
    A run past the timeout is stopped with SIGTERM, which mpirun passes to its ranks."""
    env = {**os.environ, "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(_free_port())}
    if os.geteuid() == 0:  # containers run as root, which mpirun refuses unless told
        env.setdefault("OMPI_ALLOW_RUN_AS_ROOT", "1")
        env.setdefault("OMPI_ALLOW_RUN_AS_ROOT_CONFIRM", "1")
    with subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                          stdin=subprocess.DEVNULL, text=True) as proc:
        try:
            output, _ = proc.communicate(timeout=_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            proc.terminate()
            output, _ = proc.communicate()
            output += f"\n(stopped after {_TIMEOUT_S:.0f} s)"
        return proc.returncode, output


def _free_port() -> int:
    """A TCP port on the loopback that nothing listens on (for torch.distributed's store)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
