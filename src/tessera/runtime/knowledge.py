"""Per-machine knowledge: small JSON records of what was measured on this machine (the
autotuner's best GEMM blocking, ...), keyed by (kind, problem key).

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
import time
import warnings
from pathlib import Path
from typing import Any

from tessera.runtime.cache import default_cache
from tessera.runtime.cpu.device import cache_sizes, cpu_features, cpu_model, usable_cores

__all__ = ["load", "machine", "records", "store"]

_KIND = "knowledge"
_RECORD = "record.json"
_VERSION = 1  # bump when the record format changes; old records are then simply not found
_warned: set[Path] = set()


def machine() -> dict[str, Any]:
    """This machine's identity: what a measured result depends on (CPU model, ISA
    features, the cores this process may use, cache sizes)."""
    return {"cpu": cpu_model(), "features": sorted(cpu_features()), "cores": usable_cores(),
            "caches": cache_sizes()}


def _cache_key(kind: str, key: str) -> str:
    text = json.dumps([f"knowledge-{_VERSION}", machine(), kind, key], sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()


def store(kind: str, key: str, value: dict[str, Any]) -> None:
    """Record `value` (JSON-able) for (kind, key) on this machine, replacing any old one."""
    record = {"kind": kind, "key": key, "machine": machine(),
              "recorded_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "value": value}
    text = json.dumps(record, indent=1)  # fails here, before anything is written

    def build(tmp: Path) -> dict[str, Any]:
        (tmp / _RECORD).write_text(text)
        return {"kind": kind, "key": key}

    default_cache().put(_KIND, _cache_key(kind, key), build)


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
    """Warn, once per entry and process, that a record is not trusted."""
    if entry not in _warned:
        _warned.add(entry)
        warnings.warn(f"ignoring the knowledge record {entry}: it {why}; defaults are used "
                      "(`tessera cache clear` removes it, re-tuning replaces it)",
                      RuntimeWarning, stacklevel=2)
