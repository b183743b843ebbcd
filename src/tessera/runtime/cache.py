"""The on-disk artifact cache every compiled kernel and measured probe goes through.

An entry is a directory named by its key (a sha256 the caller computes from everything
that determines the artifact) holding the files plus a manifest with their sizes and
sha256s. Entries are built in a private temp directory and renamed into place, so a reader
never sees half an entry; a per-key file lock makes concurrent processes build once; an
entry whose files do not match its manifest is never loaded: it is removed and rebuilt.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import shutil
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from tessera.errors import CacheError

__all__ = ["ArtifactCache", "cache_dir", "default_cache", "sha256_file"]

_LAYOUT = "v1"  # bump when the entry format changes; old trees are then simply ignored
_MANIFEST = "manifest.json"


def cache_dir() -> Path:
    """`$TESSERA_CACHE_DIR`, else `$XDG_CACHE_HOME/tessera`, else `~/.cache/tessera`."""
    env = os.environ.get("TESSERA_CACHE_DIR")
    if env:
        return Path(env).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (Path(xdg).expanduser() if xdg else Path.home() / ".cache") / "tessera"


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


class ArtifactCache:
    """Content-addressed entries under `root/v1/<kind>/<key[:2]>/<key>/`."""

    def __init__(self, root: Path | str):
        self.root = Path(root)
        self.base = self.root / _LAYOUT

    # -- paths ------------------------------------------------------------------------
    def entry_dir(self, kind: str, key: str) -> Path:
        return self.base / kind / key[:2] / key

    def _ensure(self, path: Path) -> Path:
        try:
            path.mkdir(parents=True, exist_ok=True, mode=0o700)
        except OSError as e:
            raise CacheError(f"cannot create cache directory {path}: {e.strerror}",
                             hint="set TESSERA_CACHE_DIR to a writable directory") from e
        return path

    # -- reading ----------------------------------------------------------------------
    def lookup(self, kind: str, key: str) -> Path | None:
        """The entry's directory if it exists and every file matches its manifest."""
        entry = self.entry_dir(kind, key)
        try:
            manifest = json.loads((entry / _MANIFEST).read_text())
            files = manifest["files"]
            if manifest.get("key") != key or not files:
                return None
            for name, want in files.items():
                path = entry / name
                if path.stat().st_size != want["size"] or sha256_file(path) != want["sha256"]:
                    return None
        except (OSError, ValueError, KeyError, TypeError):
            return None
        return entry

    def manifest(self, entry: Path) -> dict[str, Any]:
        return json.loads((entry / _MANIFEST).read_text())

    def remove(self, kind: str, key: str) -> None:
        """Drop one entry (e.g. to force a re-measurement)."""
        with self.lock(kind, key):
            shutil.rmtree(self.entry_dir(kind, key), ignore_errors=True)

    # -- writing ----------------------------------------------------------------------
    @contextlib.contextmanager
    def lock(self, kind: str, key: str) -> Iterator[None]:
        """An exclusive inter-process lock on one key (released if the holder dies)."""
        locks = self._ensure(self.base / "locks")
        fd = os.open(locks / f"{kind}-{key}.lock", os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            os.close(fd)  # closing drops the flock

    def get_or_build(self, kind: str, key: str, build: Callable[[Path], dict[str, Any]]
                     ) -> tuple[Path, bool]:
        """The valid entry for `key`, building it with `build(tmpdir) -> meta` if needed.

        Returns (entry directory, whether this call built it). `build` writes its files
        into the empty directory it is given; they are hashed into the manifest.
        """
        entry = self.lookup(kind, key)
        if entry is not None:
            return entry, False
        with self.lock(kind, key):
            entry = self.lookup(kind, key)  # another process may have built it meanwhile
            if entry is not None:
                return entry, False
            return self._build(kind, key, build), True

    def put(self, kind: str, key: str, build: Callable[[Path], dict[str, Any]]) -> Path:
        """Build the entry for `key` anew and publish it in place of any old one, for
        records that change (a tuning result). A reader meanwhile finds the old entry, the
        new one, or (for the instant of the swap) none; never a mix."""
        with self.lock(kind, key):
            return self._build(kind, key, build)

    def _build(self, kind: str, key: str, build: Callable[[Path], dict[str, Any]]) -> Path:
        tmp = Path(tempfile.mkdtemp(prefix=f"{key[:12]}-", dir=self._ensure(self.base / "tmp")))
        try:
            meta = build(tmp)
            self._seal(tmp, key, meta)
            return self._publish(tmp, kind, key)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)

    def _seal(self, tmp: Path, key: str, meta: dict[str, Any]) -> None:
        files = {}
        for path in sorted(tmp.iterdir()):
            with open(path, "rb") as f:
                os.fsync(f.fileno())
            files[path.name] = {"size": path.stat().st_size, "sha256": sha256_file(path)}
        manifest = {"key": key, "created": time.time(), "files": files, "meta": meta}
        with open(tmp / _MANIFEST, "w") as f:
            json.dump(manifest, f, indent=1)
            f.flush()
            os.fsync(f.fileno())

    def _publish(self, tmp: Path, kind: str, key: str) -> Path:
        entry = self.entry_dir(kind, key)
        self._ensure(entry.parent)
        if entry.exists():  # a stale or corrupted entry: move it aside, then replace it
            stale = Path(tempfile.mkdtemp(prefix="stale-", dir=self.base / "tmp"))
            os.rename(entry, stale / "entry")
            shutil.rmtree(stale, ignore_errors=True)
        os.rename(tmp, entry)
        return entry

    # -- housekeeping -----------------------------------------------------------------
    def info(self) -> dict[str, Any]:
        """Where the cache is, and entry counts and bytes per kind."""
        kinds: dict[str, dict[str, int]] = {}
        if self.base.is_dir():
            for kind_dir in sorted(p for p in self.base.iterdir() if p.is_dir()):
                if kind_dir.name in ("tmp", "locks", "errors"):
                    continue
                entries = [p for p in kind_dir.glob("*/*") if p.is_dir()]
                size = sum(f.stat().st_size for f in kind_dir.rglob("*") if f.is_file())
                kinds[kind_dir.name] = {"entries": len(entries), "bytes": size}
        errors = self.base / "errors"
        failed = sorted(errors.iterdir()) if errors.is_dir() else []
        return {"path": str(self.root), "layout": _LAYOUT, "kinds": kinds,
                "failed_sources": len(failed),
                "total_bytes": sum(k["bytes"] for k in kinds.values())
                + sum(f.stat().st_size for f in failed)}

    def clear(self) -> int:
        """Delete every entry; returns the bytes freed. Safe beside running builders:
        they publish by rename, and a removed entry is rebuilt on next use."""
        freed = self.info()["total_bytes"]
        if self.base.is_dir():
            for child in self.base.iterdir():
                if child.name != "locks":  # live lock holders keep their inode; leave them
                    shutil.rmtree(child, ignore_errors=True)
        return freed


_default: ArtifactCache | None = None


def default_cache() -> ArtifactCache:
    """The process's cache at `cache_dir()`, re-resolved if TESSERA_CACHE_DIR changes."""
    global _default
    root = cache_dir()
    if _default is None or _default.root != root:
        _default = ArtifactCache(root)
    return _default
