"""`manifest.json` for every output folder: resolved config, git commit, inputs with fingerprints."""

from __future__ import annotations

import dataclasses
import datetime as dt
import platform
import subprocess
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import umarvel
from umarvel.config.digest import file_digest, folder_digest
from umarvel.data.io import write_json

MANIFEST = "manifest.json"


def fingerprint(path: str | Path) -> dict[str, Any]:
    """Identify a file or folder by its full content digest (config/digest.py; cached, so cheap when
    unchanged). A path that does not exist is recorded by name only."""
    path = Path(path)
    if path.is_dir():
        return {"path": str(path.resolve()), "kind": "folder", "sha256": folder_digest(path)}
    if not path.is_file():
        return {"path": str(path), "kind": "name"}
    return {
        "path": str(path.resolve()),
        "kind": "file",
        "bytes": path.stat().st_size,
        "sha256": file_digest(path),
    }


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
