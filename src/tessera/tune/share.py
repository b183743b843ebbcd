"""Sharing the knowledge base between machines: `export_records` writes this machine's
records to one JSON file, `import_records` stores a file's records here.

A file carries the exporting machine's fingerprint (`knowledge.machine()`: CPU model, ISA
features, cores, cache sizes) and a SHA-256 of its records. Import checks the whole file
before storing anything: a file that does not parse, has lost its digest match or holds a
record that is malformed (or a GEMM blocking that cannot run here) raises `ShareError`
and imports nothing. Records measured on another machine are refused, because timings
describe the machine they were taken on; `force=True` imports them anyway when the ISA
features and the core count match (the same kernels run, with the same parallelism: only
the model or cache sizes differ), stored under this machine's fingerprint and marked
with where they came from. Stores are the artifact cache's atomic replacements, so
concurrent importers and tuners never leave a broken record.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
import time
from pathlib import Path
from typing import Any

from tessera.errors import TesseraError
from tessera.runtime import knowledge
from tessera.templates.gemm.tuning import KIND as GEMM_KIND
from tessera.templates.gemm.tuning import invalid

__all__ = ["FORMAT", "ShareError", "export_records", "import_records"]

FORMAT = "tessera-knowledge-1"


class ShareError(TesseraError, ValueError):
    """A knowledge file that cannot be imported: corrupted, or from another machine."""


def export_records(path: str | Path) -> int:
    """Write this machine's records to `path` (replaced atomically); returns how many."""
    records = knowledge.records()
    doc = {"format": FORMAT, "machine": knowledge.machine(),
           "exported_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
           "sha256": _digest(records), "records": records}
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(doc, f, indent=1)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return len(records)


def import_records(path: str | Path, force: bool = False) -> int:
    """Store the records of file `path` on this machine; returns how many. Nothing is
    stored unless the whole file is intact and made on this machine (or, with `force`,
    on one with the same ISA features and core count)."""
    path = Path(path)
    try:
        doc = json.loads(path.read_text())
    except OSError as e:
        raise ShareError(f"cannot read the knowledge file {path}: {e.strerror}") from None
    except ValueError as e:
        raise ShareError(f"the knowledge file {path} is not JSON ({e}): nothing imported",
                         hint="export it again with `tessera tune export`") from None
    records = _checked(doc, path)
    theirs, ours = doc["machine"], knowledge.machine()
    if theirs != ours:
        differ = sorted(k for k in {*theirs, *ours} if theirs.get(k) != ours.get(k))
        if not force or {"features", "cores"} & set(differ):
            raise ShareError(
                f"the knowledge file {path} was made on another machine ({theirs.get('cpu')}, "
                f"{theirs.get('cores')} cores; differs in {', '.join(differ)}): its timings "
                "do not hold here, nothing imported",
                hint="tune on this machine (`tessera tune ...`)" + (
                    "; --force imports it anyway, as its ISA features and core count match"
                    if {"features", "cores"}.isdisjoint(differ) else
                    "; --force is refused too: the ISA features or core count differ"))
    for r in records:
        value = r["value"] if theirs == ours else {**r["value"],
                                                   "imported_from": theirs.get("cpu")}
        knowledge.store(r["kind"], r["key"], value, recorded_at=r["recorded_at"])
    return len(records)


def _checked(doc: Any, path: Path) -> list[dict[str, Any]]:
    """The file's records if the file is intact and every record well-formed."""
    def bad(why: str) -> ShareError:
        return ShareError(f"the knowledge file {path} is corrupted: {why}; nothing imported",
                          hint="export it again with `tessera tune export`")

    if not isinstance(doc, dict) or doc.get("format") != FORMAT:
        raise bad(f"it is not a {FORMAT} file")
    if not isinstance(doc.get("machine"), dict) or not isinstance(doc.get("records"), list):
        raise bad("it has no machine or no records")
    records = doc["records"]
    if doc.get("sha256") != _digest(records):
        raise bad("its records do not match their SHA-256 (edited or truncated)")
    for i, r in enumerate(records):
        if not (isinstance(r, dict) and set(r) == {"kind", "key", "recorded_at", "value"}
                and all(isinstance(r[k], str) for k in ("kind", "key", "recorded_at"))
                and isinstance(r["value"], dict)):
            raise bad(f"record {i} is not a knowledge record")
        why = _invalid(r["kind"], r["value"])
        if why:
            raise bad(f"record {i} ({r['kind']} {r['key']}) {why}")
    return records


def _invalid(kind: str, value: dict[str, Any]) -> str | None:
    """Why a record's value cannot be used here, for the kinds Tessera reads."""
    if kind == GEMM_KIND:
        blocking = value.get("blocking")
        why = invalid(blocking) if isinstance(blocking, dict) else "it has no blocking"
        return f"cannot run here: {why}" if why else None
    if kind == knowledge.TILE:
        t = value.get("tile")
        if not (isinstance(t, list) and len(t) == 2 and all(
                type(v) is int and v > 0 for v in t) and t[0] * t[1] <= knowledge.MAX_TILE):
            return f"has no valid tile: {t!r}"
    return None


def _digest(records: list[Any]) -> str:
    return hashlib.sha256(json.dumps(records, sort_keys=True).encode()).hexdigest()
