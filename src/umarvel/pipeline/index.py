"""The `index` and `search` stages: embed a pool into a FAISS index folder, and query it."""

from __future__ import annotations

import dataclasses
import logging
from pathlib import Path

import numpy as np

from umarvel.config.manifest import write_manifest
from umarvel.config.schema import EmbedderConfig
from umarvel.data.records import Query
from umarvel.retrieval.index import Index, SearchResult, embedder_fingerprint

logger = logging.getLogger(__name__)


def build_index(
    config: EmbedderConfig,
    pool_path: str | Path,
    out_dir: str | Path,
    factory: str = "Flat",
    image_root: str | Path | None = None,
    cache_dir: str | Path | None = None,
    progress: bool = True,
) -> Index:
    """Embed every candidate of `pool_path` (JSONL with did / txt / img_path) and save an index folder."""
    from umarvel.modeling.embedder import Embedder
    from umarvel.pipeline.embed import read_items
    from umarvel.retrieval.encode import encode_corpus

    out_dir = Path(out_dir)
    items = read_items(pool_path, "candidate", image_root)
    ids = [item.did for item in items]  # type: ignore[union-attr]
    embedder = Embedder.from_config(config)
    vectors_path = encode_corpus(
        embedder, items, out_dir / "embeddings.npy", "candidate", cache_dir=cache_dir, progress=progress
    )
    index = Index(embedder.dim, factory, embedder_fingerprint(dataclasses.asdict(config)))
    index.add(np.load(vectors_path), ids)
    index.save(out_dir)
    write_manifest(
        out_dir,
        "index",
        config,
        inputs={"pool": pool_path},
        extra={"factory": factory, "size": index.size, "embedder": index.embedder},
    )
    return index


def search_index(
    index_dir: str | Path,
    text: str | None = None,
    image: str | Path | None = None,
    instruction: str | None = None,
    k: int = 10,
    overrides: dict | None = None,
) -> SearchResult:
    """Embed one query with the embedder that built the index and return its top k."""
    from umarvel.modeling.embedder import Embedder

    index = Index.load(index_dir)
    settings = {key: value for key, value in index.embedder.items() if value is not None}
    settings.update(overrides or {})
    embedder = Embedder.from_pretrained(settings.pop("model"), **settings)
    index.check_embedder(dataclasses.asdict(embedder.settings))
    query = Query(
        qid="query", text=text, image=Path(image) if image is not None else None, instruction=instruction
    )
    return index.search(embedder.encode_queries([query], progress=False), k)
