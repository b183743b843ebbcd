"""Profiling events: what the lower layers report while a profile is active.

`tessera.profile()` (tessera/tools/profiler.py) starts a `Session`; until it stops,
`active` is that session and every reporting site appends timed events to it. When no
profile is active, `active` is None and each site costs one check: the native launchers'
timer hooks are NULL pointers (runtime/cpu/launch.c, ops/fastpath.cpp), compiled graphs
replay through the build of replay.c without timers, op entry points test one global
flag, and collectives are plain methods (profiled versions are swapped in while active).

An event is (cat, name, start_ns, end_ns, thread id, args); cat is one of "kernel", "op",
"graph", "compile", "memory", "collective". Times are `time.perf_counter_ns()`, which is
CLOCK_MONOTONIC on Linux: the clock the native hooks read. Kernels are named by entry
address (`name_kernel`, called where a compiled module's symbol is looked up).
"""

from __future__ import annotations

import ctypes
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from typing import Any, NamedTuple

from tessera.errors import TesseraError

__all__ = ["Event", "ProfilerError", "Session", "active", "describe", "kernel_name", "name_kernel",
           "now", "scalars", "span", "start", "stop", "subscribe", "timed"]

now = time.perf_counter_ns


class ProfilerError(TesseraError):
    """A profile used in a way it cannot be (nested, stopped twice, ...)."""


class Event(NamedTuple):
    cat: str
    name: str
    start: int  # ns, perf_counter_ns
    end: int
    tid: int
    args: dict[str, Any] | None


_names: dict[int, str] = {}


def name_kernel(address: int, name: str) -> None:
    """Name the kernel entry point at `address` (the first name given wins)."""
    _names.setdefault(address, name)


def kernel_name(address: int) -> str:
    """The name of the entry point at `address` (its hex address if nobody named it)."""
    return _names.get(address) or f"kernel@{address:#x}"


class Session:
    """The events of one profile, in the order they were reported."""

    def __init__(self) -> None:
        self.events: list[Event] = []
        # memory in use (bytes) per source, sampled when it changes: (name, t_ns, bytes)
        self.counters: list[tuple[str, int, int]] = []
        self.in_use: dict[str, int] = {}
        # graph/node/op of the compiled-graph step running in Python on each thread: the
        # kernels it launches carry them
        self.scopes: dict[int, dict[str, Any]] = {}
        self.started = now()
        self.stopped: int | None = None

    def kernel(self, address: int, start: int, end: int) -> None:
        """A launch through a native launcher (the C hooks call this)."""
        tid = threading.get_ident()
        self.events.append(Event("kernel", kernel_name(address), start, end, tid,
                                 self.scopes.get(tid)))

    def record(self, cat: str, name: str, start: int, end: int,
               args: dict[str, Any] | None = None) -> None:
        self.events.append(Event(cat, name, start, end, threading.get_ident(), args))

    def memory(self, source: str, name: str, delta: int, start: int, end: int,
               args: dict[str, Any] | None = None, count: bool = True) -> None:
        """An allocation (delta > 0) or a free (delta < 0) of `source`'s memory; `count`:
        whether it changes the bytes in use counted per source (False where the free is
        not seen, as of the output buffers a caller keeps)."""
        if count:
            total = self.in_use[source] = self.in_use.get(source, 0) + delta
            self.counters.append((source, end, total))
        self.events.append(Event("memory", name, start, end, threading.get_ident(),
                                 {"source": source, "bytes": delta, **(args or {})}))

    @contextmanager
    def scope(self, args: dict[str, Any]) -> Iterator[None]:
        """Kernels launched on this thread inside carry `args` (a graph step's node)."""
        tid = threading.get_ident()
        outer = self.scopes.get(tid)
        self.scopes[tid] = args
        try:
            yield
        finally:
            if outer is None:
                del self.scopes[tid]
            else:
                self.scopes[tid] = outer


active: Session | None = None
_listeners: list[Callable[[Session | None], None]] = []
_lock = threading.Lock()


def subscribe(fn: Callable[[Session | None], None]) -> None:
    """Call `fn(session)` when a profile starts and `fn(None)` when it stops (at once if
    one is active): for sites that swap a hook in rather than test a flag per call."""
    with _lock:
        _listeners.append(fn)
        if active is not None:
            fn(active)


def start() -> Session:
    """Begin a profile (one at a time per process)."""
    global active
    with _lock:
        if active is not None:
            raise ProfilerError("a profile is already running in this process",
                                hint="profiles do not nest: leave the outer "
                                     "`with tessera.profile()` block first")
        session = active = Session()
        for fn in _listeners:
            fn(session)
    return session


def stop(session: Session) -> None:
    """End `session` (the active profile)."""
    global active
    with _lock:
        if active is not session:
            raise ProfilerError("this profile is not the running one",
                                hint="stop a profile once, with the session `start` gave")
        active = None
        for fn in _listeners:
            fn(None)
        session.stopped = now()


@contextmanager
def span(cat: str, name: str, args: dict[str, Any] | None = None) -> Iterator[dict[str, Any]]:
    """Time the block as one event (if a profile is active); the block may add to the
    yielded args (e.g. whether a compile hit the cache)."""
    session = active
    extra: dict[str, Any] = dict(args or {})
    if session is None:
        yield extra
        return
    t0 = now()
    try:
        yield extra
    finally:
        session.record(cat, name, t0, now(), extra)


def timed(fn: Any) -> Callable[..., Any]:
    """`fn`, a ctypes foreign function of a compiled module called directly (not through
    the launcher), reported as a kernel launch while a profile is active."""
    address = ctypes.cast(fn, ctypes.c_void_p).value or 0

    def call(*args: Any) -> Any:
        session = active
        if session is None:
            return fn(*args)
        t0 = now()
        try:
            return fn(*args)
        finally:
            session.kernel(address, t0, now())
    return call


def describe(xs: Iterable[Any]) -> list[tuple[tuple[int, ...], str]]:
    """(shape, dtype name) of each tensor (torch, numpy, tessera) among `xs`: what an op
    event says of its operands."""
    return [(tuple(x.shape), str(x.dtype).removeprefix("torch.").removeprefix("tessera."))
            for x in xs if hasattr(x, "shape") and hasattr(x, "dtype")]


def scalars(named: dict[str, Any]) -> dict[str, Any]:
    """The plain scalar arguments among `named` (ints, floats, bools, strings): an op
    event's "params" (a flop count may need one, e.g. top_k)."""
    return {k: v for k, v in named.items()
            if isinstance(v, (int, float, str)) and not isinstance(v, type)}
