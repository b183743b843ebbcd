"""Shared-memory transport: the ranks of one node exchanging data through one POSIX segment.

The protocol and the reductions live in `transport.c` (a CPython extension built through the
compile cache); this module sizes the segment, names it, creates it on the node's first rank,
attaches the others; the name is removed as soon as all are attached (`group.create`), so
no crash after that can leave it behind, and `sweep_stale` clears names of jobs that died
before.
"""

from __future__ import annotations

import os
import secrets
from functools import cache
from pathlib import Path
from types import ModuleType
from typing import Any

from tessera.errors import CommError
from tessera.runtime.toolchain import compile_extension

__all__ = ["Layout", "Segment", "direct_min", "env_int", "native", "new_token", "segment_name",
           "source", "sweep_stale", "unlink"]

_SHM_DIR = Path("/dev/shm")
_PREFIX = "tessera."


@cache
def native() -> ModuleType:
    """The compiled transport (built once per machine, then loaded from the cache)."""
    return compile_extension(source(), "_tsr_shm")


def source() -> str:
    """transport.c with reduce.h spliced in (so the cache key covers both files)."""
    here = Path(__file__).parent
    return (here / "transport.c").read_text().replace(
        '#include "reduce.h"', (here / "reduce.h").read_text(), 1)


class Layout:
    """Segment geometry: `nslots` collective slots of `slot_bytes` per rank, and `nbuf`
    point-to-point buffers of `p2p_bytes` per ordered pair of ranks.

    Defaults: 1 MiB slots (a chunk of a large collective fits in L2 beside its inputs), 4 of
    them (ranks may run 2 chunks apart), and p2p buffers sized so the pairs share 64 MiB.
    Overridable with TESSERA_COMM_SLOT_BYTES / TESSERA_COMM_SLOTS.
    """

    def __init__(self, size: int):
        self.slot_bytes = env_int("TESSERA_COMM_SLOT_BYTES", 1 << 20, lo=4096, multiple=64)
        self.nslots = env_int("TESSERA_COMM_SLOTS", 4, lo=2)
        self.nbuf = 2
        per_pair = (64 << 20) // max(1, size * size * self.nbuf)
        self.p2p_bytes = max(4096, min(256 << 10, per_pair // 64 * 64))

    def args(self) -> tuple[int, int, int, int]:
        return self.slot_bytes, self.nslots, self.p2p_bytes, self.nbuf


def spin_seconds(local_size: int) -> float:
    """How long a waiting rank spins before yielding its core: 20 us, or not at all when
    the node's ranks outnumber the cores this process may run on (a spinning rank would
    hold the core the awaited one needs)."""
    return 0.0 if local_size > len(os.sched_getaffinity(0)) else 20e-6


def direct_min() -> int:
    """Bytes per rank from which collectives copy straight between ranks' buffers (one
    copy instead of two through the segment); TESSERA_COMM_DIRECT_MIN, 0 turns it off."""
    return env_int("TESSERA_COMM_DIRECT_MIN", 16 << 10, lo=0)


def env_int(name: str, default: int, *, lo: int, multiple: int = 1) -> int:
    raw = os.environ.get(name)
    if raw is None:
        return default
    try:
        value = int(raw)
    except ValueError:
        value = -1
    if value < lo or value % multiple:
        raise CommError(f"{name}={raw!r} is not valid",
                           hint=f"set an integer >= {lo}" +
                                (f" and a multiple of {multiple}" if multiple > 1 else ""))
    return value


def segment_name(creator_pid: int, token: str, node: int) -> str:
    """`/tessera.<uid>.<creator pid>.<token>.<node>`: the pid lets a later job recognize a
    segment whose creator died before removing its name."""
    return f"/{_PREFIX}{os.getuid()}.{creator_pid}.{token}.{node}"


def new_token() -> str:
    return secrets.token_hex(6)


def sweep_stale() -> list[str]:
    """Remove segment names this user's dead jobs left in /dev/shm (a crash between
    creating a segment and every rank attaching). Returns the names removed."""
    removed = []
    if not _SHM_DIR.is_dir():
        return removed
    mine = f"{_PREFIX}{os.getuid()}."
    for path in _SHM_DIR.glob(mine + "*"):
        pid = path.name[len(mine):].split(".")[0]
        if not pid.isdigit() or not 0 < int(pid) < 2**22:  # not a name we make
            continue
        if not _alive(int(pid)):
            try:
                path.unlink()
                removed.append(path.name)
            except OSError:
                pass
    return removed


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class Segment:
    """One node's shared-memory communicator: `handle` is what the transport's calls take."""

    def __init__(self, name: str, size: int, rank: int, layout: Layout, timeout: float):
        self.name = name
        self.size = size
        self.rank = rank
        self.layout = layout
        try:
            self.handle: Any = native().create(name, size, rank, *layout.args(), timeout,
                                               spin_seconds(size))
        except OSError as e:
            raise CommError(
                f"shared memory for the communicator failed on local rank {rank}: {e}",
                hint="check that /dev/shm is mounted and has room (docker: --shm-size=1g), "
                     "or shrink TESSERA_COMM_SLOT_BYTES") from e

    def info(self) -> dict[str, int]:
        return native().info(self.handle)


def unlink(name: str) -> None:
    try:
        os.unlink(_SHM_DIR / name.lstrip("/"))
    except FileNotFoundError:
        pass
