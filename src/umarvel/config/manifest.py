"""`manifest.json` for every output folder: resolved config, git commit, inputs with fingerprints."""

from __future__ import annotations

import dataclasses
import datetime as dt
import platform
import subprocess
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import umarvel
from umarvel.config.digest import file_digest, folder_digest
from umarvel.files import write_json

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


CPU_FLAGS = ("amx_bf16", "avx512_bf16", "avx512f", "avx2")


def machine() -> dict[str, Any]:
    """What the numbers were computed on: CPU model, the flags that decide CPU speed and bf16 support,
    the GPU if one is in use, and what `dtype: auto` resolves to here (bf16 only where native)."""
    try:
        info = Path("/proc/cpuinfo").read_text()
    except OSError:
        info = ""
    names = [line.split(":", 1)[1].strip() for line in info.splitlines() if line.startswith("model name")]
    present = set(info.split())
    flags = [flag for flag in CPU_FLAGS if flag in present]
    torch = sys.modules.get("torch")  # asked only if already imported: the config layer stays light
    gpu = None
    if torch is not None and torch.cuda.is_available():
        gpu = torch.cuda.get_device_name(0)
        auto = "bfloat16" if torch.cuda.is_bf16_supported() else "float32"
    else:
        auto = "bfloat16" if {"amx_bf16", "avx512_bf16"} & present else "float32"
    return {
        "cpu": names[0] if names else platform.processor() or platform.machine(),
        "cpu_flags": flags,
        "gpu": gpu,
        "dtype_auto": auto,
    }


def describe_machine(facts: Mapping[str, Any] | None = None) -> str:
    """One line for a table header: `CPU ... (flags ...); dtype auto = float32`."""
    facts = facts or machine()
    flags = ", ".join(facts["cpu_flags"]) or "none of " + ", ".join(CPU_FLAGS)
    device = f"GPU {facts['gpu']}" if facts["gpu"] else f"CPU {facts['cpu']} (flags: {flags})"
    return f"{device}; dtype auto = {facts['dtype_auto']}"


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
        "machine": machine(),
        "config": resolved,
        "inputs": {name: fingerprint(path) for name, path in (inputs or {}).items()},
        **(extra or {}),
    }
    path = Path(output_dir) / filename
    write_json(path, manifest)
    return path
