"""Every test run gets its own compile cache, so tests never see or touch the user's: a
fresh one, or the one `TESSERA_TEST_CACHE` names (`make test-quick` keeps one in .venv so
that day-to-day runs start warm). Under pytest-xdist the workers share it (the cache is
safe under concurrent processes), so a kernel one worker built is not built again."""

from __future__ import annotations

import os
import shutil
import tempfile

import pytest

_OWNED = "_TESSERA_TEST_CACHE_OWNER"  # pid of the process that made a fresh cache


def pytest_configure(config: pytest.Config) -> None:
    if hasattr(config, "workerinput"):  # an xdist worker: the controller set it up
        return
    kept = os.environ.get("TESSERA_TEST_CACHE")
    if kept:
        os.makedirs(kept, exist_ok=True)
        os.environ["TESSERA_CACHE_DIR"] = os.path.abspath(kept)
        return
    os.environ["TESSERA_CACHE_DIR"] = tempfile.mkdtemp(prefix="tessera-test-cache-")
    os.environ[_OWNED] = str(os.getpid())


def pytest_unconfigure(config: pytest.Config) -> None:
    if os.environ.get(_OWNED) == str(os.getpid()):
        shutil.rmtree(os.environ.pop("TESSERA_CACHE_DIR"), ignore_errors=True)
        del os.environ[_OWNED]


@pytest.fixture(scope="session")
def opencl_device():
    """The first OpenCL device. Skips, saying why, where there is none, unless
    TESSERA_REQUIRE_OPENCL=1 (`make test`, CI): there a missing device fails."""
    import tessera
    from tessera.runtime import opencl

    if not opencl.available():
        why = f"no OpenCL device: {opencl.unavailable_reason()}"
        if os.environ.get("TESSERA_REQUIRE_OPENCL") == "1":
            pytest.fail(f"{why} (TESSERA_REQUIRE_OPENCL=1)")
        pytest.skip(why)
    return tessera.device("opencl")
