"""The one ranking path: exact top k, and the FAISS index against brute force."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from umarvel.retrieval.search import search_vectors, top_k

# Small integers make ties common, which is where rankings differ.
scores_matrix = arrays(
    np.float32,
    st.tuples(st.integers(1, 6), st.integers(1, 12)),
    elements=st.integers(-3, 3).map(float),
)


@settings(max_examples=200, deadline=None, database=None, derandomize=True)
@given(scores=scores_matrix, k=st.integers(1, 15))
def test_top_k_is_the_brute_force_order_with_ties_in_column_order(scores: np.ndarray, k: int) -> None:
    expected = [sorted(range(len(row)), key=lambda j, row=row: (-row[j], j))[:k] for row in scores]
    assert top_k(scores, k).tolist() == expected


def test_top_k_of_a_vector_is_a_vector_and_k_below_one_is_refused() -> None:
    assert top_k(np.array([0.2, 0.5, 0.1]), 2).tolist() == [1, 0]
    with pytest.raises(ValueError, match="at least 1"):
        top_k(np.array([0.2]), 0)


@settings(max_examples=50, deadline=None, database=None, derandomize=True)
@given(seed=st.integers(0, 2**16), queries=st.integers(1, 5), pool=st.integers(1, 40), k=st.integers(1, 10))
def test_the_flat_index_returns_the_exact_top_k(seed: int, queries: int, pool: int, k: int) -> None:
    rng = np.random.default_rng(seed)
    q = rng.standard_normal((queries, 8)).astype(np.float32)
    c = rng.standard_normal((pool, 8)).astype(np.float32)
    ids = [f"d{i}" for i in range(pool)]
    found = search_vectors(q, c, ids, k)
    exact = top_k(q @ c.T, k)
    # Random float vectors have no ties, so the orders must agree exactly.
    assert found.ids == [[ids[j] for j in row] for row in exact]
    np.testing.assert_allclose(found.scores, np.take_along_axis(q @ c.T, exact, axis=1), rtol=1e-5, atol=1e-5)
