"""Host memory, the caching allocator (size classes, reuse, stats, threads) and arenas."""

from __future__ import annotations

import ctypes
import gc
import queue
import random
import sys
import threading

import numpy as np
import pytest

import tessera
from tessera.errors import OutOfMemoryError, ShapeError
from tessera.runtime.memory import Arena, Block, CachingAllocator, HostMemory, format_bytes

KiB, MiB = 1 << 10, 1 << 20


@pytest.fixture
def alloc():
    """A private allocator, so counters start at zero and other tests cannot disturb them."""
    a = CachingAllocator(tessera.device("cpu"), HostMemory())
    yield a
    gc.collect()
    a.empty_cache()


def delta(before: dict[str, int], after: dict[str, int]) -> dict[str, int]:
    return {k: after[k] - before[k] for k in before}


class BudgetMemory:
    """A fake device that refuses to hold more than `budget` bytes at once."""

    alignment = 64

    def __init__(self, budget: int):
        self.budget, self.used, self.sizes = budget, 0, {}
        self.next_ptr = 1 << 20

    def malloc(self, nbytes: int) -> int:
        if self.used + nbytes > self.budget:
            raise OutOfMemoryError(f"budget exceeded by {nbytes}")
        ptr, self.next_ptr = self.next_ptr, self.next_ptr + nbytes + 64 - nbytes % 64
        self.sizes[ptr] = nbytes
        self.used += nbytes
        return ptr

    def free(self, ptr: int) -> None:
        self.used -= self.sizes.pop(ptr)


# --- host memory -------------------------------------------------------------------------------

def test_host_memory_is_aligned_and_usable():
    host = HostMemory()
    ptrs = [host.malloc(n) for n in (1, 63, 4096, 3 * MiB)]
    for p in ptrs:
        assert p % 64 == 0
    buf = (ctypes.c_uint8 * 4096).from_address(ptrs[2])
    buf[:] = bytes(range(256)) * 16
    assert bytes(buf)[:4] == b"\x00\x01\x02\x03" and buf[4095] == 255
    for p in ptrs:
        host.free(p)


@pytest.mark.parametrize("nbytes", [1 << 60, 1 << 64, 1 << 70])
def test_host_memory_refuses_absurd_sizes(nbytes):
    with pytest.raises(OutOfMemoryError, match=r"host allocation of .* failed") as info:
        HostMemory().malloc(nbytes)
    assert isinstance(info.value, MemoryError) and info.value.hint


def test_negative_sizes_are_rejected(alloc):
    with pytest.raises(ShapeError):
        HostMemory().malloc(-1)
    with pytest.raises(ShapeError):
        alloc.allocate(-8)


def test_format_bytes():
    assert [format_bytes(n) for n in (0, 1023, 1024, 3 * MiB // 2, 1 << 60)] == \
        ["0 B", "1023 B", "1.0 KiB", "1.5 MiB", "1.0 EiB"]


# --- size classes and reuse --------------------------------------------------------------------

@pytest.mark.parametrize("nbytes, rounded", [
    (0, 512), (1, 512), (512, 512), (513, 1024), (1000 * KiB, 1000 * KiB), (MiB, MiB),
    (MiB + 1, MiB + 128 * KiB), (3 * MiB, 3 * MiB), (3 * MiB + 1, 3 * MiB + 256 * KiB),
    (100 * MiB, 104 * MiB),
])
def test_size_classes(alloc, nbytes, rounded):
    assert alloc.round_size(nbytes) == rounded
    assert rounded - nbytes <= max(512, nbytes // 8)  # waste bound


def test_allocate_gives_aligned_distinct_blocks(alloc):
    blocks = [alloc.allocate(n) for n in (0, 0, 1, 100, 4096, 2 * MiB + 3)]
    assert len({b.ptr for b in blocks}) == len(blocks)
    for b in blocks:
        assert isinstance(b, Block) and b.ptr % 64 == 0 and b.size >= max(b.nbytes, 1)
        assert b.device == "cpu"
    assert blocks[0] is not blocks[1] and blocks[0].nbytes == 0
    assert "size=512" in repr(blocks[0])


def test_free_returns_to_cache_and_is_reused(alloc):
    b = alloc.allocate(3000)
    ptr = b.ptr
    s = alloc.stats()
    assert s == {"allocated_bytes": 3072, "reserved_bytes": 3072, "peak_allocated_bytes": 3072,
                 "num_allocs": 1, "num_os_allocs": 1, "active_blocks": 1, "cached_blocks": 0}
    del b
    gc.collect()
    s = alloc.stats()
    assert (s["allocated_bytes"], s["reserved_bytes"], s["active_blocks"], s["cached_blocks"]) \
        == (0, 3072, 0, 1)
    again = alloc.allocate(2900)  # same size class
    assert again.ptr == ptr and again.size == 3072
    s = alloc.stats()
    assert s["num_os_allocs"] == 1 and s["num_allocs"] == 2 and s["cached_blocks"] == 0


def test_block_in_a_reference_cycle_is_freed_by_gc(alloc):
    class Holder:
        pass

    h = Holder()
    h.self, h.block = h, alloc.allocate(100)
    del h
    assert alloc.stats()["active_blocks"] == 1
    gc.collect()
    assert alloc.stats()["active_blocks"] == 0


def test_best_fit_and_bounded_waste(alloc):
    small, big, huge = alloc.allocate(4 * KiB), alloc.allocate(64 * KiB), alloc.allocate(8 * MiB)
    ptrs = {b.size: b.ptr for b in (small, big, huge)}
    del small, big, huge
    gc.collect()
    three_k = alloc.allocate(3 * KiB)  # best fit among 4K and 64K: the 4K block
    assert three_k.ptr == ptrs[4 * KiB] and three_k.size == 4 * KiB
    one_k = alloc.allocate(KiB)  # 64K > 2 x 1K: not reused
    assert one_k.ptr != ptrs[64 * KiB] and one_k.size == KiB
    mid = alloc.allocate(2 * MiB)  # 8 MiB > 2 x 2 MiB: not reused
    assert mid.ptr != ptrs[8 * MiB]
    five = alloc.allocate(5 * MiB)  # 8 MiB <= 2 x 5 MiB: reused
    assert five.ptr == ptrs[8 * MiB] and five.size == 8 * MiB
    assert alloc.stats()["num_os_allocs"] == 5


def test_peak_and_reset(alloc):
    a, b = alloc.allocate(MiB), alloc.allocate(MiB)
    del a
    gc.collect()
    s = alloc.stats()
    assert s["peak_allocated_bytes"] == 2 * MiB and s["allocated_bytes"] == MiB
    alloc.reset_peak()
    assert alloc.stats()["peak_allocated_bytes"] == MiB
    c = alloc.allocate(4 * KiB)
    assert alloc.stats()["peak_allocated_bytes"] == MiB + 4 * KiB
    del b, c


def test_empty_cache_returns_memory_to_the_os(alloc):
    keep = alloc.allocate(10 * KiB)
    drop = [alloc.allocate(n * KiB) for n in (1, 2, 3, 300)]
    del drop
    gc.collect()
    s = alloc.stats()
    assert s["reserved_bytes"] > s["allocated_bytes"] and s["cached_blocks"] == 4
    alloc.empty_cache()
    s = alloc.stats()
    assert s["reserved_bytes"] == s["allocated_bytes"] == keep.size
    assert s["cached_blocks"] == 0 and s["active_blocks"] == 1


def test_out_of_memory_frees_the_cache_and_retries():
    backend = BudgetMemory(budget=8 * KiB)
    alloc = CachingAllocator(tessera.device("cpu"), backend)
    cached = [alloc.allocate(2 * KiB) for _ in range(3)]
    del cached
    gc.collect()
    assert backend.used == 6 * KiB
    big = alloc.allocate(5 * KiB)  # fits only once the cache is given back
    assert backend.used == 5 * KiB and alloc.stats()["cached_blocks"] == 0
    with pytest.raises(OutOfMemoryError, match=r"cannot allocate 8\.0 KiB on cpu") as info:
        alloc.allocate(8 * KiB)
    assert "5.0 KiB already allocated" in str(info.value) and info.value.hint
    assert alloc.stats()["active_blocks"] == 1
    del big


def test_huge_allocation_raises_out_of_memory():
    with pytest.raises(OutOfMemoryError):
        tessera.empty(1 << 60, dtype=tessera.uint8)
    with pytest.raises(OutOfMemoryError):
        tessera.empty((1 << 40, 1 << 40), dtype=tessera.int64)


def test_disabled_caching_goes_to_the_os_every_time(monkeypatch):
    monkeypatch.setenv("TESSERA_DISABLE_CACHING_ALLOCATOR", "1")
    backend = BudgetMemory(budget=1 << 30)
    alloc = CachingAllocator(tessera.device("cpu"), backend)
    for _ in range(3):
        b = alloc.allocate(100)
        assert b.size == 100 and backend.used == 100
        del b
        assert backend.used == 0  # freed at once: no one held the allocator lock
    s = alloc.stats()
    assert s["num_os_allocs"] == 3 and s["reserved_bytes"] == 0 and s["cached_blocks"] == 0


def test_threads_allocating_and_freeing(alloc):
    """Blocks are handed to a different thread to die there; no block is ever given to two
    owners at once (each writes its own pattern and checks it is intact), and no counter
    update is lost. A tiny GIL switch interval makes races likely."""
    graveyard: queue.Queue = queue.Queue()
    errors: list[str] = []

    def worker(seed: int) -> None:
        rng = random.Random(seed)
        for _ in range(1000):
            b = alloc.allocate(rng.choice((0, 64, 700, 5000, 70_000)))
            n = max(b.nbytes, 1)
            ctypes.memset(b.ptr, seed, n)
            if rng.random() < 0.5:
                threading.Event().wait(0.0001)
            if ctypes.string_at(b.ptr, n) != bytes([seed]) * n:
                errors.append(f"block {b} was overwritten while owned by thread {seed}")
            graveyard.put(b)
            del b

    def reaper() -> None:
        while graveyard.get() is not None:
            pass

    reapers = [threading.Thread(target=reaper) for _ in range(2)]
    workers = [threading.Thread(target=worker, args=(i + 1,)) for i in range(6)]
    old = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)
    try:
        for t in reapers + workers:
            t.start()
        for t in workers:
            t.join()
        for _ in reapers:
            graveyard.put(None)
        for t in reapers:
            t.join()
    finally:
        sys.setswitchinterval(old)
    gc.collect()
    assert not errors
    s = alloc.stats()
    assert s["num_allocs"] == 6000 and s["active_blocks"] == 0 and s["allocated_bytes"] == 0
    assert s["num_os_allocs"] < 200  # the cache did its job
    alloc.empty_cache()
    assert alloc.stats()["reserved_bytes"] == 0


# --- module functions --------------------------------------------------------------------------

def test_memory_stats_of_the_default_device():
    gc.collect()
    before = tessera.memory_stats()
    assert before == tessera.memory_stats("cpu") == tessera.memory_stats(tessera.device("cpu"))
    t = tessera.empty((256, 256), dtype=tessera.float32)  # 256 KiB
    d = delta(before, tessera.memory_stats())
    assert d["allocated_bytes"] == 256 * KiB and d["num_allocs"] == 1
    assert d["active_blocks"] == 1
    tessera.reset_peak_memory_stats()
    assert tessera.memory_stats()["peak_allocated_bytes"] == \
        tessera.memory_stats()["allocated_bytes"]
    del t
    gc.collect()
    tessera.empty_cache("cpu")
    s = tessera.memory_stats(None)
    assert s["reserved_bytes"] == s["allocated_bytes"] and s["cached_blocks"] == 0


# --- arenas ------------------------------------------------------------------------------------

def test_arena_views_share_one_allocation():
    gc.collect()
    before = tessera.memory_stats()
    arena = Arena(4096)
    assert arena.nbytes == 4096 and arena.ptr % 64 == 0 and arena.device == "cpu"
    a = arena.view(0, (4, 8), tessera.float32)
    b = arena.view(128, 16, "int64")
    c = arena.view(4096 - 64, (2, 2, 2), tessera.bfloat16)
    assert a.data_ptr() == arena.ptr and b.data_ptr() == arena.ptr + 128
    assert c.data_ptr() == arena.ptr + 4032 and c.is_contiguous()
    assert a.owner is b.owner is arena.block
    a.numpy()[:] = 1.5
    b.numpy()[:] = -7
    assert (a.numpy() == 1.5).all() and (b.numpy() == -7).all()
    raw = np.ctypeslib.as_array((ctypes.c_uint8 * 4096).from_address(arena.ptr))
    assert raw[:128].view(np.float32).tolist() == [1.5] * 32
    assert delta(before, tessera.memory_stats())["num_allocs"] == 1
    assert "Arena(nbytes=4096" in repr(arena)


def test_arena_lives_while_any_view_does():
    gc.collect()
    base = tessera.memory_stats()["active_blocks"]
    arena = Arena(1024)
    view = arena.view(64, 8, tessera.int32)
    del arena
    gc.collect()
    assert tessera.memory_stats()["active_blocks"] == base + 1
    view.numpy()[:] = np.arange(8)
    assert view.numpy().tolist() == list(range(8))
    del view
    gc.collect()
    assert tessera.memory_stats()["active_blocks"] == base


@pytest.mark.parametrize("offset, shape, dtype, match", [
    (32, 4, tessera.float32, "multiple of 64"),
    (-64, 4, tessera.float32, "multiple of 64"),
    (0, 257, tessera.float32, "needs 1028 bytes"),
    (960, 9, tessera.int64, "needs 1032 bytes"),
    (1024, 1, tessera.uint8, "needs 1025 bytes"),
])
def test_arena_rejects_bad_views(offset, shape, dtype, match):
    arena = Arena(1024)
    with pytest.raises(ShapeError, match=match):
        arena.view(offset, shape, dtype)
    assert arena.view(960, 8, tessera.int64).numel == 8  # exactly fits
