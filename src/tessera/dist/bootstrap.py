"""How the processes of a job find each other before any shared memory exists.

A bootstrap knows this process's rank and the job's size and can all-gather small Python
objects. It comes from the launcher: `mpirun` (through mpi4py), `torchrun` (through the
TCP store torch.distributed rendezvous gives), a store handed over by torch.distributed
itself (the `tessera` backend), or nothing (one process).
"""

from __future__ import annotations

import os
import pickle
from abc import ABC, abstractmethod
from datetime import timedelta
from typing import Any

from tessera.errors import CommTimeoutError, TesseraError

__all__ = ["Bootstrap", "MPIBootstrap", "SoloBootstrap", "StoreBootstrap", "detect",
           "launched_by"]

_MPI_ENV = ("OMPI_COMM_WORLD_SIZE", "PMI_SIZE", "PMIX_RANK", "MV2_COMM_WORLD_SIZE")


class Bootstrap(ABC):
    """Rank, size and an all-gather of picklable objects (slow: setup only)."""

    rank: int
    size: int
    kind: str

    @abstractmethod
    def allgather(self, obj: Any) -> list[Any]:
        """Every rank's `obj`, in rank order."""


class SoloBootstrap(Bootstrap):
    """A job of one process."""

    rank, size, kind = 0, 1, "solo"

    def allgather(self, obj: Any) -> list[Any]:
        return [obj]


class MPIBootstrap(Bootstrap):
    """Ranks from an MPI communicator (mpirun); its engine also carries inter-node traffic."""

    kind = "mpi"

    def __init__(self, comm: Any = None):
        mpi = import_mpi()
        self.comm = comm if comm is not None else mpi.COMM_WORLD
        self.rank = self.comm.Get_rank()
        self.size = self.comm.Get_size()

    def allgather(self, obj: Any) -> list[Any]:
        return self.comm.allgather(obj)


class StoreBootstrap(Bootstrap):
    """Ranks from a torch.distributed key-value store (torchrun, or a process group)."""

    kind = "store"

    def __init__(self, store: Any, rank: int, size: int, timeout: float):
        self.store = store
        self.rank = rank
        self.size = size
        self.timeout = timeout
        self._round = 0

    def allgather(self, obj: Any) -> list[Any]:
        self._round += 1
        keys = [f"tessera/boot/{self._round}/{r}" for r in range(self.size)]
        self.store.set(keys[self.rank], pickle.dumps(obj))
        try:
            self.store.wait(keys, timedelta(seconds=self.timeout))
        except RuntimeError as e:
            raise CommTimeoutError(f"ranks did not all reach bootstrap round {self._round} "
                                   f"within {self.timeout:.0f} s: {e}", rank=-1) from e
        return [pickle.loads(self.store.get(k)) for k in keys]


def import_mpi() -> Any:
    """mpi4py's MPI module, or a TesseraError that says what to install."""
    try:
        from mpi4py import MPI
    except ImportError as e:
        raise TesseraError(
            "this process was started by mpirun but mpi4py is not importable",
            hint="install Open MPI (apt-get install openmpi-bin libopenmpi-dev) and "
                 "`pip install mpi4py`, or launch with torchrun") from e
    return MPI


def launched_by() -> str:
    """'mpi' under mpirun/srun with PMI, 'torchrun' with torch's environment, else 'solo'."""
    if any(v in os.environ for v in _MPI_ENV):
        return "mpi"
    if "RANK" in os.environ and "WORLD_SIZE" in os.environ:
        return "torchrun"
    return "solo"


def detect(launcher: str | None, timeout: float) -> Bootstrap:
    """The bootstrap for `launcher` ('mpi', 'torchrun', 'solo' or None: from the
    environment)."""
    launcher = launcher or launched_by()
    if launcher == "mpi":
        return MPIBootstrap()
    if launcher == "torchrun":
        import torch.distributed as dist

        missing = [v for v in ("MASTER_ADDR", "MASTER_PORT") if v not in os.environ]
        if missing:
            raise TesseraError(f"RANK and WORLD_SIZE are set but {', '.join(missing)} is not",
                               hint="launch with torchrun, or set MASTER_ADDR and MASTER_PORT")
        store, rank, size = next(dist.rendezvous("env://", timeout=timedelta(seconds=timeout)))
        return StoreBootstrap(dist.PrefixStore("tessera", store), rank, size, timeout)
    if launcher == "solo":
        return SoloBootstrap()
    raise TesseraError(f"unknown launcher {launcher!r}", hint="use 'mpi', 'torchrun' or 'solo'")
