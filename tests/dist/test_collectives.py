"""Every collective, dtype and op at 2, 3 and 4 ranks, launched by mpirun and torchrun, on
one node and on forced multi-node splits (shared memory + MPI or gloo between "nodes").

Each configuration is one job running every case in tests/dist/workers/cases.py; the tests
below report each case of each job."""

from __future__ import annotations

import sys

import pytest
from jobs import WORKERS, results, run

pytestmark = pytest.mark.ranks

sys.path.insert(0, str(WORKERS))
from cases import CASES

CONFIGS = {
    "mpirun-2": ("mpirun", 2, {}),
    "mpirun-4-small-slots": ("mpirun", 4, {"TESSERA_COMM_SLOT_BYTES": "8192",
                                           "TESSERA_COMM_DIRECT_MIN": "0"}),
    "torchrun-2-twoshot": ("torchrun", 2, {"TESSERA_COMM_ALGO": "twoshot",
                                           "TESSERA_COMM_DIRECT_MIN": "0"}),
    "torchrun-3-oneshot": ("torchrun", 3, {"TESSERA_COMM_ALGO": "oneshot"}),
    "mpirun-3-direct": ("mpirun", 3, {"TESSERA_COMM_ALGO": "direct",
                                      "TESSERA_COMM_DIRECT_MIN": "1"}),
    "torchrun-4-two-nodes": ("torchrun", 4, {"TESSERA_COMM_LOCAL_SIZE": "2"}),
    "mpirun-3-uneven-nodes": ("mpirun", 3, {"TESSERA_COMM_LOCAL_SIZE": "2"}),
}
_jobs: dict[str, list[dict]] = {}


def job(name: str, tmp_path_factory: pytest.TempPathFactory) -> list[dict]:
    if name not in _jobs:
        launcher, nranks, env = CONFIGS[name]
        out = tmp_path_factory.mktemp(name)
        proc = run(launcher, nranks, WORKERS / "cases.py", [str(out)], env=env)
        _jobs[name] = results(out, nranks, proc)
    return _jobs[name]


@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("config", list(CONFIGS))
def test_case(config: str, case: str, tmp_path_factory: pytest.TempPathFactory) -> None:
    ranks = job(config, tmp_path_factory)
    for r, res in enumerate(ranks):
        assert res.get(case, "ok") == "ok", f"rank {r}:\n{res[case]}"
    for r, res in enumerate(ranks):
        assert case in res, f"rank {r} stopped before {case}: a case failed earlier"


@pytest.mark.parametrize("config", list(CONFIGS))
def test_topology(config: str, tmp_path_factory: pytest.TempPathFactory) -> None:
    _, nranks, env = CONFIGS[config]
    ranks = job(config, tmp_path_factory)
    local = int(env.get("TESSERA_COMM_LOCAL_SIZE", nranks))
    for res in ranks:
        assert res, "a rank wrote no results"
        assert res["size"] == nranks
        assert res["nodes"] == -(-nranks // local), res
        assert ("+engine" in res["transport"]) == (local < nranks), res
        direct = env.get("TESSERA_COMM_DIRECT_MIN") != "0"     # the kernel allows it here
        assert ("+direct" in res["transport"]) == direct, res
