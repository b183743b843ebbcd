"""Per-machine knowledge: small JSON records of what was measured on this machine, keyed
by (kind, problem key): the GEMM blocking ("gemm.blocking"), `@tl.autotune` winners
("autotune") and the tiles of row and pointwise kernels ("tile", read through `tile()`
when a kernel is compiled).

Each record is an entry of the artifact cache (kind `knowledge`), so it is written
atomically, integrity-checked, safe under concurrent processes, listed by `tessera cache
info` and removed by `tessera cache clear`. Its cache key hashes the machine's identity,
so machines sharing one cache directory (an NFS home) keep their own records. A record
that is corrupted or names another machine is never trusted: it is ignored with one
warning, and the caller falls back to its defaults.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from tessera.runtime.cache import default_cache
from tessera.runtime.cpu.device import cache_sizes, cpu_features, cpu_model, usable_cores

__all__ = ["MAX_TILE", "TILE", "load", "machine", "records", "reload", "store", "tile",
           "tile_key", "tile_shapes", "trying"]

_KIND = "knowledge"
_RECORD = "record.json"
_VERSION = 1  # bump when the record format changes; old records are then simply not found
_warned: set[tuple[Path, str]] = set()


def machine() -> dict[str, Any]:
    """This machine's identity: what a measured result depends on (CPU model, ISA
    features, the cores this process may use, cache sizes)."""
    return {"cpu": cpu_model(), "features": sorted(cpu_features()), "cores": usable_cores(),
            "caches": cache_sizes()}


def _cache_key(kind: str, key: str) -> str:
    text = json.dumps([f"knowledge-{_VERSION}", machine(), kind, key], sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()


def store(kind: str, key: str, value: dict[str, Any], recorded_at: str | None = None
          ) -> None:
    """Record `value` (JSON-able) for (kind, key) on this machine, replacing any old one;
    `recorded_at` keeps an imported record's date (default: now)."""
    record = {"kind": kind, "key": key, "machine": machine(),
              "recorded_at": recorded_at or time.strftime("%Y-%m-%dT%H:%M:%S%z"),
              "value": value}
    text = json.dumps(record, indent=1)  # fails here, before anything is written

    def build(tmp: Path) -> dict[str, Any]:
        (tmp / _RECORD).write_text(text)
        return {"kind": kind, "key": key}

    default_cache().put(_KIND, _cache_key(kind, key), build)
    reload()


def load(kind: str, key: str) -> dict[str, Any] | None:
    """The value recorded for (kind, key) on this machine, or None if there is no
    trustworthy one."""
    cache_key = _cache_key(kind, key)
    record = _read(cache_key)
    if record is None:
        return None
    if (record["kind"], record["key"], record["machine"]) != (kind, key, machine()):
        _ignore(default_cache().entry_dir(_KIND, cache_key),
                "was recorded for another machine or problem")
        return None
    return record["value"]


def records() -> list[dict[str, Any]]:
    """This machine's trustworthy records (kind, key, recorded_at, value), sorted; other
    machines' records in a shared cache directory are left out."""
    found = []
    for entry in (default_cache().base / _KIND).glob("*/*"):
        record = _read(entry.name)
        if record is not None and record["machine"] == machine():
            found.append({k: record[k] for k in ("kind", "key", "recorded_at", "value")})
    return sorted(found, key=lambda r: (r["kind"], r["key"]))


def _read(cache_key: str) -> dict[str, Any] | None:
    """The record in one entry if the entry is intact and holds one: None if there is no
    entry, None with a warning if it is corrupted."""
    cache = default_cache()
    path = cache.entry_dir(_KIND, cache_key)
    for _ in range(3):  # a concurrent store swaps the entry: look again before judging it
        if not path.exists():
            return None
        entry = cache.lookup(_KIND, cache_key)
        try:
            text = None if entry is None else (entry / _RECORD).read_text()
        except OSError:
            text = None
        if text is not None:
            break
    else:
        _ignore(path, "is corrupted")
        return None
    try:
        record = json.loads(text)
    except ValueError:
        record = None
    if not (isinstance(record, dict) and isinstance(record.get("value"), dict)
            and {"kind", "key", "machine", "recorded_at"} <= record.keys()):
        _ignore(path, "is not a knowledge record")
        return None
    return record


def _ignore(entry: Path, why: str) -> None:
    """Warn, once per entry, reason and process, that a record is not trusted."""
    if (entry, why) not in _warned:
        _warned.add((entry, why))
        warnings.warn(f"ignoring the knowledge record {entry}: it {why}; defaults are used "
                      "(`tessera cache clear` removes it, re-tuning replaces it)",
                      RuntimeWarning, stacklevel=2)


# -- tiles of generated kernels --------------------------------------------------------------
TILE = "tile"  # records {"tile": [BM, BN], ...} under tile_key(kernel, shape class, dtype)
MAX_TILE = 1 << 16  # elements of a tile at most: a larger one is no tuning result
_memo: dict[tuple[str | None, str, str, str], tuple[int, int]] = {}
_shapes: dict[tuple[str | None, str, str], frozenset[str]] = {}
_trial: list[tuple[tuple[int, int] | None, list[dict[str, Any]]]] = []  # see trying()


def tile_key(kernel: str, shape: str, dtype: str) -> str:
    """The record key of a kernel's tile for one shape class and dtype."""
    return f"{kernel}|{shape}|{dtype}"


def tile(kernel: str, shape: str, dtype: str, default: tuple[int, int],
         fixed_bn: bool = False) -> tuple[int, int]:
    """The (BM, BN) tile kernel `kernel` (a program key: an op's name, a fused kernel's
    digest) compiles with for shape class `shape` and `dtype`: this machine's record, or
    `default` (the caller's heuristic). `fixed_bn`: only BM may differ from the default
    (a row must fit one tile). The answer is kept in memory, so a repeated lookup is one
    dict access; a record that does not fit is ignored with one warning."""
    if _trial:
        return _tried(kernel, shape, dtype, default, fixed_bn)
    key = (os.environ.get("TESSERA_CACHE_DIR"), kernel, shape, dtype)
    found = _memo.get(key)
    if found is None:
        found = _memo[key] = _tuned(kernel, shape, dtype, default, fixed_bn)
    return found


def tile_shapes(kernel: str, dtype: str) -> frozenset[str]:
    """The shape classes this machine has tile records for, of `kernel` in `dtype` (kept in
    memory like `tile`'s answers): for a caller that must know whether any shape of a
    kind is tuned, e.g. before serving it through a path that only knows default tiles."""
    key = (os.environ.get("TESSERA_CACHE_DIR"), kernel, dtype)
    found = _shapes.get(key)
    if found is None:
        prefix = tile_key(kernel, "", "").removesuffix("|")
        found = _shapes[key] = frozenset(
            r["key"].split("|")[1] for r in records()
            if r["kind"] == TILE and r["key"].startswith(prefix)
            and r["key"].endswith(f"|{dtype}"))
    return found


def _tuned(kernel: str, shape: str, dtype: str, default: tuple[int, int],
           fixed_bn: bool) -> tuple[int, int]:
    value = load(TILE, tile_key(kernel, shape, dtype))
    if value is None:
        return default
    t = value.get("tile")
    if not (isinstance(t, list) and len(t) == 2 and all(type(v) is int and v > 0 for v in t)
            and t[0] * t[1] <= MAX_TILE):
        why = f"its tile {t!r} is not two positive integers of at most {MAX_TILE} elements"
    elif fixed_bn and t[1] != default[1]:
        why = f"its tile {t} is not {default[1]} wide, as a row of this kernel must be"
    else:
        return t[0], t[1]
    _ignore(default_cache().entry_dir(_KIND, _cache_key(TILE, tile_key(kernel, shape, dtype))),
            f"does not fit ({why})")
    return default


def _tried(kernel: str, shape: str, dtype: str, default: tuple[int, int],
           fixed_bn: bool) -> tuple[int, int]:
    tried, seen = _trial[-1]
    seen.append({"kernel": kernel, "shape": shape, "dtype": dtype, "default": default,
                 "fixed_bn": fixed_bn})
    return default if tried is None else tried


@contextmanager
def trying(tried: tuple[int, int] | None) -> Iterator[list[dict[str, Any]]]:
    """Inside the block, every tile lookup of this process answers `tried` (None: the
    caller's default; records are not read) and is noted in the yielded list (kernel,
    shape, dtype, default, fixed_bn): how a tuner runs a kernel with a candidate tile
    and learns which kernels a call compiles."""
    seen: list[dict[str, Any]] = []
    _trial.append((tried, seen))
    try:
        yield seen
    finally:
        _trial.pop()


def reload() -> None:
    """Forget the tiles looked up so far: the next lookups read the records again (after
    this process stored or imported some; another process's new records are seen by
    processes started after them, or after this call)."""
    _memo.clear()
    _shapes.clear()
