"""The OpenCL device: memory, copies, streams and events, program builds (PoCL in CI)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import tessera
from tessera.errors import CompileError, DeviceError

DTYPES = ["float32", "float16", "bfloat16", "int8", "uint8", "int32", "int64", "bool"]


def test_properties_and_listing(opencl_device):
    props = opencl_device.properties()
    assert props["type"] == "opencl" and props["compute_units"] >= 1
    assert props["global_memory_bytes"] > 0 and props["max_work_group_size"] >= 1
    assert opencl_device in tessera.devices()
    assert tessera.device("opencl:0") is opencl_device


def test_bad_device_index(opencl_device):
    with pytest.raises(DeviceError, match="does not exist"):
        tessera.device("opencl:99")


@pytest.mark.parametrize("name", DTYPES)
def test_round_trip_every_dtype(opencl_device, name):
    x = torch.arange(-7, 17).reshape(4, 6).to(getattr(torch, name))
    t = tessera.as_tensor(x).to(opencl_device)
    assert t.device == opencl_device and t.dtype.name == name
    assert torch.equal(t.cpu().torch(), x)
    assert torch.equal(t.clone().cpu().torch(), x)


def test_strided_views_come_back_as_views(opencl_device):
    x = np.arange(60, dtype=np.float32).reshape(3, 4, 5)
    t = tessera.as_tensor(x).to(opencl_device)
    v = t.as_strided((5, 3), (1, 20), offset=2)
    np.testing.assert_array_equal(v.cpu().numpy(), x.reshape(-1)[2:].reshape(-1)[
        np.arange(5)[:, None] + 20 * np.arange(3)[None, :]])
    np.testing.assert_array_equal(v.clone().cpu().numpy(), v.cpu().numpy())
    strided_host = tessera.as_tensor(x[:, ::2, 1:])  # host view -> device: contiguous copy
    np.testing.assert_array_equal(strided_host.to(opencl_device).cpu().numpy(), x[:, ::2, 1:])


def test_zeros_and_empty(opencl_device):
    z = tessera.zeros((3, 1000), "int32", device=opencl_device)
    assert not z.cpu().numpy().any()
    assert tessera.empty((0, 5), device=opencl_device).cpu().numpy().shape == (0, 5)


def test_host_access_is_refused(opencl_device):
    t = tessera.zeros((4,), device=opencl_device)
    for read in (lambda: t.numpy(), lambda: np.asarray(t), lambda: t.torch(),
                 lambda: t.__dlpack__()):
        with pytest.raises(DeviceError, match="copy it first"):
            read()


def test_allocator_caches_and_counts(opencl_device):
    before = tessera.memory_stats(opencl_device)
    t = tessera.empty((1 << 16,), device=opencl_device)
    ptr = t.data_ptr()
    during = tessera.memory_stats(opencl_device)
    assert during["allocated_bytes"] >= before["allocated_bytes"] + (1 << 18)
    del t
    again = tessera.empty((1 << 16,), device=opencl_device)
    assert again.data_ptr() == ptr  # served from the cache
    buffer, offset = opencl_device.locate(again.data_ptr() + 64)
    assert offset == 64 and buffer.size >= 1 << 18
    with pytest.raises(DeviceError, match="not memory of"):
        opencl_device.locate(np.zeros(4).ctypes.data)


def test_streams_order_work_and_time_it(opencl_device):
    x = tessera.as_tensor(np.arange(1 << 20, dtype=np.float32)).to(opencl_device)
    s1, s2 = tessera.Stream(opencl_device), tessera.Stream(opencl_device)
    start, end = tessera.Event(enable_timing=True), tessera.Event(enable_timing=True)
    with tessera.stream(s1):
        start.record()
        y = x.clone()
        end.record()
    s2.wait_event(end)  # the device orders s2 after s1's copy
    with tessera.stream(s2):
        z = y.clone()
    s2.synchronize()
    end.synchronize()
    assert end.query() and start.elapsed_time(end) >= 0
    np.testing.assert_array_equal(z.cpu().numpy(), x.cpu().numpy())
    ran = []
    s1.submit(ran.append, 1)  # host work runs once the queue drained
    assert ran == [1]
    tessera.synchronize(opencl_device)
    s1.close()
    with pytest.raises(tessera.TesseraError, match="cannot be closed"):
        tessera.current_stream(opencl_device).close()


SOURCE = "__kernel void twice(__global float *x) { x[get_global_id(0)] *= 2.0f; }"


def test_build_is_cached_and_runs(opencl_device):
    program = opencl_device.build(SOURCE, "twice")
    assert opencl_device.build(SOURCE, "twice") is program  # in memory
    x = tessera.as_tensor(np.arange(8, dtype=np.float32)).to(opencl_device)
    buffer, _ = opencl_device.locate(x.data_ptr())
    opencl_device.run(program.twice, (8, 1, 1), [buffer])
    np.testing.assert_array_equal(x.cpu().numpy(), 2 * np.arange(8, dtype=np.float32))
    entry = tessera.runtime.cache.default_cache().base / "opencl"
    assert any(entry.rglob("program.bin"))


def test_build_error_shows_the_log(opencl_device):
    with pytest.raises(CompileError, match="OpenCL build of 'broken' failed") as info:
        opencl_device.build("__kernel void broken(__global float *x) { x[0] = y; }",
                            "broken")
    assert "undeclared identifier 'y'" in info.value.compiler_output  # the build log
    assert "x[0] = y" in open(info.value.source_path).read()
