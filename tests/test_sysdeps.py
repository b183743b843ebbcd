"""scripts/sysdeps.sh, the first step of `make demo` and `make test`: installs missing
system packages when it can, else stops with the one command to run. Run here against a
PATH of stand-ins (a fake apt-get records what it was asked), never the real apt-get."""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "sysdeps.sh"
ROOT = os.geteuid() == 0


@pytest.fixture
def tmp_path() -> Iterator[Path]:
    """A scratch directory `nobody` can use too (pytest's own are private to this user)."""
    d = Path(tempfile.mkdtemp(prefix="tessera-sysdeps-"))
    d.chmod(0o777)
    yield d
    shutil.rmtree(d)


def _bin(tmp_path: Path, *present: str, apt: bool = True, sudo: bool = False) -> Path:
    """A directory for PATH: bash, id and the named commands (as `true`); a fake apt-get
    that logs its arguments and "installs" Open MPI by adding mpirun and mpicc."""
    d = tmp_path / "bin"
    d.mkdir(mode=0o755)
    ln, true = shutil.which("ln"), shutil.which("true")
    for tool in ("bash", "id"):
        (d / tool).symlink_to(shutil.which(tool))
    for tool in present:
        (d / tool).symlink_to(true)
    if apt:
        (d / "apt-get").write_text(
            f'#!{shutil.which("bash")}\necho "$@" >> {tmp_path}/apt.log\n'
            f'case "$*" in *openmpi-bin*) {ln} -sf {true} {d}/mpirun; {ln} -sf {true} {d}/mpicc;;'
            ' esac\n')
        (d / "apt-get").chmod(0o755)
    if sudo:
        (d / "sudo").write_text(f'#!{shutil.which("bash")}\n[ "$1" = -n ] && shift\nexec "$@"\n')
        (d / "sudo").chmod(0o755)
    (tmp_path / "vendors").mkdir()  # OCL_ICD_VENDORS: no OpenCL device registered
    return d


def _run(path: Path, *parts: str, as_nobody: bool = False) -> subprocess.CompletedProcess:
    """The script run from a copy in the scratch directory (also its working directory):
    `nobody` may not reach the checkout (a clone inside a 0700 directory)."""
    script = shutil.copy(SCRIPT, path.parent / SCRIPT.name)
    cmd = [shutil.which("bash"), script, *parts]
    if as_nobody and ROOT:
        cmd = [shutil.which("runuser"), "-u", "nobody", "--", *cmd]
    return subprocess.run(cmd, env={"PATH": str(path), "OCL_ICD_VENDORS": str(
        path.parent / "vendors")}, cwd=path.parent, capture_output=True, text=True,
        timeout=60)


def test_nothing_missing_is_silent(tmp_path: Path) -> None:
    out = _run(_bin(tmp_path, "cc", "mpirun", "mpicc"), "cc", "mpi")
    assert out.returncode == 0 and out.stdout == out.stderr == ""
    assert not (tmp_path / "apt.log").exists()


def test_without_rights_stops_with_the_command(tmp_path: Path) -> None:
    out = _run(_bin(tmp_path, "cc"), "cc", "mpi", as_nobody=True)
    assert out.returncode == 1
    assert "openmpi-bin libopenmpi-dev         Open MPI" in out.stderr
    assert ("sudo apt-get update && sudo apt-get install -y --no-install-recommends "
            "openmpi-bin libopenmpi-dev\n") in out.stderr
    assert "build-essential" not in out.stderr  # cc is there
    assert not (tmp_path / "apt.log").exists()


def test_installs_what_is_missing(tmp_path: Path) -> None:
    """As root directly, otherwise through (a stand-in for) password-less sudo."""
    out = _run(_bin(tmp_path, "cc", sudo=not ROOT), "cc", "mpi")
    assert out.returncode == 0, out.stderr
    assert (tmp_path / "apt.log").read_text().splitlines() == [
        "update -qq", "install -y --no-install-recommends openmpi-bin libopenmpi-dev -qq"]


def test_still_missing_after_install_fails(tmp_path: Path) -> None:
    d = _bin(tmp_path, sudo=not ROOT)  # apt-get "installs" Open MPI but never a compiler
    out = _run(d, "cc")
    assert out.returncode == 1 and "still missing after installing: build-essential" in \
        out.stderr


def test_no_apt_get_names_the_packages(tmp_path: Path) -> None:
    out = _run(_bin(tmp_path, "cc", apt=False), "mpi")
    assert out.returncode == 1 and "no apt-get" in out.stderr and "openmpi" in out.stderr


def test_unknown_part(tmp_path: Path) -> None:
    out = _run(_bin(tmp_path, "cc"), "cuda")
    assert out.returncode == 2 and "unknown part 'cuda'" in out.stderr


@pytest.mark.parametrize("part, package", [("opencl", "pocl-opencl-icd"),
                                           ("cc", "build-essential")])
def test_each_part_names_its_packages(tmp_path: Path, part: str, package: str) -> None:
    out = _run(_bin(tmp_path), part, as_nobody=True)
    assert out.returncode == 1 and package in out.stderr
