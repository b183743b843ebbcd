"""Launching multi-process jobs from tests: mpirun or torchrun, with a deadline."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest

WORKERS = Path(__file__).parent / "workers"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def command(launcher: str, nranks: int, script: Path, args: list[str]) -> list[str]:
    if launcher == "mpirun":
        mpirun = shutil.which("mpirun")
        if mpirun is None:
            pytest.fail("mpirun is not installed: apt-get install openmpi-bin libopenmpi-dev")
        return [mpirun, "--oversubscribe", "-np", str(nranks), sys.executable, str(script),
                *args]
    return [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(nranks),
            "--master-addr", "127.0.0.1", "--master-port", str(free_port()), str(script),
            *args]


def run(launcher: str, nranks: int, script: Path, args: list[str], *,
        env: dict[str, str] | None = None, timeout: float = 240) -> subprocess.CompletedProcess:
    """Run a job to completion; the job's output is returned, not checked."""
    full = {**os.environ, "OMPI_ALLOW_RUN_AS_ROOT": "1", "OMPI_ALLOW_RUN_AS_ROOT_CONFIRM": "1",
            "OMPI_MCA_rmaps_base_oversubscribe": "1", "OMP_NUM_THREADS": "1",
            "PYTHONUNBUFFERED": "1", **(env or {})}
    return subprocess.run(command(launcher, nranks, script, args), env=full, timeout=timeout,
                          capture_output=True, text=True)


def results(out: Path, nranks: int, proc: subprocess.CompletedProcess) -> list[dict]:
    """Every rank's JSON results ({} for a rank that wrote none: killed when a peer failed),
    or a test failure showing the job's output when no rank wrote any."""
    found = []
    for r in range(nranks):
        path = out / f"rank{r}.json"
        found.append(json.loads(path.read_text()) if path.exists() else {})
    if not any(found):
        pytest.fail(f"no rank wrote results (exit {proc.returncode})\n"
                    f"stdout:\n{proc.stdout[-4000:]}\nstderr:\n{proc.stderr[-4000:]}")
    return found
