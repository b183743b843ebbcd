"""The `tessera` command: exit codes, JSON output, error formatting."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest


def tessera(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "tessera", *args], capture_output=True,
                          text=True, env={**os.environ, **(env or {})}, timeout=300)


@pytest.mark.mpi
def test_info_json_reports_devices_compiler_cache():
    out = tessera("info", "--json")
    assert out.returncode == 0, out.stderr
    report = json.loads(out.stdout)
    cpu = report["devices"][0]
    assert cpu["name"] == "cpu" and cpu["peak_gflops_fp32"] > 0 and cpu["copy_bandwidth_gbs"] > 0
    assert report["compiler"]["version"]
    assert report["cache"]["path"] == os.environ["TESSERA_CACHE_DIR"]
    comm = report["collectives"]  # CI installs Open MPI and mpi4py; this kernel allows CMA
    assert comm["shm_free_bytes"] > 0 and comm["direct_copies"] is True
    assert comm["mpi4py"] and "Open MPI" in comm["mpirun"] and comm["torch_distributed"]


def test_info_table():
    out = tessera("info")
    assert out.returncode == 0, out.stderr
    assert "peak fp32 (measured)" in out.stdout and "GFLOPS" in out.stdout
    assert "GEMM blocking" in out.stdout and "default" in out.stdout
    assert "collectives" in out.stdout and "mpi4py" in out.stdout


def test_cache_info_and_clear(tmp_path):
    env = {"TESSERA_CACHE_DIR": str(tmp_path)}
    subprocess.run([sys.executable, "-c", "from tessera.runtime.toolchain import compile_c;"
                    "compile_c('int f(void){return 1;}')"], env={**os.environ, **env}, check=True)
    info = tessera("cache", "info", env=env)
    assert info.returncode == 0 and "modules" in info.stdout and "1 entries" in info.stdout
    cleared = tessera("cache", "clear", env=env)
    assert cleared.returncode == 0 and "freed" in cleared.stdout
    assert "modules" not in tessera("cache", "info", env=env).stdout


@pytest.mark.parametrize("args, env, message", [
    (["info"], {"CC": "/nonexistent/cc"}, "ToolchainError"),
    (["bench", "no-such-suite"], {}, "no-such-suite"),
])
def test_errors_are_messages_not_tracebacks(args, env, message):
    out = tessera(*args, env=env)
    assert out.returncode == 1
    assert message in out.stderr and "Traceback" not in out.stderr
