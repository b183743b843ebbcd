"""The benchmark runner: medians, interleaving, checks, JSON shape. Checks, not timings."""

from __future__ import annotations

import json
import sys
import types

import pytest

from tessera import bench
from tessera.bench import BenchError, Case
from tessera.bench.runner import time_case


class FakeClock:
    """A clock that only moves when a fake implementation 'runs'."""

    def __init__(self) -> None:
        self.now = 0

    def __call__(self) -> int:
        return self.now

    def work(self, ns: int):
        def fn() -> None:
            self.now += ns
        return fn


def test_medians_are_per_call_seconds():
    clock = FakeClock()
    timings = time_case({"tessera": clock.work(1000), "numpy": clock.work(3000)},
                        rounds=5, min_sample_s=1e-4, clock=clock)
    assert timings["tessera"].median_s == pytest.approx(1e-6)
    assert timings["numpy"].median_s == pytest.approx(3e-6)
    assert timings["tessera"].calls_per_sample >= 100  # calibrated to >= 0.1 ms a sample
    assert timings["numpy"].iqr_pct == 0.0


def test_rounds_interleave_every_impl():
    calls: list[str] = []
    clock = FakeClock()

    def impl(name: str):
        step = clock.work(10_000_000)  # 10 ms a call: one call per sample

        def fn() -> None:
            calls.append(name)
            step()
        return fn

    time_case({n: impl(n) for n in "abc"}, rounds=6, min_sample_s=1e-3, clock=clock)
    timed = calls[6:]  # after one warm-up and one calibration call each
    rounds = [timed[i:i + 3] for i in range(0, len(timed), 3)]
    assert len(rounds) == 6 and all(sorted(r) == ["a", "b", "c"] for r in rounds)
    assert len({tuple(r) for r in rounds}) > 1, "the order within rounds must be shuffled"


@pytest.fixture
def fake_suite(monkeypatch):
    module = types.ModuleType("fake_bench_suite")
    state = {"agree": True}

    def cases(quick: bool) -> list[Case]:
        def check() -> None:
            assert state["agree"], "tessera returned 3, numpy returned 4"
        return [Case("tiny", {"tessera": lambda: None, "numpy": lambda: sum(range(50))},
                     check=check, extra=lambda impl, s: {"us_per_call": s * 1e6},
                     meta={"size": 50})]

    module.cases = cases
    monkeypatch.setitem(sys.modules, "fake_bench_suite", module)
    monkeypatch.setitem(bench.SUITES, "fake", "fake_bench_suite")
    return state


def test_json_has_the_architecture_shape(fake_suite, tmp_path):
    out = tmp_path / "out.json"
    bench.run("fake", quick=True, json_path=str(out))
    data = json.loads(out.read_text())
    assert {"cpu", "cores", "torch"} <= set(data["machine"])
    rows = data["results"]
    assert [(r["case"], r["impl"]) for r in rows] == [("tiny", "tessera"), ("tiny", "numpy")]
    for row in rows:
        assert set(row) == {"suite", "case", "impl", "median_s", "extra"}
        assert row["suite"] == "fake" and row["median_s"] > 0
        assert row["extra"]["size"] == 50 and row["extra"]["us_per_call"] > 0


def test_disagreeing_implementations_are_refused(fake_suite):
    fake_suite["agree"] = False
    with pytest.raises(BenchError, match=r"fake/tiny.*returned 3"):
        bench.run("fake", quick=True)


def test_only_selects_cases_by_pattern(fake_suite):
    assert [r["case"] for r in bench.run("fake", quick=True, only="ti*, other")] == \
        ["tiny", "tiny"]
    with pytest.raises(BenchError, match=r"no case of suite 'fake' matches 'big_\*'"):
        bench.run("fake", quick=True, only="big_*")


def test_unknown_suite():
    with pytest.raises(BenchError, match="unknown benchmark suite") as info:
        bench.run("nope")
    assert "runtime" in info.value.hint


def test_runtime_suite_end_to_end(tmp_path):
    out = tmp_path / "runtime.json"
    rows = bench.run("runtime", quick=True, json_path=str(out))
    assert {(r["case"], r["impl"]) for r in rows} == {
        (c, i) for c in ("call_trivial_c", "call_kernel_ptr_args")
        for i in ("tessera", "torch_eager")} | {
        (c, i) for c in ("launch_profiled_x100", "op_add_profiled_x100")
        for i in ("tessera", "profiled")}
    assert all(r["extra"]["us_per_call"] > 0 for r in rows)
    assert json.loads(out.read_text())["results"] == rows


@pytest.mark.slow
def test_lang_suite_end_to_end(tmp_path):
    out = tmp_path / "lang.json"
    rows = bench.run("lang", quick=True, json_path=str(out))
    cases = {r["case"] for r in rows}
    assert {"softmax_32x384", "layernorm_32x384", "rmsnorm_32x384"} <= cases
    assert any(c.startswith("flash_attention") for c in cases)
    assert {r["impl"] for r in rows} == {"tessera", "torch_eager"}  # --quick: no Inductor
    metric = [r["extra"].get("gb_per_s") or r["extra"].get("gflops") for r in rows]
    assert all(m > 0 for m in metric)


def test_a_suite_can_return_finished_rows(monkeypatch, tmp_path):
    """A suite timed in processes of its own (comm) hands back rows: the runner orders
    them (Tessera first, baselines in a fixed order), prints them and writes the JSON."""
    module = types.ModuleType("fake_rows_suite")
    seen = {}

    def rows(quick: bool, ranks: int, only: str | None = None) -> list[dict]:
        seen.update(quick=quick, ranks=ranks)
        return [{"suite": "fake", "case": c, "impl": i, "median_s": 1e-6,
                 "extra": {"iqr_pct": 1.0, "rounds": 3, "calls_per_sample": 10, "ranks": ranks},
                 "_meta": ["ranks"]}
                for c in ("a", "b") for i in ("gloo", "tessera", "mpi")]

    module.rows = rows
    monkeypatch.setitem(sys.modules, "fake_rows_suite", module)
    monkeypatch.setitem(bench.SUITES, "fake_rows", "fake_rows_suite")
    out = tmp_path / "out.json"
    got = bench.run("fake_rows", quick=True, ranks=3, json_path=str(out))
    assert seen == {"quick": True, "ranks": 3}
    assert [(r["case"], r["impl"]) for r in got] == [
        (c, i) for c in ("a", "b") for i in ("tessera", "mpi", "gloo")]
    assert json.loads(out.read_text())["results"] == got
    assert all("_meta" not in r for r in got)
