"""Engines that carry traffic between nodes: MPI (mpi4py) or torch.distributed's gloo.

Tessera never builds its own network layer; between machines it rides on one of these.
Engines work on flat byte arrays (numpy uint8 views of the caller's memory) plus a dtype
code for reductions, so the hierarchical transport can hand them any buffer.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from datetime import timedelta
from typing import Any

import numpy as np

__all__ = ["Engine", "EngineTimeout", "GlooEngine", "MPIEngine", "as_float32", "from_float32"]

# dtype codes of the transport: float32 float16 bfloat16 int32 int64 float64 uint8
_NP = (np.float32, np.float16, np.uint16, np.int32, np.int64, np.float64, np.uint8)
HALF = (1, 2)


def as_float32(raw: np.ndarray, code: int) -> np.ndarray:
    """16-bit floats widened to float32 (engines have no 16-bit reductions)."""
    if code == 1:
        return raw.view(np.float16).astype(np.float32)
    return (raw.view(np.uint16).astype(np.uint32) << 16).view(np.float32)


def from_float32(wide: np.ndarray, raw: np.ndarray, code: int) -> None:
    """Round float32 back into the 16-bit buffer `raw` (nearest even, as the C side)."""
    if code == 1:
        raw.view(np.float16)[:] = wide
        return
    u = wide.view(np.uint32)
    rounded = ((u + 0x7FFF + ((u >> 16) & 1)) >> 16).astype(np.uint16)
    rounded[np.isnan(wide)] = 0x7FC0
    raw.view(np.uint16)[:] = rounded


class EngineTimeout(RuntimeError):
    """The engine gave up waiting for a peer (gloo's timeout; MPI has none)."""


def _wait(work: Any) -> None:
    """Wait for a gloo work; its timeout becomes EngineTimeout."""
    try:
        work.wait()
    except RuntimeError as e:
        if "timed out" in str(e).lower() or "timeout" in str(e).lower():
            raise EngineTimeout(f"the inter-node engine (gloo) timed out: {e}") from e
        raise


def typed(raw: np.ndarray, code: int) -> np.ndarray:
    return raw.view(_NP[code])


class Engine(ABC):
    """Collectives among `size` processes (one per node, or all ranks) on byte arrays;
    `errors`: the exceptions its failures raise."""

    rank: int
    size: int
    errors: tuple[type[BaseException], ...]

    @abstractmethod
    def allreduce(self, raw: np.ndarray, code: int, op: int) -> None:
        """Reduce `raw` (elements of dtype `code`) in place across the engine's ranks."""

    @abstractmethod
    def bcast(self, raw: np.ndarray, root: int) -> None: ...

    @abstractmethod
    def allgatherv(self, src: np.ndarray, dst: np.ndarray, nbytes: list[int]) -> None: ...

    @abstractmethod
    def alltoallv(self, src: np.ndarray, dst: np.ndarray, sends: list[int],
                  recvs: list[int]) -> None:
        """`sends[j]` bytes to rank j, `recvs[j]` bytes from it, blocks in rank order."""

    @abstractmethod
    def send(self, raw: np.ndarray, dst: int, tag: int) -> None: ...

    @abstractmethod
    def recv(self, raw: np.ndarray, src: int, tag: int) -> None: ...

    @abstractmethod
    def barrier(self) -> None: ...

    @abstractmethod
    def split(self, color: int | None, key: int) -> Engine | None:
        """Collective over this engine's ranks, like MPI_Comm_split (None: no group)."""


def _offsets(sizes: list[int]) -> list[int]:
    out, total = [], 0
    for s in sizes:
        out.append(total)
        total += s
    return out


class MPIEngine(Engine):
    """An mpi4py communicator (Open MPI, MPICH, ...)."""

    def __init__(self, comm: Any):
        from mpi4py import MPI

        self.MPI = MPI
        self.errors = (MPI.Exception,)
        self.comm = comm
        self.rank = comm.Get_rank()
        self.size = comm.Get_size()
        self._ops = (MPI.SUM, MPI.PROD, MPI.MAX, MPI.MIN)

    def allreduce(self, raw: np.ndarray, code: int, op: int) -> None:
        if code in HALF:
            wide = as_float32(raw, code)
            self.comm.Allreduce(self.MPI.IN_PLACE, wide, self._ops[op])
            from_float32(wide, raw, code)
        else:
            self.comm.Allreduce(self.MPI.IN_PLACE, typed(raw, code), self._ops[op])

    def bcast(self, raw: np.ndarray, root: int) -> None:
        self.comm.Bcast(raw, root)

    def allgatherv(self, src: np.ndarray, dst: np.ndarray, nbytes: list[int]) -> None:
        self.comm.Allgatherv(src, [dst, nbytes, _offsets(nbytes), self.MPI.BYTE])

    def alltoallv(self, src: np.ndarray, dst: np.ndarray, sends: list[int],
                  recvs: list[int]) -> None:
        self.comm.Alltoallv([src, sends, _offsets(sends), self.MPI.BYTE],
                            [dst, recvs, _offsets(recvs), self.MPI.BYTE])

    def send(self, raw: np.ndarray, dst: int, tag: int) -> None:
        self.comm.Send(raw, dst, tag)

    def recv(self, raw: np.ndarray, src: int, tag: int) -> None:
        self.comm.Recv(raw, src, tag)

    def barrier(self) -> None:
        self.comm.Barrier()

    def split(self, color: int | None, key: int) -> MPIEngine | None:
        sub = self.comm.Split(self.MPI.UNDEFINED if color is None else color, key)
        return None if sub == self.MPI.COMM_NULL else MPIEngine(sub)


class GlooEngine(Engine):
    """A torch.distributed gloo process group, built on a store without touching the
    user's default process group."""

    def __init__(self, store: Any, rank: int, size: int, timeout: float, name: str = "world"):
        import torch.distributed as dist

        self.store = store
        self.errors = (RuntimeError,)  # torch.distributed's errors derive from it
        self.rank = rank
        self.size = size
        self.timeout = timeout
        self.name = name
        self._splits = 0
        self.pg = dist.ProcessGroupGloo(dist.PrefixStore(f"tessera-gloo/{name}", store), rank,
                                        size, timedelta(seconds=timeout))
        self._ops = (dist.ReduceOp.SUM, dist.ReduceOp.PRODUCT, dist.ReduceOp.MAX,
                     dist.ReduceOp.MIN)

    @staticmethod
    def _tensor(raw: np.ndarray) -> Any:
        import torch

        return torch.from_numpy(raw)

    def allreduce(self, raw: np.ndarray, code: int, op: int) -> None:
        import torch.distributed as dist

        opts = dist.AllreduceOptions()
        opts.reduceOp = self._ops[op]
        wide = as_float32(raw, code) if code in HALF else typed(raw, code)
        _wait(self.pg.allreduce([self._tensor(wide)], opts))
        if code in HALF:
            from_float32(wide, raw, code)

    def bcast(self, raw: np.ndarray, root: int) -> None:
        import torch.distributed as dist

        opts = dist.BroadcastOptions()
        opts.rootRank = root
        _wait(self.pg.broadcast([self._tensor(raw)], opts))

    def allgatherv(self, src: np.ndarray, dst: np.ndarray, nbytes: list[int]) -> None:
        # gloo's allgather wants equal sizes: pad every block to the largest
        most = max(nbytes)
        padded = np.zeros(most, np.uint8)
        padded[:src.size] = src
        out = np.empty(most * self.size, np.uint8)
        _wait(self.pg.allgather([[self._tensor(out[i * most:(i + 1) * most])
                                  for i in range(self.size)]], [self._tensor(padded)]))
        for i, off in enumerate(_offsets(nbytes)):
            dst[off:off + nbytes[i]] = out[i * most:i * most + nbytes[i]]

    def alltoallv(self, src: np.ndarray, dst: np.ndarray, sends: list[int],
                  recvs: list[int]) -> None:
        _wait(self.pg.alltoall_base(self._tensor(dst), self._tensor(src), recvs, sends))

    def send(self, raw: np.ndarray, dst: int, tag: int) -> None:
        _wait(self.pg.send([self._tensor(raw)], dst, tag))

    def recv(self, raw: np.ndarray, src: int, tag: int) -> None:
        _wait(self.pg.recv([self._tensor(raw)], src, tag))

    def barrier(self) -> None:
        _wait(self.pg.barrier())

    def split(self, color: int | None, key: int) -> GlooEngine | None:
        self._splits += 1
        table = np.zeros(2 * self.size, np.int64)
        mine = np.array([-1 if color is None else color, key], np.int64)
        self.allgatherv(mine.view(np.uint8), table.view(np.uint8), [16] * self.size)
        pairs = table.reshape(self.size, 2)
        if color is None:
            return None
        members = sorted((int(k), r) for r, (c, k) in enumerate(pairs) if c == color)
        ranks = [r for _, r in members]
        return GlooEngine(self.store, ranks.index(self.rank), len(ranks), self.timeout,
                          f"{self.name}.{self._splits}.{color}")
