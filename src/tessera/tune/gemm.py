"""`tune_gemm`: find this machine's fastest GEMM blocking by a staged search around the
cache-size default, and record it in the knowledge base, where `blocking()` (and so every
GEMM of every later process) picks it up.

Stages: the micro-tile (MR x NR) at the default cache blocks, then KC, MC and NC one at a
time around the best so far; then the winner and the default are timed against each other
once more, and the winner is recorded only if it is faster there.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, replace
from functools import partial
from typing import Any

import numpy as np

from tessera.errors import TesseraError, TuneError
from tessera.runtime import knowledge
from tessera.runtime.cpu.device import usable_cores
from tessera.templates.gemm import Blocking, blocking, gemm
from tessera.templates.gemm.tuning import KEY, KIND, invalid
from tessera.tune.tuner import geomean, time_interleaved

__all__ = ["FULL_SIZES", "MAX_NOISE", "QUICK_SIZES", "tune_gemm"]

FULL_SIZES = (512, 1024, 2048)
QUICK_SIZES = (256, 512)
_MR = (4, 6, 8, 12, 14)
_KC = (192, 256, 384, 512)
_SCALES = {False: (0.5, 0.75, 1.5, 2.0), True: (0.5, 2.0)}  # MC and NC around the best
_REPEATS = {False: 7, True: 5}
_BUDGET_S = {False: 8.0, True: 1.0}  # per stage and size: fewer rounds beyond it
MAX_NOISE = 1.25  # see _Search.noise: beyond it, the candidates' differences are noise


def tune_gemm(sizes: Sequence[int] | None = None, quick: bool = False,
              candidates: Sequence[Blocking] | None = None,
              progress: Callable[[str], None] | None = None,
              max_noise: float | None = MAX_NOISE) -> Blocking:
    """Time float32 GEMM blockings on square problems of `sizes` (default FULL_SIZES, or
    QUICK_SIZES and a narrower search if `quick`), record the fastest for this machine and
    return it. `candidates` replaces the staged search by these blockings (and the
    default); `progress` receives a line per stage. If repeated timings varied by more
    than `max_noise` (a busy machine), nothing is recorded: a TuneError says so."""
    sizes = tuple(sizes or (QUICK_SIZES if quick else FULL_SIZES))
    if not all(isinstance(s, int) and s > 0 for s in sizes):
        raise TuneError(f"tune_gemm: sizes must be positive integers, got {sizes}",
                        hint="e.g. sizes=(512, 1024)")
    for c in candidates or ():
        why = invalid(asdict(c))
        if why:
            raise TuneError(f"tune_gemm: cannot try {c}: {why}",
                            hint="see tessera.templates.gemm.tuning.invalid for the rules")
    started = time.perf_counter()
    default = blocking(tuned=False)
    search = _Search(sizes, quick, progress or (lambda line: None))
    if candidates is not None:
        best = search.stage("given", [default, *candidates])
    else:
        best = search.stage("micro-tile", _tiles(default))
        best = search.stage("KC", [replace(best, kc=kc) for kc in (best.kc, *_KC)])
        best = search.stage("MC", [_scaled(best, "mc", "mr", s) for s in (1, *_SCALES[quick])])
        best = search.stage("NC", [_scaled(best, "nc", "nr", s) for s in (1, *_SCALES[quick])])
    seconds = search.confirm(default, best)
    speedup = geomean([d / b for d, b in zip(seconds[default], seconds[best], strict=True)])
    if speedup < 1.0:  # the search's edge did not hold up: keep the default
        best, speedup = default, 1.0
    noise = search.noise()
    if max_noise is not None and noise > max_noise:
        raise TuneError(f"tune_gemm: repeated timings differed by up to {noise - 1:.0%}, more "
                        f"than the {max_noise - 1:.0%} a choice can stand: the machine is busy, "
                        "so nothing was recorded (the blocking in use is unchanged)",
                        hint="tune again when the machine is idle")
    knowledge.store(KIND, KEY, {
        "blocking": asdict(best), "default": asdict(default), "sizes": list(sizes),
        "quick": quick, "speedup": round(speedup, 4),
        "gflops": {"tuned": search.gflops(seconds[best]),
                   "default": search.gflops(seconds[default])},
        "noise": round(noise, 3),
        "seconds": round(time.perf_counter() - started, 1), "trials": search.trials})
    blocking.cache_clear()  # this process's GEMMs switch to the record now
    return best


def _tiles(default: Blocking) -> list[Blocking]:
    """Every MR x NR micro-tile around the default, at the default's cache blocks."""
    vl = default.vl
    return [default, *(replace(default, mr=mr, nr=nr, mc=_multiple(default.mc, mr),
                               nc=_multiple(default.nc, nr))
                       for mr in _MR for nr in (vl, 2 * vl, 3 * vl))]


def _scaled(b: Blocking, field: str, unit: str, scale: float) -> Blocking:
    """`b` with one cache block scaled, kept a whole number of micro-tiles."""
    return replace(b, **{field: _multiple(getattr(b, field) * scale, getattr(b, unit))})


def _multiple(x: float, unit: int) -> int:
    return max(unit, round(x / unit) * unit)


class _Search:
    """The problems, the checked candidates and every trial of one tuning run."""

    def __init__(self, sizes: tuple[int, ...], quick: bool, progress: Callable[[str], None]):
        self.sizes, self.quick, self.progress = sizes, quick, progress
        rng = np.random.default_rng(0)
        self.problems = [(rng.standard_normal((n, n), dtype=np.float32),
                          rng.standard_normal((n, n), dtype=np.float32),
                          np.empty((n, n), np.float32)) for n in sizes]
        # one ragged problem checks every candidate's edge tiles and partial blocks
        m, k, n = min(sizes) + 7, min(sizes) + 5, min(sizes) + 3
        self.check_a = rng.standard_normal((m, k), dtype=np.float32)
        self.check_b = rng.standard_normal((k, n), dtype=np.float32)
        a64, b64 = self.check_a.astype(np.float64), self.check_b.astype(np.float64)
        self.reference, self.scale = a64 @ b64, np.abs(a64) @ np.abs(b64)
        self.errors: dict[Blocking, str | None] = {}
        self.trials: list[dict[str, Any]] = []
        self.spreads: list[float] = []  # median / best run, per candidate and size
        self.drifts: list[float] = []  # a stage's winner timed again in the next stage
        self.last: tuple[Blocking, float] | None = None  # that winner and its mean seconds

    def stage(self, name: str, candidates: list[Blocking]) -> Blocking:
        """The fastest of the candidates that can run here, behave differently at these
        sizes from the ones before them (the first is the incumbent) and compute right."""
        distinct: dict[tuple[int, ...], Blocking] = {}
        for c in candidates:
            if invalid(asdict(c)) is None:
                distinct.setdefault(self._behaviour(c), c)
        ok = self._checked(name, list(distinct.values()))
        if len(ok) == 1:
            self.progress(f"{name}: nothing else behaves differently at these sizes")
            return ok[0]
        self.progress(f"{name}: timing {len(ok)} blockings on {len(self.sizes)} sizes")
        seconds = self._time(ok, _REPEATS[self.quick])
        for c in ok:
            self.trials.append({"stage": name, "blocking": asdict(c),
                                "gflops": self.gflops(seconds[c])})
        return self._winner(seconds)

    def confirm(self, default: Blocking, best: Blocking) -> dict[Blocking, list[float]]:
        """Median seconds per size of the default and the winner, timed side by side with
        twice the rounds of a stage."""
        self.progress("confirm: the winner against the default")
        seconds = self._time(list(dict.fromkeys([default, best])), 2 * _REPEATS[self.quick])
        self._winner(seconds)
        return seconds

    def noise(self) -> float:
        """How far the same measurement varied (1 = not at all): the median spread of runs,
        or the largest move of a winner's time from one stage to the next if larger.
        Above ~1.1 the machine was busy and the choice may be noise."""
        return max([statistics.median(self.spreads), *self.drifts])

    def _winner(self, seconds: dict[Blocking, list[float]]) -> Blocking:
        """The fastest timed candidate; how the previous winner's time moved is noted."""
        if self.last is not None and self.last[0] in seconds:
            was, now = self.last[1], geomean(seconds[self.last[0]])
            self.drifts.append(max(was / now, now / was))
        best = min(seconds, key=lambda c: geomean(seconds[c]))
        self.last = (best, geomean(seconds[best]))
        return best

    def gflops(self, seconds: list[float]) -> list[float]:
        return [round(2 * n ** 3 / s / 1e9, 1) for n, s in zip(self.sizes, seconds, strict=True)]

    def _behaviour(self, b: Blocking) -> tuple[int, ...]:
        """What decides how `b` runs at these sizes: a cache block at least as large as
        every problem is one block, whatever its size."""
        top = max(self.sizes)
        return (b.mr, b.nr, min(b.kc, top), min(b.mc, -(-top // b.mr) * b.mr),
                min(b.nc, -(-top // b.nr) * b.nr))

    def _checked(self, stage: str, candidates: list[Blocking]) -> list[Blocking]:
        """The candidates that build and compute the ragged check problem right (each
        checked once per run; the builds run in parallel); failures become trials. The
        first, the incumbent, must work."""
        new = [c for c in candidates if c not in self.errors]
        one = np.ones((1, 1), np.float32)
        with ThreadPoolExecutor(usable_cores()) as pool:  # a 1x1 product builds the kernel
            built = list(pool.map(lambda c: _error_of(lambda: gemm(one, one, config=c)), new))
        for c, error in zip(new, built, strict=True):
            self.errors[c] = error or self._wrong(c)
            if self.errors[c]:
                self.trials.append({"stage": stage, "blocking": asdict(c), "gflops": None,
                                    "error": self.errors[c]})
        first = candidates[0]
        if self.errors[first]:
            raise TuneError(f"tune_gemm: {first} fails: {self.errors[first]}",
                            hint="the GEMM template is broken here; run tests/templates")
        return [c for c in candidates if not self.errors[c]]

    def _wrong(self, b: Blocking) -> str | None:
        """Why `b` computes the check problem wrong (beyond the fp32 rounding bound)."""
        out = np.empty(self.reference.shape, np.float32)
        error = _error_of(lambda: gemm(self.check_a, self.check_b, out, config=b))
        if error:
            return error
        k = self.check_a.shape[1]
        err = float(np.max(np.abs(out - self.reference) / self.scale))
        return None if err <= k * 2.0 ** -23 else f"wrong result (relative error {err:.2g})"

    def _time(self, candidates: list[Blocking], repeats: int) -> dict[Blocking, list[float]]:
        """Median seconds of each candidate per size (their spreads noted)."""
        seconds: dict[Blocking, list[float]] = {c: [] for c in candidates}
        for a, b, out in self.problems:
            calls = [partial(gemm, a, b, out, config=c) for c in candidates]
            for c, runs in zip(candidates, time_interleaved(calls, repeats,
                                                            _BUDGET_S[self.quick]), strict=True):
                seconds[c].append(statistics.median(runs))
                self.spreads.append(statistics.median(runs) / min(runs))
        return seconds


def _error_of(call: Callable[[], object]) -> str | None:
    """The message of the Tessera error the call raised, or None if it ran."""
    try:
        call()
    except TesseraError as e:
        return f"{type(e).__name__}: {e.message}"
    return None
