"""The `tessera` torch.distributed backend.

Multi-process checks run in one torchrun launch per world size (2 ranks, and 4 on this
2-core machine, oversubscribed on purpose); each rank of workers/torch_backend_worker.py
runs every check against a locally computed reference and writes its results, and each
(world, check) pair below is one test over every rank's result. In-process tests cover the
Work object, registration and a one-rank group.
"""

from __future__ import annotations

import importlib.util
import json
import os
import socket
import subprocess
import sys
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

from tessera.errors import CommError, DtypeError, ShapeError, TesseraError

WORKER = Path(__file__).with_name("workers") / "torch_backend_worker.py"
WORLDS = (2, 4)
LAUNCH_TIMEOUT = 120  # seconds; a launch normally takes ~4 s (2 ranks) and ~8 s (4 ranks)


def _worker_module():
    spec = importlib.util.spec_from_file_location("_tessera_torch_backend_worker", WORKER)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


_worker = _worker_module()
CHECKS = [(w, name) for w in WORLDS for name, _ in _worker.checks(w)]


@dataclass
class Launch:
    returncode: int
    output: str
    ranks: dict[int, dict[str, str]]  # rank -> check -> "ok" or the failure


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _start(world: int, outdir: Path) -> subprocess.Popen:
    """Start one torchrun launch of the worker at `world` ranks."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(world),
           "--master-addr", "127.0.0.1", "--master-port", str(_free_port()),
           str(WORKER), str(outdir)]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    return subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True)


def _finish(proc: subprocess.Popen, world: int, outdir: Path) -> Launch:
    """Wait for a launch and read what each rank reported."""
    try:
        output, _ = proc.communicate(timeout=LAUNCH_TIMEOUT)
        code = proc.returncode
    except subprocess.TimeoutExpired:
        proc.kill()
        output, _ = proc.communicate()
        code, output = -1, f"torchrun did not finish in {LAUNCH_TIMEOUT} s\n{output}"
    ranks = {}
    for r in range(world):
        path = outdir / f"rank{r}.json"
        if path.exists():
            ranks[r] = json.loads(path.read_text())["results"]
    return Launch(code, output, ranks)


@pytest.fixture(scope="session")
def launches(tmp_path_factory: pytest.TempPathFactory) -> dict[int, Launch]:
    """world -> Launch: both worlds launched side by side, once per session, after one
    solo communicator has built the shared-memory transport into this session's compile
    cache (so the ranks do not all compile it at once)."""
    import tessera.dist as tdist

    tdist.init_from_store(dist.HashStore(), 0, 1, timeout=30).close()
    dirs = {w: tmp_path_factory.mktemp(f"torch_backend_{w}") for w in WORLDS}
    procs = {w: _start(w, dirs[w]) for w in WORLDS}
    return {w: _finish(procs[w], w, dirs[w]) for w in WORLDS}


@pytest.mark.ranks
@pytest.mark.parametrize("world", WORLDS)
def test_launch_finishes_cleanly(launches, world):
    launch = launches[world]
    assert launch.returncode == 0, launch.output[-4000:]
    assert sorted(launch.ranks) == list(range(world)), launch.output[-4000:]
    for r, res in launch.ranks.items():
        assert res.get("done") == "ok", f"rank {r} did not finish every check"


@pytest.mark.ranks
@pytest.mark.parametrize("world, check", CHECKS, ids=[f"{w}-{c}" for w, c in CHECKS])
def test_worker_check(launches, world, check):
    launch = launches[world]
    assert launch.ranks, f"no rank reported:\n{launch.output[-4000:]}"
    failures = {r: res.get(check, "never ran (an earlier check hung or crashed the rank)")
                for r, res in launch.ranks.items()}
    failures = {r: v for r, v in failures.items() if v != "ok"}
    missing = sorted(set(range(world)) - set(launch.ranks))
    assert not failures and not missing, (
        f"missing ranks {missing}\n" + "\n".join(f"rank {r}: {v}" for r, v in failures.items()))


# --------------------------------------------------------------------------- in process


def test_import_registers_backend():
    """`import tessera.dist` (torch already imported) registers "tessera" for CPU."""
    code = ("import torch.distributed as dist, tessera.dist\n"
            "assert 'tessera' in dist.Backend.backend_list, dist.Backend.backend_list\n"
            "assert dist.Backend.backend_capability['tessera'] == ['cpu']\n"
            "assert dist.Backend.default_device_backend_map['cpu'] == 'gloo'\n")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=60)
    assert proc.returncode == 0, proc.stderr


def test_register_is_idempotent():
    from tessera.dist import torch_backend

    torch_backend.register()
    torch_backend.register()
    assert dist.Backend.backend_list.count("tessera") == 1
    assert dist.Backend.TESSERA == "tessera"


@pytest.fixture
def solo_group():
    """A one-rank `tessera` default group in this process."""
    from tessera.dist import torch_backend  # noqa: F401 (registers)

    assert not dist.is_initialized()
    dist.init_process_group("tessera", store=dist.HashStore(), rank=0, world_size=1,
                            timeout=timedelta(seconds=30))
    yield dist.group.WORLD
    dist.destroy_process_group()


@pytest.mark.filterwarnings("ignore::FutureWarning")  # torch deprecating its own names
def test_solo_group_runs_collectives(solo_group):
    assert dist.get_backend() == "tessera" and solo_group.size() == 1
    t = torch.arange(6.0).view(2, 3)
    dist.all_reduce(t, op=dist.ReduceOp.AVG)
    assert torch.equal(t, torch.arange(6.0).view(2, 3))
    out = torch.empty(5, dtype=torch.bfloat16)
    dist.all_gather_into_tensor(out, torch.arange(5).to(torch.bfloat16))
    assert torch.equal(out, torch.arange(5).to(torch.bfloat16))
    out = torch.empty(4, dtype=torch.int64)
    dist.all_to_all_single(out, torch.arange(4), [4], [4])
    assert torch.equal(out, torch.arange(4))
    w = dist.barrier(async_op=True)
    assert w.wait() and w.is_completed()
    ts = [torch.ones(3), torch.arange(4.0)]
    dist.all_reduce_coalesced(ts, op=dist.ReduceOp.MAX)
    assert torch.equal(ts[0], torch.ones(3)) and torch.equal(ts[1], torch.arange(4.0))
    outs = [[torch.empty(2)], [torch.empty(3)]]
    dist.all_gather_coalesced(outs, [torch.ones(2), torch.arange(3.0)])
    assert torch.equal(outs[0][0], torch.ones(2)) and torch.equal(outs[1][0], torch.arange(3.0))


@pytest.mark.parametrize("op, match", [
    (dist.ReduceOp.BAND, "BAND is not supported"),
    (dist.ReduceOp.BOR, "BOR is not supported"),
    (dist.ReduceOp.BXOR, "BXOR is not supported"),
])
def test_bitwise_ops_raise(solo_group, op, match):
    with pytest.raises(CommError, match=match) as info:
        dist.all_reduce(torch.ones(3, dtype=torch.int32), op=op)
    assert info.value.hint and info.value.where == "dist.all_reduce"


def test_premul_sum_raises(solo_group):
    with pytest.raises(CommError, match="PREMUL_SUM is not supported") as info:
        dist.all_reduce(torch.ones(3), op=dist._make_nccl_premul_sum(2.0))
    assert "multiply" in info.value.hint


@pytest.mark.filterwarnings("ignore::FutureWarning")
def test_bad_arguments_raise(solo_group):
    with pytest.raises(DtypeError, match="AVG of bool"):
        dist.all_reduce(torch.ones(2, dtype=torch.bool), op=dist.ReduceOp.AVG)
    with pytest.raises(DtypeError, match="cannot reduce"):
        dist.all_reduce(torch.ones(2).to(torch.float8_e4m3fn))
    with pytest.raises(ShapeError, match="world_size times"):
        dist.all_gather_into_tensor(torch.empty(3), torch.empty(2))
    with pytest.raises(ShapeError, match="do not cover"):
        dist.all_to_all_single(torch.empty(4), torch.empty(4), [3], [4])
    with pytest.raises(CommError, match="recv without a source"):
        dist.recv(torch.empty(1))
    # the group still works after refusing those calls
    t = torch.ones(2)
    dist.all_reduce(t)
    assert torch.equal(t, torch.ones(2))


# --------------------------------------------------------------------------- work objects


class _FakeWork:
    """A communicator work: completes when `done` is set; raises `error` on wait."""

    def __init__(self, error: BaseException | None = None):
        self.done = False
        self.error = error
        self.waits = 0

    def is_completed(self) -> bool:
        return self.done

    def wait(self, timeout: float | None = None) -> None:
        self.waits += 1
        self.done = True
        if self.error is not None:
            raise self.error


def test_work_finalizes_once_and_resolves_future():
    from tessera.dist.torch_backend import TesseraWork

    calls = []
    inner = _FakeWork()
    out = torch.zeros(2)
    work = TesseraWork([inner], lambda: calls.append(out.add_(1)), [out])
    assert isinstance(work, dist.Work)
    assert not work.is_completed() and calls == []
    inner.done = True
    assert work.is_completed() and len(calls) == 1  # found complete: outputs written
    assert work.wait() is True and len(calls) == 1 and inner.waits == 1
    fut = work.get_future()
    assert isinstance(fut, torch.futures.Future) and fut.done()
    assert torch.equal(fut.wait()[0], torch.ones(2)) and work.exception() is None


def test_work_raises_the_communicators_error():
    from tessera.dist.torch_backend import TesseraWork

    error = CommError("peer 1 gave up", where="rank 0 of 2")
    work = TesseraWork([_FakeWork(error)], lambda: pytest.fail("finalized a failed work"), [])
    with pytest.raises(CommError, match="peer 1 gave up"):
        work.wait()
    with pytest.raises(CommError):  # again: the error sticks
        work.wait()
    assert work.exception() is error and not work.is_success()
    with pytest.raises(CommError):
        work.get_future().wait()


def test_work_timeout_is_passed_down():
    from tessera.dist.torch_backend import TesseraWork

    seen = []

    class Slow(_FakeWork):
        def wait(self, timeout=None):
            seen.append(timeout)

    TesseraWork([Slow()], timeout=timedelta(seconds=5)).wait()
    TesseraWork([Slow()]).wait(timedelta(milliseconds=250))
    TesseraWork([Slow()], timeout=timedelta(milliseconds=-1)).wait()  # torch's "default"
    assert seen == [5.0, 0.25, None]


def test_errors_are_tessera_errors():
    assert issubclass(CommError, TesseraError) and issubclass(CommError, RuntimeError)
