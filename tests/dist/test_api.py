"""In-process tests of tessera.dist: the C reductions against numpy/torch, every collective of
a one-rank communicator, argument and environment checks, /dev/shm hygiene, init/finalize
and Work. A few tests use two ranks run as two threads of this process (`_pair`)."""

from __future__ import annotations

import math
import os
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import tessera.dist as tdist
from tessera.dist import group, shm
from tessera.dist.bootstrap import Bootstrap, SoloBootstrap
from tessera.dist.comm import Communicator, Work
from tessera.dist.group import create, default_timeout
from tessera.errors import CommError, CommTimeoutError, DtypeError, ShapeError, TesseraError

NP = {0: np.float32, 1: np.float16, 3: np.int32, 4: np.int64, 5: np.float64, 6: np.uint8}
TORCH = {0: torch.float32, 1: torch.float16, 2: torch.bfloat16, 3: torch.int32,
         4: torch.int64, 5: torch.float64, 6: torch.uint8}
NP_OPS = (np.add, np.multiply, np.maximum, np.minimum)
TORCH_OPS = (torch.add, torch.mul, torch.maximum, torch.minimum)
SHM = Path("/dev/shm")


# ------------------------------------------------------------------------------ helpers


@pytest.fixture(scope="module")
def solo() -> Iterator[Communicator]:
    comm = create(SoloBootstrap(), timeout=5.0)
    assert comm is not None
    yield comm
    comm.close()


@pytest.fixture
def fresh() -> Iterator[Communicator]:
    """A one-rank communicator of its own (for tests that abort it)."""
    comm = create(SoloBootstrap(), timeout=5.0)
    yield comm
    comm.close()


class _ThreadBootstrap(Bootstrap):
    """Rank `rank` of a job whose ranks are threads of this process."""

    kind = "threads"

    def __init__(self, rank: int, size: int, board: tuple[list[Any], threading.Barrier]):
        self.rank, self.size, self._board = rank, size, board

    def allgather(self, obj: Any) -> list[Any]:
        slots, barrier = self._board
        slots[self.rank] = obj
        barrier.wait()
        out = list(slots)
        barrier.wait()
        return out


def _both(f0: Callable[[], Any], f1: Callable[[], Any], limit: float = 20.0) -> list[Any]:
    """Run f0 and f1 in two threads; their results, or the first error."""
    results: list[Any] = [None, None]
    errors: list[BaseException | None] = [None, None]

    def run(i: int, f: Callable[[], Any]) -> None:
        try:
            results[i] = f()
        except BaseException as e:
            errors[i] = e

    threads = [threading.Thread(target=run, args=(i, f), daemon=True)
               for i, f in enumerate((f0, f1))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(limit)
    assert not any(t.is_alive() for t in threads), "a rank thread hung"
    for e in errors:
        if e is not None:
            raise e
    return results


def _pair(timeout: float = 5.0) -> list[Communicator]:
    """Two ranks of one shared-memory communicator, one per thread of this process."""
    board = ([None, None], threading.Barrier(2, timeout=20))
    boots = [_ThreadBootstrap(r, 2, board) for r in range(2)]
    return _both(lambda: create(boots[0], timeout=timeout),
                 lambda: create(boots[1], timeout=timeout))


@pytest.fixture(scope="module")
def pair() -> Iterator[list[Communicator]]:
    comms = _pair()
    yield comms
    for c in comms:
        c.close()


def _my_names() -> set[str]:
    """Segment names in /dev/shm created by this process."""
    prefix = f"tessera.{os.getuid()}.{os.getpid()}."
    return {p.name for p in SHM.glob(prefix + "*")} if SHM.is_dir() else set()


def _dead_pid() -> int:
    proc = subprocess.Popen(["true"])
    proc.wait()
    return proc.pid


# ------------------------------------------------------------------- 1. the C reductions


def _sources(code: int, n: int, nsrc: int, seed: int, scale: float, special: float,
             offset: int) -> list[torch.Tensor]:
    """`nsrc` tensors of `n` elements (views at `offset` elements into their storage, so
    buffers are not aligned to a vector width), float ones sprinkled with NaN/inf/zeros."""
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(nsrc):
        if code in (3, 4, 6):
            info = np.iinfo(NP[code])
            v = rng.integers(info.min, info.max, n + offset, NP[code], endpoint=True)
            t = torch.from_numpy(v)
        else:
            v = rng.standard_normal(n + offset) * scale
            mask = rng.random(n + offset) < special
            v[mask] = rng.choice([np.nan, np.inf, -np.inf, 0.0, -0.0], int(mask.sum()))
            t = torch.from_numpy(v).to(TORCH[code])
        out.append(t[offset:])
    return out


def _buffer(t: torch.Tensor) -> Any:
    """What reduce_local takes: a numpy view, or an address for bfloat16."""
    return t.data_ptr() if t.dtype == torch.bfloat16 else t.numpy()


def _reference(srcs: list[torch.Tensor], code: int, op: int) -> np.ndarray:
    if code in (1, 2):  # accumulate in float32, round once
        acc = srcs[0].float()
        for s in srcs[1:]:
            acc = TORCH_OPS[op](acc, s.float())
        return acc.to(TORCH[code]).float().numpy()
    arrays = [s.numpy() for s in srcs]
    acc = arrays[0].copy()
    with np.errstate(all="ignore"):
        for a in arrays[1:]:
            acc = NP_OPS[op](acc, a)
    return acc


@pytest.mark.parametrize("code", sorted(TORCH), ids=lambda c: str(TORCH[c]).split(".")[1])
@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(op=st.integers(0, 3),
       n=st.one_of(st.integers(0, 3000), st.sampled_from([0, 1, 1023, 1024, 1025, 2049, 3000])),
       nsrc=st.integers(2, 5), seed=st.integers(0, 2**32 - 1),
       scale=st.sampled_from([1.0, 1e-3, 1e-6, 300.0, 1e30, 1e-39]),
       special=st.sampled_from([0.0, 0.01, 0.3]), offset=st.integers(0, 3),
       inplace=st.booleans())
def test_reduce_local_matches_reference(code: int, op: int, n: int, nsrc: int, seed: int,
                                        scale: float, special: float, offset: int,
                                        inplace: bool) -> None:
    """reduce_local of every dtype/op equals the sequential reduction in source order:
    exact for float32/64, float32 accumulation rounded once for 16-bit floats, wrapping
    integers, NaN-propagating max/min; the output may be the first source."""
    srcs = _sources(code, n, nsrc, seed, scale, special, offset)
    expected = _reference(srcs, code, op)
    if inplace:
        dst = srcs[0] = srcs[0].clone()
    else:
        dst = torch.empty(n, dtype=TORCH[code])
    shm.native().reduce_local(_buffer(dst), [_buffer(s) for s in srcs], n, code, op)
    got = dst.float().numpy() if code in (1, 2) else dst.numpy()
    np.testing.assert_array_equal(got, expected)


@pytest.mark.parametrize("code", [1, 2], ids=["float16", "bfloat16"])
def test_portable_build_reduces_16_bit_floats_alike(monkeypatch: pytest.MonkeyPatch,
                                                   code: int) -> None:
    """A build without F16C (plain x86-64) converts 16-bit floats in C and gets the same
    bits as the native build (and the reference)."""
    from tessera.runtime.toolchain import compile_extension

    native = shm.native()
    monkeypatch.setenv("TESSERA_CFLAGS", "-march=x86-64 -mtune=generic")
    portable = compile_extension(shm.source(), "_tsr_shm")
    assert portable is not native
    srcs = _sources(code, 2051, 3, 7, 300.0, 0.01, 1)
    for op in range(4):
        expected = _reference(srcs, code, op)
        for module in (portable, native):
            dst = torch.empty(2051, dtype=TORCH[code])
            module.reduce_local(_buffer(dst), [_buffer(x) for x in srcs], 2051, code, op)
            np.testing.assert_array_equal(dst.float().numpy(), expected)


def _bf16(bits: list[int]) -> torch.Tensor:
    return torch.from_numpy(np.array(bits, np.uint16).view(np.int16)).view(torch.bfloat16)


def _bits(t: torch.Tensor) -> list[int]:
    return [b & 0xFFFF for b in t.view(torch.int16).tolist()]


def test_reduce_local_bf16_ties_round_half_even() -> None:
    """A float32 sum exactly halfway between two bf16 values rounds to the even one
    (including the tie above the largest finite value, which rounds to inf)."""
    cases = [  # (a, b, expected) as bf16 bits; a + b is an exact tie in float32
        (0x3F80, 0x3B80, 0x3F80),  # 1 + 2^-8: between 1 (even) and 1 + 2^-7 -> 1
        (0x3F81, 0x3B80, 0x3F82),  # 1 + 3*2^-8: between 0x3f81 and 0x3f82 (even) -> up
        (0xBF80, 0xBB80, 0xBF80),  # negative tie, even below
        (0xBF81, 0xBB80, 0xBF82),  # negative tie, even above
        (0x4781, 0x4380, 0x4782),  # 66048 + 256: tie at a larger exponent, even above
        (0x7F7F, 0x7B00, 0x7F80),  # max finite + half an ulp (2^119) -> inf
    ]
    a, b = _bf16([c[0] for c in cases]), _bf16([c[1] for c in cases])
    assert ((a.float() + b.float()).to(torch.bfloat16) == _bf16([c[2] for c in cases])).all()
    out = torch.empty(len(cases), dtype=torch.bfloat16)
    shm.native().reduce_local(out.data_ptr(), [a.data_ptr(), b.data_ptr()], len(cases), 2, 0)
    assert _bits(out) == [c[2] for c in cases]


def test_reduce_local_bf16_nan_stays_nan() -> None:
    """NaN inputs and NaN results (inf - inf, 0 * inf) of bf16 reductions stay NaN and
    never round to inf."""
    a = torch.tensor([math.nan, math.inf, 0.0, 1.0, -math.nan], dtype=torch.bfloat16)
    b = torch.tensor([1.0, -math.inf, math.inf, math.nan, 2.0], dtype=torch.bfloat16)
    for op in range(4):
        out = torch.empty(5, dtype=torch.bfloat16)
        shm.native().reduce_local(out.data_ptr(), [a.data_ptr(), b.data_ptr()], 5, 2, op)
        ref = TORCH_OPS[op](a.float(), b.float()).to(torch.bfloat16)
        assert torch.equal(out.isnan(), ref.isnan()), (op, out, ref)
        assert out[0].isnan() and out[4].isnan()
        assert torch.equal(out[~ref.isnan()], ref[~ref.isnan()])


@pytest.mark.parametrize("code", [0, 1, 2, 5])
def test_reduce_local_max_min_propagate_nan(code: int) -> None:
    """max/min give NaN when either operand is NaN, in either position, like
    torch.maximum/minimum."""
    a = torch.tensor([math.nan, 1.0, math.nan, -math.inf, 2.0], dtype=TORCH[code])
    b = torch.tensor([1.0, math.nan, math.nan, math.inf, -3.0], dtype=TORCH[code])
    for op, ref_op in ((2, torch.maximum), (3, torch.minimum)):
        out = torch.empty(5, dtype=TORCH[code])
        shm.native().reduce_local(_buffer(out), [_buffer(a), _buffer(b)], 5, code, op)
        np.testing.assert_array_equal(out.float().numpy(), ref_op(a, b).float().numpy())
        assert out[:3].isnan().all()


def test_reduce_local_integer_wraparound() -> None:
    """Integer sums and products wrap modulo 2**bits as numpy's do."""
    r = shm.native().reduce_local
    i32 = np.array([2**31 - 1, -(2**31)], np.int32)
    out = np.empty(2, np.int32)
    r(out, [i32, np.array([1, -1], np.int32)], 2, 3, 0)
    assert out.tolist() == [-(2**31), 2**31 - 1]
    u8 = np.empty(2, np.uint8)
    r(u8, [np.array([200, 16], np.uint8), np.array([100, 16], np.uint8)], 2, 6, 1)
    assert u8.tolist() == [200 * 100 % 256, 0]
    r(u8, [np.array([200, 255], np.uint8), np.array([100, 1], np.uint8)], 2, 6, 0)
    assert u8.tolist() == [44, 0]
    i64 = np.empty(1, np.int64)
    r(i64, [np.array([2**62], np.int64), np.array([4], np.int64)], 1, 4, 1)
    assert i64.tolist() == [0]


def test_reduce_local_rejects_bad_arguments() -> None:
    """One source, a short or non-contiguous buffer, a read-only output and unknown codes
    are ValueErrors, not memory errors."""
    r = shm.native().reduce_local
    a = np.ones(4, np.float32)
    with pytest.raises(ValueError, match=r"2\.\.1024 sources"):
        r(a, [a], 4, 0, 0)
    with pytest.raises(ValueError, match="needs 16"):
        r(a, [a, a[:2]], 4, 0, 0)
    with pytest.raises(ValueError, match="contiguous"):
        r(a, [a, np.ones(8, np.float32)[::2]], 4, 0, 0)
    with pytest.raises(ValueError, match="read-only"):
        r(np.frombuffer(bytes(16), np.float32), [a, a], 4, 0, 0)
    for dt, op, n in ((7, 0, 4), (-1, 0, 4), (0, 4, 4), (0, 0, -1)):
        with pytest.raises(ValueError, match="bad dtype, op or count"):
            r(a, [a, a], n, dt, op)


# --------------------------------------------------------- 2. collectives of one rank


def _sample(kind: str, dtype: Any = "float32") -> Any:
    x = np.arange(24, dtype=np.float64).reshape(4, 6) - 5
    if kind == "torch":
        return torch.from_numpy(x).to(getattr(torch, dtype))
    return x.astype(dtype)


def _same(a: Any, b: Any) -> None:
    assert type(a) is type(b)
    assert tuple(a.shape) == tuple(b.shape)
    assert a.dtype == b.dtype
    if isinstance(a, torch.Tensor):
        assert torch.equal(a, b)
    else:
        np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("kind,dtype", [("numpy", "float32"), ("numpy", "int64"),
                                        ("numpy", "float16"), ("torch", "float32"),
                                        ("torch", "bfloat16"), ("torch", "int32")])
@pytest.mark.parametrize("op", ["sum", "prod", "max", "min"])
def test_allreduce_new_output(solo: Communicator, kind: str, dtype: str, op: str) -> None:
    """allreduce of one rank returns a new array/tensor equal to x, of x's kind, shape and
    dtype, for every op."""
    x = _sample(kind, dtype)
    before = _clone(x)
    y = solo.allreduce(x, op)
    _same(y, before)
    _same(x, before)
    assert not _shares(x, y)


def _clone(x: Any) -> Any:
    return x.clone() if isinstance(x, torch.Tensor) else x.copy()


def _shares(a: Any, b: Any) -> bool:
    if isinstance(a, torch.Tensor):
        return a.untyped_storage().data_ptr() == b.untyped_storage().data_ptr()
    return np.shares_memory(a, b)


@pytest.mark.parametrize("kind", ["numpy", "torch"])
def test_allreduce_out_and_in_place(solo: Communicator, kind: str) -> None:
    """out= is filled and returned; out=x reduces in place and returns x."""
    x = _sample(kind)
    out = _clone(x) * 0
    assert solo.allreduce(x, out=out) is out
    _same(out, x)
    ref = _clone(x)
    assert solo.allreduce(x, "max", out=x) is x
    _same(x, ref)


@pytest.mark.parametrize("kind", ["numpy", "torch"])
def test_allreduce_strided_input_and_out(solo: Communicator, kind: str) -> None:
    """Non-contiguous inputs are read correctly; a non-contiguous out is written in place
    without touching the elements between its strides."""
    base = _sample(kind)
    x = base[:, ::2]
    y = solo.allreduce(x)
    _same(y, _clone(x))
    big = _clone(base) * 0 - 7
    out = big[:, 1::2]
    assert solo.allreduce(x, out=out) is out
    _same(_clone(out), _clone(x))
    assert (big[:, ::2] == -7).all()
    t = base.T if kind == "numpy" else base.t()
    _same(solo.allreduce(_clone(t), out=t), _clone(t))


@pytest.mark.parametrize("kind", ["numpy", "torch"])
def test_allreduce_empty_and_0d(solo: Communicator, kind: str) -> None:
    """Empty and 0-d arrays reduce to themselves with their shape."""
    for shape in ((0,), (3, 0), ()):
        x = np.full(shape, 2.5, np.float32)
        x = torch.from_numpy(x) if kind == "torch" else x
        _same(solo.allreduce(x), _clone(x))


@pytest.mark.parametrize("kind", ["numpy", "torch"])
def test_reduce_and_broadcast(solo: Communicator, kind: str) -> None:
    """reduce on the root returns the reduction (new, or out=); broadcast returns x
    itself, unchanged."""
    x = _sample(kind)
    _same(solo.reduce(x, root=0, op="min"), x)
    out = _clone(x) * 0
    assert solo.reduce(x, 0, out=out) is out
    _same(out, x)
    ref = _clone(x)
    assert solo.broadcast(x, root=0) is x
    _same(x, ref)
    s = _sample(kind)[:, ::3]
    assert solo.broadcast(s) is s
    _same(_clone(s), _clone(_sample(kind)[:, ::3]))


@pytest.mark.parametrize("kind", ["numpy", "torch"])
def test_allgather_shapes(solo: Communicator, kind: str) -> None:
    """allgather stacks to (1, *x.shape); allgatherv concatenates along dim 0, with or
    without counts; out= is filled and returned."""
    x = _sample(kind)
    g = solo.allgather(x)
    assert tuple(g.shape) == (1, *x.shape)
    _same(g[0], x)
    out = _clone(g) * 0
    assert solo.allgather(x, out=out) is out
    _same(out, g)
    _same(solo.allgather(x[:, 1::2])[0], _clone(x[:, 1::2]))
    _same(solo.allgatherv(x), x)
    _same(solo.allgatherv(x, [4]), x)
    _same(solo.allgatherv(x[:0]), x[:0])


@pytest.mark.parametrize("kind", ["numpy", "torch"])
def test_reduce_scatter_and_alltoall(solo: Communicator, kind: str) -> None:
    """reduce_scatter(v) and alltoall(v) of one rank give x back (dim 0 kept), also with
    out=x in place."""
    x = _sample(kind)
    _same(solo.reduce_scatter(x, "prod"), x)
    _same(solo.reduce_scatterv(x, [4], "max"), x)
    _same(solo.alltoall(x), x)
    _same(solo.alltoallv(x, [4]), x)
    _same(solo.alltoallv(x, [4], [4]), x)
    ref = _clone(x)
    assert solo.alltoallv(x, [4], out=x) is x
    _same(x, ref)
    assert solo.reduce_scatterv(x, [4], out=x) is x
    _same(x, ref)
    out = _clone(x) * 0
    assert solo.alltoall(x, out=out) is out
    _same(out, x)
    _same(solo.alltoall(x[:, ::2]), _clone(x[:, ::2]))


def test_barrier_objects_and_split(solo: Communicator) -> None:
    """barrier returns None; allgather_object gives [obj]; split(0) is a working one-rank
    communicator and split(None) is None."""
    assert solo.barrier() is None
    obj = {"a": [1, 2.5, None], "b": "text"}
    assert solo.allgather_object(obj) == [obj]
    assert solo.allgather_object(None) == [None]
    sub = solo.split(0)
    assert isinstance(sub, Communicator)
    assert (sub.rank, sub.size, sub.nodes, sub.local_size) == (0, 1, 1, 1)
    np.testing.assert_array_equal(sub.allreduce(np.arange(5)), np.arange(5))
    sub.close()
    assert solo.split(None) is None
    other = solo.split(3, key=-4)
    assert other.size == 1
    other.close()


@pytest.mark.parametrize("kind", ["numpy", "torch"])
def test_async_ops_return_completed_work(solo: Communicator, kind: str) -> None:
    """async_op=True returns a Work; wait() gives what the blocking call gives and
    is_completed() is True afterwards."""
    x = _sample(kind)
    calls = {
        "allreduce": (lambda: solo.allreduce(x, async_op=True), x),
        "reduce": (lambda: solo.reduce(x, 0, "max", async_op=True), x),
        "broadcast": (lambda: solo.broadcast(x, async_op=True), x),
        "allgather": (lambda: solo.allgather(x, async_op=True), x[None]),
        "allgatherv": (lambda: solo.allgatherv(x, [4], async_op=True), x),
        "reduce_scatter": (lambda: solo.reduce_scatter(x, async_op=True), x),
        "reduce_scatterv": (lambda: solo.reduce_scatterv(x, [4], async_op=True), x),
        "alltoall": (lambda: solo.alltoall(x, async_op=True), x),
        "alltoallv": (lambda: solo.alltoallv(x, [4], async_op=True), x),
    }
    for name, (call, expected) in calls.items():
        work = call()
        assert isinstance(work, Work), name
        _same(work.wait(timeout=5), expected)
        assert work.is_completed(), name
    work = solo.barrier(async_op=True)
    assert work.wait(timeout=5) is None and work.is_completed()


def test_async_then_blocking_keeps_order(solo: Communicator) -> None:
    """Blocking calls issued while async ones are pending run after them, in order."""
    x = np.arange(1 << 16, dtype=np.float32)
    works = [solo.allreduce(x * i, async_op=True) for i in range(8)]
    y = solo.allreduce(x)
    for i, w in enumerate(works):
        np.testing.assert_array_equal(w.wait(timeout=5), x * i)
    np.testing.assert_array_equal(y, x)


# ------------------------------------------------------------------------ 3. bad inputs


@pytest.mark.parametrize("x", [np.zeros(3, np.int16), np.zeros(3, np.complex64),
                               np.zeros(3, bool), np.zeros(3, ">f4"),
                               torch.zeros(3, dtype=torch.int16),
                               torch.zeros(3, dtype=torch.complex64),
                               torch.zeros(3, dtype=torch.bool)],
                         ids=lambda x: f"{type(x).__module__.split('.')[0]}-{x.dtype}")
def test_unsupported_dtype(solo: Communicator, x: Any) -> None:
    """Unsupported dtypes raise DtypeError naming the dtype and the supported ones, from
    every collective."""
    for call in (lambda: solo.allreduce(x), lambda: solo.allreduce(x, out=x),
                 lambda: solo.broadcast(x), lambda: solo.allgather(x),
                 lambda: solo.alltoall(x), lambda: solo.reduce(x)):
        with pytest.raises(DtypeError, match="is not supported") as e:
            call()
        assert "bfloat16" in e.value.hint


def test_not_an_array(solo: Communicator) -> None:
    """A list (or a tensor off the CPU) is refused with a CommError saying what to pass."""
    with pytest.raises(CommError, match="expected a numpy array or a torch tensor, got list"):
        solo.allreduce([1.0, 2.0])
    with pytest.raises(CommError, match="got list"):
        solo.broadcast([1, 2])
    with pytest.raises(CommError, match="is on meta"):
        solo.allreduce(torch.zeros(3, device="meta"))


def test_bad_out(solo: Communicator) -> None:
    """A read-only out is a CommError; an out of the wrong size or dtype a ShapeError that
    states both."""
    x = np.ones(4, np.float32)
    ro = np.zeros(4, np.float32)
    ro.flags.writeable = False
    with pytest.raises(CommError, match="read-only"):
        solo.allreduce(x, out=ro)
    with pytest.raises(CommError, match="read-only"):
        solo.broadcast(ro)
    for out in (np.zeros(5, np.float32), np.zeros(4, np.float64), np.zeros(4, np.int32),
                torch.zeros(3), torch.zeros(4, dtype=torch.float64)):
        with pytest.raises(ShapeError, match=r"out has .* elements, the result is 4 float32"):
            solo.allreduce(x, out=out)
    with pytest.raises(ShapeError, match="out has"):
        solo.allreduce(torch.ones(4), out=torch.zeros(5))
    with pytest.raises(ShapeError, match="out has"):
        solo.allgather(x, out=np.zeros((1, 3), np.float32))
    for out in (np.zeros(5, np.float32), np.zeros(4, np.int32)):
        with pytest.raises(ShapeError, match="out has"):
            solo.alltoall(x, out=out)


def test_alltoall_read_only_out(solo: Communicator) -> None:
    """alltoall into a read-only out is the same CommError alltoallv and allreduce give."""
    ro = np.zeros(4, np.float32)
    ro.flags.writeable = False
    with pytest.raises(CommError, match="read-only"):
        solo.alltoallv(np.ones(4, np.float32), [4], out=ro)
    with pytest.raises(CommError, match="read-only"):
        solo.alltoall(np.ones(4, np.float32), out=ro)


@pytest.mark.parametrize("op", ["avg", 3, None, "SUM"])
def test_unknown_op(solo: Communicator, op: Any) -> None:
    """An unknown reduction is a CommError listing the valid ones (numpy fast path, torch
    path, reduce and reduce_scatterv alike)."""
    for call in (lambda: solo.allreduce(np.ones(3, np.float32), op),
                 lambda: solo.allreduce(torch.ones(3), op),
                 lambda: solo.allreduce(torch.ones(3), op, out=torch.empty(3)),
                 lambda: solo.reduce(np.ones(3), 0, op),
                 lambda: solo.reduce_scatterv(np.ones(3), [3], op)):
        with pytest.raises(CommError, match="unknown reduction") as e:
            call()
        assert "sum, prod, max, min" in e.value.hint


@pytest.mark.parametrize("root", [1, -1, 0.0, "0", None])
def test_bad_root(solo: Communicator, root: Any) -> None:
    """A root out of range or not an int is a CommError naming it."""
    x = np.ones(3, np.float32)
    for call in (lambda: solo.reduce(x, root), lambda: solo.broadcast(x, root)):
        with pytest.raises(CommError, match="is not a rank of this communicator"):
            call()


@pytest.mark.parametrize("peer", [0, 1, -1, 0.5])
def test_bad_peer(solo: Communicator, peer: Any) -> None:
    """send/recv/isend/irecv to this rank or to no rank raise at the call."""
    x = np.ones(3, np.float32)
    phrase = "is this rank" if peer == 0 and isinstance(peer, int) else "is not a rank"
    for call in (lambda: solo.send(x, peer), lambda: solo.recv(x, peer),
                 lambda: solo.isend(x, peer), lambda: solo.irecv(x, peer)):
        with pytest.raises(CommError, match=phrase):
            call()


@pytest.mark.parametrize("tag", [-1, 2**31, 2**40])
def test_tag_out_of_range(pair: list[Communicator], tag: int) -> None:
    """A tag outside [0, 2**31) is a CommError from send/recv, and from isend's wait()."""
    x = np.ones(3, np.float32)
    with pytest.raises(CommError, match=f"tag {tag} is out of range"):
        pair[0].send(x, 1, tag)
    with pytest.raises(CommError, match="out of range"):
        pair[1].recv(x, 0, tag)
    with pytest.raises(CommError, match="out of range"):
        pair[0].isend(x, 1, tag).wait(timeout=5)


def test_send_recv_between_threads(pair: list[Communicator]) -> None:
    """A valid small send is buffered and received in order with its tag (the pair still
    works after the bad-tag tests)."""
    x = np.arange(10, dtype=np.float64)
    pair[0].send(x, 1, tag=2**31 - 1)
    pair[0].send(x * 2, 1, tag=0)
    out = np.empty(10)
    assert pair[1].recv(out, 0, tag=2**31 - 1) is out
    np.testing.assert_array_equal(out, x)
    t = torch.empty(20, dtype=torch.float64)[::2]
    pair[1].recv(t, 0)
    np.testing.assert_array_equal(t.numpy(), x * 2)


def test_uneven_blocks_on_two_ranks(pair: list[Communicator]) -> None:
    """reduce_scatter/alltoall of a dim 0 not divisible by the size are ShapeErrors that
    point to the v-variants (checked before any communication)."""
    x = np.ones((3, 2), np.float32)
    with pytest.raises(ShapeError, match=r"dim 0 \(3\) is not a multiple") as e:
        pair[0].reduce_scatter(x)
    assert "reduce_scatterv" in e.value.hint
    with pytest.raises(ShapeError, match=r"dim 0 \(3\) is not a multiple") as e:
        pair[0].alltoall(x)
    assert "alltoallv" in e.value.hint
    with pytest.raises(ShapeError, match="counts must be 2 non-negative"):
        pair[0].reduce_scatterv(x, [3])
    with pytest.raises(ShapeError, match="send_counts sum to 2 rows, x has 3"):
        pair[0].alltoallv(x, [1, 1])


def test_bad_counts(solo: Communicator) -> None:
    """v-collective counts that do not sum to dim 0, of the wrong length, negative, or
    recv_counts that disagree with what is sent, are ShapeErrors."""
    x = np.ones((4, 2), np.float32)
    with pytest.raises(ShapeError, match="counts sum to 3 rows, x has 4"):
        solo.reduce_scatterv(x, [3])
    with pytest.raises(ShapeError, match="counts must be 1 non-negative row counts"):
        solo.reduce_scatterv(x, [2, 2])
    with pytest.raises(ShapeError, match="counts must be 1 non-negative"):
        solo.reduce_scatterv(x, [-4])
    with pytest.raises(ShapeError, match="counts must be 1 non-negative"):
        solo.reduce_scatterv(x, [])
    with pytest.raises(ShapeError, match="send_counts sum to 5 rows, x has 4"):
        solo.alltoallv(x, [5])
    with pytest.raises(ShapeError, match="counts must be 1"):
        solo.alltoallv(x, [2, 2])
    with pytest.raises(ShapeError, match="sends itself 4 rows but expects 3"):
        solo.alltoallv(x, [4], [3])
    with pytest.raises(ShapeError, match=r"counts\[0\] = 3 but x has 4 rows"):
        solo.allgatherv(x, [3])
    with pytest.raises(ShapeError, match="counts must be 1"):
        solo.allgatherv(x, [4, 0])


def test_non_integer_counts_rejected(solo: Communicator) -> None:
    """Row counts that are not integers are refused, not truncated."""
    x = np.ones((3, 2), np.float32)
    with pytest.raises(ShapeError):
        solo.reduce_scatterv(x, [3.9])


def test_0d_input_to_v_collectives(solo: Communicator) -> None:
    """A 0-d value has no rows: every row-counting collective says so."""
    x = np.array(1.0, np.float32)
    for call in (lambda: solo.allgatherv(x), lambda: solo.allgatherv(x, [1]),
                 lambda: solo.reduce_scatter(x), lambda: solo.reduce_scatterv(x, [1]),
                 lambda: solo.alltoall(x), lambda: solo.alltoallv(x, [1]),
                 lambda: solo.allgatherv(torch.tensor(1.0))):
        with pytest.raises(ShapeError, match="0-d value has no rows"):
            call()


@pytest.mark.parametrize("color", [-1, 1.5, "a", np.int64(-1)])
def test_bad_split_color(solo: Communicator, color: Any) -> None:
    """split with a negative or non-int color is a CommError."""
    with pytest.raises(CommError, match="color must be a non-negative int or None"):
        solo.split(color)


def test_argument_errors_leave_communicator_usable(fresh: Communicator) -> None:
    """Argument errors are raised before any communication and do not abort."""
    for call in (lambda: fresh.allreduce([1]), lambda: fresh.reduce(np.ones(2), 5),
                 lambda: fresh.alltoallv(np.ones(2), [3])):
        with pytest.raises(TesseraError):
            call()
    np.testing.assert_array_equal(fresh.allreduce(np.arange(3)), np.arange(3))
    assert fresh.barrier() is None


# ------------------------------------------------------------------- 4. environment


def test_bogus_algorithm(monkeypatch: pytest.MonkeyPatch) -> None:
    """TESSERA_COMM_ALGO=bogus makes create() raise a CommError naming it and the valid
    ones, and leaves no segment name behind."""
    monkeypatch.setenv("TESSERA_COMM_ALGO", "bogus")
    before = _my_names()
    with pytest.raises(CommError, match="TESSERA_COMM_ALGO='bogus' is not an algorithm") as e:
        create(SoloBootstrap(), timeout=5.0)
    assert "oneshot" in e.value.hint and "twoshot" in e.value.hint
    assert _my_names() == before


@pytest.mark.parametrize("algo,direct_min", [("auto", None), ("oneshot", None),
                                             ("twoshot", "0"), ("direct", "64"),
                                             ("auto", "64")])
def test_algorithms_on_two_thread_ranks(monkeypatch: pytest.MonkeyPatch, algo: str,
                                        direct_min: str | None) -> None:
    """Each valid TESSERA_COMM_ALGO (and the single-copy paths from TESSERA_COMM_DIRECT_MIN)
    gives right results: one rank, and two thread-ranks with messages spanning several
    4 KiB slots, for allreduce (also in place), reduce, broadcast, allgatherv, alltoall(v)."""
    monkeypatch.setenv("TESSERA_COMM_ALGO", algo)
    monkeypatch.setenv("TESSERA_COMM_SLOT_BYTES", "4096")
    if direct_min is not None:
        monkeypatch.setenv("TESSERA_COMM_DIRECT_MIN", direct_min)
    comm = create(SoloBootstrap(), timeout=5.0)
    np.testing.assert_array_equal(comm.allreduce(np.arange(7.0)), np.arange(7.0))
    comm.close()
    c = _pair()
    try:
        assert c[0]._t.segment.info()["slot_bytes"] == 4096
        assert c[0]._t.direct == (direct_min != "0")
        for n in (1, 100, 5000):
            x = [np.arange(n, dtype=np.float32) * (r + 1) - r for r in range(2)]
            for op, ref in (("sum", x[0] + x[1]), ("max", np.maximum(x[0], x[1]))):
                for g in _both(lambda x=x, op=op: c[0].allreduce(x[0], op),
                               lambda x=x, op=op: c[1].allreduce(x[1], op)):
                    np.testing.assert_array_equal(g, ref)
            y = [x[0].copy(), x[1].copy()]
            _both(lambda y=y: c[0].allreduce(y[0], out=y[0]),
                  lambda y=y: c[1].allreduce(y[1], out=y[1]))
            for g in y:
                np.testing.assert_array_equal(g, x[0] + x[1])
            got = _both(lambda x=x: c[0].reduce(x[0], 1), lambda x=x: c[1].reduce(x[1], 1))
            assert got[0] is None
            np.testing.assert_array_equal(got[1], x[0] + x[1])
            y = [x[0].copy(), np.zeros(n, np.float32)]
            _both(lambda y=y: c[0].broadcast(y[0]), lambda y=y: c[1].broadcast(y[1]))
            np.testing.assert_array_equal(y[1], x[0])
            half = n // 2
            for g in _both(lambda x=x: c[0].allgatherv(x[0]),
                           lambda x=x, h=half: c[1].allgatherv(x[1][:h])):
                np.testing.assert_array_equal(g, np.concatenate([x[0], x[1][:half]]))
            got = _both(lambda x=x, h=half: c[0].alltoall(x[0][:2 * h]),
                        lambda x=x, h=half: c[1].alltoall(x[1][:2 * h]))
            np.testing.assert_array_equal(got[0], np.concatenate([x[0][:half], x[1][:half]]))
            np.testing.assert_array_equal(got[1], np.concatenate([x[0][half:2 * half],
                                                                  x[1][half:2 * half]]))
            k0, k1 = [n // 3, n - n // 3], [n - n // 4, n // 4]
            got = _both(lambda x=x, k=k0: c[0].alltoallv(x[0], k),
                        lambda x=x, k=k1: c[1].alltoallv(x[1], k))
            np.testing.assert_array_equal(got[0], np.concatenate([x[0][:k0[0]], x[1][:k1[0]]]))
            np.testing.assert_array_equal(got[1], np.concatenate([x[0][k0[0]:], x[1][k1[0]:]]))
    finally:
        for comm in c:
            comm.close()


@pytest.mark.parametrize("value", ["abc", "-1", "1.5"])
def test_bad_direct_min(monkeypatch: pytest.MonkeyPatch, value: str) -> None:
    """TESSERA_COMM_DIRECT_MIN that is not an integer >= 0 makes create() raise a
    TesseraError quoting it."""
    monkeypatch.setenv("TESSERA_COMM_DIRECT_MIN", value)
    with pytest.raises(TesseraError, match=f"TESSERA_COMM_DIRECT_MIN={value!r} is not valid"):
        create(SoloBootstrap(), timeout=5.0)


def test_direct_min_zero_turns_direct_off(monkeypatch: pytest.MonkeyPatch) -> None:
    """TESSERA_COMM_DIRECT_MIN=0 gives the plain shared-memory transport."""
    monkeypatch.setenv("TESSERA_COMM_DIRECT_MIN", "0")
    comm = create(SoloBootstrap(), timeout=5.0)
    assert not comm._t.direct and "(1 node, shm)" in repr(comm)
    comm.close()


class _LateBootstrap(_ThreadBootstrap):
    """Rank 1 dawdles after the last bootstrap round (inside create, before the transport
    is probed)."""

    rounds = 0

    def allgather(self, obj: Any) -> list[Any]:
        out = super().allgather(obj)
        self.rounds += 1
        if self.rank == 1 and self.rounds == 3:
            time.sleep(0.6)
        return out


def test_create_timeout_is_a_tessera_error() -> None:
    """A rank that stalls inside create() makes the waiting rank's create() raise
    CommTimeoutError naming it, and the late one learn of the abort (CommError), never the
    C extension's own exceptions."""
    board = ([None, None], threading.Barrier(2, timeout=20))
    boots = [_LateBootstrap(r, 2, board) for r in range(2)]
    errors: list[BaseException | None] = [None, None]

    def run(r: int) -> None:
        try:
            create(boots[r], timeout=0.2).close()
        except BaseException as e:
            errors[r] = e

    _both(lambda: run(0), lambda: run(1))
    assert isinstance(errors[0], CommTimeoutError) and errors[0].rank == 1, repr(errors[0])
    late = errors[1]
    assert late is None or isinstance(late, CommTimeoutError) or (
        type(late) is CommError and "aborted" in str(late) and "failed first" in str(late)
    ), repr(late)


@pytest.fixture
def no_world(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """No world communicator during the test; whatever the test made is finalized and the
    previous state restored afterwards."""
    monkeypatch.setattr(group, "_world", None)
    for var in ("TESSERA_COMM_TIMEOUT", "TESSERA_COMM_LOCAL_SIZE", "TESSERA_COMM_ALGO"):
        monkeypatch.delenv(var, raising=False)
    yield
    group.finalize()


@pytest.mark.parametrize("value", ["0", "-3", "abc", "", "-inf"])
def test_bad_timeout(no_world: None, monkeypatch: pytest.MonkeyPatch, value: str) -> None:
    """TESSERA_COMM_TIMEOUT that is not a positive number makes init() raise a CommError
    quoting it, and leaves tessera.dist uninitialized."""
    monkeypatch.setenv("TESSERA_COMM_TIMEOUT", value)
    with pytest.raises(CommError, match=f"TESSERA_COMM_TIMEOUT={value!r} is not a number"):
        tdist.init("solo")
    assert not tdist.is_initialized()


@pytest.mark.parametrize("value", ["inf", "nan", "1e300"])
def test_non_finite_timeout(monkeypatch: pytest.MonkeyPatch, value: str) -> None:
    """TESSERA_COMM_TIMEOUT=inf/nan/huge is refused (the C side counts nanoseconds in an
    int64), as is the same timeout passed to init()."""
    monkeypatch.setenv("TESSERA_COMM_TIMEOUT", value)
    with pytest.raises(CommError, match="is not a number of seconds"):
        default_timeout()
    with pytest.raises(CommError, match="is not a number of seconds"):
        tdist.init("solo", timeout=float(value))


@pytest.mark.parametrize("var,value,phrase", [
    ("TESSERA_COMM_SLOT_BYTES", "4100", "multiple of 64"),
    ("TESSERA_COMM_SLOT_BYTES", "2048", ">= 4096"),
    ("TESSERA_COMM_SLOT_BYTES", "1MiB", ">= 4096"),
    ("TESSERA_COMM_SLOTS", "1", ">= 2"),
])
def test_bad_layout(monkeypatch: pytest.MonkeyPatch, var: str, value: str, phrase: str) -> None:
    """Slot sizes that are too small, not multiples of 64 or not integers make Layout and
    create() raise a TesseraError quoting the setting, with a hint of the valid range."""
    monkeypatch.setenv(var, value)
    for call in (lambda: shm.Layout(1), lambda: create(SoloBootstrap(), timeout=5.0)):
        with pytest.raises(TesseraError, match=f"{var}={value!r} is not valid") as e:
            call()
        assert phrase in e.value.hint


def test_slot_bytes_setting_is_used(monkeypatch: pytest.MonkeyPatch) -> None:
    """A valid TESSERA_COMM_SLOT_BYTES/SLOTS shapes the segment."""
    monkeypatch.setenv("TESSERA_COMM_SLOT_BYTES", "8192")
    monkeypatch.setenv("TESSERA_COMM_SLOTS", "3")
    comm = create(SoloBootstrap(), timeout=5.0)
    info = comm._t.segment.info()
    assert (info["slot_bytes"], info["nslots"], info["size"]) == (8192, 3, 1)
    comm.close()


def test_bad_oneshot_max(monkeypatch: pytest.MonkeyPatch) -> None:
    """TESSERA_COMM_ONESHOT_MAX=abc is a TesseraError quoting the setting."""
    monkeypatch.setenv("TESSERA_COMM_ONESHOT_MAX", "abc")
    with pytest.raises(TesseraError, match="TESSERA_COMM_ONESHOT_MAX"):
        create(SoloBootstrap(), timeout=5.0)


@pytest.mark.parametrize("value", ["0", "-1", "abc", "1.5"])
def test_bad_local_size(no_world: None, monkeypatch: pytest.MonkeyPatch, value: str) -> None:
    """TESSERA_COMM_LOCAL_SIZE that is not a positive integer makes init() raise."""
    monkeypatch.setenv("TESSERA_COMM_LOCAL_SIZE", value)
    with pytest.raises(CommError, match=f"TESSERA_COMM_LOCAL_SIZE={value!r} is not a positive"):
        tdist.init("solo")
    assert not tdist.is_initialized()


def test_local_size_one_alone(no_world: None, monkeypatch: pytest.MonkeyPatch) -> None:
    """TESSERA_COMM_LOCAL_SIZE=1 on one rank is still one node."""
    monkeypatch.setenv("TESSERA_COMM_LOCAL_SIZE", "1")
    comm = tdist.init("solo")
    assert (comm.size, comm.nodes) == (1, 1)


# ------------------------------------------------------------------------ 5. /dev/shm


def test_sweep_stale() -> None:
    """sweep_stale removes this user's names whose creator pid is gone, and keeps names
    of live processes, of other users and of other programs."""
    uid, token, dead = os.getuid(), os.urandom(6).hex(), _dead_pid()
    stale = f"tessera.{uid}.{dead}.{token}.0"
    kept = [f"tessera.{uid}.{os.getpid()}.{token}.0", f"tessera.{uid + 1}.{dead}.{token}.0",
            f"tessera.{uid}.x{dead}.{token}.0", f"tessera-{uid}.{dead}.{token}.0",
            f"other.{uid}.{dead}.{token}"]
    try:
        for name in (stale, *kept):
            (SHM / name).touch()
        removed = shm.sweep_stale()
        assert stale in removed
        assert not (SHM / stale).exists()
        for name in kept:
            assert (SHM / name).exists(), name
            assert name not in removed
    finally:
        for name in (stale, *kept):
            (SHM / name).unlink(missing_ok=True)


def test_sweep_stale_survives_odd_pid() -> None:
    """A name whose pid field is no valid pid does not make sweep_stale (and create) fail."""
    path = SHM / f"tessera.{os.getuid()}.99999999999.{os.urandom(6).hex()}.0"
    path.touch()
    try:
        shm.sweep_stale()
        create(SoloBootstrap(), timeout=5.0).close()
    finally:
        path.unlink(missing_ok=True)


def test_create_leaves_no_names() -> None:
    """No segment name of this process remains in /dev/shm after create() or split()
    returns, and the communicators still work."""
    before = _my_names()
    comm = create(SoloBootstrap(), timeout=5.0)
    assert _my_names() == before
    sub = comm.split(0)
    assert _my_names() == before
    np.testing.assert_array_equal(sub.allreduce(np.ones(3)), np.ones(3))
    sub.close()
    comm.close()


# ------------------------------------------------------------------ 6. init / finalize


def test_get_world_before_init(no_world: None) -> None:
    """get_world() before init() is a CommError whose hint says to call init()."""
    assert not tdist.is_initialized()
    with pytest.raises(CommError, match="not initialized") as e:
        tdist.get_world()
    assert "tessera.dist.init()" in e.value.hint


def test_init_solo_lifecycle(no_world: None) -> None:
    """init('solo') gives a size-1 world, is idempotent, get_world() returns it, finalize()
    forgets it (twice is harmless) and a new init() makes a new one."""
    world = tdist.init("solo", timeout=7.0)
    assert (world.rank, world.size, world.nodes, world.timeout) == (0, 1, 1, 7.0)
    assert tdist.is_initialized()
    assert tdist.init("solo") is world
    assert tdist.init() is world
    assert tdist.get_world() is world
    np.testing.assert_array_equal(world.allreduce(np.arange(4)), np.arange(4))
    tdist.finalize()
    assert not tdist.is_initialized()
    tdist.finalize()
    again = tdist.init("solo")
    assert again is not world and tdist.get_world() is again


def test_init_unknown_launcher(no_world: None) -> None:
    """An unknown launcher name is a TesseraError listing the known ones."""
    with pytest.raises(TesseraError, match="unknown launcher 'slurm'") as e:
        tdist.init("slurm")
    assert "solo" in e.value.hint
    assert not tdist.is_initialized()


# ------------------------------------------------------------------------------ 7. Work


def test_work_wait_timeout() -> None:
    """wait(timeout) on a Work that never finishes raises CommTimeoutError; once finished,
    wait() returns the result, or raises the error it finished with."""
    work = Work()
    assert not work.is_completed()
    t0 = time.perf_counter()
    with pytest.raises(CommTimeoutError, match=r"did not finish within 0\.05 s") as e:
        work.wait(timeout=0.05)
    assert e.value.rank == -1
    assert time.perf_counter() - t0 < 2
    work._finish(42)
    assert work.is_completed() and work.wait(timeout=0) == 42
    failed = Work()
    failed._finish(error=KeyError("k"))
    with pytest.raises(KeyError):
        failed.wait()


def test_async_error_raised_by_wait(fresh: Communicator,
                                    monkeypatch: pytest.MonkeyPatch) -> None:
    """A transport error inside an async collective is raised, as a CommError with the
    transport's message, by wait(); the communicator is then aborted."""
    native = shm.native()

    def broken(*args: Any) -> None:
        raise native.CommError("injected failure", 0, -3)

    monkeypatch.setattr(fresh._t, "allreduce", broken)
    work = fresh.allreduce(np.ones(3, np.float32), async_op=True)
    with pytest.raises(CommError, match="injected failure"):
        work.wait(timeout=5)
    assert work.is_completed()
    with pytest.raises(CommError, match="aborted: injected failure"):
        fresh.barrier()


def test_async_timeout_raised_by_wait(fresh: Communicator,
                                      monkeypatch: pytest.MonkeyPatch) -> None:
    """A peer timeout inside an async collective is a CommTimeoutError naming the rank."""
    native = shm.native()

    def stalled(*args: Any) -> None:
        raise native.TimeoutError("rank 3 did not respond within 1.0 s", 3, -1)

    monkeypatch.setattr(fresh._t, "allgatherv", stalled)
    work = fresh.allgather(torch.ones(2), async_op=True)
    with pytest.raises(CommTimeoutError, match="rank 3 did not respond") as e:
        work.wait(timeout=5)
    assert e.value.rank == 3


def test_threads_sharing_a_communicator_take_turns(pair: list[Communicator]) -> None:
    """Two threads per rank calling collectives on one communicator at once: the transport
    runs one collective at a time (the other waits), so no step is lost or doubled. All
    calls are the same collective, so whichever pair up across ranks give the right sums
    (different ones would be reported as a mismatch)."""
    def rank(c: Communicator) -> list[bool]:
        def worker() -> bool:
            x = np.ones(100_000, np.float32)                # large: the GIL is released
            t = torch.ones(100_000)                         # the same call, as torch
            ok = True
            for _ in range(40):
                ok &= bool((c.allreduce(x) == 2).all())      # numpy fast path
                ok &= bool((c.allreduce(t, out=t) == 2).all())  # torch in place
                t.fill_(1)
            return ok
        return _both(worker, worker)

    results = _both(lambda: rank(pair[0]), lambda: rank(pair[1]), limit=60)
    assert results == [[True, True], [True, True]]
    check = _both(lambda: pair[0].allreduce(np.arange(4.0)), lambda: pair[1].allreduce(
        np.arange(4.0)))
    np.testing.assert_array_equal(check[0], 2 * np.arange(4.0))
