"""Corpus encoding at scale: resumable shards, a content-addressed cache, and sharding across processes.

`encode_corpus` writes `shard-NNNNN.npy` files under a parts folder as it goes, so a killed run resumes
where it stopped; with a cache folder, an item whose content and embedder settings were embedded before
is never embedded again. Under torchrun / `accelerate launch`, each process
encodes every world-size-th shard, rank 0 assembles the result after a barrier, and every process
returns it (umarvel/distributed.py).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Literal

import numpy as np
from PIL import Image

from umarvel.config.digest import digests_of, file_digest
from umarvel.data.io import OutputLock, atomic_write
from umarvel.data.records import Candidate, Query
from umarvel.distributed import barrier, broadcast, each_rank_does, my_share, run_on_main, world

logger = logging.getLogger(__name__)

Role = Literal["query", "candidate"]
Item = Query | Candidate


def _media_signature(media: object) -> str:
    """An image or video file by its content digest (a missing file by its name: reading it fails
    later, naming the file); in-memory images by their pixels."""
    if media is None:
        return ""
    if isinstance(media, Image.Image):
        return (
            "pixels:" + hashlib.sha256(media.tobytes() + str((media.mode, media.size)).encode()).hexdigest()
        )
    try:
        return "sha256:" + file_digest(Path(str(media)))
    except OSError:
        return f"missing:{media}"


def prime_media_digests(items: Sequence[Item]) -> None:
    """Digest every existing media file of `items` in one batch (cached in one transaction), so the
    `item_key`s that follow read them from memory instead of one cache write per file."""
    media = [
        Path(str(m))
        for item in items
        for m in (item.image, item.video, *(item.images if isinstance(item, Query) else ()))
        if m is not None and not isinstance(m, Image.Image)
    ]
    digests_of(dict.fromkeys(p for p in media if p.is_file()))


def item_key(item: Item, role: Role, instruction: str | None, fingerprint: str) -> str:
    """Content address of one embedding: the embedder's fingerprint (weights digest and embedding
    definition), role, instruction, text, and the content digests of its image, video and earlier images."""
    own = item.instruction if isinstance(item, Query) and item.instruction is not None else instruction
    if role == "candidate":
        own = None
    parts = [fingerprint, role, own, item.text, _media_signature(item.image)]
    if item.video is not None:
        parts.append(_media_signature(item.video))
    if isinstance(item, Query) and item.images:
        parts.append([_media_signature(p) for p in item.images])
    payload = json.dumps(parts)
    return hashlib.sha256(payload.encode()).hexdigest()


class EmbeddingCache:
    """Content-addressed store of embeddings for one embedder (a subfolder named by its fingerprint):
    shard files of (keys, vectors)."""

    def __init__(self, folder: str | Path, fingerprint: str) -> None:
        self.folder = Path(folder) / fingerprint[:16]
        self.folder.mkdir(parents=True, exist_ok=True)
        self.vectors: dict[str, np.ndarray] = {}
        for shard in sorted(self.folder.glob("cache-*.npz")):
            with np.load(shard) as data:
                self.vectors.update(zip(data["keys"].tolist(), data["vectors"], strict=True))

    def get(self, key: str) -> np.ndarray | None:
        return self.vectors.get(key)

    def put(self, keys: Sequence[str], vectors: np.ndarray) -> None:
        if not keys:
            return
        name = f"cache-{time.time_ns()}-{os.getpid()}.npz"
        with atomic_write(self.folder / name, "wb") as handle:
            np.savez(handle, keys=np.array(keys), vectors=vectors.astype(np.float32))
        self.vectors.update(zip(keys, vectors, strict=True))


def encode_corpus(
    embedder: object,
    items: Sequence[Item],
    output: str | Path,
    role: Role = "candidate",
    instruction: str | None = None,
    shard_size: int | None = None,
    cache_dir: str | Path | None = None,
    progress: bool = True,
) -> Path:
    """Embed `items` into `output` (.npy, float32, input order), resumably; returns the output path.

    Args:
        embedder: an `Embedder`.
        items: queries or candidates.
        output: the .npy file to write; `<output>.parts/` holds finished shards until the end.
        role: "query" (instructions apply) or "candidate".
        instruction: for queries without their own.
        shard_size: items per shard (the unit of resumption and of work split across processes);
            default: the embedder's `shard_size` setting.
        cache_dir: content-addressed cache; items embedded before with the same settings are reused.

    Under torchrun / accelerate launch every rank calls this with the same items: each encodes every
    world-size-th shard, rank 0 assembles the output once all shards are written, and every rank returns
    the finished output. An error on any rank is raised on every rank. A second process writing the same
    output at the same time is refused (InputError; `.<output>.lock`).
    """
    output = Path(output)
    current = world()
    # One writer per output: rank 0 of this run holds the lock; a second run fails at once.
    lock = OutputLock(output)
    if not broadcast(lock.acquire() if current.main else True):
        raise lock.refusal()
    try:
        return _encode_corpus(embedder, items, output, role, instruction, cache_dir, progress, shard_size)
    finally:
        lock.release()


def _encode_corpus(
    embedder: object,
    items: Sequence[Item],
    output: Path,
    role: Role,
    instruction: str | None,
    cache_dir: str | Path | None,
    progress: bool,
    shard_size: int | None,
) -> Path:
    fingerprint = embedder.fingerprint  # type: ignore[attr-defined]
    parts = output.with_name(output.name + ".parts")
    parts.mkdir(parents=True, exist_ok=True)
    shard_size = shard_size or embedder.settings.shard_size  # type: ignore[attr-defined]
    prime_media_digests(items)
    keys = [item_key(item, role, instruction, fingerprint) for item in items]
    # A finished output remembers the content hash of everything in it: the same call returns at once.
    done_key = hashlib.sha256("".join(keys).encode()).hexdigest()
    key_file = output.with_name(output.name + ".key")
    current = world()
    up_to_date = broadcast(output.is_file() and key_file.is_file() and key_file.read_text() == done_key)
    if up_to_date:
        logger.info("%s is up to date (%d items)", output, len(items))
        return output
    cache = EmbeddingCache(cache_dir, fingerprint) if cache_dir is not None else None
    # A shard file is named by the hash of its items' content keys: a rerun reuses exactly the shards
    # whose items, settings and image files are unchanged.
    shards = []
    for index, start in enumerate(range(0, len(items), shard_size)):
        end = min(start + shard_size, len(items))
        digest = hashlib.sha256("".join(keys[start:end]).encode()).hexdigest()[:16]
        shards.append((parts / f"shard-{index:05d}-{digest}.npy", start, end))
    if current.main:
        wanted = {path.name for path, _, _ in shards}
        for stale in parts.glob("shard-*.npy"):
            if stale.name not in wanted:
                stale.unlink()
    barrier()
    mine = [(number, *shard) for number, shard in my_share(shards)]
    each_rank_does(
        lambda: _encode_shards(
            embedder, items, keys, mine, role, instruction, cache, progress and current.main
        ),
        f"encoding {output}",
    )
    return run_on_main(_assemble, embedder, shards, output, key_file, done_key, parts)


def _encode_shards(
    embedder: object,
    items: Sequence[Item],
    keys: Sequence[str],
    shards: Sequence[tuple[int, Path, int, int]],
    role: Role,
    instruction: str | None,
    cache: EmbeddingCache | None,
    progress: bool,
) -> None:
    """Encode this rank's shards that are not written yet (cache hits are copied, not encoded)."""
    started, encoded = time.perf_counter(), 0
    for number, path, start, end in shards:
        if path.is_file():
            continue
        vectors = np.zeros((end - start, embedder.dim), dtype=np.float32)  # type: ignore[attr-defined]
        todo = []
        for offset, key in enumerate(keys[start:end]):
            hit = cache.get(key) if cache is not None else None
            if hit is None:
                todo.append(offset)
            else:
                vectors[offset] = hit
        if todo:
            chunk = [items[start + o] for o in todo]
            if role == "query":
                fresh = embedder.encode_queries(chunk, instruction=instruction, progress=progress)  # type: ignore[attr-defined]
            else:
                fresh = embedder.encode_candidates(chunk, progress=progress)  # type: ignore[attr-defined]
            vectors[todo] = fresh
            encoded += len(todo)
            if cache is not None:
                cache.put([keys[start + o] for o in todo], fresh)
        with atomic_write(path, "wb") as handle:
            np.save(handle, vectors)
        logger.info("shard %d: items %d-%d (%d from cache)", number, start + 1, end, end - start - len(todo))
    if encoded:
        logger.info("embedded %d items at %.1f items/s", encoded, encoded / (time.perf_counter() - started))


def _assemble(
    embedder: object,
    shards: Sequence[tuple[Path, int, int]],
    output: Path,
    key_file: Path,
    done_key: str,
    parts: Path,
) -> Path:
    """Concatenate the shards into `output` (rank 0, once every rank's shards are written)."""
    missing = [path.name for path, _, _ in shards if not path.is_file()]
    if missing:
        raise RuntimeError(f"{parts}: shards {missing[:3]} were not written (was another writer here?)")
    dim = embedder.dim  # type: ignore[attr-defined]
    matrix = np.concatenate([np.load(p) for p, _, _ in shards]) if shards else np.zeros((0, dim), np.float32)
    with atomic_write(output, "wb") as handle:
        np.save(handle, matrix)
    key_file.write_text(done_key)
    shutil.rmtree(parts)
    return output
