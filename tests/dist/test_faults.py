"""Faults: dead and stuck peers, ranks that disagree on a collective, and what is left in
/dev/shm afterwards. Ranks are started directly with torchrun's environment (no launcher
that would kill the survivors when a rank dies)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from jobs import WORKERS, free_port

pytestmark = pytest.mark.ranks

SHM = Path("/dev/shm")


def launch(scenario: str, nranks: int, out: Path, **extra: str
           ) -> tuple[list[dict | None], list[int]]:
    env = {**os.environ, "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(free_port()),
           "WORLD_SIZE": str(nranks), "OMP_NUM_THREADS": "1", **extra}
    procs = [subprocess.Popen([sys.executable, str(WORKERS / "faults.py"), scenario, str(out)],
                              env={**env, "RANK": str(r), "LOCAL_RANK": str(r)},
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
             for r in range(nranks)]
    try:
        for p in procs:
            p.wait(timeout=120)
    finally:
        for p in procs:
            p.kill()
    found = []
    for r in range(nranks):
        path = out / f"rank{r}.json"
        found.append(json.loads(path.read_text()) if path.exists() else None)
    return found, [p.pid for p in procs]


def leftovers(pids: list[int]) -> list[str]:
    prefix = f"tessera.{os.getuid()}."
    return [p.name for p in SHM.glob(prefix + "*")
            if int(p.name[len(prefix):].split(".")[0]) in pids]


@pytest.mark.parametrize("scenario", ["dead", "killed"])
def test_dead_peer_is_named_quickly(scenario: str, tmp_path: Path) -> None:
    (survivor, gone), pids = launch(scenario, 2, tmp_path)
    assert gone is None
    assert survivor["error"] == "CommTimeoutError", survivor
    assert survivor["rank"] == 1
    assert "rank 1" in survivor["message"] and "died" in survivor["message"]
    assert survivor["seconds"] < 20            # found dead, not waited out (timeout 60 s)
    assert survivor["after"] == "CommError"    # the communicator is aborted, says so at once
    assert leftovers(pids) == []


def test_stuck_peer_times_out_and_learns_of_the_abort(tmp_path: Path) -> None:
    (waiter, sleeper), pids = launch("stuck", 2, tmp_path)
    assert waiter["error"] == "CommTimeoutError" and waiter["rank"] == 1, waiter
    assert "did not respond within 2.0 s" in waiter["message"]
    assert 1.5 < waiter["seconds"] < 15
    assert sleeper["error"] == "CommError", sleeper        # woke up to an aborted communicator
    assert "aborted" in sleeper["message"] and "rank 0" in sleeper["message"]
    assert sleeper["seconds"] < 1
    assert leftovers(pids) == []


def test_stuck_peer_on_another_node_times_out_in_the_engine(tmp_path: Path) -> None:
    """Each rank its own "node": the wait happens inside gloo, whose timeout is the
    communicator's, and still ends in CommTimeoutError."""
    (waiter, sleeper), _ = launch("stuck_two_nodes", 2, tmp_path, TESSERA_COMM_LOCAL_SIZE="1")
    assert waiter["error"] == "CommTimeoutError", waiter
    assert "timed out" in waiter["message"]
    assert waiter["seconds"] < 15
    assert sleeper["error"] in ("CommTimeoutError", "CommError"), sleeper


@pytest.mark.parametrize(("scenario", "nranks", "words"), [
    ("mismatch_size", 3, ["size 10", "size 11"]),
    ("mismatch_large", 2, ["size 1048576", "size 1048577"]),
    ("mismatch_dtype", 2, ["float32", "int32"]),
    ("mismatch_op", 2, ["op sum", "op max"]),
    ("mismatch_kind", 2, ["allreduce", "broadcast"]),
    ("mismatch_root", 2, ["root 0", "root 1"]),
    ("mismatch_alltoallv", 2, ["rank 0 sends 12 bytes to rank 1, which expects 24"]),
])
def test_mismatched_collectives_are_reported_on_every_rank(
        scenario: str, nranks: int, words: list[str], tmp_path: Path) -> None:
    ranks, pids = launch(scenario, nranks, tmp_path)
    for r, res in enumerate(ranks):
        assert res is not None, f"rank {r} did not finish"
        assert res["error"] == "CommError", (r, res)
        assert res["seconds"] < 20, (r, res)
        assert res["after"] == "CommError", (r, res)
    direct = [res["message"] for res in ranks if "mismatch" in res["message"]]
    assert direct, ranks
    for message in direct:
        for word in words:
            assert word in message, (word, message)
    assert leftovers(pids) == []


def test_recv_of_the_wrong_size_is_reported(tmp_path: Path) -> None:
    (sender, receiver), _ = launch("recv_mismatch", 2, tmp_path)
    assert sender["error"] is None                        # buffered: the send completes
    assert receiver["error"] == "CommError", receiver
    assert "expects 48 bytes with tag 4" in receiver["message"]
    assert "sent 40 bytes with tag 4" in receiver["message"]
