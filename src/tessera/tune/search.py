"""Tile search: time candidate (BM, BN) tiles of one generated kernel against its default
tile and record the winner in the knowledge base (kind "tile"), which the kernel reads
when it is next compiled (`tessera.runtime.knowledge.tile`).

Three strategies choose what is timed: "exhaustive" (every candidate), "random" (a seeded
sample) and "model" (the candidates an analytic cost model ranks best: bytes moved with
masked padding, vector width, whether a tile fits the caches, balance of the programs over
the cores). Every trial is checked against the default tile's result first: a wrong or
failing one is rejected and reported, never timed or recorded. The checked ones and the
default are timed interleaved (medians); the winner is recorded only when it beats the
default beyond noise: its upper-quartile time below the default's lower quartile, and its
median at least 3% faster; and nothing is recorded when the machine was too busy to tell
(a tile's quartiles more than MAX_SPREAD apart).
"""

from __future__ import annotations

import math
import random
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import torch

from tessera.errors import TesseraError, TuneError
from tessera.runtime import knowledge
from tessera.runtime.cpu.device import cache_sizes, usable_cores
from tessera.templates.gemm.tuning import vector_lanes
from tessera.tune.tuner import time_interleaved

__all__ = ["MAX_SPREAD", "STRATEGIES", "Target", "Trial", "TuneResult", "estimate",
           "tune_tile"]

Tile = tuple[int, int]
STRATEGIES = ("exhaustive", "random", "model")
_TOP = 4  # candidates the model strategy times (besides the default)
_SAMPLES = 6  # candidates the random strategy times
_REPEATS = 25
_MIN_BUDGET_S = 2.0  # the timing rounds' budget when the checks used up the timeout
_MIN_GAIN = 1.03  # a smaller gain of the medians is not worth a record
MAX_SPREAD = 2.0  # a tile's upper / lower quartile time beyond it: the machine is busy


@dataclass
class Target:
    """One kernel at one shape to tune. `run(tile)` computes its result with that tile (a
    tensor or a tuple of them; the tuner compares it with the default's); `rows` x `cols`
    the elements a launch covers, `rows_kernel` whether a program walks whole rows (else
    a tile of the grid), `streams` the tensors it reads and writes (for the cost model)."""

    kernel: str
    shape: str
    dtype: str
    default: Tile
    candidates: list[Tile]
    run: Callable[[Tile], Any]
    rows: int
    cols: int
    itemsize: int
    streams: int
    rows_kernel: bool
    fixed_bn: bool = False
    label: str = ""  # what it is, for people: "softmax 4096x1024", a graph node

    @property
    def key(self) -> str:
        return knowledge.tile_key(self.kernel, self.shape, self.dtype)


@dataclass
class Trial:
    """One candidate: its tile, the model's estimate, its median seconds (None if it was
    not timed) and why it was rejected (None if it computed the default's result)."""

    tile: Tile
    model_s: float
    median_s: float | None = None
    error: str | None = None


@dataclass
class TuneResult:
    """The outcome of one search: the best tile, whether it was recorded and why not."""

    target: Target
    strategy: str
    best: Tile
    speedup: float
    recorded: bool
    note: str
    seconds: float
    trials: list[Trial] = field(default_factory=list)
    noise: float = 1.0  # the largest upper / lower quartile time of a timed tile

    def record(self) -> dict[str, Any]:
        """The knowledge record's value (also what --json prints)."""
        return {"tile": list(self.best), "default": list(self.target.default),
                "label": self.target.label, "strategy": self.strategy,
                "speedup": round(self.speedup, 4), "noise": round(self.noise, 3),
                "seconds": round(self.seconds, 2),
                "trials": [{**asdict(t), "tile": list(t.tile)} for t in self.trials]}


def estimate(target: Target, tile: Tile) -> float:
    """Modelled seconds of one launch with `tile`: the bytes it moves (masked padding
    included) at an assumed per-core bandwidth, slowed by partial vectors and by tiles
    that spill out of L1/L2, over the cores the programs keep busy, plus a cost per
    program."""
    bm, bn = tile
    row_blocks = -(-target.rows // bm)
    col_blocks = -(-target.cols // bn)
    programs = row_blocks * (1 if target.rows_kernel else col_blocks)
    cores = usable_cores()
    balance = programs / (-(-programs // cores) * cores) if programs else 1.0
    busy = min(cores, programs) * balance
    moved = row_blocks * bm * col_blocks * bn * target.itemsize * target.streams
    vector = 1.0 if bn % vector_lanes() == 0 else 1.5
    live = bm * bn * 4 * target.streams  # the tiles a program keeps (computed in float32)
    caches = cache_sizes()
    spill = 1.0 if live <= (caches["L1d"] or 32 << 10) else \
        1.3 if live <= (caches["L2"] or 256 << 10) else 2.0
    return moved / 8e9 * vector * spill / max(busy, 1e-9) + programs * 5e-8


def tune_tile(target: Target, strategy: str = "model", timeout: float = 30.0,
              candidates: Sequence[Tile] | None = None, seed: int = 0,
              progress: Callable[[str], None] | None = None,
              max_spread: float | None = MAX_SPREAD) -> TuneResult:
    """Search tiles for `target` with `strategy` within about `timeout` seconds (the
    checks stop there; the timing rounds shrink to fit) and record the winner if it beats
    the default beyond noise. `candidates` replaces the target's own list. If a tile's
    upper-quartile time exceeds its lower quartile by more than `max_spread` times (a
    busy machine: launches stall waiting for descheduled threads), nothing is recorded."""
    if strategy not in STRATEGIES:
        raise TuneError(f"tune: unknown strategy {strategy!r}",
                        hint=f"one of {', '.join(STRATEGIES)}")
    if not timeout > 0:
        raise TuneError(f"tune: timeout={timeout!r} must be a positive number of seconds")
    say = progress or (lambda line: None)
    started = time.perf_counter()
    deadline = started + timeout
    pool = [tuple(c) for c in (target.candidates if candidates is None else candidates)]
    trials = {c: Trial(c, estimate(target, c)) for c in dict.fromkeys([target.default, *pool])}
    order = _order(strategy, [c for c in trials if c != target.default], trials, seed)
    say(f"{target.label or target.key}: checking the default {target.default}")
    reference = target.run(target.default)
    checked = [target.default]
    for i, c in enumerate(order):
        if time.perf_counter() > deadline:
            say(f"timeout: {len(order) - i} candidates left unchecked")
            break
        say(f"{target.label or target.key}: checking {c} ({i + 1}/{len(order)})")
        trials[c].error = _wrong(lambda c=c: target.run(c), reference, target.dtype)
        if trials[c].error is None:
            checked.append(c)
    if len(checked) > 1:
        say(f"{target.label or target.key}: timing {len(checked)} tiles")
        budget = max(deadline - time.perf_counter(), _MIN_BUDGET_S)
        runs = time_interleaved([lambda c=c: target.run(c) for c in checked], _REPEATS, budget)
        for c, r in zip(checked, runs, strict=True):
            trials[c].median_s = statistics.median(r)
        best = min(checked, key=lambda c: trials[c].median_s or math.inf)
        spread = dict(zip(checked, runs, strict=True))
        speedup = trials[target.default].median_s / trials[best].median_s
        noise = max(_quartile(r, 3) / _quartile(r, 1) for r in runs)
        busy = max_spread is not None and noise > max_spread
        beats = not busy and best != target.default and speedup >= _MIN_GAIN and _quartile(
            spread[best], 3) < _quartile(spread[target.default], 1)
    else:
        best, beats, speedup, busy, noise = target.default, False, 1.0, False, 1.0
    listed = [target.default, *order]  # then the candidates the strategy left out
    result = TuneResult(target, strategy, best if beats else target.default,
                        speedup if beats else 1.0, beats, "", time.perf_counter() - started,
                        [trials[c] for c in [*listed, *(c for c in trials if c not in listed)]])
    result.noise = noise
    if beats:
        result.note = f"{best} beats the default {target.default} by {speedup:.2f}x: recorded"
        knowledge.store(knowledge.TILE, target.key, result.record())
    elif busy:
        result.note = (f"the machine is busy (a tile's timings varied by {noise:.1f}x between "
                       "quartiles): nothing recorded; tune again when it is idle")
    elif len(checked) == 1:
        result.note = "no candidate besides the default computed right in time: nothing recorded"
    else:
        result.note = (f"no tile beat the default {target.default} beyond noise (best {best}, "
                       f"{speedup:.2f}x): nothing recorded")
    return result


def _order(strategy: str, pool: list[Tile], trials: dict[Tile, Trial], seed: int) -> list[Tile]:
    """The candidates to try, in order, for `strategy`."""
    if strategy == "random":
        return random.Random(seed).sample(pool, min(_SAMPLES, len(pool)))
    if strategy == "model":
        return sorted(pool, key=lambda c: trials[c].model_s)[:_TOP]
    return pool


_TOLERANCE = {"float32": 1e-4, "float16": 4e-3, "bfloat16": 3e-2}  # of the largest value


def _wrong(run: Callable[[], Any], reference: Any, dtype: str) -> str | None:
    """Why a trial's result differs from the default's (shapes, dtypes, NaN positions,
    values beyond a summation-order tolerance), or None; a Tessera error is reported."""
    try:
        result = run()
    except TesseraError as e:
        return f"{type(e).__name__}: {e.message}"
    got = result if isinstance(result, tuple) else (result,)
    want = reference if isinstance(reference, tuple) else (reference,)
    for i, (g, w) in enumerate(zip(got, want, strict=True)):
        if g.shape != w.shape or g.dtype != w.dtype:
            return f"output {i} is {g.dtype}{list(g.shape)}, not {w.dtype}{list(w.shape)}"
        if not w.dtype.is_floating_point:
            if not torch.equal(g, w):
                return f"output {i} differs from the default tile's"
            continue
        g64, w64 = g.double(), w.double()
        if not torch.equal(g64.isnan(), w64.isnan()):
            return f"output {i} has NaNs where the default tile's has none (or the reverse)"
        finite = w64.isfinite()
        if not torch.equal(g64[~finite].nan_to_num(), w64[~finite].nan_to_num()):
            return f"output {i} has other infinities than the default tile's"
        if finite.any():
            err = float((g64[finite] - w64[finite]).abs().max())
            scale = max(1.0, float(w64[finite].abs().max()))
            if err > _TOLERANCE.get(dtype, 1e-4) * scale:
                return f"wrong result: max abs error {err:.3g} against the default tile's"
    return None


def _quartile(runs: list[float], q: int) -> float:
    return statistics.quantiles(runs, n=4)[q - 1] if len(runs) > 1 else runs[0]
