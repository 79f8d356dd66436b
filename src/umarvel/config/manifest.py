"""`manifest.json` for every output folder: resolved config, git commit, inputs with fingerprints."""

from __future__ import annotations

import dataclasses
import datetime as dt
import hashlib
import platform
import subprocess
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import umarvel
from umarvel.data.io import write_json

MANIFEST = "manifest.json"
_FULL_HASH_LIMIT = 64 * 2**20
_CHUNK = 2**20


def fingerprint(path: str | Path) -> dict[str, Any]:
    """Identify a file or folder: sha256 of small files; size + head/tail sha256 of large ones;
    folders hash the sorted (relative name, size) list of their files."""
    path = Path(path)
    if path.is_dir():
        digest = hashlib.sha256()
        count = 0
        for file in sorted(p for p in path.rglob("*") if p.is_file()):
            digest.update(f"{file.relative_to(path)}\0{file.stat().st_size}\n".encode())
            count += 1
        return {"path": str(path.resolve()), "kind": "folder", "files": count, "sha256": digest.hexdigest()}
    if not path.is_file():
        return {"path": str(path), "kind": "name"}
    size = path.stat().st_size
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        if size <= _FULL_HASH_LIMIT:
            for block in iter(lambda: handle.read(_CHUNK), b""):
                digest.update(block)
            kind = "sha256"
        else:
            digest.update(handle.read(_CHUNK))
            handle.seek(size - _CHUNK)
            digest.update(handle.read(_CHUNK))
            kind = "sha256-head-tail"
    return {"path": str(path.resolve()), "kind": kind, "bytes": size, "sha256": digest.hexdigest()}


def git_commit() -> str | None:
    """Commit of the umarvel source tree, when it is a git checkout."""
    source = Path(umarvel.__file__).resolve().parent
    try:
        result = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=source, capture_output=True, text=True, timeout=5, check=False
        )
    except (OSError, subprocess.TimeoutExpired):
        return None
    if result.returncode != 0:
        return None
    dirty = subprocess.run(
        ["git", "status", "--porcelain", "--untracked-files=no"],
        cwd=source,
        capture_output=True,
        text=True,
        timeout=5,
        check=False,
    ).stdout.strip()
    return result.stdout.strip() + ("-dirty" if dirty else "")


def write_manifest(
    output_dir: str | Path,
    command: str,
    config: Any,
    inputs: Mapping[str, str | Path] | None = None,
    extra: Mapping[str, Any] | None = None,
    filename: str = MANIFEST,
) -> Path:
    """Write `output_dir/<filename>` (default manifest.json) atomically and return its path."""
    resolved = dataclasses.asdict(config) if dataclasses.is_dataclass(config) else dict(config)
    manifest = {
        "command": command,
        "umarvel_version": umarvel.__version__,
        "git_commit": git_commit(),
        "created": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "python": platform.python_version(),
        "config": resolved,
        "inputs": {name: fingerprint(path) for name, path in (inputs or {}).items()},
        **(extra or {}),
    }
    path = Path(output_dir) / filename
    write_json(path, manifest)
    return path
