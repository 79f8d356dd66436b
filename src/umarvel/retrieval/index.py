"""FAISS index over candidate embeddings, with the candidate ids and a manifest naming the embedder.

An index folder holds `index.faiss`, `ids.json` (row -> did) and `index.json` (factory string, metric,
dimension, embedder fingerprint and settings). Searching with another embedder is an error.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from umarvel.config.io import ConfigError
from umarvel.config.manifest import MANIFEST
from umarvel.data.io import InputError, atomic_write, write_json
from umarvel.errors import UserError
from umarvel.retrieval.search import SearchResult, top_k

logger = logging.getLogger(__name__)

INDEX_FILE, IDS_FILE, META_FILE = "index.faiss", "ids.json", "index.json"
VECTORS_FILE = "vectors.npy"  # the float vectors of an index that rescores
BINARY = "Binary"


def binary_codes(vectors: np.ndarray) -> np.ndarray:
    """One bit per dimension, set where the coordinate is positive, packed 8 to a byte: (n, dim / 8)."""
    return np.packbits(np.asarray(vectors) > 0, axis=1)


class IndexMismatchError(UserError):
    """The embedder asked to search differs from the one that built the index."""


def embedder_record(embedder: Any) -> dict[str, Any]:
    """What an index records of the embedder that built it: the model name it was loaded from, and its
    identity (weights digest, embedding definition, numeric settings)."""
    return {"model": embedder.settings.model, **embedder.identity()}


def checked_queries(queries: np.ndarray, dim: int) -> np.ndarray:
    """`queries` as contiguous float32 (n, dim), or ValueError."""
    queries = np.ascontiguousarray(queries, dtype=np.float32)
    if queries.ndim != 2 or queries.shape[1] != dim:
        raise ValueError(f"expected queries of shape (n, {dim}), got {queries.shape}")
    return queries


def _check_binary_dim(dim: int) -> None:
    if dim % 8:
        raise ConfigError(f"a binary index needs a dimension divisible by 8, got {dim}")


def checked_rows(vectors: np.ndarray, ids: Sequence[str], dim: int, known: set[str]) -> np.ndarray:
    """`vectors` as contiguous float32 (n, dim), checked against `ids`: one id per row, none repeated
    or already in `known`."""
    vectors = np.ascontiguousarray(vectors, dtype=np.float32)
    if vectors.ndim != 2 or vectors.shape[1] != dim:
        raise ValueError(f"expected vectors of shape (n, {dim}), got {vectors.shape}")
    if len(ids) != len(vectors):
        raise ValueError(f"{len(ids)} ids for {len(vectors)} vectors")
    duplicates = [i for i in ids if i in known]
    if duplicates or len(set(ids)) != len(ids):
        raise InputError(
            None, f"duplicate candidate id {duplicates[0] if duplicates else 'within the batch'}"
        )
    return vectors


class Index:
    """Inner-product FAISS index (cosine on normalised vectors) with string ids.

    Args:
        dim: embedding dimension.
        factory: a FAISS factory string: "Flat" (exact, default), "SQ8" (int8 codes, 4x smaller),
            "IVF1024,Flat", "HNSW32", "IVF1024,PQ64", ..., or "Binary" (one bit per dimension, the
            sign, 32x smaller, searched by Hamming distance; dim must be a multiple of 8).
        embedder: the record of the embedder whose vectors go in (see `embedder_record`).
        nprobe: IVF lists visited per query (ignored by other indexes).
        rescore: when > 0, keep the float vectors too; a search takes `rescore * k` candidates from the
            compact index and ranks them by their exact inner product (float rescoring).
    """

    def __init__(
        self,
        dim: int,
        factory: str = "Flat",
        embedder: Mapping[str, Any] | None = None,
        nprobe: int = 32,
        rescore: int = 0,
    ) -> None:
        import faiss

        self.dim, self.factory, self.nprobe, self.rescore = dim, factory, nprobe, rescore
        self.embedder = dict(embedder or {})
        if factory == BINARY:
            _check_binary_dim(dim)
            self.index = faiss.IndexBinaryFlat(dim)
        else:
            self.index = faiss.index_factory(dim, factory, faiss.METRIC_INNER_PRODUCT)
        self.ids: list[str] = []
        self.vectors = np.zeros((0, dim), dtype=np.float32)  # kept only when rescoring

    @property
    def binary(self) -> bool:
        return self.factory == BINARY

    @property
    def size(self) -> int:
        return int(self.index.ntotal)

    @staticmethod
    def check_factory(factory: str, dim: int, size: int) -> None:
        """Raise ConfigError unless FAISS can build `factory` at `dim` and train it on `size` vectors (an
        IVF index needs at least as many vectors as lists): checked before anything is embedded."""
        import faiss

        if factory == BINARY:
            _check_binary_dim(dim)
            return
        try:
            built = faiss.index_factory(dim, factory, faiss.METRIC_INNER_PRODUCT)
        except RuntimeError as error:
            reason = str(error).strip().splitlines()[-1] if str(error).strip() else "unknown"
            raise ConfigError(
                f"factory {factory!r}: FAISS cannot build it at dimension {dim} ({reason})"
            ) from None
        ivf = faiss.try_extract_index_ivf(built)
        if ivf is not None and size < ivf.nlist:
            raise ConfigError(
                f"factory {factory!r} has {ivf.nlist} lists but the pool has {size} candidates: use at most "
                f"{size} lists (about {max(1, round(size**0.5))} is usual) or Flat"
            )

    def add(self, vectors: np.ndarray, ids: Sequence[str]) -> None:
        """Append rows; IVF/PQ/SQ indexes train on the first batch they are given."""
        vectors = checked_rows(vectors, ids, self.dim, set(self.ids))
        if self.binary:
            self.index.add(binary_codes(vectors))
        else:
            if not self.index.is_trained:
                logger.info("training %s on %d vectors", self.factory, len(vectors))
                self.index.train(vectors)
            self.index.add(vectors)
        if self.rescore:
            self.vectors = np.concatenate([self.vectors, vectors])
        self.ids.extend(ids)

    def search(self, queries: np.ndarray, k: int) -> SearchResult:
        import faiss

        queries = checked_queries(queries, self.dim)
        depth = min(k * max(1, self.rescore), max(1, self.size))
        if self.binary:
            distances, rows = self.index.search(binary_codes(queries), depth)
            scores = 1.0 - 2.0 * distances.astype(np.float32) / self.dim  # cosine of the sign vectors
        else:
            ivf = faiss.try_extract_index_ivf(self.index)
            if ivf is not None:
                ivf.nprobe = self.nprobe
            scores, rows = self.index.search(queries, depth)
        if self.rescore:
            scores, rows = self._rescored(queries, rows, min(k, max(1, self.size)))
        ids = [[self.ids[r] if r >= 0 else "" for r in row] for row in rows]
        return SearchResult(ids=ids, scores=np.where(rows >= 0, scores, -np.inf).astype(np.float32))

    def _rescored(self, queries: np.ndarray, rows: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """Each query's shortlist `rows` ranked by the exact inner product with the float vectors."""
        exact = np.einsum("qd,qcd->qc", queries, self.vectors[np.maximum(rows, 0)])
        exact = np.where(rows >= 0, exact, -np.inf)
        order = top_k(exact, k)
        return np.take_along_axis(exact, order, axis=1), np.take_along_axis(rows, order, axis=1)

    def check_embedder(self, record: Mapping[str, Any]) -> None:
        """Raise IndexMismatchError unless `record` matches the embedder that built the index (see
        `check_embedder_record`)."""
        check_embedder_record(self.embedder, record)

    def save(self, folder: str | Path) -> Path:
        """Write `index.faiss`, `ids.json` and `index.json`, which records both files' sha256 (checked by
        `load`)."""
        import faiss

        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        serialize = faiss.serialize_index_binary if self.binary else faiss.serialize_index
        files = {INDEX_FILE: serialize(self.index).tobytes(), IDS_FILE: json.dumps(self.ids).encode("utf-8")}
        if self.rescore:
            buffer = io.BytesIO()
            np.save(buffer, self.vectors)
            files[VECTORS_FILE] = buffer.getvalue()
        for name, data in files.items():
            with atomic_write(folder / name, "wb") as handle:
                handle.write(data)
        write_json(
            folder / META_FILE,
            {
                "dim": self.dim,
                "factory": self.factory,
                "metric": "hamming" if self.binary else "inner_product",
                "nprobe": self.nprobe,
                "rescore": self.rescore,
                "size": self.size,
                "embedder": self.embedder,
                "sha256": {name: hashlib.sha256(data).hexdigest() for name, data in files.items()},
            },
        )
        return folder

    @classmethod
    def load(cls, folder: str | Path) -> Index:
        """Open an index folder, verifying each file against the digests `index.json` records and the
        index against the folder's manifest; a changed, truncated or malformed file raises InputError."""
        import faiss

        folder = Path(folder)
        for name in (INDEX_FILE, IDS_FILE, META_FILE):
            if not (folder / name).is_file():
                raise InputError(folder, f"not an index folder: {name} is missing")
        meta = _read_json_object(folder / META_FILE)
        missing = [key for key in ("dim", "factory", "embedder", "size") if key not in meta]
        if missing:
            raise InputError(folder / META_FILE, f"malformed index record: no {', '.join(missing)}")
        names = (INDEX_FILE, IDS_FILE, VECTORS_FILE) if meta.get("rescore") else (INDEX_FILE, IDS_FILE)
        if not all((folder / name).is_file() for name in names):
            raise InputError(folder, f"not an index folder: {', '.join(names)} are needed")
        raw = {name: (folder / name).read_bytes() for name in names}
        recorded = meta.get("sha256")
        if recorded is None:
            logger.warning("%s: written before index files carried digests; not verified", folder)
        else:
            for name, data in raw.items():
                if hashlib.sha256(data).hexdigest() != recorded.get(name):
                    raise InputError(
                        folder / name,
                        f"does not match the sha256 recorded in {META_FILE} (changed or corrupted since it "
                        "was written): rebuild the index with umarvel index",
                    )
        _check_manifest(folder, meta)
        index = cls(
            meta["dim"], meta["factory"], meta["embedder"], meta.get("nprobe", 32), meta.get("rescore", 0)
        )
        deserialize = faiss.deserialize_index_binary if index.binary else faiss.deserialize_index
        try:
            index.index = deserialize(np.frombuffer(raw[INDEX_FILE], dtype=np.uint8))
        except RuntimeError:
            raise InputError(folder / INDEX_FILE, "FAISS cannot read it (truncated or corrupt)") from None
        if index.rescore:
            try:
                index.vectors = np.load(io.BytesIO(raw[VECTORS_FILE]), allow_pickle=False)
            except ValueError as error:
                raise InputError(folder / VECTORS_FILE, f"not a NumPy array ({error})") from None
            if index.vectors.shape != (index.size, index.dim):
                raise InputError(
                    folder / VECTORS_FILE, f"shape {index.vectors.shape}, expected {(index.size, index.dim)}"
                )
        try:
            index.ids = json.loads(raw[IDS_FILE].decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as error:
            raise InputError(folder / IDS_FILE, f"malformed JSON ({error})") from None
        if not isinstance(index.ids, list) or len(index.ids) != index.size or index.size != meta["size"]:
            count = len(index.ids) if isinstance(index.ids, list) else "no list of"
            raise InputError(
                folder / IDS_FILE, f"{count} ids for {index.size} vectors ({meta['size']} in {META_FILE})"
            )
        if index.index.d != meta["dim"]:
            raise InputError(
                folder / INDEX_FILE, f"dimension {index.index.d}, but {META_FILE} says {meta['dim']}"
            )
        return index


def check_embedder_record(built: Mapping[str, Any], record: Mapping[str, Any]) -> None:
    """Raise IndexMismatchError unless `record` (see `embedder_record`) has the weights and embedding
    definition of `built`, the record of the embedder that built an index; numeric settings (dtype,
    kernel) may differ, since the space is the same."""
    if not built:
        return
    if record.get("weights") != built.get("weights"):
        raise IndexMismatchError(
            f"this index was built with other weights than those of {record.get('model')!r} "
            f"(index {str(built.get('weights'))[:12]}, model {str(record.get('weights'))[:12]}): "
            "the checkpoint changed since the index was built; rebuild the index"
        )
    made, wanted = built.get("definition", {}), record.get("definition", {})
    diff = {k: (made.get(k), wanted.get(k)) for k in sorted({*made, *wanted}) if made.get(k) != wanted.get(k)}
    if diff:
        raise IndexMismatchError(
            f"this index was built with another embedding definition: (index, requested) = {diff}"
        )


def open_index(folder: str | Path) -> Any:
    """The index of a folder written by `umarvel index`: FAISS (`Index`), or the Milvus collection its
    `index.json` names (`retrieval.milvus.MilvusIndex`)."""
    folder = Path(folder)
    if (folder / META_FILE).is_file():
        meta = _read_json_object(folder / META_FILE)
        if meta.get("backend") == "milvus":
            from umarvel.retrieval.milvus import MilvusIndex  # pymilvus, the optional milvus extra

            _check_manifest(folder, meta)
            return MilvusIndex.load(folder, meta)
    return Index.load(folder)


def _read_json_object(path: Path) -> dict[str, Any]:
    try:
        value = json.loads(path.read_bytes().decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise InputError(path, f"malformed JSON ({error})") from None
    if not isinstance(value, dict):
        raise InputError(path, f"expected a JSON object, got {type(value).__name__}")
    return value


def _check_manifest(folder: Path, meta: Mapping[str, Any]) -> None:
    """The index record and the folder's manifest (written by `umarvel index`) must agree."""
    path = folder / MANIFEST
    if not path.is_file():
        return
    manifest = _read_json_object(path)
    if manifest.get("command") != "index":
        return
    for key in ("factory", "size"):
        if key in manifest and manifest[key] != meta[key]:
            raise InputError(
                folder / META_FILE,
                f"{key} is {meta[key]!r} but the folder's {MANIFEST} says {manifest[key]!r}",
            )
