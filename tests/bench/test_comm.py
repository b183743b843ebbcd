"""`tessera bench comm`: it launches its own ranks under mpirun and returns one row per
case and impl; wrong results on any rank stop every rank. Checks, not timings."""

from __future__ import annotations

import json
import shutil
import sys

import pytest

from tessera import bench
from tessera.bench import BenchError
from tessera.bench import comm as comm_suite

# one case of each kind: allreduce latency (us) and bandwidth (GB/s), alltoall (GB/s); the
# 16 MB patterns match cases --quick leaves out
ONLY = "allreduce_8B,allreduce_1MB,alltoall_4KB,*_16MB"
CASES = ["allreduce_8B", "allreduce_1MB", "alltoall_4KB"]
LATENCY = {"allreduce_8B"}


@pytest.mark.ranks
def test_comm_ranks_time_the_chosen_cases() -> None:
    """The ranks build and time only the cases `only` names (the whole quick suite takes
    three times as long), and rank 0 returns one row per case and impl."""
    rows = comm_suite.rows(quick=True, ranks=2, only=ONLY)
    assert [(r["case"], r["impl"]) for r in rows] == [
        (c, i) for c in CASES for i in ("tessera", "mpi", "gloo")]
    for r in rows:
        assert r["suite"] == "comm" and r["median_s"] > 0
        assert r["extra"]["ranks"] == 2 and r["extra"]["bytes"] > 0
        assert r["extra"]["us" if r["case"] in LATENCY else "gb_per_s"] > 0


@pytest.mark.ranks
def test_wrong_results_on_one_rank_stop_every_rank(tmp_path):
    """Rank 1's tessera allreduce adds 1: both ranks leave, rank 0 reports rank 1's error."""
    script = tmp_path / "wrong_rank1.py"
    script.write_text(
        "import sys\n"
        "import tessera.dist as tdist\n"
        "from tessera.bench import comm_worker\n"
        "right = tdist.Communicator.allreduce\n"
        "def wrong(self, x, *args, **kwargs):\n"
        "    out = right(self, x, *args, **kwargs)\n"
        "    if self.rank == 1:\n"
        "        out += 1\n"
        "    return out\n"
        "tdist.Communicator.allreduce = wrong\n"
        "comm_worker.main(sys.argv[1:])\n")
    out = tmp_path / "rows.json"
    mpirun = shutil.which("mpirun") or pytest.fail(
        "mpirun is not installed: apt-get install openmpi-bin libopenmpi-dev")
    code, output = comm_suite._launch([mpirun, "-np", "2", sys.executable,
                                       "-m", "mpi4py", str(script), str(out), "--quick"])
    assert code == 0, output
    error = json.loads(out.read_text())["error"]
    assert "comm/allreduce_8B" in error and "rank 1: allreduce by tessera" in error
    assert "rank 0:" not in error


def test_missing_mpirun_says_what_to_install(monkeypatch):
    monkeypatch.setattr(shutil, "which", lambda name: None)
    with pytest.raises(BenchError, match="mpirun") as info:
        bench.run("comm", quick=True)
    assert "apt-get install openmpi-bin libopenmpi-dev" in info.value.hint
    assert "pip install mpi4py" in info.value.hint


def test_one_rank_is_refused():
    with pytest.raises(BenchError, match="at least 2 ranks"):
        bench.run("comm", quick=True, ranks=1)
