"""The GEMM autotuner and the blocking it records: `blocking()` takes a usable record for
this machine and ignores anything else; the tuner checks every candidate's results,
searches in stages and records a correct winner. No timing is asserted: the staged
search is steered by a synthetic cost instead."""

from __future__ import annotations

import json
from dataclasses import asdict

import numpy as np
import pytest
from typer.testing import CliRunner

import tessera.tune
from tessera.cli import app
from tessera.errors import TuneError
from tessera.runtime import knowledge
from tessera.templates.gemm import Blocking, blocking, gemm
from tessera.templates.gemm.tuning import KEY, KIND, vector_lanes, vector_registers
from tessera.tune import gemm as tuner

VL = vector_lanes()


@pytest.fixture(autouse=True)
def own_cache(tmp_path, monkeypatch):
    """A knowledge base of this test's own; other tests see the default blocking again."""
    monkeypatch.setenv("TESSERA_CACHE_DIR", str(tmp_path))
    blocking.cache_clear()
    yield
    blocking.cache_clear()


def _record(b: Blocking | dict) -> None:
    knowledge.store(KIND, KEY, {"blocking": b if isinstance(b, dict) else asdict(b),
                                "speedup": 1.2})


def test_blocking_uses_this_machines_record():
    default = blocking()
    tuned = Blocking(4, 2 * VL, VL, 64, 128, 8 * VL)
    _record(tuned)
    assert blocking() == default  # cached per process until the tuner clears it
    blocking.cache_clear()
    assert blocking() == tuned and blocking(tuned=False) == default
    a, b = np.ones((37, 300), np.float32), np.ones((300, 41), np.float32)
    np.testing.assert_allclose(gemm(a, b), a @ b)


@pytest.mark.parametrize("bad, why", [
    ({"vl": 4 if VL == 8 else 8}, "VL ="),
    ({"nr": VL + 1}, "not a multiple of VL"),
    ({"mr": vector_registers(), "nr": 2 * VL}, "vector registers"),
    ({"mr": 8, "mc": 60}, "multiples of MR"),
    ({"nc": 3 * VL + 1}, "multiples of MR"),
    ({"kc": 1 << 20}, "64 MiB"),
    ({"kc": -1}, "positive integers"),
    ({"kc": 128.0}, "positive integers"),
    ({"extra": 1}, "positive integers"),
])
def test_unusable_blocking_in_a_record_is_ignored(bad, why):
    default = blocking(tuned=False)
    _record({**asdict(Blocking(4, VL, VL, 64, 128, 8 * VL)), **bad})
    with pytest.warns(RuntimeWarning, match=why):
        assert blocking() == default


def test_record_without_a_blocking_is_ignored():
    knowledge.store(KIND, KEY, {"speedup": 2.0})
    with pytest.warns(RuntimeWarning, match="has no blocking"):
        assert blocking() == blocking(tuned=False)


def test_tiny_tuning_run_records_a_correct_winner():
    given = [Blocking(4, VL, VL, 16, 32, 2 * VL), Blocking(6, 2 * VL, VL, 24, 48, 4 * VL)]
    lines: list[str] = []
    winner = tessera.tune.tune_gemm(sizes=(40, 72), quick=True, candidates=given,
                                    progress=lines.append, max_noise=None)
    assert winner in [blocking(tuned=False), *given] and blocking() == winner
    record = knowledge.load(KIND, KEY)
    assert record["blocking"] == asdict(winner) and record["default"] == asdict(blocking(False))
    assert record["speedup"] >= 1.0 and len(record["gflops"]["tuned"]) == 2
    assert [t["blocking"] for t in record["trials"]] == [asdict(blocking(False)),
                                                       *map(asdict, given)]
    assert all(len(t["gflops"]) == 2 for t in record["trials"])
    assert lines and lines[-1].startswith("confirm")
    a = np.random.default_rng(1).standard_normal((99, 70), dtype=np.float32)
    np.testing.assert_allclose(gemm(a, a.T), a @ a.T, rtol=1e-4, atol=1e-4)


def test_candidates_with_wrong_results_never_win(monkeypatch):
    broken = Blocking(4, VL, VL, 16, 32, 2 * VL)

    def gemm_broken_for_one(a, b, out=None, *, config):
        result = gemm(a, b, out, config=config)
        if config == broken:
            result[0, 0] += 1.0
        return result
    monkeypatch.setattr(tuner, "gemm", gemm_broken_for_one)
    winner = tessera.tune.tune_gemm(sizes=(40,), candidates=[broken], max_noise=None)
    assert winner == blocking(tuned=False)
    (failed,) = [t for t in knowledge.load(KIND, KEY)["trials"] if t["blocking"] == asdict(broken)]
    assert failed["gflops"] is None and "wrong result" in failed["error"]


def test_staged_search_finds_the_best_of_a_synthetic_cost(monkeypatch):
    """Stages MR x NR, KC, MC and NC, each around the best so far, on a cost that is
    lowest for a 12 x VL tile, KC 256 and the smaller MC and NC."""
    def cost(b: Blocking) -> float:
        return (1 + abs(b.mr - 12) + (b.nr // VL - 1) + abs(b.kc - 256) / 64
                + b.mc / 1e4 + b.nc / 1e5)

    def fake_timing(calls, repeats, budget_s):
        return [[cost(call.keywords["config"])] * 3 for call in calls]

    def numpy_gemm(a, b, out=None, *, config):
        return np.matmul(a, b, out=out)
    monkeypatch.setattr(tuner, "time_interleaved", fake_timing)
    monkeypatch.setattr(tuner, "gemm", numpy_gemm)
    default = blocking(tuned=False)
    winner = tessera.tune.tune_gemm(sizes=(64, 3000))  # blocks below 3000 all count
    assert (winner.mr, winner.nr, winner.kc) == (12, VL, 256)
    assert winner.mc < default.mc and winner.nc < default.nc
    record = knowledge.load(KIND, KEY)
    stages = [t["stage"] for t in record["trials"]]
    assert stages == sorted(stages, key=["micro-tile", "KC", "MC", "NC"].index)
    assert set(stages) == {"micro-tile", "KC", "MC", "NC"}
    tiles = [t["blocking"] for t in record["trials"] if t["stage"] == "micro-tile"]
    assert tiles[0] == asdict(default) and len(tiles) >= 6
    assert record["speedup"] == pytest.approx(cost(default) / cost(winner), rel=1e-3)
    assert record["noise"] == 1.0  # every repeat and stage measured the same


def test_a_busy_machine_records_nothing(monkeypatch):
    _record(Blocking(4, VL, VL, 64, 128, 8 * VL))
    runs = iter([1.0, 2.0, 2.0] * 1000)  # every median twice the best run

    def noisy_timing(calls, repeats, budget_s):
        return [[next(runs) for _ in range(3)] for _ in calls]
    monkeypatch.setattr(tuner, "time_interleaved", noisy_timing)
    given = [Blocking(4, VL, VL, 16, 32, 2 * VL)]
    with pytest.raises(TuneError, match="busy") as e:
        tessera.tune.tune_gemm(sizes=(40,), candidates=given)
    assert e.value.hint and knowledge.load(KIND, KEY)["speedup"] == 1.2  # the old record


def test_bad_requests_are_errors():
    with pytest.raises(TuneError, match="positive integers"):
        tessera.tune.tune_gemm(sizes=(0, 64))
    with pytest.raises(TuneError, match="registers") as e:
        tessera.tune.tune_gemm(candidates=[Blocking(30, 4 * VL, VL, 30, 64, 4 * VL)])
    assert e.value.hint
    assert knowledge.load(KIND, KEY) is None


def test_cli_tune_gemm_and_show(monkeypatch):
    runner = CliRunner()
    shown = runner.invoke(app, ["tune", "show"])
    assert shown.exit_code == 0 and "no tuning records" in shown.output
    given = [Blocking(4, VL, VL, 16, 32, 2 * VL)]
    real = tessera.tune.tune_gemm
    monkeypatch.setattr(tessera.tune, "tune_gemm", lambda quick, progress: real(
        sizes=(32,), quick=quick, candidates=given, progress=progress, max_noise=None))
    tuned = runner.invoke(app, ["tune", "gemm", "--quick", "--json"])
    assert tuned.exit_code == 0, tuned.output
    assert json.loads(tuned.stdout)["blocking"] == asdict(blocking())
    shown = runner.invoke(app, ["tune", "show"])
    assert shown.exit_code == 0 and "gemm.blocking float32" in shown.output
    assert "GEMM blocking candidates" in shown.output and "speedup" in shown.output
    listed = json.loads(runner.invoke(app, ["tune", "show", "--json"]).stdout)
    assert listed["machine"] == knowledge.machine() and len(listed["records"]) == 1


def test_info_reports_tuned_or_default_blocking():
    from tessera.cli import machine_report

    assert machine_report()["gemm_blocking"] == {**asdict(blocking()), "speedup": None}
    tuned = Blocking(4, VL, VL, 64, 128, 8 * VL)
    _record(tuned)
    blocking.cache_clear()
    assert machine_report()["gemm_blocking"] == {**asdict(tuned), "speedup": 1.2}
