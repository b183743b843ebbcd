"""Running a user's script as `python script.py args` would, inside this process: what
`tessera profile`, `compare`, `view` and `run` do around their own context."""

from __future__ import annotations

import os
import runpy
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from tessera.errors import TesseraError

__all__ = ["exit_code", "run_as_main", "script_path"]


def run_as_main(path: str | Path, argv: Sequence[str] = (), *, command: str,
                error: type[TesseraError] = TesseraError) -> tuple[dict[str, Any], int]:
    """Run the Python file at `path` as `__main__` with `sys.argv = [path, *argv]` and its
    directory first on `sys.path`: (the script's globals, its exit code). `sys.argv` and
    `sys.path` are restored; an exception from the script propagates. A missing file is
    `error`, naming `tessera <command>`."""
    path = script_path(path, command=command, error=error)
    saved_argv, saved_path = sys.argv, list(sys.path)
    sys.argv = [path, *argv]
    sys.path.insert(0, os.path.dirname(os.path.abspath(path)))
    try:
        return runpy.run_path(path, run_name="__main__"), 0
    except SystemExit as e:
        return {}, exit_code(e.code)
    finally:
        sys.argv, sys.path[:] = saved_argv, saved_path


def script_path(path: str | Path, *, command: str,
                error: type[TesseraError] = TesseraError) -> str:
    """`path` if it names a Python file, else `error` naming `tessera <command>`."""
    path = str(path)
    if not os.path.isfile(path) or not path.endswith(".py"):
        raise error(f"no Python script at {path!r}", where=f"tessera {command}",
                    hint=f"give the path of a .py file: tessera {command} script.py ARGS")
    return path


def exit_code(code: Any) -> int:
    """The process exit status of `sys.exit(code)`: a message is printed, status 1."""
    if code is None or isinstance(code, int):
        return code or 0
    print(code, file=sys.stderr)
    return 1
