"""What tessera.dist can use on this machine, for `tessera info`: shared memory, direct
copies between processes, and the engines and launchers for jobs across machines."""

from __future__ import annotations

import os
import shutil
import subprocess
from importlib import metadata
from typing import Any

__all__ = ["status"]


def status() -> dict[str, Any]:
    """Shared memory (free bytes), whether ranks may copy directly between their memories,
    mpi4py and mpirun (for jobs across machines), and torch.distributed."""
    from tessera.dist import shm

    try:
        stat = os.statvfs("/dev/shm")
        free = stat.f_bavail * stat.f_frsize
    except OSError:
        free = None
    return {"shm_free_bytes": free,
            "direct_copies": bool(shm.native().direct_copies_allowed()),
            "mpi4py": _version("mpi4py"),
            "mpirun": _mpirun(),
            "torch_distributed": _version("torch") is not None}


def _version(dist: str) -> str | None:
    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return None


def _mpirun() -> str | None:
    """`mpirun --version`'s first line (which MPI launches jobs), or None."""
    path = shutil.which("mpirun")
    if path is None:
        return None
    try:
        out = subprocess.run([path, "--version"], capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return path
    lines = (out.stdout or out.stderr).strip().splitlines()
    return lines[0] if lines else path
