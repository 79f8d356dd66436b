"""Ranking: the one place scores become ranked lists.

`top_k` is the exact top k of a score vector or matrix (highest first, ties in column order), for
every in-memory ranking (evaluation suites, metrics, the teacher's shortlists). `search_vectors` ranks
candidate vectors for query vectors by inner product through an `Index` (FAISS), for pools that are
searched rather than scored whole (M-BEIR pools, mining, served indexes); `Index.search` returns the
same `SearchResult`.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np


@dataclass
class SearchResult:
    """Top-k candidate ids and scores per query: (Q, k) arrays, best first; missing slots are ''/-inf."""

    ids: list[list[str]]
    scores: np.ndarray


def top_k(scores: np.ndarray, k: int) -> np.ndarray:
    """Column indices of the `k` highest scores, best first, ties broken by column order: (k,) for a
    score vector, (rows, k) for a matrix (fewer when there are fewer columns).

    >>> top_k(np.array([[0.1, 0.9, 0.9], [0.5, 0.2, 0.7]]), 2).tolist()
    [[1, 2], [2, 0]]
    """
    if k < 1:
        raise ValueError(f"k must be at least 1, got {k}")
    scores = np.asarray(scores)
    if scores.ndim not in (1, 2):
        raise ValueError(f"expected a score vector or matrix, got shape {scores.shape}")
    columns = scores.shape[-1]
    k = min(k, columns)
    if k == 0:
        return np.zeros((*scores.shape[:-1], 0), dtype=np.int64)
    order = np.argsort(-scores, axis=-1, kind="stable")
    return order[..., :k]


def search_vectors(
    query_vectors: np.ndarray,
    candidate_vectors: np.ndarray,
    ids: Sequence[str],
    k: int,
    factory: str = "Flat",
) -> SearchResult:
    """The top `k` of `ids` for each query by inner product, through a FAISS index built with `factory`
    ("Flat" is exact)."""
    from umarvel.retrieval.index import Index  # index.py builds on this module's primitives

    index = Index(candidate_vectors.shape[1], factory)
    index.add(candidate_vectors, list(ids))
    return index.search(query_vectors, k)
