"""FAISS index: exact search equals brute force, IVF is close, save/load round-trips, mismatches raise."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from umarvel.retrieval.index import Index, IndexMismatchError


def _unit(n: int, d: int, seed: int) -> np.ndarray:
    x = np.random.default_rng(seed).standard_normal((n, d)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def test_exact_search_matches_brute_force_top_k() -> None:
    corpus, queries = _unit(500, 32, 0), _unit(20, 32, 1)
    index = Index(32)
    index.add(corpus, [f"d{i}" for i in range(500)])
    result = index.search(queries, 10)
    expected = np.argsort(-(queries @ corpus.T), axis=1)[:, :10]
    assert result.ids == [[f"d{j}" for j in row] for row in expected]
    np.testing.assert_allclose(result.scores, np.sort(queries @ corpus.T, axis=1)[:, ::-1][:, :10], rtol=1e-5)


def _clustered(n: int, d: int, seed: int, centres: int = 200) -> np.ndarray:
    """Random unit vectors around random centres: the structure real embeddings have."""
    rng = np.random.default_rng(seed)
    centre = _unit(centres, d, 99)[rng.integers(0, centres, n)]
    x = centre + 0.35 * rng.standard_normal((n, d)).astype(np.float32) / np.sqrt(d)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def test_ivf_recall_at_10_is_at_least_0_9_of_exact() -> None:
    corpus, queries = _clustered(20_000, 64, 2), _clustered(100, 64, 3)
    ids = [f"d{i}" for i in range(len(corpus))]
    exact, ivf = Index(64), Index(64, "IVF64,Flat", nprobe=16)
    exact.add(corpus, ids)
    ivf.add(corpus, ids)
    truth, found = exact.search(queries, 10).ids, ivf.search(queries, 10).ids
    overlap = np.mean([len(set(a) & set(b)) / 10 for a, b in zip(truth, found, strict=True)])
    assert overlap >= 0.9


def test_an_index_round_trips_through_its_folder(tmp_path: Path) -> None:
    corpus = _unit(50, 16, 4)
    index = Index(16, embedder={"model": "tiny:qwen2_vl"})
    index.add(corpus, [f"d{i}" for i in range(50)])
    loaded = Index.load(index.save(tmp_path / "idx"))
    assert loaded.ids == index.ids and loaded.embedder == index.embedder
    assert loaded.search(corpus[:3], 1).ids == [["d0"], ["d1"], ["d2"]]


RECORD = {
    "model": "offline",
    "weights": "a" * 64,
    "definition": {"pooling": "mean", "attention": "bidirectional"},
    "numeric": {"dtype": "float32", "attn": "sdpa"},
}


def test_searching_with_another_embedding_definition_raises() -> None:
    index = Index(8, embedder=RECORD)
    index.check_embedder(RECORD)
    with pytest.raises(IndexMismatchError, match="pooling"):
        index.check_embedder({**RECORD, "definition": {**RECORD["definition"], "pooling": "last_token"}})


def test_searching_with_changed_weights_raises() -> None:
    with pytest.raises(IndexMismatchError, match="other weights"):
        Index(8, embedder=RECORD).check_embedder({**RECORD, "weights": "b" * 64})


def test_searching_in_another_dtype_is_allowed() -> None:
    Index(8, embedder=RECORD).check_embedder({**RECORD, "numeric": {"dtype": "bfloat16", "attn": "sdpa"}})


def test_duplicate_ids_are_refused() -> None:
    index = Index(4)
    index.add(_unit(2, 4, 5), ["a", "b"])
    with pytest.raises(ValueError, match="duplicate candidate id a"):
        index.add(_unit(1, 4, 6), ["a"])
