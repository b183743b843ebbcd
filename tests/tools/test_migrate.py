"""tessera run / tessera.tools.migrate: a script written for a GPU runs here unchanged, with
results matching eager CPU; the summary lists what was redirected, what fell back and what
could not be mapped; everything is undone on exit; nccl under torchrun is the tessera
collectives backend."""

from __future__ import annotations

import json
import os
import runpy
import subprocess
import sys
import textwrap
import time
import warnings
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from torch.amp.autocast_mode import autocast
from torch.amp.grad_scaler import GradScaler
from torch.distributed import device_mesh
from torch.nn.parallel import DistributedDataParallel
from typer.testing import CliRunner

from tessera.cli import app
from tessera.tools.migrate import Migration, MigrationError, run_script

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "gpu_script.py"


def _script(tmp_path: Path, body: str, name: str = "script.py") -> Path:
    path = tmp_path / name
    path.write_text(textwrap.dedent(body))
    return path


@pytest.fixture(scope="module")
def example_run(tmp_path_factory: pytest.TempPathFactory):
    """`tessera run --json R examples/gpu_script.py --steps 3 --save Y`, in this process:
    (the CLI result, Y, the JSON report)."""
    tmp = tmp_path_factory.mktemp("migrate")
    result = CliRunner().invoke(app, ["run", "--json", str(tmp / "report.json"), str(EXAMPLE),
                                      "--steps", "3", "--save", str(tmp / "y.pt")])
    report = json.loads((tmp / "report.json").read_text()) if result.exit_code == 0 else None
    return result, tmp / "y.pt", report


def test_gpu_script_matches_eager_cpu(example_run):
    result, out, _ = example_run
    assert result.exit_code == 0, (result.output, result.exception)
    example = runpy.run_path(str(EXAMPLE), run_name="reference")
    with torch.no_grad():
        want = example["build_model"]()(example["make_inputs"]())
    got = torch.load(out)
    assert got.device.type == "cpu"
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
    printed = float(result.stdout.split("output checksum: ")[1].split()[0])
    assert abs(printed - want.double().sum().item()) < 1e-3
    assert "ms per step" in result.stdout


def test_summary_lists_redirections(example_run):
    result, _, report = example_run
    summary = result.stderr
    assert "tessera run: what was migrated" in summary
    for line in ("Module.cuda() -> stays on the cpu",
                 "cuda device arguments -> cpu",
                 "torch.compile -> backend='tessera'",
                 "torch.cuda.synchronize -> tessera.synchronize()",
                 "torch.cuda.Event -> tessera.Event",
                 "torch.cuda.is_available -> True for the script",
                 "torch.cuda.max_memory_allocated -> peak process resident memory"):
        assert line in summary, summary
    counts = report["redirected"]
    assert counts["torch.cuda.synchronize -> tessera.synchronize()"] == 2
    assert counts["torch.cuda.Event -> tessera.Event"] == 2
    assert counts["torch.compile -> backend='tessera'"] == 1
    assert counts["Module.cuda() -> stays on the cpu"] == 1
    # the compiled graph replays; nothing the script compiled fell back or was unsupported
    assert report["fallbacks"] == {} and report["unsupported"] == {} and report["kept"] == {}
    assert "fell back" not in summary and "unsupported" not in summary


def _patched_objects() -> dict[str, object]:
    """Everything a migration replaces, by name."""
    objs = {f"torch.cuda.{n}": getattr(torch.cuda, n) for n in dir(torch.cuda)
            if not n.startswith("_")}
    objs.update({f"nvtx.{n}": getattr(torch.cuda.nvtx, n) for n in dir(torch.cuda.nvtx)})
    objs.update({
        "torch.compile": torch.compile, "set_default_device": torch.set_default_device,
        "Module.cuda": torch.nn.Module.cuda, "autocast.__init__": autocast.__init__,
        "GradScaler.__init__": GradScaler.__init__,
        "DDP.__init__": DistributedDataParallel.__init__,
        "init_process_group": dist.init_process_group, "new_group": dist.new_group,
        "is_nccl_available": dist.is_nccl_available,
        "init_device_mesh": device_mesh.init_device_mesh,
        "showwarning": warnings.showwarning,
    })
    return objs


def test_redirections_in_process_and_all_undone():
    before = _patched_objects()
    modes = torch._C._len_torch_function_stack()
    has_cuda = torch.cuda.is_available()
    x = torch.ones(2, 3)
    with Migration() as m:
        assert torch.cuda.is_available() and torch.cuda.device_count() == 1
        assert torch.zeros(2, device="cuda").device.type == "cpu"
        assert torch.empty(2, device=torch.device("cuda", 1)).device.type == "cpu"
        assert x.to("cuda:0").device.type == "cpu" and x.to(0, torch.float64).dtype == \
            torch.float64
        assert x.cuda() is x and x.pin_memory() is x
        lin = torch.nn.Linear(3, 2).to("cuda")
        assert lin.cuda() is lin and lin.weight.device.type == "cpu"
        with torch.autocast("cuda"):
            assert lin(x).dtype == torch.bfloat16
        assert GradScaler()._device == "cpu"
        torch.cuda.manual_seed(7)
        a = torch.randn(3, device="cuda")
        torch.manual_seed(7)
        torch.testing.assert_close(a, torch.randn(3))
        assert torch.cuda.max_memory_allocated() >= torch.cuda.memory_allocated() > 0
        # torch's own code still sees the real answer
        internal = {"__name__": "torch.fake", "torch": torch}
        exec("available = torch.cuda.is_available()", internal)
        assert internal["available"] is has_cuda
        kept = torch.compile(lin, backend="eager")
        assert kept(x).shape == (2, 2)
    report = m.report
    assert report.redirected["cuda device arguments -> cpu (factories, .to, Module.to)"] >= 5
    assert report.redirected["autocast('cuda') -> autocast('cpu')"] == 1
    assert report.redirected["GradScaler('cuda') -> GradScaler('cpu')"] == 1
    assert report.kept["torch.compile(backend='eager'): explicit backend"] == 1

    after = _patched_objects()
    changed = [k for k in before if before[k] is not after.get(k)]
    assert not changed, changed
    assert torch._C._len_torch_function_stack() == modes
    assert torch.cuda.is_available() is has_cuda
    if not has_cuda:
        with pytest.raises((RuntimeError, AssertionError)):
            torch.zeros(1, device="cuda")


def test_events_time_and_streams_order_inline():
    with Migration() as m:
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        time.sleep(0.02)
        end.record()
        end.synchronize()
        assert 15 <= start.elapsed_time(end) < 2000
        s = torch.cuda.Stream()
        assert isinstance(s, torch.cuda.Stream)
        with torch.cuda.stream(s):
            assert torch.cuda.current_stream() is s
            y = torch.ones(4, device="cuda") * 2
        torch.cuda.current_stream().wait_stream(s)
        s.synchronize()
        assert y.sum().item() == 8
        with pytest.raises(MigrationError, match="cuda_stream"):
            s.cuda_stream  # noqa: B018
        with pytest.raises(MigrationError, match="CUDAGraph"):
            torch.cuda.CUDAGraph()
        with pytest.raises(MigrationError, match="get_device_capability"):
            torch.cuda.get_device_capability()
    assert m.report.unsupported == {"torch.cuda.Stream.cuda_stream": 1,
                                    "torch.cuda.CUDAGraph": 1,
                                    "torch.cuda.get_device_capability": 1}
    assert m.report.sites["torch.cuda.CUDAGraph"].startswith(__file__)


def test_training_graph_runs_through_torch_and_is_reported():
    torch.manual_seed(0)
    lin, x = torch.nn.Linear(4, 2), torch.randn(3, 4)
    with Migration() as m:
        model = lin.cuda()
        torch.compile(model)(x.to("cuda")).square().sum().backward()
    got = lin.weight.grad.clone()
    lin.weight.grad = None
    lin(x).square().sum().backward()
    torch.testing.assert_close(got, lin.weight.grad)
    assert m.report.fallbacks == {"graph that needs gradients (training) run by torch: the "
                                  "tessera backend compiles inference graphs": 1}


def test_one_migration_at_a_time():
    with Migration(), pytest.raises(MigrationError, match="already installed"):
        Migration().install()


def test_unsupported_api_is_reported_not_silent(tmp_path):
    script = _script(tmp_path, """\
        import torch
        s = torch.cuda.Stream()
        print("handle", s.cuda_stream)
    """)
    result = CliRunner().invoke(app, ["run", str(script)])
    assert isinstance(result.exception, MigrationError)
    assert f"{script}:3" in str(result.exception)
    assert "unsupported (raised MigrationError)" in result.stderr
    assert f"torch.cuda.Stream.cuda_stream  (first at {script}:3)" in result.stderr


def test_graph_fallbacks_and_exit_code_reported(tmp_path):
    script = _script(tmp_path, """\
        import sys, torch
        f = torch.compile(lambda x: torch.cumsum(x, 1) * 2)
        x = torch.arange(6.0, device="cuda").reshape(2, 3)
        print(f(x).tolist())
        sys.exit(3)
    """)
    result = CliRunner().invoke(app, ["run", str(script), "--flag-for-the-script"])
    assert result.exit_code == 3, (result.output, result.exception)
    assert "[[0.0, 2.0, 6.0], [6.0, 14.0, 24.0]]" in result.stdout
    assert "op run through torch in a compiled graph: cumsum.default" in result.stderr


def test_missing_script_is_a_tessera_error(tmp_path):
    with pytest.raises(MigrationError, match="no Python script"):
        run_script(str(tmp_path / "nope.py"))


@pytest.mark.ranks
@pytest.mark.slow
def test_nccl_under_torchrun_uses_tessera_backend(tmp_path):
    import tessera.dist as tdist

    tdist.init_from_store(dist.HashStore(), 0, 1, timeout=30).close()  # transport built once
    script = _script(tmp_path, """\
        import os, torch, torch.distributed as dist
        local_rank = int(os.environ["LOCAL_RANK"])
        torch.cuda.set_device(local_rank)
        dist.init_process_group("nccl", device_id=torch.device("cuda", local_rank))
        dist.barrier(device_ids=[local_rank])
        rank, world = dist.get_rank(), dist.get_world_size()
        from torch.distributed.device_mesh import init_device_mesh
        assert init_device_mesh("cuda", (world,)).device_type == "cpu"
        x = torch.arange(5, dtype=torch.float32, device=f"cuda:{local_rank}") * (rank + 1)
        dist.all_reduce(x)
        model = torch.nn.parallel.DistributedDataParallel(torch.nn.Linear(4, 2).cuda(),
                                                          device_ids=[local_rank])
        print(f"rank {rank} of {world} on {dist.get_backend()}: {x.tolist()}", flush=True)
        dist.destroy_process_group()
    """)
    out = subprocess.run([sys.executable, "-m", "tessera", "run", "--nproc", "2", "--json",
                          str(tmp_path / "report.json"), str(script)],
                         capture_output=True, text=True, timeout=180,
                         env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert out.returncode == 0, out.stdout + out.stderr
    want = [float(i * 3) for i in range(5)]  # ranks 1 and 2 times arange(5)
    for rank in (0, 1):
        assert f"rank {rank} of 2 on tessera: {want}" in out.stdout, out.stdout
        report = json.loads((tmp_path / f"report.rank{rank}.json").read_text())
        assert report["redirected"]["process group backend 'nccl' -> 'tessera'"] == 1
        for line in ("process group backend 'nccl' -> 'tessera'",
                     "DistributedDataParallel device_ids dropped (cpu module)",
                     "init_process_group device_id= dropped (cpu)",
                     "init_device_mesh('cuda') -> 'cpu'",
                     "torch.cuda.set_device -> no-op"):
            assert f"[rank {rank}]" in out.stderr and line in out.stderr, out.stderr
