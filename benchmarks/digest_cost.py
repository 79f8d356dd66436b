"""What content identity costs: the full sha256 of a 1 GB file (first time, and again through the digest
cache), against the head/tail shortcut it replaced, and a folder of many small files (an image folder).

Writes digest_cost.json and digest_cost.md to --output-dir. Figures are seconds on this machine, measured
side by side in one run; the page cache is warm for the file after it is written (a checkpoint is hashed
right after it is saved), so the cold figure is sha256 itself, not the disk.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import tempfile
import time
from pathlib import Path


def _cpu_flags() -> str:
    """The flags that matter here: native bf16 (amx_bf16, avx512_bf16), avx512f, and SHA extensions."""
    try:
        present = set(Path("/proc/cpuinfo").read_text().split())
    except OSError:
        return "unknown"
    wanted = ("amx_bf16", "avx512_bf16", "avx512f", "avx2", "sha_ni")
    have = [f for f in wanted if f in present]
    lacking = [f for f in wanted if f not in present]
    return ", ".join(have) + ("; no " + ", ".join(lacking) if lacking else "")


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _head_tail(path: Path) -> str:
    """The shortcut umarvel used before: sha256 of the first and last MiB."""
    size, digest = path.stat().st_size, hashlib.sha256()
    with path.open("rb") as handle:
        digest.update(handle.read(2**20))
        handle.seek(size - 2**20)
        digest.update(handle.read(2**20))
    return digest.hexdigest()


def _timed(function, *args) -> tuple[float, object]:
    started = time.perf_counter()
    value = function(*args)
    return time.perf_counter() - started, value


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--output-dir", type=Path, default=Path("benchmarks/results"))
    parser.add_argument("--gigabytes", type=float, default=1.0)
    parser.add_argument("--small-files", type=int, default=2000)
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="digest-cost-"))
    os.environ["UMARVEL_CACHE_DIR"] = str(work / "cache")
    from umarvel.config.digest import file_digest, folder_digest, hash_file

    big = work / "weights.safetensors"
    block = os.urandom(2**24)
    with big.open("wb") as handle:
        for _ in range(int(args.gigabytes * 2**30) // len(block)):
            handle.write(block)
    size = big.stat().st_size
    folder = work / "images"
    folder.mkdir()
    for i in range(args.small_files):
        (folder / f"{i:05d}.jpg").write_bytes(os.urandom(60_000))
    results = {
        "machine": {
            "cpu": _cpu_name(),
            "flags": _cpu_flags(),
            "cores": os.cpu_count(),
        },
        "file_bytes": size,
        "head_tail_s": _timed(_head_tail, big)[0],
        "full_sha256_s": _timed(hash_file, big)[0],
        "first_digest_s": _timed(file_digest, big)[0],
        "cached_digest_s": _timed(file_digest, big)[0],
        "folder_files": args.small_files,
        "folder_bytes": args.small_files * 60_000,
        "folder_first_s": _timed(folder_digest, folder)[0],
        "folder_cached_s": _timed(folder_digest, folder)[0],
    }
    results["full_sha256_gb_per_s"] = size / results["full_sha256_s"] / 1e9
    args.output_dir.mkdir(parents=True, exist_ok=True)
    (args.output_dir / "digest_cost.json").write_text(json.dumps(results, indent=2) + "\n")
    gib = size / 2**30
    lines = [
        f"# Digest cost ({results['machine']['cpu']}, {results['machine']['cores']} cores; "
        f"flags: {results['machine']['flags']})",
        "",
        "| what | seconds |",
        "|---|---|",
        f"| {gib:.2f} GiB file: head/tail shortcut (first + last MiB, the old fingerprint) | "
        f"{results['head_tail_s']:.4f} |",
        f"| {gib:.2f} GiB file: full sha256 ({results['full_sha256_gb_per_s']:.2f} GB/s) | "
        f"{results['full_sha256_s']:.2f} |",
        f"| {gib:.2f} GiB file: `file_digest`, first time (hash + cache entry) | "
        f"{results['first_digest_s']:.2f} |",
        f"| {gib:.2f} GiB file: `file_digest` again, unchanged (one stat + cache lookup) | "
        f"{results['cached_digest_s']:.5f} |",
        f"| folder of {args.small_files} files of 60 kB: `folder_digest`, first time | "
        f"{results['folder_first_s']:.2f} |",
        f"| same folder again, unchanged | {results['folder_cached_s']:.3f} |",
    ]
    (args.output_dir / "digest_cost.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    for path in sorted(work.rglob("*"), reverse=True):
        path.rmdir() if path.is_dir() else path.unlink()
    work.rmdir()


if __name__ == "__main__":
    main()
