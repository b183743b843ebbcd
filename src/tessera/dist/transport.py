"""Transports: how a communicator's collectives move bytes.

`ShmTransport` is one node's shared-memory segment (every rank of the communicator on one
machine). `Hierarchical` spans nodes: shared memory inside each node, an engine (MPI or
gloo) between the nodes' first ranks, and the engine over all ranks for all-to-all and for
messages that leave the node.

Both take buffers as the transport reads them (numpy arrays or addresses) and sizes in
elements or bytes; the communicator above checks shapes and dtypes.
"""

from __future__ import annotations

import ctypes
from functools import partial
from typing import Any, Protocol

import numpy as np

from tessera.dist import shm
from tessera.dist.engine import Engine, EngineTimeout

__all__ = ["Hierarchical", "ShmTransport", "Transport"]

_ITEMSIZE = (4, 2, 2, 4, 8, 8, 1)


def _oneshot_max(size: int) -> int:
    """Largest allreduce done one-shot: every rank reads every copy, size x the bytes of
    two-shot's reduce-scatter, against two synchronizations instead of one."""
    return shm.env_int("TESSERA_COMM_ONESHOT_MAX", max(4096, (128 << 10) // size), lo=0)


class Transport(Protocol):
    """What a communicator needs of a transport (ShmTransport, Hierarchical). Buffers are
    numpy arrays or addresses; sizes are elements (reductions) or bytes (movement)."""

    name: str
    local_rank: int
    local_size: int
    pairs: bool  # alltoallv_pairs works (no count exchange needed)
    errors: tuple[type[BaseException], ...]
    timeout_errors: tuple[type[BaseException], ...]
    abort_errors: tuple[type[BaseException], ...]

    def allreduce(self, src: Any, dst: Any, n: int, code: int, op: int, root: int) -> None: ...
    def broadcast(self, buf: Any, nbytes: int, root: int) -> None: ...
    def allgatherv(self, src: Any, dst: Any, nbytes: list[int]) -> None: ...
    def reduce_scatterv(self, src: Any, dst: Any, counts: list[int], code: int,
                        op: int) -> None: ...
    def alltoallv(self, src: Any, dst: Any, matrix: list[int]) -> None: ...
    def alltoallv_pairs(self, src: Any, dst: Any, sends: list[int],
                        recvs: list[int]) -> None: ...
    def send(self, buf: Any, nbytes: int, dst: int, tag: int) -> None: ...
    def recv(self, buf: Any, nbytes: int, src: int, tag: int) -> None: ...
    def barrier(self) -> None: ...
    def abort(self, message: str) -> None: ...
    def describe_error(self, e: BaseException) -> tuple[str, int]: ...


class ShmTransport:
    """All of a communicator's ranks on one node, through one segment; `direct`: large
    collectives copy straight between ranks' buffers (see `shm.direct_min`)."""

    direct = False

    @property
    def name(self) -> str:
        return "shm+direct" if self.direct else "shm"

    @property
    def pairs(self) -> bool:
        return self.direct

    def __init__(self, segment: shm.Segment, algo: int):
        n = shm.native()
        h = segment.handle
        self.segment = segment
        self.local_rank = segment.rank
        self.local_size = segment.size
        self.errors: tuple[type[BaseException], ...] = (n.CommError,)
        self.timeout_errors: tuple[type[BaseException], ...] = (n.TimeoutError,)
        self.abort_errors: tuple[type[BaseException], ...] = (n.AbortedError,)
        # bound once: a small collective costs one C call
        self.allreduce = partial(n.allreduce, h, algo, _oneshot_max(segment.size))
        self.allreduce_arrays = partial(n.allreduce_arrays, h, algo, _oneshot_max(segment.size))
        self.unsupported = n.Unsupported
        self.broadcast = partial(n.broadcast, h)
        self.allgatherv = partial(n.allgatherv, h)
        self.reduce_scatterv = partial(n.reduce_scatterv, h)
        self.alltoallv = partial(n.alltoallv, h)
        self.alltoall_arrays = partial(n.alltoall_arrays, h)
        self.alltoallv_pairs = partial(n.alltoallv_pairs, h)
        self.send = partial(n.send, h)
        self.recv = partial(n.recv, h)
        self.barrier = partial(n.barrier, h)
        self._abort = partial(n.abort, h)

    def abort(self, message: str) -> None:
        self._abort(message)

    @staticmethod
    def describe_error(e: BaseException) -> tuple[str, int]:
        message, rank, _code = e.args
        return message, rank


def as_bytes(handle: Any, nbytes: int) -> np.ndarray:
    """A uint8 view of a transport buffer (array or address)."""
    if isinstance(handle, np.ndarray):
        return handle.reshape(-1).view(np.uint8)[:nbytes]
    if nbytes == 0:
        return np.empty(0, np.uint8)
    return np.frombuffer((ctypes.c_uint8 * nbytes).from_address(handle), np.uint8)


class Hierarchical:
    """Ranks on several nodes: shared memory inside a node, an engine between nodes.

    allreduce: reduce to the node's first rank, allreduce among first ranks, broadcast in
    the node. broadcast/allgatherv go the same way; reduce-scatter is an allreduce that
    keeps one block; all-to-all and messages across nodes use the engine of all ranks.
    """

    @property
    def name(self) -> str:
        return f"{self.local.name}+engine"

    def __init__(self, local: ShmTransport, leaders: Engine | None, world: Engine,
                 nodes: list[int], rank: int):
        self.local = local
        self.leaders = leaders          # the first rank of every node (None elsewhere)
        self.world = world              # every rank
        self.nodes = nodes              # node index of every rank
        self.rank = rank
        self.local_rank = local.local_rank
        self.local_size = local.local_size
        self.members = [[r for r, n in enumerate(nodes) if n == k]
                        for k in range(max(nodes) + 1)]
        self.errors = (*local.errors, *world.errors)
        self.timeout_errors = (*local.timeout_errors, EngineTimeout)
        self.abort_errors = local.abort_errors
        self._node = nodes[rank]

    def abort(self, message: str) -> None:
        self.local.abort(message)

    def describe_error(self, e: BaseException) -> tuple[str, int]:
        if isinstance(e, self.local.errors):
            return self.local.describe_error(e)
        if isinstance(e, EngineTimeout):
            return str(e), -1
        return f"the inter-node engine failed: {e}", -1

    def _local_of(self, rank: int) -> int:
        return self.members[self.nodes[rank]].index(rank)

    def allreduce(self, src: Any, dst: Any, n: int, code: int, op: int, root: int) -> None:
        nbytes = n * _ITEMSIZE[code]
        if dst is None:  # reduce, not the root: a place for the node's partial result
            dst = np.empty(nbytes, np.uint8)
        self.local.allreduce(src, dst, n, code, op, 0)
        if self.leaders is not None:
            self.leaders.allreduce(as_bytes(dst, nbytes), code, op)
        if root < 0:
            self.local.broadcast(dst, nbytes, 0)
        elif self.nodes[root] == self._node and self._local_of(root) != 0:
            if self.local_rank == 0:
                self.local.send(dst, nbytes, self._local_of(root), 0)
            elif self.rank == root:
                self.local.recv(dst, nbytes, 0, 0)

    def broadcast(self, buf: Any, nbytes: int, root: int) -> None:
        root_node = self.nodes[root]
        if self._node == root_node:
            self.local.broadcast(buf, nbytes, self._local_of(root))
        if self.leaders is not None:
            self.leaders.bcast(as_bytes(buf, nbytes), root_node)
        if self._node != root_node:
            self.local.broadcast(buf, nbytes, 0)

    def allgatherv(self, src: Any, dst: Any, nbytes: list[int]) -> None:
        """Gather the node's blocks, exchange nodes' blocks between first ranks, spread the
        whole in the node, then put blocks in rank order."""
        mine = self.members[self._node]
        node_bytes = [sum(nbytes[r] for r in group) for group in self.members]
        whole = np.empty(sum(nbytes), np.uint8)
        node_off = sum(node_bytes[:self._node])
        part = whole[node_off:node_off + node_bytes[self._node]]
        self.local.allgatherv(src, part, [nbytes[r] for r in mine])
        if self.leaders is not None:
            self.leaders.allgatherv(part.copy(), whole, node_bytes)
        self.local.broadcast(whole, whole.size, 0)
        out = as_bytes(dst, whole.size)
        rank_off = np.cumsum([0, *nbytes])
        pos = 0
        for group in self.members:
            for r in group:
                out[rank_off[r]:rank_off[r] + nbytes[r]] = whole[pos:pos + nbytes[r]]
                pos += nbytes[r]

    def reduce_scatterv(self, src: Any, dst: Any, counts: list[int], code: int,
                        op: int) -> None:
        total = sum(counts)
        size = _ITEMSIZE[code]
        whole = np.empty(total * size, np.uint8)
        self.allreduce(src, whole, total, code, op, -1)
        lo = sum(counts[:self.rank]) * size
        as_bytes(dst, counts[self.rank] * size)[:] = whole[lo:lo + counts[self.rank] * size]

    pairs = True  # the engines need only this rank's row and column

    def alltoallv(self, src: Any, dst: Any, matrix: list[int]) -> None:
        p, r = len(self.nodes), self.rank
        self.alltoallv_pairs(src, dst, matrix[r * p:(r + 1) * p], matrix[r::p])

    def alltoallv_pairs(self, src: Any, dst: Any, sends: list[int], recvs: list[int]) -> None:
        self.world.alltoallv(as_bytes(src, sum(sends)), as_bytes(dst, sum(recvs)), sends,
                             recvs)

    def barrier(self) -> None:
        self.local.barrier()
        if self.leaders is not None:
            self.leaders.barrier()
        self.local.barrier()

    def send(self, buf: Any, nbytes: int, dst: int, tag: int) -> None:
        if self.nodes[dst] == self._node:
            self.local.send(buf, nbytes, self._local_of(dst), tag)
        else:
            self.world.send(as_bytes(buf, nbytes), dst, tag)

    def recv(self, buf: Any, nbytes: int, src: int, tag: int) -> None:
        if self.nodes[src] == self._node:
            self.local.recv(buf, nbytes, self._local_of(src), tag)
        else:
            self.world.recv(as_bytes(buf, nbytes), src, tag)
