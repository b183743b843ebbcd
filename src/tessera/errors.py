"""Every user-facing failure in Tessera: what went wrong, where, and what to do about it.

Each error subclasses `TesseraError` and, where one fits, the builtin exception a Python
user would expect (`ValueError`, `TypeError`, `MemoryError`, ...), so existing handlers
keep working.
"""

from __future__ import annotations

__all__ = [
    "CacheError",
    "CommError",
    "CommTimeoutError",
    "CompileError",
    "DeviceError",
    "DtypeError",
    "OutOfMemoryError",
    "ShapeError",
    "StreamError",
    "TesseraError",
    "ToolchainError",
    "TuneError",
]


class TesseraError(Exception):
    """Base of all Tessera errors. `where` names the place (file:line, node, device);
    `hint` says how to fix it."""

    def __init__(self, message: str, *, where: str | None = None, hint: str | None = None):
        self.message = message
        self.where = where
        self.hint = hint
        super().__init__(self._format())

    def _format(self) -> str:
        parts = [self.message]
        if self.where:
            parts.append(f"  where: {self.where}")
        if self.hint:
            parts.append(f"  fix:   {self.hint}")
        return "\n".join(parts)


class DeviceError(TesseraError, RuntimeError):
    """An unknown, unavailable or misused device."""


class DtypeError(TesseraError, TypeError):
    """A dtype that is unknown or not supported where it was used."""


class ShapeError(TesseraError, ValueError):
    """Shapes, strides or offsets that do not fit together or do not fit their storage."""


class OutOfMemoryError(TesseraError, MemoryError):
    """An allocation the device could not satisfy."""


class StreamError(TesseraError, RuntimeError):
    """Misuse of streams or events (e.g. waiting on an event never recorded)."""


class ToolchainError(TesseraError, RuntimeError):
    """No usable C compiler, or a compiled library that cannot be loaded."""


class CompileError(TesseraError):
    """A C compiler rejected generated source. The source is saved at `source_path`."""

    def __init__(self, message: str, *, compiler_output: str, source_path: str, command: str,
                 where: str | None = None, hint: str | None = None):
        self.compiler_output = compiler_output
        self.source_path = source_path
        self.command = command
        super().__init__(
            f"{message}\n  source saved to: {source_path}\n  command: {command}\n"
            f"  compiler said:\n{_indent(compiler_output.strip(), 4)}",
            where=where,
            hint=hint,
        )


class TuneError(TesseraError, RuntimeError):
    """The autotuner was asked for something it cannot do, or no candidate worked."""


class CommError(TesseraError, RuntimeError):
    """A collective that cannot complete: ranks that disagree on what they call, an
    aborted communicator, a bad rank or buffer."""


class CommTimeoutError(CommError, TimeoutError):
    """A peer that died or did not answer in time; `rank` names it (-1: unknown)."""

    def __init__(self, message: str, *, rank: int, where: str | None = None,
                 hint: str | None = None):
        self.rank = rank
        super().__init__(message, where=where, hint=hint)


class CacheError(TesseraError, OSError):
    """The compile cache directory cannot be used (permissions, full disk, ...)."""


def _indent(text: str, n: int) -> str:
    pad = " " * n
    return "\n".join(pad + line for line in text.splitlines()) or pad + "(no output)"
