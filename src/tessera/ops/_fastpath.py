"""The eager fast path (fastpath.cpp): small ops guarded, allocated and launched in C++
against torch's tensor API, so a cached call costs what torch's own dispatch costs.

It is built against the installed torch's headers the first time tessera.ops is used on a
machine (~25 s, in a background thread: calls take the Python path meanwhile) and loaded
from the compile cache afterwards. Ops register "plans" (a compiled kernel and its launch
parameters) in tables named for the op variant; an op's `fast` expression calls
`_pw(@table, ...)` or `_rows(@table, ...)`, and the generated entry points are rebound to
the native functions once they are loaded. `TESSERA_OPS_FASTPATH=0` keeps everything on
the Python path; `wait()` blocks until the native path is ready (benchmarks, tests).
While a profile is active, its launches are timed in C and reported (runtime/profiling.py).
"""

from __future__ import annotations

import contextlib
import os
import sys
import threading
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

from tessera.errors import TesseraError
from tessera.runtime import profiling

__all__ = ["add_plan", "bind", "enabled", "start", "suspended", "table", "wait"]

_TABLES: dict[str, int] = {}
_PLANS: dict[tuple, None] = {}  # every plan registered (in order), replayed on load
_ENVS: list[dict[str, Any]] = []  # globals of generated entry points, rebound on load
_native: Any = None
_lock = threading.Lock()
_ready = threading.Event()
_thread: threading.Thread | None = None
_suspended = 0  # depth of `suspended()` blocks: entry points take the Python path


def _none(*args: Any) -> None:
    """The fast path before (or without) the native module: always 'take the slow path'."""
    return None


def enabled() -> bool:
    return os.environ.get("TESSERA_OPS_FASTPATH", "1") != "0"


def table(name: str) -> int:
    """The id of plan table `name` (created on first use)."""
    with _lock:
        return _TABLES.setdefault(name, len(_TABLES))


def bind(env: dict[str, Any]) -> None:
    """Give a generated entry point's globals `_pw` and `_rows`: the native functions once
    loaded, `_none` until then."""
    with _lock:
        _ENVS.append(env)
        _bind_one(env, _native if not _suspended else None)


def add_plan(name: str, address: int, ins: tuple[torch.dtype, ...], out: torch.dtype,
             block: int = 0, scalars: tuple[int | float, ...] = (),
             rows: tuple | None = None) -> None:
    """Register a compiled kernel under table `name` (see fastpath.cpp's add_plan)."""
    plan = (table(name), address, ins, out, block, scalars, rows)
    with _lock:
        if plan in _PLANS:
            return
        _PLANS[plan] = None
        if _native is not None:
            _native.add_plan(*plan)


def _build() -> None:
    global _native
    try:
        native = _compile()
    except TesseraError as e:
        warnings.warn(f"tessera.ops: the native fast path could not be built, so small ops "
                      f"run on the Python path (slower per call): {e.message}", stacklevel=2)
        _ready.set()
        return
    with _lock:
        for plan in _PLANS:
            native.add_plan(*plan)
        _native = native
        _rebind()
    profiling.subscribe(lambda session: native.set_timer(session and session.kernel))
    _ready.set()


def _compile() -> Any:
    from tessera.runtime.toolchain import compile_extension
    root = Path(torch.__file__).parent
    include, lib = root / "include", root / "lib"
    flags = [f"-I{include}", f"-I{include / 'torch/csrc/api/include'}",
             f"-D_GLIBCXX_USE_CXX11_ABI={int(torch._C._GLIBCXX_USE_CXX11_ABI)}",
             "-w", f"-L{lib}", f"-Wl,-rpath,{lib}", "-ltorch", "-ltorch_cpu", "-lc10",
             "-ltorch_python"]
    source = (f"// torch {torch.__version__}, Python {sys.version.split()[0]}\n"
              + Path(__file__).with_name("fastpath.cpp").read_text())
    return compile_extension(source, "_tsr_fastpath", cxx=True, flags=flags)


def start() -> None:
    """Build or load the native module in the background (once per process)."""
    global _thread
    if _thread is not None:
        return
    if not enabled():
        _ready.set()
        return
    _thread = threading.Thread(target=_build, name="tessera-ops-fastpath", daemon=True)
    _thread.start()


def wait(timeout: float | None = None) -> bool:
    """Block until the native fast path is loaded (or known unavailable); whether it is."""
    start()
    _ready.wait(timeout)
    return _native is not None


@contextlib.contextmanager
def suspended() -> Iterator[None]:
    """Every op entry point takes the Python path inside: for callers that must see each
    launch go through the launcher (the graph compiler's recorder), and for tests."""
    global _suspended
    with _lock:
        _suspended += 1
        _rebind()
    try:
        yield
    finally:
        with _lock:
            _suspended -= 1
            _rebind()


def _rebind() -> None:
    """Point every entry point at the native functions, or at `_none` (call with _lock)."""
    native = _native if not _suspended else None
    for env in _ENVS:
        _bind_one(env, native)


def _bind_one(env: dict[str, Any], native: Any) -> None:
    env["_pw"] = native.pointwise if native is not None else _none
    env["_rows"] = native.rows if native is not None else _none
