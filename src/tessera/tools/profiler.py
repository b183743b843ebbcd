"""The profiler: `with tessera.profile() as p:` records what Tessera does, timed.

    with tessera.profile() as p:
        model(x)
    print(p)                              # top kernels and ops, against the roofline
    p.export_chrome_trace("trace.json")   # open in ui.perfetto.dev or chrome://tracing
    p.roofline("roofline.svg")            # the plot (needs matplotlib)

Recorded (runtime/profiling.py): every kernel launch, eager (the native launcher and the
ops' C++ fast path) or inside a compiled graph's native replay (replay.c built with
per-launch timers, used only while profiling); every call of an eager op (name, shapes,
dtypes, scalar arguments); every compiled-graph call, with one op event per node; compiles
and compile-cache lookups (hit or miss); allocations and frees of Tessera's allocator,
graph arenas and output buffers; collectives (op, bytes, ranks). With no profile active
each of those sites costs one pointer or flag check.

Not covered: the GEMM template's ctypes entry points (grouped and batched GEMM, weight
packing in templates/gemm/sgemm.py) show inside their op's time but not as kernels.

Chrome-trace format (`export_chrome_trace`): {"traceEvents": [...], "displayTimeUnit":
"ms"}. Every event is a complete event {"ph": "X", "name", "cat", "ts", "dur", "pid",
"tid", "args"}, ts and dur in microseconds from the profile's start; cat is one of
"kernel", "op", "graph", "compile", "memory", "collective". Events of one thread nest
(graph call > node op > kernel; eager op > kernel). Kernel and op events of a compiled
graph have args {"graph": label, "node": index, "op": name}, where label is
`Executable.label` (a hash of the graph's text, "g" + 10 hex digits, the same in every
process) and index is the node's position in `Executable.graph.nodes`; op events also
carry "inputs" and "outputs" ([shape, dtype] pairs) and "params". A graph call is an event
named "graph <label>" with args {"graph", "nodes", "ran"} (ran: plan, generic, record or
interpreter). Memory in use is a counter ("ph": "C") per source, named "memory: <source>"
with args {"bytes": n}; process and thread names are metadata events ("ph": "M").
"""

from __future__ import annotations

import bisect
import io
import json
import os
import threading
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import Any

from tessera.runtime import profiling
from tessera.runtime.memory import format_bytes
from tessera.tools import roofline
from tessera.tools.script import run_as_main

__all__ = ["Profile", "Stat", "profile", "profile_script"]

CATEGORIES = ("kernel", "op", "graph", "compile", "memory", "collective")


@dataclass
class Stat:
    """Totals of one kernel or op over a profile; flops and bytes counted where the shapes
    tell them (`flops_ns`, `bytes_ns`: the time of the calls counted)."""

    name: str
    cat: str
    calls: int = 0
    total_ns: int = 0
    flops: int = 0
    flops_ns: int = 0
    nbytes: int = 0
    bytes_ns: int = 0
    share: float = 0.0  # of its category's total time
    attained: float | None = None  # fraction of the roofline at its intensity
    bound: str | None = None  # "compute" or "memory"

    @property
    def avg_us(self) -> float:
        return self.total_ns / max(self.calls, 1) / 1e3

    @property
    def gflops(self) -> float | None:
        return self.flops / self.flops_ns if self.flops and self.flops_ns else None

    @property
    def gbs(self) -> float | None:
        return self.nbytes / self.bytes_ns if self.nbytes and self.bytes_ns else None

    @property
    def intensity(self) -> float | None:
        """Flops per byte (None unless both are counted)."""
        return self.flops / self.nbytes if self.flops and self.nbytes else None


@dataclass
class _Cost:
    flops: int | None
    nbytes: int | None
    kernels: list[int] = field(default_factory=list)  # indices of the kernels inside


class Profile:
    """A profile: a context manager that records while its block runs; then its events,
    `stats()`, `table()`, `export_chrome_trace()` and `roofline()`."""

    def __init__(self) -> None:
        self._session: profiling.Session | None = None
        self._running = False
        self._peaks: roofline.Peaks | None = None

    # -- recording ---------------------------------------------------------------------
    def start(self) -> Profile:
        if self._session is not None:
            raise profiling.ProfilerError("this profile has already recorded",
                                          hint="make a new tessera.profile() per run")
        self._session = profiling.start()
        self._running = True
        return self

    def stop(self) -> None:
        if not self._running or self._session is None:
            raise profiling.ProfilerError("this profile is not recording",
                                          hint="call stop() once, after start()")
        profiling.stop(self._session)
        self._running = False

    def __enter__(self) -> Profile:
        return self.start()

    def __exit__(self, kind: type[BaseException] | None, value: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.stop()

    @property
    def events(self) -> list[profiling.Event]:
        """Every event recorded, in the order reported."""
        return list(self._session.events) if self._session is not None else []

    @property
    def wall_ns(self) -> int:
        """Nanoseconds the profile recorded for."""
        s = self._session
        if s is None:
            return 0
        return (s.stopped or profiling.now()) - s.started

    def peaks(self) -> roofline.Peaks:
        """The device's measured peaks (the roofs)."""
        if self._peaks is None:
            self._peaks = roofline.peaks()
        return self._peaks

    # -- analysis ----------------------------------------------------------------------
    def _costs(self) -> tuple[list[profiling.Event], dict[int, _Cost], dict[int, _Cost]]:
        """Events, and the flops and bytes of each op event and of each kernel that is the
        only kernel of its innermost op (by event index)."""
        events = self.events
        ops: dict[int, _Cost] = {}
        for i, e in enumerate(events):
            if e.cat == "op" and e.args is not None and "inputs" in e.args:
                a = e.args
                ops[i] = _Cost(roofline.op_flops(e.name, a["inputs"], a["outputs"],
                                                 a.get("params")),
                               roofline.op_bytes(a["inputs"], a["outputs"]))
        kernels_by_tid: dict[int, list[tuple[int, int]]] = {}
        for i, e in enumerate(events):
            if e.cat == "kernel":
                kernels_by_tid.setdefault(e.tid, []).append((e.start, i))
        for v in kernels_by_tid.values():
            v.sort()
        innermost: dict[int, int] = {}  # kernel -> op
        for i in ops:
            e = events[i]
            starts = kernels_by_tid.get(e.tid, [])
            for j in range(bisect.bisect_left(starts, (e.start, -1)), len(starts)):
                k = starts[j][1]
                if events[k].start > e.end:
                    break
                if events[k].end <= e.end:
                    j = innermost.get(k)
                    if j is None or events[j].end - events[j].start > e.end - e.start:
                        innermost[k] = i
        for k, i in innermost.items():
            ops[i].kernels.append(k)
        kernels = {ops[i].kernels[0]: ops[i] for i in ops if len(ops[i].kernels) == 1}
        return events, ops, kernels

    def stats(self, cat: str = "kernel") -> list[Stat]:
        """Totals per name of the events of `cat` ("kernel", "op", "graph", "compile",
        "collective"), most time first, with GFLOPS, GB/s and the roofline position
        where counted (kernels: the flops and bytes of the op they are the only kernel of)."""
        if cat not in CATEGORIES:
            raise profiling.ProfilerError(f"no event category {cat!r}",
                                          hint=f"one of {', '.join(CATEGORIES)}")
        events, ops, kernels = self._costs()
        costs = ops if cat == "op" else kernels if cat == "kernel" else {}
        out: dict[str, Stat] = {}
        for i, e in enumerate(events):
            if e.cat != cat:
                continue
            s = out.get(e.name)
            if s is None:
                s = out[e.name] = Stat(e.name, cat)
            ns = e.end - e.start
            s.calls += 1
            s.total_ns += ns
            c = costs.get(i)
            if c is not None and c.flops:
                s.flops += c.flops
                s.flops_ns += ns
            if c is not None and c.nbytes:
                s.nbytes += c.nbytes
                s.bytes_ns += ns
        total = sum(s.total_ns for s in out.values()) or 1
        stats = sorted(out.values(), key=lambda s: -s.total_ns)
        for s in stats:
            s.share = s.total_ns / total
            if s.nbytes:
                s.attained, s.bound = roofline.position(s.gflops, s.gbs, s.intensity,
                                                        self.peaks())
        return stats

    # -- reports -----------------------------------------------------------------------
    def tables(self, top: int = 15) -> list[Any]:
        """Rich tables: top kernels, top ops, graph calls, compiles, collectives, memory."""
        from rich.table import Table

        out = []
        for cat, title in (("kernel", "Kernels"), ("op", "Ops"), ("graph", "Compiled graphs"),
                           ("compile", "Compiles"), ("collective", "Collectives")):
            stats = self.stats(cat)
            if not stats:
                continue
            roofed = cat in ("kernel", "op")
            table = Table(title=f"{title} (top {min(top, len(stats))} of {len(stats)} by "
                                f"total time)", title_justify="left")
            columns = ["name", "calls", "total ms", "share", "avg us"]
            if roofed:
                columns += ["GFLOPS", "GB/s", "of roof", "bound"]
            for c in columns:
                table.add_column(c, justify="left" if c in ("name", "bound") else "right",
                                 overflow="fold", no_wrap=c != "name",
                                 min_width=min(24, max(len(s.name) for s in stats))
                                 if c == "name" else None)
            for s in stats[:top]:
                row = [s.name, str(s.calls), f"{s.total_ns / 1e6:.3f}", f"{s.share:.1%}",
                       f"{s.avg_us:.1f}"]
                if roofed:
                    row += [_num(s.gflops), _num(s.gbs),
                            "-" if s.attained is None else f"{s.attained:.0%}", s.bound or "-"]
                table.add_row(*row)
            out.append(table)
        if self._session is not None and self._session.counters:
            from rich.table import Table
            table = Table(title="Memory (bytes in use, during the profile)",
                          title_justify="left")
            for c in ("source", "events", "peak", "at end"):
                table.add_column(c, justify="left" if c == "source" else "right")
            for source, values in _by_source(self._session.counters).items():
                table.add_row(source, str(len(values)), format_bytes(max(values)),
                              format_bytes(values[-1]))
            out.append(table)
        return out

    def table(self, top: int = 15, width: int = 120) -> str:
        """The report as text: top kernels and ops with GFLOPS, GB/s and their position
        against this device's roofline, then graphs, compiles, collectives, memory."""
        from rich.console import Console

        console = Console(width=width, record=True, file=io.StringIO())
        self._print(console, top)
        return console.export_text()

    def _print(self, console: Any, top: int) -> None:
        for t in self.tables(top):
            console.print(t)
        roof = self.peaks() if any(e.cat in ("kernel", "op") for e in self.events) else None
        if roof is not None:
            console.print(f"roofline: {roof.gflops:.1f} GFLOPS fp32, {roof.gbs:.1f} GB/s "
                          f"(ridge at {roof.ridge:.1f} flop/byte); wall "
                          f"{self.wall_ns / 1e6:.3f} ms")

    def __rich_console__(self, console: Any, options: Any) -> Iterable[Any]:
        yield from self.tables()

    def __str__(self) -> str:
        return self.table()

    def __repr__(self) -> str:
        return f"<tessera Profile: {len(self.events)} events>"

    # -- exports -----------------------------------------------------------------------
    def chrome_trace(self) -> dict[str, Any]:
        """The profile as Chrome-trace JSON data (see the module docstring)."""
        s = self._session
        if s is None:
            return {"traceEvents": [], "displayTimeUnit": "ms"}
        origin = s.started
        pid = os.getpid()
        tids: dict[int, int] = {}
        names = {t.ident: t.name for t in threading.enumerate()}
        main = threading.main_thread().ident

        def tid(ident: int) -> int:
            if ident not in tids:
                tids[ident] = 0 if ident == main else len(tids) + 1
            return tids[ident]

        trace: list[dict[str, Any]] = [
            {"ph": "M", "name": "process_name", "pid": pid, "tid": 0,
             "args": {"name": f"tessera (pid {pid})"}}]
        for e in s.events:
            trace.append({"ph": "X", "name": e.name, "cat": e.cat, "pid": pid,
                          "tid": tid(e.tid), "ts": (e.start - origin) / 1e3,
                          "dur": max(e.end - e.start, 0) / 1e3,
                          "args": _jsonable(e.args or {})})
        for source, t, value in s.counters:
            trace.append({"ph": "C", "name": f"memory: {source}", "pid": pid, "tid": 0,
                          "ts": (t - origin) / 1e3, "args": {"bytes": value}})
        for ident, n in tids.items():
            trace.append({"ph": "M", "name": "thread_name", "pid": pid, "tid": n,
                          "args": {"name": "main" if ident == main
                                   else names.get(ident, f"thread {n}")}})
        return {"traceEvents": trace, "displayTimeUnit": "ms"}

    def export_chrome_trace(self, path: str | Path) -> Path:
        """Write the Chrome-trace / Perfetto JSON file (open it in ui.perfetto.dev)."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(self.chrome_trace()))
        return path

    def roofline(self, path: str | Path, top: int = 20) -> Path:
        """Draw the kernels and ops whose flops are counted on this device's roofline into
        `path` (.png, .svg or .pdf; needs matplotlib)."""
        points = []
        for cat in ("kernel", "op"):
            for s in self.stats(cat)[:top]:
                if s.intensity is not None and s.gflops is not None:
                    points.append((f"{s.name} ({cat})", s.intensity, s.gflops))
        return roofline.plot(points, self.peaks(), path, title="Roofline (measured peaks)")


def profile() -> Profile:
    """A profile to use as `with tessera.profile() as p:`."""
    return Profile()


def profile_script(path: str, argv: Sequence[str] = ()) -> tuple[Profile, int]:
    """Run the Python script at `path` as `__main__` with `sys.argv = [path, *argv]` inside
    a profile: (the profile, the script's exit code). An exception from the script is
    raised after the profile stops."""
    p = Profile()
    with p:
        code = run_as_main(path, argv, command="profile", error=profiling.ProfilerError)[1]
    return p, code


def _num(x: float | None) -> str:
    return "-" if x is None else f"{x:.1f}" if x < 1000 else f"{x:.0f}"


def _by_source(counters: list[tuple[str, int, int]]) -> dict[str, list[int]]:
    out: dict[str, list[int]] = {}
    for source, _, value in counters:
        out.setdefault(source, []).append(value)
    return out


def _jsonable(x: Any) -> Any:
    if isinstance(x, dict):
        return {str(k): _jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_jsonable(v) for v in x]
    if x is None or isinstance(x, (bool, int, float, str)):
        return x
    return str(x)
