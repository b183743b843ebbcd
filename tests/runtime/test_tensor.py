"""Tensors: construction, strided views, and zero-copy interop with numpy, torch and DLPack."""

from __future__ import annotations

import gc
import weakref

import numpy as np
import pytest
import torch

import tessera
from tessera.errors import DeviceError, DtypeError, ShapeError, StreamError, TesseraError
from tessera.runtime.dtype import DTYPES
from tessera.runtime.memory import Block
from tessera.runtime.tensor import Tensor

IDS = [d.name for d in DTYPES]
NUMPY_DTYPES = [d for d in DTYPES if d is not tessera.bfloat16]


def sample(d, shape, seed: int = 0) -> torch.Tensor:
    """Distinct-ish values of tessera dtype `d` as a torch tensor."""
    g = torch.Generator().manual_seed(seed)
    if d is tessera.bool:
        return torch.randint(0, 2, shape, generator=g).bool()
    if d.is_floating_point:
        return (torch.randn(shape, generator=g) * 10).to(d.torch)
    info = torch.iinfo(d.torch)
    return torch.randint(max(info.min, -1000), min(info.max, 1000) + 1, shape, generator=g,
                         dtype=d.torch)


def bits(x) -> np.ndarray:
    """The stored values of a torch tensor, numpy array or tessera Tensor, comparable across
    libraries (bfloat16 as its uint16 bit patterns)."""
    if isinstance(x, Tensor):
        return x.numpy(view_bfloat16_as_uint16=True).copy()
    if isinstance(x, torch.Tensor):
        if x.dtype == torch.bfloat16:
            return x.view(torch.int16).numpy().view(np.uint16).copy()
        return x.numpy().copy()
    return np.array(x)


def active_blocks() -> int:
    gc.collect()
    return tessera.memory_stats()["active_blocks"]


# --- construction and facts ----------------------------------------------------------------------

def test_empty_and_zeros_facts():
    t = tessera.empty((2, 3, 4), dtype="f16")
    assert t.shape == (2, 3, 4) and t.strides == (12, 4, 1) and t.stride() == (12, 4, 1)
    assert t.stride(1) == 4 and t.stride(-1) == 1
    assert t.dtype is tessera.float16 and t.device == "cpu" and t.device is tessera.device()
    assert t.ndim == 3 and t.numel == 24 and t.nbytes == 48 and len(t) == 2
    assert t.is_contiguous() and t.storage_offset() == 0 and not t.readonly
    assert t.data_ptr() % 64 == 0 and isinstance(t.owner, Block)
    assert repr(t) == "tessera.Tensor(shape=(2, 3, 4), dtype=tessera.float16, device='cpu')"
    assert tessera.empty(5).shape == (5,) and tessera.empty(np.int64(3)).shape == (3,)
    assert tessera.empty(torch.Size([2, 2]), device=tessera.device("cpu")).shape == (2, 2)


@pytest.mark.parametrize("d", DTYPES, ids=IDS)
def test_zeros_are_zero(d):
    # Dirty the cache first so zeros() cannot pass by getting fresh zero pages.
    dirty = tessera.empty((7, 9), dtype=tessera.uint8)
    dirty.numpy()[:] = 0xAB
    del dirty
    gc.collect()
    t = tessera.zeros((7, 9), dtype=d)
    assert not bits(t).any()
    assert torch.equal(t.torch(), torch.zeros((7, 9), dtype=d.torch))


def test_zero_size_and_zero_dim():
    e = tessera.empty((3, 0, 2))
    assert e.numel == 0 and e.nbytes == 0 and e.is_contiguous() and e.numpy().shape == (3, 0, 2)
    assert e.torch().shape == (3, 0, 2)
    s = tessera.zeros(())
    assert s.shape == () and s.numel == 1 and s.ndim == 0 and s.numpy().item() == 0.0
    with pytest.raises(ShapeError, match="0-d"):
        len(s)


@pytest.mark.parametrize("shape", [(-1,), (2, -3), 2.5, "abc", (2, None)])
def test_bad_shapes(shape):
    with pytest.raises(ShapeError):
        tessera.empty(shape)


def test_bad_dtype_and_device():
    with pytest.raises(DtypeError):
        tessera.empty(3, dtype="float64")
    with pytest.raises(DeviceError):
        tessera.zeros(3, device="gpu")


# --- numpy <-> tessera <-> torch, every dtype, zero-copy -----------------------------------------

@pytest.mark.parametrize("d", DTYPES, ids=IDS)
def test_tessera_to_numpy_and_torch(d):
    t = tessera.empty((3, 5), dtype=d)
    raw = t.numpy(view_bfloat16_as_uint16=True)
    tt = t.torch()
    assert raw.ctypes.data == tt.data_ptr() == t.data_ptr()
    assert tt.dtype == d.torch and tt.shape == (3, 5) and tt.stride() == (5, 1)
    values = sample(d, (3, 5))
    tt.copy_(values)  # write through torch ...
    assert np.array_equal(bits(t), bits(values))  # ... read through numpy
    if d.numpy is not None:
        n = t.numpy()
        assert n.dtype == d.numpy and n.ctypes.data == t.data_ptr()
        other = sample(d, (3, 5), seed=1)
        n[...] = bits(other)  # write through numpy ...
        assert torch.equal(tt, other)  # ... read through torch
        assert np.asarray(t).ctypes.data == t.data_ptr()


@pytest.mark.parametrize("d", DTYPES, ids=IDS)
def test_torch_to_tessera_and_back(d):
    src = sample(d, (4, 6))
    t = tessera.as_tensor(src)
    assert t.dtype is d and t.data_ptr() == src.data_ptr() and t.owner is src
    back = t.torch()
    assert back.data_ptr() == src.data_ptr() and torch.equal(back, src)
    src[2, 3] = sample(d, (1,), seed=5)[0]
    assert torch.equal(back, src) and np.array_equal(bits(t), bits(src))
    via_dlpack = tessera.from_dlpack(src)
    assert via_dlpack.data_ptr() == src.data_ptr() and via_dlpack.dtype is d


@pytest.mark.parametrize("d", NUMPY_DTYPES, ids=[d.name for d in NUMPY_DTYPES])
def test_numpy_to_tessera_and_back(d):
    a = bits(sample(d, (5, 3)))
    t = tessera.as_tensor(a)
    assert t.dtype is d and t.data_ptr() == a.ctypes.data and t.owner is a
    tt = t.torch()
    assert tt.data_ptr() == a.ctypes.data
    tt[1] = sample(d, (3,), seed=9)
    assert np.array_equal(a, bits(tt))
    for shared in (np.asarray(t), np.from_dlpack(t), tessera.from_dlpack(a).numpy()):
        assert shared.ctypes.data == a.ctypes.data and np.array_equal(shared, a)


@pytest.mark.parametrize("d", DTYPES, ids=IDS)
def test_dlpack_both_ways(d):
    t = tessera.as_tensor(sample(d, (2, 3, 4)).clone())
    x = torch.from_dlpack(t)
    assert x.data_ptr() == t.data_ptr() and x.dtype == d.torch
    again = tessera.from_dlpack(x)
    assert again.data_ptr() == t.data_ptr() and again.dtype is d
    if d.numpy is not None:
        assert np.from_dlpack(t).ctypes.data == t.data_ptr()
    legacy = t.__dlpack__()
    assert "dltensor" in repr(legacy) and "versioned" not in repr(legacy)
    assert "dltensor_versioned" in repr(t.__dlpack__(max_version=(1, 0)))
    assert torch.from_dlpack(legacy).data_ptr() == t.data_ptr()
    assert tessera.from_dlpack(t.__dlpack__(max_version=(1, 3))).data_ptr() == t.data_ptr()
    assert t.__dlpack_device__() == (1, 0)


def test_dlpack_copy_and_stream_and_device_arguments():
    t = tessera.as_tensor([1.0, 2.0, 3.0])
    copied = torch.from_dlpack(t.__dlpack__(max_version=(1, 0), copy=True))
    assert copied.data_ptr() != t.data_ptr() and copied.tolist() == [1.0, 2.0, 3.0]
    shared = torch.from_dlpack(t.__dlpack__(stream=None, dl_device=(1, 0), copy=False))
    assert shared.data_ptr() == t.data_ptr()
    assert np.from_dlpack(t, device="cpu", copy=False).ctypes.data == t.data_ptr()
    assert torch.from_dlpack(t, device="cpu").data_ptr() == t.data_ptr()
    with pytest.raises(StreamError):
        t.__dlpack__(stream=7)
    with pytest.raises(DeviceError):
        t.__dlpack__(dl_device=(2, 0))


# --- strides, offsets and views ------------------------------------------------------------------

@pytest.mark.parametrize("view", [
    lambda x: x[1:, ::2],
    lambda x: x.T,
    lambda x: x[:, 2],
    lambda x: x[2:4, 1:5].T,
    lambda x: x.unsqueeze(1).expand(5, 3, 6),  # stride 0
], ids=["slice-step", "transpose", "column", "block-T", "expand"])
def test_torch_strided_views(view):
    base = torch.arange(30, dtype=torch.float32).reshape(5, 6)
    v = view(base)
    t = tessera.as_tensor(v)
    assert t.strides == v.stride() and t.storage_offset() == v.storage_offset()
    assert t.data_ptr() == v.data_ptr() and t.shape == tuple(v.shape)
    assert t.is_contiguous() == v.is_contiguous()
    assert np.array_equal(t.numpy(), v.numpy())
    back = t.torch()
    assert back.data_ptr() == v.data_ptr() and back.stride() == v.stride()
    assert torch.equal(back, v)
    base.mul_(-1)  # the views see it: nothing was copied
    assert np.array_equal(t.numpy(), v.numpy()) and torch.equal(back, v)
    assert torch.equal(t.clone().torch(), v) and t.clone().is_contiguous()


@pytest.mark.parametrize("view", [
    lambda a: a[1::2, 1:],
    lambda a: a.T,
    lambda a: a[::-1],
    lambda a: a[:, ::-2],
    lambda a: a[::-2, ::-1].T,
], ids=["slice-step", "transpose", "reversed-rows", "reversed-step-cols", "reversed-both-T"])
def test_numpy_strided_views(view):
    base = np.arange(42, dtype=np.int32).reshape(6, 7)
    v = view(base)
    t = tessera.as_tensor(v)
    assert t.strides == tuple(s // 4 for s in v.strides) and t.data_ptr() == v.ctypes.data
    out = t.numpy()
    assert out.ctypes.data == v.ctypes.data and out.strides == v.strides
    assert np.array_equal(out, v) and np.array_equal(np.from_dlpack(t), v)
    out[0, 0] = -1
    assert v[0, 0] == -1
    assert np.array_equal(t.clone().numpy(), v)
    if min(v.strides) < 0:
        with pytest.raises(ShapeError, match="negative strides"):
            t.torch()
    else:
        assert torch.equal(t.torch(), torch.from_numpy(v))


def test_as_strided_views_and_bounds():
    t = tessera.as_tensor(np.arange(10, dtype=np.int64))
    windows = t.as_strided((8, 3), (1, 1), 0)  # overlapping sliding windows
    assert windows.numpy().tolist()[-1] == [7, 8, 9] and not windows.is_contiguous()
    rev = t.as_strided((10,), (-1,), 9)
    assert rev.numpy().tolist() == list(range(9, -1, -1))
    assert t.as_strided((0, 5), (100, 100), 10).numel == 0
    assert t.as_strided((2,), (3,)).numpy().tolist() == [0, 3]  # offset defaults to t's
    for shape, strides, offset in [((11,), (1,), 0), ((5,), (2,), 2), ((2,), (1,), -1),
                                   ((3,), (-1,), 1), ((2, 2), (5, 1), 5)]:
        with pytest.raises(ShapeError, match="outside the storage"):
            t.as_strided(shape, strides, offset)
    with pytest.raises(ShapeError, match="2 dims"):
        t.as_strided((2, 2), (1,))
    with pytest.raises(ShapeError, match="must be ints"):
        t.as_strided((2,), (1.5,))


def test_as_strided_reaches_the_whole_torch_storage():
    base = torch.arange(12, dtype=torch.float32)
    t = tessera.as_tensor(base[4:8])
    assert t.storage_offset() == 4
    whole = t.as_strided((12,), (1,), 0)
    assert whole.numpy().tolist() == base.tolist()
    with pytest.raises(ShapeError):
        t.as_strided((13,), (1,), 0)


def test_numpy_foreign_storage_is_exactly_the_view():
    a = np.arange(20, dtype=np.float32)[5:15]
    t = tessera.as_tensor(a)
    assert t.as_strided((10,), (1,), 0).numpy().tolist() == a.tolist()
    with pytest.raises(ShapeError):
        t.as_strided((11,), (1,), 0)


def test_readonly_and_broadcast_numpy_arrays():
    a = np.broadcast_to(np.arange(4, dtype=np.float32), (3, 4))
    t = tessera.as_tensor(a)
    assert t.readonly and t.strides == (0, 1) and t.shape == (3, 4)
    out = t.numpy()
    assert not out.flags.writeable and np.array_equal(out, a)
    assert torch.equal(t.torch(), torch.arange(4.0).expand(3, 4))
    assert not t.clone().readonly
    assert tessera.from_dlpack(a).readonly  # DLPack 1.0 carries the read-only flag
    assert not np.from_dlpack(t).flags.writeable


def test_bfloat16_has_no_numpy_dtype():
    t = tessera.zeros(3, dtype=tessera.bfloat16)
    with pytest.raises(DtypeError, match="numpy has no bfloat16") as info:
        t.numpy()
    assert ".torch()" in info.value.hint
    with pytest.raises(DtypeError):
        np.asarray(t)
    raw = t.numpy(view_bfloat16_as_uint16=True)
    raw[:] = 0x3FC0  # 1.5 in bfloat16
    assert t.torch().tolist() == [1.5, 1.5, 1.5]


# --- copies from Python objects ------------------------------------------------------------------

def test_lists_and_scalars_are_copied():
    assert tessera.as_tensor([[1, 2], [3, 4]]).dtype is tessera.int64
    f = tessera.as_tensor([0.5, 1.25])
    assert f.dtype is tessera.float32 and f.numpy().tolist() == [0.5, 1.25]
    assert tessera.as_tensor([True, False]).numpy().tolist() == [True, False]
    assert tessera.as_tensor(7, dtype="i8").numpy().item() == 7
    s = tessera.as_tensor(2.5)
    assert s.shape == () and s.numpy().item() == 2.5 and isinstance(s.owner, Block)
    h = tessera.as_tensor([1, 2, 3], dtype=tessera.float16)
    assert h.numpy().tolist() == [1.0, 2.0, 3.0]


def test_bfloat16_from_python_rounds_like_torch():
    values = [0.0, -0.0, 1.0, 1.00390625, 1.01171875, 3.14159, -2.5e-3, 1e38, 3.4e38,
              float("inf"), float("-inf"), 1e-40, 65504.0, 1.0 + 2 ** -8, 1.0 + 3 * 2 ** -8]
    t = tessera.as_tensor(values, dtype="bf16")
    expected = torch.tensor(values, dtype=torch.float32).to(torch.bfloat16)
    assert np.array_equal(bits(t), bits(expected))
    assert torch.isnan(tessera.as_tensor([float("nan")], dtype="bf16").torch()).all()


def test_array_interface_objects_are_shared():
    class Exporter:
        def __init__(self, a):
            self.a = a
            self.__array_interface__ = a.__array_interface__

    a = np.arange(6, dtype=np.uint8)
    t = tessera.as_tensor(Exporter(a))
    assert t.data_ptr() == a.ctypes.data
    a[0] = 99
    assert t.numpy()[0] == 99
    assert tessera.as_tensor(t) is t


@pytest.mark.parametrize("bad, error, match", [
    (np.zeros(3), DtypeError, "float64"),
    (np.zeros(3, np.complex64), DtypeError, "complex64"),
    (np.zeros(3, ">i4"), DtypeError, "byte order"),
    (np.zeros(3, np.int16), DtypeError, "int16"),
    (torch.zeros(3, dtype=torch.float64), DtypeError, "float64"),
    (torch.zeros(3, dtype=torch.complex64), DtypeError, "complex64"),
    (torch.zeros(3, device="meta"), DeviceError, "meta"),
    (torch.zeros(3).to_sparse(), ShapeError, "not strided"),
    (torch.ones(3)._neg_view(), TesseraError, "negation"),
    ([[1, 2], [3]], ShapeError, "inhomogeneous"),
    ([1 + 2j], DtypeError, "complex128"),
    (["a"], DtypeError, "str"),
    (object(), DtypeError, "object"),
    (np.lib.stride_tricks.as_strided(np.zeros(8, np.int32), (3,), (6,)), ShapeError,
     "not multiples of the itemsize"),
])
def test_unsupported_inputs(bad, error, match):
    with pytest.raises(error, match=match) as info:
        tessera.as_tensor(bad)
    assert isinstance(info.value, TesseraError)


def test_as_tensor_never_converts_shared_memory():
    with pytest.raises(DtypeError, match="never converts"):
        tessera.as_tensor(np.zeros(3, np.int32), dtype=tessera.float32)
    assert tessera.as_tensor(np.zeros(3, np.int32), dtype="i32").dtype is tessera.int32
    with pytest.raises(DtypeError, match="out of range"):
        tessera.as_tensor([300], dtype=tessera.int8)


def test_from_dlpack_errors():
    with pytest.raises(TesseraError, match="does not support DLPack"):
        tessera.from_dlpack([1, 2])
    capsule = np.zeros(2, np.float32).__dlpack__()
    tessera.from_dlpack(capsule)
    with pytest.raises(TesseraError, match="consumed only once"):
        tessera.from_dlpack(capsule)
    with pytest.raises(DtypeError):
        tessera.from_dlpack(np.zeros(2))  # float64

    class OnGpu:
        def __dlpack_device__(self):
            return (2, 0)

        def __dlpack__(self, **kwargs):
            raise AssertionError("must not be asked to export")

    with pytest.raises(DeviceError, match=r"\(2, 0\)"):
        tessera.from_dlpack(OnGpu())


# --- lifetimes -----------------------------------------------------------------------------------

def test_numpy_view_keeps_tessera_memory_alive():
    before = active_blocks()
    t = tessera.zeros(1000, dtype=tessera.int32)
    n = t.numpy()
    del t
    assert active_blocks() == before + 1
    n[:] = np.arange(1000)  # still valid memory
    filler = [tessera.zeros(1000, dtype=tessera.int32) for _ in range(4)]  # would reuse it
    assert n.tolist() == list(range(1000))
    del filler, n
    assert active_blocks() == before


@pytest.mark.parametrize("export", [
    lambda t: t.torch(),
    lambda t: torch.from_dlpack(t),
    lambda t: np.from_dlpack(t),
    lambda t: np.asarray(t),
    lambda t: t.as_strided((10,), (1,), 0).numpy(),
], ids=["torch", "torch.from_dlpack", "np.from_dlpack", "np.asarray", "as_strided"])
def test_exports_keep_tessera_memory_alive(export):
    before = active_blocks()
    t = tessera.zeros(10, dtype=tessera.int64)
    view = export(t)
    del t
    assert active_blocks() == before + 1
    view[3] = 42
    _ = [tessera.zeros(10, dtype=tessera.int64) for _ in range(3)]
    assert int(view[3]) == 42 and int(view[4]) == 0
    del view, _
    assert active_blocks() == before


def test_unconsumed_capsule_releases_its_tensor():
    before = active_blocks()
    t = tessera.empty(100)
    capsules = [t.__dlpack__(), t.__dlpack__(max_version=(1, 0))]
    del t
    assert active_blocks() == before + 1
    del capsules
    assert active_blocks() == before


def test_foreign_memory_lives_while_the_tensor_does():
    a = np.arange(5, dtype=np.int64)
    ref = weakref.ref(a)
    via_array, via_dlpack = tessera.as_tensor(a), tessera.from_dlpack(a)
    del a
    gc.collect()
    assert ref() is not None
    assert via_array.numpy().tolist() == via_dlpack.numpy().tolist() == [0, 1, 2, 3, 4]
    del via_array
    gc.collect()
    assert ref() is not None  # the DLPack import still holds it
    del via_dlpack  # ... until the producer's deleter runs
    gc.collect()
    assert ref() is None


def test_torch_import_keeps_the_torch_tensor_alive():
    src = torch.arange(6, dtype=torch.int32)
    ptr = src.data_ptr()
    t = tessera.as_tensor(src)
    del src
    gc.collect()
    assert t.owner.data_ptr() == ptr and t.numpy().tolist() == list(range(6))


def test_exceptions_survive_dying_exports():
    """Deleters run while an exception unwinds; it must arrive intact (Python-level ctypes
    callbacks would replace it with a SystemError)."""
    t = tessera.zeros(4)
    with pytest.raises(ZeroDivisionError):
        _ = [torch.from_dlpack(t), 1 / 0]
    with pytest.raises(ZeroDivisionError):
        _ = [t.__dlpack__(), t.__dlpack__(max_version=(1, 0)), 1 / 0]
    with pytest.raises(ZeroDivisionError):
        _ = [tessera.from_dlpack(np.zeros(3, np.float32)), tessera.empty(3), 1 / 0]
    with pytest.raises(RuntimeError, match=r"[Uu]nsupported"):
        np.from_dlpack(tessera.zeros(2, dtype=tessera.bfloat16))  # numpy rejects, then frees
