"""The static memory plan: buffers alive at once never overlap, the arena is no larger
than the buffers' sum, and reuse happens where lifetimes allow."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from tessera.graph.memplan import ALIGN, Buffer, plan


def _overlap(a: tuple[int, int], b: tuple[int, int]) -> bool:
    return a[0] < b[1] and b[0] < a[1]


def _check(buffers: list[Buffer]) -> None:
    p = plan(buffers)
    spans = [(o, o + b.nbytes) for o, b in zip(p.offsets, buffers, strict=True)]
    for i, a in enumerate(buffers):
        assert p.offsets[i] % ALIGN == 0 and spans[i][1] <= p.arena_bytes
        for j in range(i):
            b = buffers[j]
            if a.first <= b.last and b.first <= a.last and a.nbytes and b.nbytes:
                assert not _overlap(spans[i], spans[j]), (a, b, p)
    assert p.arena_bytes <= max(p.total_bytes, ALIGN) or not buffers


@settings(max_examples=200, deadline=None)
@given(st.lists(st.tuples(st.integers(0, 5000), st.integers(0, 30), st.integers(0, 10)),
                max_size=40))
def test_live_buffers_never_overlap(specs: list[tuple[int, int, int]]) -> None:
    _check([Buffer(n, first, first + span) for n, first, span in specs])


def test_a_chain_reuses_memory() -> None:
    # x0 -> x1 -> x2 -> x3: each buffer dies when the next is made, so two slots suffice
    chain = [Buffer(1000, i, i + 1) for i in range(8)]
    p = plan(chain)
    assert p.arena_bytes == 2 * 1024 and p.total_bytes == 8 * 1024
    assert "25%" in str(p)


def test_empty_plan() -> None:
    p = plan([])
    assert p.arena_bytes == 0 and p.offsets == ()
