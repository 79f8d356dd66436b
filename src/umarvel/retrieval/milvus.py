"""A Milvus backend beside FAISS: the candidate vectors live in a Milvus collection.

The same `pymilvus` client talks to Milvus Lite (a local file, `uri="idx/vectors.db"`, the embedded
engine that the tests run) and to a Milvus server or cluster (`uri="http://host:19530"`, with
`token="user:password"` where it needs one). The collection holds the candidate id (the primary key)
and its vector, under an exact (FLAT) inner-product index, so results equal FAISS's Flat search.

The index folder keeps `index.json` with `backend: milvus`, the URI, the collection and the
embedder's record, beside `candidates.jsonl` and the media, so `search` and `serve` open it like a
FAISS folder (`retrieval.index.open_index`). A relative Milvus Lite path is stored relative to the
folder. The token is never written. It comes from `$MILVUS_TOKEN` when the folder is opened.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from umarvel.config.io import ConfigError
from umarvel.data.io import InputError, write_json
from umarvel.retrieval.index import (
    META_FILE,
    SearchResult,
    check_embedder_record,
    checked_queries,
    checked_rows,
)

logger = logging.getLogger(__name__)

BACKEND = "milvus"
INSERT_BATCH = 1000


def _client(uri: str, token: str | None) -> Any:
    try:
        from pymilvus import MilvusClient
    except ImportError:
        raise ConfigError("the Milvus backend needs pymilvus: pip install 'umarvel[milvus]'") from None
    try:
        return MilvusClient(uri=uri, token=token or "")
    except Exception as error:  # pymilvus raises its own MilvusException and connection errors
        raise ConfigError(f"cannot connect to Milvus at {uri}: {error}") from None


def _is_local(uri: str) -> bool:
    return "://" not in uri


class MilvusIndex:
    """Inner-product search over a Milvus collection, with the interface of `Index` (add, search,
    size, check_embedder, save).

    Args:
        dim: embedding dimension.
        uri: a Milvus Lite file path or a server URI.
        collection: the collection name.
        embedder: the record of the embedder whose vectors go in.
        token: credentials for a server (never saved).
        fresh: drop any collection of this name and create it empty (building an index).
    """

    factory = "milvus:FLAT"

    def __init__(
        self,
        dim: int,
        uri: str,
        collection: str,
        embedder: Mapping[str, Any] | None = None,
        token: str | None = None,
        fresh: bool = False,
    ) -> None:
        self.dim, self.uri, self.collection = dim, uri, collection
        self.embedder = dict(embedder or {})
        self.client = _client(uri, token)
        self._ids: set[str] = set()
        self._loaded = False
        if fresh:
            if self.client.has_collection(collection):
                logger.warning("Milvus collection %s at %s exists; replacing it", collection, uri)
                self.client.drop_collection(collection)
            self._create()
        elif not self.client.has_collection(collection):
            raise InputError(None, f"Milvus at {uri} has no collection {collection!r}; rebuild the index")

    def _create(self) -> None:
        from pymilvus import DataType

        schema = self.client.create_schema(auto_id=False, enable_dynamic_field=False)
        schema.add_field("id", DataType.VARCHAR, is_primary=True, max_length=512)
        schema.add_field("vector", DataType.FLOAT_VECTOR, dim=self.dim)
        params = self.client.prepare_index_params()
        params.add_index(field_name="vector", index_type="FLAT", metric_type="IP")
        self.client.create_collection(self.collection, schema=schema, index_params=params)

    @property
    def size(self) -> int:
        stats = self.client.get_collection_stats(self.collection)
        return int(stats.get("row_count", 0))

    def add(self, vectors: np.ndarray, ids: Sequence[str]) -> None:
        """Insert rows (ids must be new: Milvus itself would keep both copies of a repeated key)."""
        vectors = checked_rows(vectors, ids, self.dim, self._ids)
        too_long = [i for i in ids if len(i.encode()) > 512]
        if too_long:
            raise InputError(
                None, f"candidate id {too_long[0][:40]!r}... is over 512 bytes, Milvus's key limit"
            )
        for start in range(0, len(ids), INSERT_BATCH):
            rows = [
                {"id": did, "vector": vector.tolist()}
                for did, vector in zip(
                    ids[start : start + INSERT_BATCH], vectors[start : start + INSERT_BATCH], strict=True
                )
            ]
            self.client.insert(self.collection, rows)
        self._ids.update(ids)
        self.client.flush(self.collection)

    def search(self, queries: np.ndarray, k: int) -> SearchResult:
        queries = checked_queries(queries, self.dim)
        if not self._loaded:  # into memory once per client, not once per search
            self.client.load_collection(self.collection)
            self._loaded = True
        found = self.client.search(
            self.collection,
            data=queries.tolist(),
            limit=max(1, k),
            search_params={"metric_type": "IP"},
            output_fields=[],
        )
        ids = [[""] * k for _ in range(len(queries))]
        scores = np.full((len(queries), k), -np.inf, dtype=np.float32)
        for row, hits in enumerate(found):
            # Ties are broken by id, so the order does not depend on Milvus's segment layout.
            ordered = sorted(hits, key=lambda hit: (-float(hit["distance"]), str(hit["id"])))[:k]
            for rank, hit in enumerate(ordered):
                ids[row][rank] = str(hit["id"])
                scores[row, rank] = float(hit["distance"])
        # Exact (FLAT) search returns min(k, collection size) hits, Index.search's width, without asking
        # the server for the size on every search.
        width = max(1, max((len(hits) for hits in found), default=0))
        return SearchResult(ids=[r[:width] for r in ids], scores=scores[:, :width])

    def check_embedder(self, record: Mapping[str, Any]) -> None:
        check_embedder_record(self.embedder, record)

    def save(self, folder: str | Path) -> Path:
        """Write the folder's `index.json` (backend, URI, collection, embedder; no token)."""
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        uri = self.uri
        if _is_local(uri):
            path = Path(uri).resolve()
            uri = (
                os.path.relpath(path, folder.resolve())
                if path.is_relative_to(folder.resolve())
                else str(path)
            )
        write_json(
            folder / META_FILE,
            {
                "backend": BACKEND,
                "uri": uri,
                "collection": self.collection,
                "dim": self.dim,
                "factory": self.factory,
                "metric": "inner_product",
                "size": self.size,
                "embedder": self.embedder,
            },
        )
        return folder

    @classmethod
    def load(cls, folder: str | Path, meta: Mapping[str, Any]) -> MilvusIndex:
        """Open the collection an index folder names (its `index.json` already read as `meta`)."""
        folder = Path(folder)
        missing = [key for key in ("uri", "collection", "dim", "embedder", "size") if key not in meta]
        if missing:
            raise InputError(folder / META_FILE, f"malformed Milvus index record: no {', '.join(missing)}")
        uri = str(meta["uri"])
        if _is_local(uri) and not Path(uri).is_absolute():
            uri = str(folder / uri)
        if _is_local(uri) and not Path(uri).exists():
            raise InputError(folder / META_FILE, f"names the Milvus Lite file {uri}, which is missing")
        index = cls(
            int(meta["dim"]), uri, str(meta["collection"]), meta["embedder"], os.environ.get("MILVUS_TOKEN")
        )
        if index.size != meta["size"]:
            raise InputError(
                folder / META_FILE,
                f"the collection {meta['collection']!r} holds {index.size} vectors, "
                f"{META_FILE} says {meta['size']}",
            )
        return index
