"""Compact indexes: int8 (SQ8) and binary codes, with float rescoring of the shortlist, saved and
loaded with their digests."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from umarvel.config.io import ConfigError
from umarvel.data.io import InputError
from umarvel.retrieval.index import Index, binary_codes
from umarvel.retrieval.search import top_k


def _vectors(n: int, dim: int, seed: int) -> np.ndarray:
    rows = np.random.default_rng(seed).standard_normal((n, dim)).astype(np.float32)
    return rows / np.linalg.norm(rows, axis=1, keepdims=True)


POOL, QUERIES = _vectors(400, 32, 0), _vectors(20, 32, 1)
IDS = [f"d{i}" for i in range(len(POOL))]


def _index(factory: str, rescore: int = 0) -> Index:
    index = Index(32, factory, rescore=rescore)
    index.add(POOL, IDS)
    return index


def test_binary_codes_are_the_packed_signs() -> None:
    codes = binary_codes(np.array([[0.5, -1, 2, -3, 0, 1, 1, -1]]))
    assert codes.tolist() == [[0b10100110]]


def test_a_binary_index_ranks_by_hamming_distance_between_sign_codes() -> None:
    found = _index("Binary").search(QUERIES, 5)
    signs_pool, signs_queries = np.where(POOL > 0, 1.0, -1.0), np.where(QUERIES > 0, 1.0, -1.0)
    cosine = signs_queries @ signs_pool.T / 32
    for row, ids in enumerate(found.ids):
        assert sorted(cosine[row, [int(d[1:]) for d in ids]], reverse=True) == pytest.approx(
            found.scores[row]
        )
        assert found.scores[row][0] == pytest.approx(cosine[row].max())


@pytest.mark.parametrize("factory", ["SQ8", "Binary"])
def test_rescoring_returns_exact_scores_and_a_wide_shortlist_recovers_exact_search(factory: str) -> None:
    exact = top_k(QUERIES @ POOL.T, 5)
    found = _index(factory, rescore=80).search(QUERIES, 5)  # 400 candidates: the whole pool
    assert found.ids == [[IDS[j] for j in row] for row in exact]
    np.testing.assert_allclose(found.scores, np.take_along_axis(QUERIES @ POOL.T, exact, axis=1), atol=1e-5)


def test_int8_codes_alone_keep_most_of_the_exact_top_10() -> None:
    exact = top_k(QUERIES @ POOL.T, 10)
    found = _index("SQ8").search(QUERIES, 10)
    overlap = np.mean([len(set(f) & {IDS[j] for j in e}) / 10 for f, e in zip(found.ids, exact, strict=True)])
    assert overlap > 0.9


def test_a_compact_index_with_rescoring_saves_and_loads_with_its_vectors(tmp_path: Path) -> None:
    index = _index("Binary", rescore=4)
    index.save(tmp_path / "idx")
    loaded = Index.load(tmp_path / "idx")
    assert loaded.binary and loaded.rescore == 4 and loaded.size == 400
    again, before = loaded.search(QUERIES, 5), index.search(QUERIES, 5)
    assert again.ids == before.ids
    np.testing.assert_allclose(again.scores, before.scores)
    (tmp_path / "idx" / "vectors.npy").write_bytes(b"changed")
    with pytest.raises(InputError, match="vectors"):
        Index.load(tmp_path / "idx")


def test_a_binary_index_needs_a_dimension_divisible_by_8() -> None:
    with pytest.raises(ConfigError, match="divisible by 8"):
        Index(30, "Binary")
    with pytest.raises(ConfigError, match="divisible by 8"):
        Index.check_factory("Binary", 30, 10)
