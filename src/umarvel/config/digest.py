"""Content digests: what identifies every artifact (checkpoints, data files, folders, caches).

A digest is the full sha256 of a file's bytes, never a head/tail shortcut. A folder's digest hashes the
sorted (relative name, file digest) list of its content files; provenance files (manifests, the digest
record itself, a re-ranker's tuned fusion weight) are left out, so writing them never changes what the
folder is. Digests are cached by (path, size, mtime, ctime, inode) in a small SQLite file, so hashing an
unchanged file again costs one `stat`; any write to a file changes its ctime and forces a rehash.

The cache lives in `$UMARVEL_CACHE_DIR` (default `~/.cache/umarvel`); where that cannot be written, an
in-process cache is used instead.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import sqlite3
import threading
from collections.abc import Iterable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from umarvel.errors import UserError
from umarvel.files import write_json

logger = logging.getLogger(__name__)

DIGEST_FILE = "umarvel_digest.json"
# Files that describe how or when an artifact was made, not what it is.
PROVENANCE = frozenset(
    {DIGEST_FILE, "manifest.json", "fusion.json", "fusion_manifest.json", "stage.json", "run.json"}
)
_BLOCK = 4 * 2**20


def cache_dir() -> Path:
    """Where umarvel keeps machine-local caches (digests)."""
    configured = os.environ.get("UMARVEL_CACHE_DIR")
    if configured:
        return Path(configured)
    base = os.environ.get("XDG_CACHE_HOME")
    return (Path(base) if base else Path.home() / ".cache") / "umarvel"


def json_digest(value: Any) -> str:
    """sha256 of `value` as canonical JSON (sorted keys)."""
    return hashlib.sha256(json.dumps(value, sort_keys=True, default=str).encode()).hexdigest()


def hash_file(path: str | Path) -> str:
    """The full sha256 of a file, streamed in 4 MiB blocks (no cache)."""
    digest = hashlib.sha256()
    with Path(path).open("rb") as handle:
        for block in iter(lambda: handle.read(_BLOCK), b""):
            digest.update(block)
    return digest.hexdigest()


def _signature(stat: os.stat_result) -> str:
    return f"{stat.st_size}:{stat.st_mtime_ns}:{stat.st_ctime_ns}:{stat.st_ino}"


class DigestCache:
    """(resolved path, stat signature) -> sha256, in SQLite shared by every process on the machine."""

    def __init__(self, folder: Path | None = None) -> None:
        self.memory: dict[str, tuple[str, str]] = {}
        self.lock = threading.Lock()
        self.db: sqlite3.Connection | None = None
        folder = folder or cache_dir()
        try:
            folder.mkdir(parents=True, exist_ok=True)
            self.db = sqlite3.connect(folder / "digests.sqlite", timeout=60, check_same_thread=False)
            self.db.execute("PRAGMA journal_mode=WAL")
            self.db.execute("PRAGMA synchronous=NORMAL")
            self.db.execute(
                "CREATE TABLE IF NOT EXISTS digests (path TEXT PRIMARY KEY, signature TEXT, sha256 TEXT)"
            )
            self.db.commit()
        except (OSError, sqlite3.Error) as error:
            logger.debug("digest cache in %s unavailable (%s); caching in memory only", folder, error)
            self.db = None

    def get(self, path: str, signature: str) -> str | None:
        with self.lock:
            hit = self.memory.get(path)
            if hit is not None and hit[0] == signature:
                return hit[1]
            if self.db is None:
                return None
            try:
                row = self.db.execute(
                    "SELECT signature, sha256 FROM digests WHERE path = ?", (path,)
                ).fetchone()
            except sqlite3.Error:
                return None
        if row is not None and row[0] == signature:
            self.memory[path] = (signature, row[1])
            return str(row[1])
        return None

    def put_many(self, entries: Iterable[tuple[str, str, str]]) -> None:
        """Store (path, signature, sha256) entries in one transaction."""
        entries = list(entries)
        with self.lock:
            for path, signature, sha256 in entries:
                self.memory[path] = (signature, sha256)
            if self.db is None or not entries:
                return
            with contextlib.suppress(sqlite3.Error):
                self.db.executemany("INSERT OR REPLACE INTO digests VALUES (?, ?, ?)", entries)
                self.db.commit()


_cache: DigestCache | None = None
_cache_key: str | None = None


def digest_cache() -> DigestCache:
    """The process-wide cache (reopened when `UMARVEL_CACHE_DIR` changes)."""
    global _cache, _cache_key
    key = str(cache_dir())
    if _cache is None or _cache_key != key:
        _cache, _cache_key = DigestCache(Path(key)), key
    return _cache


def digests_of(paths: Iterable[str | Path]) -> list[str]:
    """The full sha256 of each file: unchanged files from the cache, the others hashed on a few threads
    and cached in one transaction (a file written while it was hashed keeps no cache entry)."""
    cache = digest_cache()
    resolved = [Path(path).resolve() for path in paths]
    signatures = [_signature(path.stat()) for path in resolved]
    values = [cache.get(str(path), sig) for path, sig in zip(resolved, signatures, strict=True)]
    missing = [i for i, value in enumerate(values) if value is None]
    if missing:
        with ThreadPoolExecutor(max_workers=min(4, len(missing))) as pool:
            for i, value in zip(missing, pool.map(hash_file, [resolved[i] for i in missing]), strict=True):
                values[i] = value
        cache.put_many(
            (str(resolved[i]), signatures[i], values[i])
            for i in missing
            if _signature(resolved[i].stat()) == signatures[i]
        )
    return values  # type: ignore[return-value]


def file_digest(path: str | Path) -> str:
    """The full sha256 of a file, from the cache when the file is unchanged."""
    return digests_of([path])[0]


def content_files(folder: str | Path, exclude: Iterable[str] = PROVENANCE) -> list[Path]:
    """A folder's content files, sorted: provenance files and hidden temporary files left out."""
    folder = Path(folder)
    skip = set(exclude)
    return sorted(
        path
        for path in folder.rglob("*")
        if path.is_file() and path.name not in skip and not path.name.startswith(".")
    )


def file_digests(folder: str | Path, exclude: Iterable[str] = PROVENANCE) -> dict[str, str]:
    """relative name -> sha256 for every content file of `folder` (see `digests_of`)."""
    folder = Path(folder)
    files = content_files(folder, exclude)
    return {
        path.relative_to(folder).as_posix(): value
        for path, value in zip(files, digests_of(files), strict=True)
    }


def combine(digests: dict[str, str]) -> str:
    """The folder digest of a name -> file digest mapping."""
    digest = hashlib.sha256()
    for name in sorted(digests):
        digest.update(f"{name}\0{digests[name]}\n".encode())
    return digest.hexdigest()


def folder_digest(folder: str | Path, exclude: Iterable[str] = PROVENANCE) -> str:
    """The digest of a folder's content files (see module docstring)."""
    return combine(file_digests(folder, exclude))


def content_digest(path: str | Path) -> str:
    """The digest of a file or a folder; a missing path raises FileNotFoundError."""
    path = Path(path)
    if path.is_dir():
        return folder_digest(path)
    if path.is_file():
        return file_digest(path)
    raise UserError(f"{path}: no such file or folder")


def record_digests(folder: str | Path) -> str:
    """Hash a checkpoint folder just written, store `umarvel_digest.json` in it and return its digest.

    The files are read back right after they are written, so they come from the page cache."""
    folder = Path(folder)
    paths = content_files(folder)
    values = [hash_file(path) for path in paths]
    digest_cache().put_many(
        (str(path.resolve()), _signature(path.resolve().stat()), value)
        for path, value in zip(paths, values, strict=True)
    )
    files = {path.relative_to(folder).as_posix(): value for path, value in zip(paths, values, strict=True)}
    digest = combine(files)
    write_json(folder / DIGEST_FILE, {"sha256": digest, "files": files})
    return digest
