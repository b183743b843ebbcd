"""tessera.dist.moe: dispatch/combine checked at 1 (one process), 2 and 4 ranks (mpirun),
and the expert-parallel example run as a script on 2 ranks.

Each launch runs every check of workers/moe_worker.py once; here one test per (launch,
check) reads every rank's verdict from the JSON files the ranks write.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from jobs import run

ROOT = Path(__file__).resolve().parents[2]
WORKER = Path(__file__).with_name("workers") / "moe_worker.py"
EXAMPLE = ROOT / "examples" / "moe_expert_parallel.py"
CHECKS = [
    "float32_top1_one_expert_per_rank",
    "float32_top2_three_experts_per_rank",
    "float32_top2_wider_output",
    "bfloat16_top1_float32_output",
    "bfloat16_top2_bfloat16_output",
    "uneven_one_rank_receives",
    "uneven_empty_local_expert",
    "no_tokens",
    "int32_ids_and_reuse",
    "out_buffer",
    "grad_and_inference_mode",
    "large_float32_top2_three_experts_per_rank",
    "large_bfloat16_top2_bfloat16_output",
    "large_float32_top1_one_expert_per_rank",
    "split_float32_top2_three_experts_per_rank",
    "split_float32_top2_wider_output",
    "split_bfloat16_top2_bfloat16_output",
    "split_uneven_one_rank_receives",
    "split_uneven_empty_local_expert",
    "split_no_tokens",
    "split_int32_ids_and_reuse",
    "split_out_buffer",
    "bad_num_experts",
    "bad_ids",
    "bad_weights",
    "bad_x",
    "bad_combine",
    "bad_out",
    "one_rank_bad",
    "example",
]


def _launch(ranks: int, script: str, *args: str) -> subprocess.CompletedProcess[str]:
    """Run `script args` as one process, or on `ranks` processes under mpirun."""
    env = {"TESSERA_COMM_TIMEOUT": "30"}
    if ranks > 1:
        return run("mpirun", ranks, Path(script), list(args), env=env)
    return subprocess.run([sys.executable, script, *args], env={**os.environ, **env},
                          capture_output=True, text=True, timeout=240)


@pytest.fixture(scope="module", ids=lambda n: f"{n}rank",
                params=[1, pytest.param(2, marks=pytest.mark.ranks),
                        pytest.param(4, marks=pytest.mark.ranks)])
def verdicts(request: pytest.FixtureRequest,
             tmp_path_factory: pytest.TempPathFactory) -> tuple[list[dict[str, str]], str]:
    """(each rank's {check: "ok" | failure}, the launch's output) for one launch."""
    outdir = tmp_path_factory.mktemp(f"moe{request.param}")
    proc = _launch(request.param, str(WORKER), str(outdir))
    output = f"exit {proc.returncode}\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    results = []
    for r in range(request.param):
        path = outdir / f"rank{r}.json"
        results.append(json.loads(path.read_text()) if path.exists() else {})
    return results, output


@pytest.mark.parametrize("check", CHECKS)
def test_moe(verdicts: tuple[list[dict[str, str]], str], check: str) -> None:
    results, output = verdicts
    for r, got in enumerate(results):
        assert check in got, f"rank {r} reported nothing for {check}:\n{output}"
        assert got[check] == "ok", f"rank {r}: {got[check]}"


def test_worker_runs_only_known_checks(verdicts: tuple[list[dict[str, str]], str]) -> None:
    results, output = verdicts
    for r, got in enumerate(results):
        assert sorted(got) == sorted(CHECKS), f"rank {r}: {sorted(got)}\n{output}"


@pytest.mark.ranks
def test_example_script_on_two_ranks() -> None:
    proc = _launch(2, str(EXAMPLE), "--tokens", "32")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "8 experts over 2 rank(s), top-2" in proc.stdout, proc.stdout
    assert "max abs error" in proc.stdout, proc.stdout
