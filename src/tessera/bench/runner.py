"""The benchmark runner: calibrate, time interleaved rounds, report medians and ratios."""

from __future__ import annotations

import fnmatch
import gc
import importlib
import json
import platform
import random
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

from tessera.errors import TesseraError

__all__ = ["SUITES", "BenchError", "Case", "available", "run", "run_case", "time_case"]

SUITES: dict[str, str] = {
    "runtime": "tessera.bench.runtime",
    "lang": "tessera.bench.lang",
    "gemm": "tessera.bench.gemm",
    "comm": "tessera.bench.comm",
    "ops": "tessera.bench.ops",
    "models": "tessera.bench.models",
}
BASELINE_ORDER = ("numpy", "torch_eager", "torch_inductor", "mpi", "gloo")
DEVICE_SUITES = ("lang", "ops")  # the suites whose cases can time Tessera on a device


class BenchError(TesseraError):
    """An unknown suite, or implementations that disagree (a benchmark of wrong results
    measures nothing)."""


@dataclass
class Case:
    """One benchmark: named zero-argument callables, timed against each other.

    `check` runs once before timing and raises AssertionError if the implementations
    disagree; `extra(impl, median_s)` derives metrics such as GFLOPS or GB/s. `skipped`:
    implementations that cannot run, with why; `notes`: what else to know about an
    implementation's numbers (the check may add to both).
    """

    name: str
    impls: dict[str, Callable[[], object]]
    check: Callable[[], None] | None = None
    extra: Callable[[str, float], dict[str, float]] | None = None
    meta: dict[str, Any] = field(default_factory=dict)
    skipped: dict[str, str] = field(default_factory=dict)
    notes: dict[str, str] = field(default_factory=dict)


@dataclass
class Timing:
    median_s: float
    iqr_pct: float
    rounds: int
    calls_per_sample: int


Clock = Callable[[], int]


def _sample(fn: Callable[[], object], calls: int, clock: Clock) -> float:
    """Seconds per call over `calls` back-to-back calls, with the collector paused."""
    gc_was_enabled = gc.isenabled()
    gc.disable()
    try:
        t0 = clock()
        for _ in range(calls):
            fn()
        return (clock() - t0) / calls / 1e9
    finally:
        if gc_was_enabled:
            gc.enable()


def _calibrate(fn: Callable[[], object], min_sample_s: float, clock: Clock) -> int:
    """Calls per sample so one sample lasts at least `min_sample_s` (timer noise << 1%)."""
    calls = 1
    while True:
        per_call = _sample(fn, calls, clock)
        if per_call * calls >= min_sample_s or calls >= 1 << 24:
            return calls
        calls = min(1 << 24, max(2 * calls, int(1.2 * min_sample_s / max(per_call, 1e-9))))


def time_case(impls: dict[str, Callable[[], object]], *, rounds: int, min_sample_s: float,
              clock: Clock = time.perf_counter_ns, seed: int = 0) -> dict[str, Timing]:
    """Median seconds per call of each impl, sampled in `rounds` shuffled rounds so slow
    drifts of the machine hit every impl alike.

    `clock` is read exactly once before and once after each sample's calls, and the order
    of the rounds depends on `seed` alone: processes timing together with a clock that
    returns the same sample times on all of them (see comm_worker) stay in step.
    """
    for fn in impls.values():  # warm up: caches, lazy compilation, first-touch pages
        fn()
    calls = {name: _calibrate(fn, min_sample_s, clock) for name, fn in impls.items()}
    samples: dict[str, list[float]] = {name: [] for name in impls}
    order = list(impls)
    rng = random.Random(seed)
    for _ in range(rounds):
        rng.shuffle(order)
        for name in order:
            samples[name].append(_sample(impls[name], calls[name], clock))
    result = {}
    for name, xs in samples.items():
        median = statistics.median(xs)
        q = statistics.quantiles(xs, n=4) if len(xs) >= 2 else [median, median, median]
        iqr = 100.0 * (q[2] - q[0]) / median if median > 0 else 0.0
        result[name] = Timing(median, iqr, rounds, calls[name])
    return result


def available() -> list[str]:
    """Names of the registered suites."""
    return sorted(SUITES)


def machine_info(device: Any = None) -> dict[str, Any]:
    """What the numbers were measured on (never imports torch just to ask its version), and
    the properties of `device` if Tessera was timed on one besides the host."""
    from tessera import __version__
    from tessera.runtime.cpu.device import cpu_model, usable_cores
    from tessera.runtime.toolchain import compiler

    def version(dist: str) -> str | None:
        try:
            return metadata.version(dist)
        except metadata.PackageNotFoundError:
            return None

    info = {"cpu": cpu_model(), "cores": usable_cores(), "torch": version("torch"),
            "numpy": version("numpy"), "python": platform.python_version(),
            "tessera": __version__, "compiler": compiler().version.splitlines()[0]}
    if device is not None:
        info["device"] = device.properties()
    return info


def _fmt_time(s: float) -> str:
    for unit, scale in (("s", 1.0), ("ms", 1e-3), ("us", 1e-6)):
        if s >= scale:
            return f"{s / scale:.3g} {unit}"
    return f"{s / 1e-9:.3g} ns"


def run_case(suite: str, case: Case, *, rounds: int, min_sample_s: float,
             clock: Clock = time.perf_counter_ns) -> list[dict[str, Any]]:
    """Check a case, time it, and return its rows (one per impl, unsorted)."""
    if case.check is not None:
        try:
            case.check()
        except AssertionError as e:
            raise BenchError(f"benchmark {suite}/{case.name}: implementations disagree: {e}",
                             hint="a benchmark of wrong results measures nothing; fix the "
                                  "implementation (or the check) first") from e
    timings = time_case(case.impls, rounds=rounds, min_sample_s=min_sample_s, clock=clock)
    rows = []
    for impl, t in timings.items():
        extra = {"iqr_pct": round(t.iqr_pct, 1), "rounds": t.rounds,
                 "calls_per_sample": t.calls_per_sample, **case.meta}
        if case.extra is not None:
            extra.update(case.extra(impl, t.median_s))
        rows.append({"suite": suite, "case": case.name, "impl": impl,
                     "median_s": t.median_s, "extra": extra, "_meta": tuple(case.meta)})
    return rows


def _table(suite: str, rows: list[dict[str, Any]], reference: str, device: bool) -> Table:
    caption = f"speedup: the impl's median / {reference}'s median (above 1: {reference} " \
              "is faster)"
    if device:
        caption += ("\ndevice_us: the device's own time for the commands one call enqueues "
                    "(commands; OpenCL event profiling), the rest of the median is the host's"
                    " (Python, launch, enqueue, synchronize); device_*: the rate over it")
    table = Table(title=f"tessera bench {suite}", title_justify="left", caption=caption,
                  caption_justify="left")
    for col in ("case", "impl", "median", "IQR", "speedup"):
        table.add_column(col, justify="left" if col in ("case", "impl") else "right",
                         no_wrap=col == "case")
    hidden = {"iqr_pct", "rounds", "calls_per_sample"}
    metrics = sorted({k for r in rows for k in r["extra"] if k not in hidden
                      and k not in r.get("_meta", ())})
    for m in metrics:
        table.add_column(m, justify="right")
    reference_s = {r["case"]: r["median_s"] for r in rows if r["impl"] == reference}
    for r in rows:
        ref = reference_s.get(r["case"])
        speedup = "" if r["impl"] == reference or ref is None else \
            f"{r['median_s'] / ref:.2f}x"
        values = [r["extra"].get(m, "") for m in metrics]
        table.add_row(r["case"], r["impl"], _fmt_time(r["median_s"]),
                      f"{r['extra']['iqr_pct']:.1f}%", speedup,
                      *(f"{v:.3g}" if isinstance(v, float) else str(v) for v in values))
    return table


def _in_order(rows: list[dict[str, Any]], reference: str = "tessera") -> list[dict[str, Any]]:
    """Rows in case order, the reference first in each case, then Tessera on the host, then
    the baselines in a fixed order."""
    cases = list(dict.fromkeys(r["case"] for r in rows))
    return sorted(rows, key=lambda r: (cases.index(r["case"]), r["impl"] != reference,
                                       r["impl"] != "tessera",
                                       BASELINE_ORDER.index(r["impl"])
                                       if r["impl"] in BASELINE_ORDER else 99, r["impl"]))


def run(suite: str, *, quick: bool = False, ranks: int = 2, json_path: str | None = None,
        console: Console | None = None, only: str | None = None,
        device: str = "cpu") -> list[dict[str, Any]]:
    """Run one suite, print its table, optionally write the JSON; returns the rows.

    `speedup` is baseline median / Tessera median: above 1 means Tessera is faster.
    `ranks` is the number of processes a suite that launches its own (comm) starts.
    `only`: comma-separated name patterns (fnmatch, e.g. "softmax_*,gelu_32x384"); the
    cases matching none are skipped. `device` (e.g. "opencl"; a suite of DEVICE_SUITES)
    also times Tessera there, as `tessera_<type>`, which then is the reference of
    `speedup`; the implementations that could not run are listed with why (in the JSON
    under "skipped"), and what else to know about one's numbers (under "notes": e.g. an
    op that ran on host copies of device data).
    """
    if suite not in SUITES:
        raise BenchError(f"unknown benchmark suite {suite!r}",
                         hint=f"available suites: {', '.join(available())}")
    from tessera.bench import device as bench_device  # (it imports this module)

    dev = _bench_device(suite, device)
    console = console or Console()
    module = importlib.import_module(SUITES[suite])
    patterns = [p.strip() for p in only.split(",") if p.strip()] if only else []

    def wanted(name: str) -> bool:
        return not patterns or any(fnmatch.fnmatchcase(name, p) for p in patterns)

    skipped: list[dict[str, str]] = []  # impls that did not run, and why
    notes: list[dict[str, str]] = []  # what else to know about an impl's numbers
    if hasattr(module, "rows"):  # timed in processes of its own, which return finished rows
        rows = [r for r in module.rows(quick, ranks, only) if wanted(r["case"])]
    else:
        with bench_device.target(dev):
            cases = [case for case in module.cases(quick) if wanted(case.name)]
        rows = [row for case in cases
                for row in run_case(suite, case, rounds=7 if quick else 21,
                                    min_sample_s=0.002 if quick else 0.005)]
        skipped = [{"case": case.name, "impl": impl, "reason": why}
                   for case in cases for impl, why in case.skipped.items()]
        notes = [{"case": case.name, "impl": impl, "note": note}
                 for case in cases for impl, note in case.notes.items()]
    if not rows:
        raise BenchError(f"no case of suite {suite!r} matches {only!r}",
                         hint="--only takes comma-separated patterns such as 'softmax_*'")
    reference = "tessera" if dev is None else bench_device.impl_name(dev)
    rows = _in_order(rows, reference)
    console.print(_table(suite, rows, reference, dev is not None))
    for s in skipped:
        console.print(f"not run: {s['case']} {s['impl']}: {s['reason']}", markup=False,
                      highlight=False)
    for n in notes:
        console.print(f"note: {n['case']} {n['impl']}: {n['note']}", markup=False,
                      highlight=False)
    rows = [{k: v for k, v in r.items() if k != "_meta"} for r in rows]
    if json_path:
        data = {"machine": machine_info(dev), "results": rows}
        data.update({k: v for k, v in (("skipped", skipped), ("notes", notes)) if v})
        Path(json_path).write_text(json.dumps(data, indent=1))
        console.print(f"wrote {json_path}")
    return rows


def _bench_device(suite: str, spec: str) -> Any:
    """The device `spec` names, None for the host (BenchError if `suite` cannot use one)."""
    from tessera.runtime.device import device

    dev = device(spec)
    if dev.is_host:
        return None
    if suite not in DEVICE_SUITES:
        raise BenchError(f"suite {suite!r} does not time Tessera on a device ({dev.name})",
                         hint=f"--device works with the suites {', '.join(DEVICE_SUITES)}")
    return dev
