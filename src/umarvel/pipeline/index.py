"""The `index` and `search` stages: embed a pool into a FAISS index folder, and query it.

An index folder also keeps `candidates.jsonl` (did, txt, img_path) and the candidates' images under
`media/` (hard links where the file system allows, else copies), so a re-ranker or a server reads
nothing outside the index folder.
"""

from __future__ import annotations

import hashlib
import logging
import os
import shutil
from pathlib import Path
from typing import Any

import numpy as np

from umarvel.config.io import ConfigError
from umarvel.config.manifest import write_manifest
from umarvel.config.schema import EmbedderConfig
from umarvel.data.io import InputError, read_jsonl, write_jsonl
from umarvel.data.records import Candidate, Query
from umarvel.distributed import run_on_main
from umarvel.pipeline.embed import read_items
from umarvel.retrieval.encode import encode_corpus
from umarvel.retrieval.index import Index, SearchResult, embedder_record, open_index

CANDIDATES_FILE = "candidates.jsonl"
MEDIA_DIR = "media"


def _keep_media(image: Path, folder: Path) -> str:
    """Link (or copy) `image` into `folder/media/` under a content-derived name; returns the path
    relative to `folder`."""
    resolved = image.resolve()
    name = hashlib.sha256(str(resolved).encode()).hexdigest()[:24] + resolved.suffix.lower()
    target = folder / MEDIA_DIR / name
    if not target.exists():
        target.parent.mkdir(parents=True, exist_ok=True)
        try:
            os.link(resolved, target)
        except OSError:
            shutil.copyfile(resolved, target)
    return f"{MEDIA_DIR}/{name}"


logger = logging.getLogger(__name__)


def build_index(
    config: EmbedderConfig,
    pool_path: str | Path,
    out_dir: str | Path,
    factory: str = "Flat",
    image_root: str | Path | None = None,
    cache_dir: str | Path | None = None,
    progress: bool = True,
    backend: str = "faiss",
    uri: str | None = None,
    collection: str | None = None,
    rescore: int = 0,
) -> int:
    """Embed every candidate of `pool_path` (JSONL with did / txt / img_path) into an index folder;
    returns the number of candidates indexed (`open_index(out_dir)` opens it).

    backend: `faiss` (the index inside the folder, built with `factory`) or `milvus` (the vectors in
    the collection `collection` at `uri`: a Milvus Lite file, default `out_dir/vectors.db`, or a server;
    the token comes from $MILVUS_TOKEN); rescore: keep the float vectors and rank `rescore * k`
    candidates of a compact index (SQ8, Binary) by their exact score."""
    from umarvel.modeling.embedder import Embedder

    out_dir = Path(out_dir)
    items = read_items(pool_path, "candidate", image_root)
    ids = [item.did for item in items]  # type: ignore[union-attr]
    first: dict[str, str | None] = {}
    for item in items:
        if item.did in first:  # type: ignore[union-attr]
            raise InputError(item.source, f"duplicate did {item.did!r} (first at {first[item.did]})")  # type: ignore[union-attr]
        first[item.did] = item.source  # type: ignore[union-attr]
    embedder = Embedder.from_config(config)
    if backend == "faiss":
        Index.check_factory(factory, embedder.dim, len(items))
    elif backend != "milvus":
        raise ConfigError(f"backend must be faiss or milvus, got {backend!r}")
    vectors_path = encode_corpus(
        embedder, items, out_dir / "embeddings.npy", "candidate", cache_dir=cache_dir, progress=progress
    )
    # The encoding above was shared among the processes; the index folder is written by rank 0 alone.
    store = (backend, uri or str(out_dir / "vectors.db"), collection or _collection_name(out_dir))
    return run_on_main(
        _save, embedder, config, items, ids, vectors_path, pool_path, out_dir, factory, store, rescore
    )


def _collection_name(folder: Path) -> str:
    """A Milvus collection name from an index folder's name (letters, digits and underscores)."""
    name = "".join(c if c.isalnum() else "_" for c in folder.resolve().name)
    return f"umarvel_{name}"[:255]


def _save(
    embedder: Any,
    config: EmbedderConfig,
    items: list,
    ids: list[str],
    vectors_path: Path,
    pool_path: str | Path,
    out_dir: Path,
    factory: str,
    store: tuple[str, str, str] = ("faiss", "", ""),
    rescore: int = 0,
) -> int:
    """The index, `candidates.jsonl` with the candidates' media, and the manifest, into `out_dir`;
    returns the number of candidates indexed."""
    backend, uri, collection = store
    if backend == "milvus":
        from umarvel.retrieval.milvus import MilvusIndex  # pymilvus, the optional milvus extra

        out_dir.mkdir(parents=True, exist_ok=True)
        token = os.environ.get("MILVUS_TOKEN")
        index: Any = MilvusIndex(embedder.dim, uri, collection, embedder_record(embedder), token, fresh=True)
        factory = index.factory
    else:
        index = Index(embedder.dim, factory, embedder_record(embedder), rescore=rescore)
    index.add(np.load(vectors_path), ids)
    index.save(out_dir)
    write_jsonl(
        out_dir / CANDIDATES_FILE,
        (
            {
                "did": item.did,
                "txt": item.text,
                "img_path": _keep_media(Path(item.image), out_dir) if item.image is not None else None,
                "video_path": _keep_media(Path(item.video), out_dir) if item.video is not None else None,
            }
            for item in items
        ),
    )
    write_manifest(
        out_dir,
        "index",
        config,
        inputs={"pool": pool_path},
        extra={"factory": factory, "size": index.size, "embedder": index.embedder},
    )
    return index.size


def read_candidates(index_dir: str | Path, wanted: set[str]) -> dict[str, Candidate]:
    """The candidates `wanted` from an index folder's `candidates.jsonl`."""
    folder = Path(index_dir).resolve()
    path = folder / CANDIDATES_FILE
    if not path.is_file():
        raise InputError(path, "this index has no candidates file (built before re-ranking support?)")
    found = {}
    for number, record in read_jsonl(path):
        if record["did"] in wanted:
            where = f"{path}:{number}"
            found[record["did"]] = Candidate(
                did=record["did"],
                text=record.get("txt"),
                image=media_path(folder, record.get("img_path"), where),
                video=media_path(folder, record.get("video_path"), where),
            )
    return found


def media_path(folder: Path, relative: str | None, where: str) -> Path | None:
    """The absolute path of a candidate image named in `candidates.jsonl`; it must lie inside the
    index folder (an edited file cannot point the server elsewhere)."""
    if not relative:
        return None
    resolved = (folder / relative).resolve()
    if not resolved.is_relative_to(folder):
        raise InputError(where, f"image path {relative!r} leaves the index folder")
    return resolved


def load_index_embedder(index_dir: str | Path, overrides: dict | None = None) -> tuple[Any, Any]:
    """The index in `index_dir` and the embedder that built it (runtime `overrides` such as dtype)."""
    from umarvel.modeling.embedder import Embedder

    index = open_index(index_dir)
    record = index.embedder
    numeric = record.get("numeric", {})
    settings = {
        **record.get("definition", {}),
        **({"dtype": numeric["dtype"]} if numeric.get("dtype") in ("float32", "bfloat16", "float16") else {}),
        **(overrides or {}),
    }
    embedder = Embedder.from_pretrained(record["model"], **settings)
    index.check_embedder(embedder_record(embedder))
    return index, embedder


def search_index(
    index_dir: str | Path,
    text: str | None = None,
    image: str | Path | None = None,
    instruction: str | None = None,
    k: int = 10,
    overrides: dict | None = None,
    reranker: str | None = None,
    rerank_top: int = 50,
    fusion_weight: float | None = None,
) -> SearchResult:
    """Embed one query with the embedder that built the index and return its top k.

    With `reranker`, the top `rerank_top` are re-scored cos + w * P(Yes) (U-MARVEL+) and re-sorted; w is
    `fusion_weight`, else the re-ranker's tuned weight, else 0.1."""
    if k < 1 or rerank_top < 1:
        raise ConfigError(f"k and rerank_top must be at least 1, got {k} and {rerank_top}")
    index, embedder = load_index_embedder(index_dir, overrides)
    query = Query(
        qid="query", text=text, image=Path(image) if image is not None else None, instruction=instruction
    )
    vectors = embedder.encode_queries([query], progress=False)
    if reranker is None:
        return index.search(vectors, k)
    from umarvel.reranker.model import Reranker
    from umarvel.reranker.scoring import DEFAULT_WEIGHT, rerank_hits

    found = index.search(vectors, max(k, rerank_top))
    ranked = [(d, float(s)) for d, s in zip(found.ids[0], found.scores[0], strict=True) if d]
    ranker = Reranker.from_pretrained(reranker)
    weight = fusion_weight if fusion_weight is not None else ranker.fusion.get("weight", DEFAULT_WEIGHT)
    records = read_candidates(index_dir, {d for d, _ in ranked[:rerank_top]})
    fused = rerank_hits(ranker, query, ranked, records, rerank_top, float(weight))[:k]
    return SearchResult(
        ids=[[d for d, _ in fused]], scores=np.array([[s for _, s in fused]], dtype=np.float32)
    )
