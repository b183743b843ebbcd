"""`tessera bench lang|ops --device opencl`: the suites build device cases, a few run and
agree with torch, cases that cannot run are listed with why, and the numbers say where a
call's time goes (device time from OpenCL event profiling)."""

from __future__ import annotations

import io
import json

import pytest
import torch
from rich.console import Console

import tessera
import tessera.kernels
import tessera.ops
from tessera import bench
from tessera.bench import device as bench_device
from tessera.bench.cases import op_case, torch_case
from tessera.errors import DeviceError, ShapeError


def _quiet() -> Console:
    return Console(file=io.StringIO(), width=200)


@pytest.mark.parametrize("suite", ["lang", "ops.matmul", "ops.index"])
def test_suites_build_device_cases(opencl_device, suite):
    """Building the quick cases for a device gives each a tessera_opencl impl first (the
    inputs move only when a case runs), or the reason it has none."""
    import importlib

    module = importlib.import_module(f"tessera.bench.{suite}")
    with bench_device.target(opencl_device):
        cases = module.cases(True)
    assert cases
    for case in cases:
        assert list(case.impls)[:3] == ["tessera_opencl", "tessera", "torch_eager"], case.name
        assert "torch_inductor" not in case.impls and not case.skipped


def test_lang_on_opencl_agrees_and_reports_device_time(opencl_device, tmp_path):
    out = tmp_path / "lang.json"
    rows = bench.run("lang", quick=True, device="opencl", only="add_16,softmax_32x384",
                     json_path=str(out), console=_quiet())
    assert [(r["case"], r["impl"]) for r in rows] == [
        (c, i) for c in ("add_16", "softmax_32x384")
        for i in ("tessera_opencl", "tessera", "torch_eager")]
    for r in rows:
        assert r["median_s"] > 0 and r["extra"]["gb_per_s"] > 0
        if r["impl"] == "tessera_opencl":
            e = r["extra"]
            assert e["commands"] == 1  # one kernel a call, nothing round-trips
            assert 0 < e["device_us"] < r["median_s"] * 1e6  # the host's share is the rest
            assert e["device_gb_per_s"] > e["gb_per_s"] and "host_round_trips" not in e
    data = json.loads(out.read_text())
    assert data["machine"]["device"]["type"] == "opencl"
    assert "skipped" not in data and data["results"] == rows


def test_ops_on_opencl_agree_with_torch(opencl_device, monkeypatch):
    # the index family alone: the whole suite would build every family's inputs (~30 s)
    monkeypatch.setitem(bench.SUITES, "ops", "tessera.bench.ops.index")
    rows = bench.run("ops", quick=True, device="opencl", only="gather_8x64_k4",
                     console=_quiet())
    assert [r["impl"] for r in rows] == ["tessera_opencl", "tessera", "torch_eager"]
    assert rows[0]["extra"]["commands"] >= 1 and rows[0]["extra"]["device_us"] > 0


@pytest.fixture
def fake_suite(monkeypatch, opencl_device):
    """A suite of one op case on the device, whose device call `state` may break."""
    import sys
    import types

    state = {"device": "ok"}

    def on_device(x):
        if state["device"] == "error":
            raise DeviceError("fake op: not on this device", hint="none")
        y = tessera.ops.add(x, x)
        return tessera.ops.add(y, x) if state["device"] == "wrong" else y

    def cases(quick: bool) -> list[bench.Case]:
        x = torch.randn(64)
        return [op_case("twice", lambda t: t + t, lambda t: 2 * t, (x,), quick,
                        on_device=on_device, bytes_moved=8 * 64),
                torch_case("closure", lambda: x + x, lambda t: 2 * t, (x,), quick)]

    module = types.ModuleType("fake_device_suite")
    module.cases = cases
    monkeypatch.setitem(sys.modules, "fake_device_suite", module)
    monkeypatch.setitem(bench.SUITES, "lang", "fake_device_suite")
    return state


def test_cases_that_cannot_run_there_are_listed(fake_suite, tmp_path):
    fake_suite["device"] = "error"
    out, console = tmp_path / "out.json", _quiet()
    rows = bench.run("lang", quick=True, device="opencl", json_path=str(out),
                     console=console)
    assert {(r["case"], r["impl"]) for r in rows} == {
        (c, i) for c in ("twice", "closure") for i in ("tessera", "torch_eager")}
    assert "not run: twice tessera_opencl: DeviceError" in console.file.getvalue()
    skipped = {s["case"]: s["reason"] for s in json.loads(out.read_text())["skipped"]}
    assert skipped["twice"].startswith("DeviceError: fake op: not on this device")
    assert "closes over host tensors" in skipped["closure"]


def test_a_wrong_device_result_is_refused(fake_suite):
    fake_suite["device"] = "wrong"
    with pytest.raises(bench.BenchError, match=r"lang/twice.*tessera_opencl"):
        bench.run("lang", quick=True, device="opencl", only="twice", console=_quiet())


def test_device_only_for_the_suites_that_have_device_cases(opencl_device):
    with pytest.raises(bench.BenchError, match="suite 'gemm' does not time") as info:
        bench.run("gemm", quick=True, device="opencl")
    assert "lang, ops" in info.value.hint


def test_upload_keeps_the_layout_and_download_brings_it_back(opencl_device):
    x = torch.randn(4, 6).t()  # a transposed view
    d = bench_device.upload([x, 3], opencl_device)
    assert d[1] == 3 and d[0].strides == x.stride() and d[0].device == opencl_device
    assert torch.equal(bench_device.download((d[0],))[0], x)


def test_profile_reads_the_device_time_of_each_command(opencl_device):
    x = bench_device.upload(torch.randn(1 << 16), opencl_device)
    p = bench_device.profile(opencl_device, lambda: tessera.kernels.add(x, x), calls=3)
    assert p.commands == 1 and 0 < p.device_s < 0.1
    with pytest.raises(bench.BenchError, match="not an OpenCL device"):
        bench_device.profile(tessera.device("cpu"), lambda: None)


def test_kernel_wrappers_refuse_what_they_cannot_do_on_a_device(opencl_device):
    x = bench_device.upload(torch.randn(2, 3, 4).transpose(0, 2), opencl_device)
    with pytest.raises(ShapeError, match="non-contiguous opencl"):
        tessera.kernels.rms_norm(x, bench_device.upload(torch.ones(2), opencl_device))
    with pytest.raises(ShapeError, match="only the last dimension"):
        tessera.kernels.softmax(x, dim=0)
