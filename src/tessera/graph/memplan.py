"""The static memory plan: every intermediate buffer gets an offset in one arena, so that
buffers alive at the same time never overlap. Offsets by best-fit: buffers are placed
largest first, each into the smallest gap among the buffers whose lifetimes it meets
(the greedy-by-size heuristic of TFLite's and ONNX Runtime's planners)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

__all__ = ["ALIGN", "Buffer", "Plan", "plan"]

ALIGN = 64  # bytes: a cache line, and what torch's CPU allocator gives


@dataclass(frozen=True)
class Buffer:
    """A buffer of `nbytes` alive from step `first` through step `last` (inclusive)."""

    nbytes: int
    first: int
    last: int


@dataclass(frozen=True)
class Plan:
    offsets: tuple[int, ...]  # per buffer, in bytes from the arena's start
    arena_bytes: int
    total_bytes: int  # the sum of all buffers: what allocating each separately would take
    buffers: tuple[Buffer, ...]  # what was planned, in the caller's order (for tools.view)

    def __str__(self) -> str:
        share = self.arena_bytes / self.total_bytes if self.total_bytes else 0.0
        return (f"arena {self.arena_bytes / 2**20:.2f} MiB for {len(self.offsets)} buffers of "
                f"{self.total_bytes / 2**20:.2f} MiB in all ({share:.0%})")


def _aligned(n: int) -> int:
    return -(-n // ALIGN) * ALIGN


def plan(buffers: Sequence[Buffer]) -> Plan:
    """Offsets for `buffers` such that any two whose lifetimes intersect are disjoint."""
    order = sorted(range(len(buffers)), key=lambda i: (-buffers[i].nbytes, buffers[i].first))
    offsets = [0] * len(buffers)
    placed: list[int] = []
    arena = 0
    for i in order:
        b = buffers[i]
        size = _aligned(b.nbytes)
        busy = sorted((offsets[j], offsets[j] + _aligned(buffers[j].nbytes)) for j in placed
                      if buffers[j].first <= b.last and b.first <= buffers[j].last)
        best, best_gap, cursor = None, None, 0
        for start, end in busy:
            gap = start - cursor
            if gap >= size and (best_gap is None or gap < best_gap):
                best, best_gap = cursor, gap
            cursor = max(cursor, end)
        offsets[i] = best if best is not None else cursor
        arena = max(arena, offsets[i] + size)
        placed.append(i)
    return Plan(tuple(offsets), arena, sum(_aligned(b.nbytes) for b in buffers), tuple(buffers))
