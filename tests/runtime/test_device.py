"""The device registry and the CPU device's facts and measured peaks."""

from __future__ import annotations

import json

import pytest

import tessera
from tessera.errors import DeviceError
from tessera.runtime.cache import default_cache
from tessera.runtime.cpu import probe


def test_cpu_device_is_a_singleton():
    cpu = tessera.device("cpu")
    assert cpu is tessera.device("cpu:0") is tessera.device(cpu) is tessera.device()
    assert cpu == "cpu" and cpu != "cpu:1" and repr(cpu) == "device('cpu')"
    assert cpu in tessera.devices()


@pytest.mark.parametrize("spec, match", [
    ("gpu", "unknown device type 'gpu'"),
    ("cpu:x", "bad device index"),
    ("cpu:1", "does not exist"),
    ("cpu:-1", "does not exist"),
    (3, "named by a string"),
])
def test_bad_device_specs(spec, match):
    with pytest.raises(DeviceError, match=match) as info:
        tessera.device(spec)
    assert info.value.hint


def test_cpu_facts():
    props = tessera.device("cpu").properties(measure=False)
    assert props["cores"] >= 1 and props["logical_cpus"] >= props["cores"]
    assert props["arch"] and props["model"]
    if props["arch"] == "x86_64":
        assert "sse4_2" in props["isa"]
        assert props["cache_bytes"]["L1d"] >= 16 * 1024
    assert "peak_gflops_fp32" not in props


def test_measured_peaks_are_plausible_and_cached():
    first = probe.measured_peaks()
    assert 1.0 < first["peak_gflops_fp32"] < 1e5
    assert 0.5 < first["copy_bandwidth_gbs"] < 1e4
    assert 0.5 < first["read_bandwidth_gbs"] < 1e4
    assert probe.measured_peaks() == first  # read back, not measured again
    assert tessera.device("cpu").properties()["peak_gflops_fp32"] == first["peak_gflops_fp32"]


def test_corrupted_measurement_is_redone():
    first = probe.measured_peaks()
    entry = default_cache().lookup("device", probe._machine_key())
    (entry / "peaks.json").write_text(json.dumps({**first, "peak_gflops_fp32": 1e9}))
    again = probe.measured_peaks()
    assert again["peak_gflops_fp32"] < 1e5  # the tampered value was never trusted
