"""FAISS index over candidate embeddings, with the candidate ids and a manifest naming the embedder.

An index folder holds `index.faiss`, `ids.json` (row -> did) and `index.json` (factory string, metric,
dimension, embedder fingerprint and settings). Searching with another embedder is an error.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from umarvel.data.io import atomic_write, write_json

logger = logging.getLogger(__name__)

INDEX_FILE, IDS_FILE, META_FILE = "index.faiss", "ids.json", "index.json"


class IndexMismatchError(ValueError):
    """The embedder asked to search differs from the one that built the index."""


def embedder_record(embedder: Any) -> dict[str, Any]:
    """What an index records of the embedder that built it: the model name it was loaded from, and its
    identity (weights digest, embedding definition, numeric settings)."""
    return {"model": embedder.settings.model, **embedder.identity()}


@dataclass
class SearchResult:
    """Top-k candidate ids and scores per query: (Q, k) arrays, best first; missing slots are ''/-inf."""

    ids: list[list[str]]
    scores: np.ndarray


class Index:
    """Inner-product FAISS index (cosine on normalised vectors) with string ids.

    Args:
        dim: embedding dimension.
        factory: a FAISS factory string: "Flat" (exact, default), "IVF1024,Flat", "HNSW32",
            "IVF1024,PQ64", ...
        embedder: the record of the embedder whose vectors go in (see `embedder_record`).
        nprobe: IVF lists visited per query (ignored by other indexes).
    """

    def __init__(
        self, dim: int, factory: str = "Flat", embedder: Mapping[str, Any] | None = None, nprobe: int = 32
    ) -> None:
        import faiss

        self.dim, self.factory, self.nprobe = dim, factory, nprobe
        self.embedder = dict(embedder or {})
        self.index = faiss.index_factory(dim, factory, faiss.METRIC_INNER_PRODUCT)
        self.ids: list[str] = []

    @property
    def size(self) -> int:
        return int(self.index.ntotal)

    def add(self, vectors: np.ndarray, ids: Sequence[str]) -> None:
        """Append rows; IVF/PQ indexes train on the first batch they are given."""
        vectors = np.ascontiguousarray(vectors, dtype=np.float32)
        if vectors.ndim != 2 or vectors.shape[1] != self.dim:
            raise ValueError(f"expected vectors of shape (n, {self.dim}), got {vectors.shape}")
        if len(ids) != len(vectors):
            raise ValueError(f"{len(ids)} ids for {len(vectors)} vectors")
        known = set(self.ids)
        duplicates = [i for i in ids if i in known]
        if duplicates or len(set(ids)) != len(ids):
            raise ValueError(f"duplicate candidate id {duplicates[0] if duplicates else 'within the batch'}")
        if not self.index.is_trained:
            logger.info("training %s on %d vectors", self.factory, len(vectors))
            self.index.train(vectors)
        self.index.add(vectors)
        self.ids.extend(ids)

    def search(self, queries: np.ndarray, k: int) -> SearchResult:
        import faiss

        queries = np.ascontiguousarray(queries, dtype=np.float32)
        if queries.ndim != 2 or queries.shape[1] != self.dim:
            raise ValueError(f"expected queries of shape (n, {self.dim}), got {queries.shape}")
        ivf = faiss.try_extract_index_ivf(self.index)
        if ivf is not None:
            ivf.nprobe = self.nprobe
        scores, rows = self.index.search(queries, min(k, max(1, self.size)))
        ids = [[self.ids[r] if r >= 0 else "" for r in row] for row in rows]
        return SearchResult(ids=ids, scores=np.where(rows >= 0, scores, -np.inf))

    def check_embedder(self, record: Mapping[str, Any]) -> None:
        """Raise IndexMismatchError unless `record` (see `embedder_record`) has the index's weights and
        embedding definition; numeric settings (dtype, kernel) may differ, since the space is the same."""
        if not self.embedder:
            return
        if record.get("weights") != self.embedder.get("weights"):
            raise IndexMismatchError(
                f"this index was built with other weights than those of {record.get('model')!r} "
                f"(index {str(self.embedder.get('weights'))[:12]}, model {str(record.get('weights'))[:12]}): "
                "the checkpoint changed since the index was built; rebuild the index"
            )
        built, wanted = self.embedder.get("definition", {}), record.get("definition", {})
        diff = {
            k: (built.get(k), wanted.get(k))
            for k in sorted({*built, *wanted})
            if built.get(k) != wanted.get(k)
        }
        if diff:
            raise IndexMismatchError(
                f"this index was built with another embedding definition: (index, requested) = {diff}"
            )

    def save(self, folder: str | Path) -> Path:
        import faiss

        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        with atomic_write(folder / INDEX_FILE, "wb") as handle:
            handle.write(faiss.serialize_index(self.index).tobytes())
        with atomic_write(folder / IDS_FILE) as handle:
            json.dump(self.ids, handle)
        write_json(
            folder / META_FILE,
            {
                "dim": self.dim,
                "factory": self.factory,
                "metric": "inner_product",
                "nprobe": self.nprobe,
                "size": self.size,
                "embedder": self.embedder,
            },
        )
        return folder

    @classmethod
    def load(cls, folder: str | Path) -> Index:
        import faiss

        folder = Path(folder)
        for name in (INDEX_FILE, IDS_FILE, META_FILE):
            if not (folder / name).is_file():
                raise FileNotFoundError(f"{folder} is not an index folder: {name} is missing")
        meta = json.loads((folder / META_FILE).read_text())
        index = cls(meta["dim"], meta["factory"], meta["embedder"], meta.get("nprobe", 32))
        index.index = faiss.deserialize_index(
            np.frombuffer((folder / INDEX_FILE).read_bytes(), dtype=np.uint8)
        )
        index.ids = json.loads((folder / IDS_FILE).read_text())
        if len(index.ids) != index.size:
            raise ValueError(f"{folder}: {len(index.ids)} ids for {index.size} vectors")
        return index
