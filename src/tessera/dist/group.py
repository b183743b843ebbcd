"""Building communicators: the world one from the launcher, sub-communicators by split.

Creation is collective and takes the same three all-gather rounds on every rank of the
bootstrap (members of every color and ranks outside all colors alike), so the groups of a
split are built side by side: (1) who is on which node, (2) the nodes' first ranks create
the shared-memory segments, (3) the others attach; then each first rank removes the
segment's name, so nothing is left in /dev/shm whatever happens next.
"""

from __future__ import annotations

import math
import os
from typing import Any

from tessera.dist import shm
from tessera.dist.bootstrap import Bootstrap, MPIBootstrap, StoreBootstrap, detect
from tessera.dist.comm import Communicator, node_key
from tessera.dist.engine import Engine, GlooEngine, MPIEngine
from tessera.dist.transport import Hierarchical, ShmTransport
from tessera.errors import CommError

__all__ = ["create", "finalize", "get_world", "init", "init_from_store", "is_initialized"]

_ALGOS = {"auto": 0, "oneshot": 1, "twoshot": 2, "direct": 3}
_world: Communicator | None = None
_STARTUP = 300.0  # seconds ranks may take to start (a short collective timeout is not that)
_MAX_TIMEOUT = 365 * 86400.0


def default_timeout() -> float:
    """TESSERA_COMM_TIMEOUT seconds (default 300): how long a rank waits for a peer."""
    raw = os.environ.get("TESSERA_COMM_TIMEOUT", "300")
    try:
        value = float(raw)
    except ValueError:
        value = -1.0
    return check_timeout(value, f"TESSERA_COMM_TIMEOUT={raw!r}")


def check_timeout(value: float, what: str = "timeout") -> float:
    """A wait limit in seconds: positive, finite, at most a year."""
    if not (isinstance(value, (int, float)) and math.isfinite(value) and
            0 < value <= _MAX_TIMEOUT):
        raise CommError(f"{what} is not a number of seconds in (0, {_MAX_TIMEOUT:.0f}]",
                        hint="e.g. timeout=60")
    return float(value)


def _algo() -> int:
    algo = os.environ.get("TESSERA_COMM_ALGO", "auto")
    if algo not in _ALGOS:
        raise CommError(f"TESSERA_COMM_ALGO={algo!r} is not an algorithm",
                        hint="use auto, oneshot (every rank reduces all copies: small "
                             "messages), twoshot (reduce-scatter + all-gather through "
                             "shared memory) or direct (the same, copying straight between "
                             "ranks' buffers)")
    return _ALGOS[algo]


def _forced_node(rank: int) -> str | None:
    """TESSERA_COMM_LOCAL_SIZE=k pretends ranks [0, k) are one node, [k, 2k) the next...,
    so the inter-node path runs (and is tested) on one machine."""
    raw = os.environ.get("TESSERA_COMM_LOCAL_SIZE")
    if raw is None:
        return None
    if not raw.isdigit() or int(raw) < 1:
        raise CommError(f"TESSERA_COMM_LOCAL_SIZE={raw!r} is not a positive integer")
    return f"{node_key()}#{rank // int(raw)}"


def _engine_for(boot: Bootstrap, timeout: float) -> Engine:
    if isinstance(boot, MPIBootstrap):
        return MPIEngine(boot.comm.Dup())
    if isinstance(boot, StoreBootstrap):
        return GlooEngine(boot.store, boot.rank, boot.size, timeout)
    raise CommError("ranks on several nodes need an inter-node engine",
                    hint="launch with mpirun (mpi4py) or torchrun (torch.distributed)")


def create(boot: Bootstrap, *, timeout: float, engine: Engine | None = None,
           my_node: str | None = None) -> Communicator | None:
    """A communicator over the bootstrap's ranks (collective over them). A rank with
    `boot.rank < 0` (outside every group of a split) takes part and gets None."""
    member = boot.rank >= 0
    token = shm.new_token()
    table = boot.allgather((my_node or node_key(), os.getpid(), token) if member else None)
    if not member:
        boot.allgather(None)
        boot.allgather(None)
        return None
    keys = [t[0] for t in table]
    order = list(dict.fromkeys(keys))                 # nodes in order of their first rank
    nodes = [order.index(k) for k in keys]
    me = boot.rank
    local = [r for r in range(boot.size) if nodes[r] == nodes[me]]
    name = shm.segment_name(table[local[0]][1], table[0][2], nodes[me])
    layout = shm.Layout(len(local))
    segment, error = None, None
    if local[0] == me:
        shm.sweep_stale()
        try:
            segment = shm.Segment(name, len(local), 0, layout, timeout)
        except CommError as e:
            error = str(e)
    errors = [e for e in boot.allgather(error) if e is not None]
    if errors:
        raise CommError(f"creating the communicator failed: {errors[0]}")
    if segment is None:
        try:
            segment = shm.Segment(name, len(local), local.index(me), layout, timeout)
        except CommError as e:
            error = str(e)
    errors = [e for e in boot.allgather(error) if e is not None]
    if local[0] == me:
        shm.unlink(name)
    if errors:
        raise CommError(f"attaching to the communicator failed: {errors[0]}")
    local_t = ShmTransport(segment, _algo())
    transport: Any = local_t
    if len(order) > 1:
        engine = engine or _engine_for(boot, timeout)
        leaders = engine.split(0 if local[0] == me else None, me)
        transport = Hierarchical(local_t, leaders, engine, nodes, me)
    comm = Communicator(transport, rank=me, size=boot.size, nodes=len(order),
                        node_key=keys[me], timeout=timeout, engine=engine)
    local_t.direct = comm._guarded(
        lambda: shm.native().enable_direct(segment.handle, shm.direct_min()))
    comm.barrier()  # nobody leaves (and, as rank 0, takes the store's server along) early
    return comm


def init(launcher: str | None = None, *, timeout: float | None = None) -> Communicator:
    """The world communicator of this job, created on first call: from mpirun (mpi4py),
    torchrun's environment, or a single process. `timeout`: seconds to wait for a peer."""
    global _world
    if _world is None:
        timeout = check_timeout(timeout) if timeout is not None else default_timeout()
        boot = detect(launcher, max(timeout, _STARTUP))
        _world = create(boot, timeout=timeout, my_node=_forced_node(boot.rank))
    return _world


def init_from_store(store: Any, rank: int, size: int,
                    timeout: float | None = None) -> Communicator:
    """A communicator over the ranks sharing a torch.distributed `store` (what the
    `tessera` process-group backend is given)."""
    timeout = check_timeout(timeout) if timeout is not None else default_timeout()
    boot = StoreBootstrap(store, rank, size, max(timeout, _STARTUP))
    comm = create(boot, timeout=timeout, my_node=_forced_node(rank))
    assert comm is not None
    return comm


def get_world() -> Communicator:
    """The communicator `init()` made."""
    if _world is None:
        raise CommError("tessera.dist is not initialized", hint="call tessera.dist.init()")
    return _world


def is_initialized() -> bool:
    return _world is not None


def finalize() -> None:
    """Stop the world communicator's background threads and forget it."""
    global _world
    if _world is not None:
        _world.close()
        _world = None
