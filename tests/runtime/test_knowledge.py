"""The per-machine knowledge base: round trips, atomic replacement, and records that are
corrupted or from another machine are ignored (with one warning), never trusted."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import warnings

import pytest

from tessera.runtime import knowledge
from tessera.runtime.cache import default_cache


@pytest.fixture(autouse=True)
def own_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("TESSERA_CACHE_DIR", str(tmp_path))


def _entry():
    """The directory of the single record in the cache."""
    (entry,) = (default_cache().base / "knowledge").glob("*/*")
    return entry


def _put_raw(text: str) -> None:
    """An entry for ("k", "p") on this machine holding `text`, intact by its manifest."""
    def build(tmp):
        (tmp / "record.json").write_text(text)
        return {}
    default_cache().put("knowledge", knowledge._cache_key("k", "p"), build)


def test_round_trip_and_listing():
    assert knowledge.load("gemm.blocking", "float32") is None and knowledge.records() == []
    knowledge.store("gemm.blocking", "float32", {"mr": 8, "nested": {"a": [1, 2.5]}})
    knowledge.store("other", "k", {"x": 1})
    assert knowledge.load("gemm.blocking", "float32") == {"mr": 8, "nested": {"a": [1, 2.5]}}
    assert knowledge.load("gemm.blocking", "other-key") is None
    listed = knowledge.records()
    assert [(r["kind"], r["key"]) for r in listed] == [("gemm.blocking", "float32"), ("other", "k")]
    assert listed[1]["value"] == {"x": 1} and listed[1]["recorded_at"]


def test_store_replaces_whole_records_and_leaves_no_temporaries():
    knowledge.store("k", "p", {"v": 1})
    knowledge.store("k", "p", {"v": 2})
    assert knowledge.load("k", "p") == {"v": 2}
    with pytest.raises(TypeError):  # not JSON: refused before anything is written
        knowledge.store("k", "p", {"v": object()})
    assert knowledge.load("k", "p") == {"v": 2}
    assert not list((default_cache().base / "tmp").iterdir())
    assert json.loads((_entry() / "record.json").read_text())["machine"] == knowledge.machine()


def test_concurrent_writers_and_a_reader_never_see_a_broken_record(tmp_path):
    code = ("import sys; from tessera.runtime import knowledge\n"
            "for i in range(60): knowledge.store('k', 'p', {'writer': sys.argv[1], 'i': i})\n")
    reader = ("from tessera.runtime import knowledge\n"
              "seen = [knowledge.load('k', 'p') for _ in range(600)]\n"
              "assert all(v is None or set(v) == {'writer', 'i'} for v in seen), seen\n")
    env = {**os.environ, "TESSERA_CACHE_DIR": str(tmp_path)}
    procs = [subprocess.Popen([sys.executable, "-c", code, str(w)], env=env) for w in range(3)]
    procs.append(subprocess.Popen([sys.executable, "-W", "error", "-c", reader], env=env))
    assert [p.wait(timeout=120) for p in procs] == [0, 0, 0, 0]
    assert knowledge.load("k", "p")["i"] == 59


def test_corrupted_record_is_ignored_with_one_warning():
    knowledge.store("k", "p", {"v": 1})
    (_entry() / "record.json").write_text('{"value": {"v": 666}}')  # breaks the manifest hash
    with pytest.warns(RuntimeWarning, match="corrupted"):
        assert knowledge.load("k", "p") is None
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert knowledge.load("k", "p") is None and knowledge.records() == []
    knowledge.store("k", "p", {"v": 2})  # a new record replaces the broken one
    assert knowledge.load("k", "p") == {"v": 2}


def test_record_that_is_not_a_record_is_ignored():
    _put_raw("[1, 2]")
    with pytest.warns(RuntimeWarning, match="not a knowledge record"):
        assert knowledge.load("k", "p") is None


def test_another_machines_records_are_not_used(monkeypatch):
    other = {**knowledge.machine(), "cpu": "Some Other CPU", "cores": 1024}
    with monkeypatch.context() as m:
        m.setattr(knowledge, "machine", lambda: other)
        knowledge.store("k", "p", {"v": "theirs"})
        assert knowledge.load("k", "p") == {"v": "theirs"}
    with warnings.catch_warnings():  # a shared cache directory: silently theirs
        warnings.simplefilter("error")
        assert knowledge.load("k", "p") is None and knowledge.records() == []
    # their record under this machine's key (copied or forged): ignored, with a warning
    theirs = json.loads((_entry() / "record.json").read_text())
    _put_raw(json.dumps(theirs))
    with pytest.warns(RuntimeWarning, match="another machine"):
        assert knowledge.load("k", "p") is None


def test_tile_lookups_are_kept_in_memory_until_reload():
    key = knowledge.tile_key("k", "32x40", "float32")
    assert knowledge.tile("k", "32x40", "float32", (64, 48)) == (64, 48)  # no record
    knowledge.store(knowledge.TILE, key, {"tile": [8, 48]})  # a store forgets the memo
    assert knowledge.tile("k", "32x40", "float32", (64, 48), fixed_bn=True) == (8, 48)
    default_cache().clear()  # another process clears the cache: this one keeps its answer
    assert knowledge.tile("k", "32x40", "float32", (64, 48)) == (8, 48)
    knowledge.reload()
    assert knowledge.tile("k", "32x40", "float32", (64, 48)) == (64, 48)


def test_trying_answers_every_lookup_and_notes_it():
    knowledge.store(knowledge.TILE, knowledge.tile_key("k", "8", "int32"), {"tile": [1, 64]})
    with knowledge.trying(None) as seen:  # the defaults, records not read
        assert knowledge.tile("k", "8", "int32", (1, 2048)) == (1, 2048)
    assert seen == [{"kernel": "k", "shape": "8", "dtype": "int32", "default": (1, 2048),
                     "fixed_bn": False}]
    with knowledge.trying((4, 16)):
        assert knowledge.tile("other", "8", "int32", (1, 2048)) == (4, 16)
    assert knowledge.tile("k", "8", "int32", (1, 2048)) == (1, 64)


@pytest.mark.parametrize("tile", [[0, 48], [8], "8x48", [1024, 1024]])
def test_tile_records_that_do_not_fit_are_ignored(tile):
    knowledge.store(knowledge.TILE, knowledge.tile_key("k", "1x1", "float32"), {"tile": tile})
    with pytest.warns(RuntimeWarning, match="does not fit"):
        assert knowledge.tile("k", "1x1", "float32", (64, 48)) == (64, 48)
