"""Retrieval metrics as pure functions of rankings and relevance judgements.

Rankings map a query id to candidate ids, best first; relevance maps a query id to its relevant ids
(graded relevance, where used, maps ids to gains). Every metric averages over the judged queries.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import numpy as np

from umarvel.data.io import InputError
from umarvel.retrieval.search import top_k


def _judged(ranking: Mapping[str, Sequence[str]], relevant: Mapping[str, object]) -> list[str]:
    if not relevant:
        raise ValueError("no queries with relevance judgements")
    missing = [qid for qid in relevant if qid not in ranking]
    if missing:
        raise InputError(None, f"{len(missing)} judged queries have no ranking, e.g. {missing[0]}")
    return list(relevant)


def recall_at_k(ranking: Mapping[str, Sequence[str]], relevant: Mapping[str, set[str]], k: int) -> float:
    """Hit rate (M-BEIR's recall): share of queries with at least one relevant id in their top k.

    >>> recall_at_k({"q1": ["a", "b"], "q2": ["c", "d"]}, {"q1": {"b"}, "q2": {"x"}}, k=2)
    0.5
    """
    queries = _judged(ranking, relevant)
    return sum(any(did in relevant[q] for did in ranking[q][:k]) for q in queries) / len(queries)


def recall_fraction_at_k(
    ranking: Mapping[str, Sequence[str]], relevant: Mapping[str, set[str]], k: int
) -> float:
    """Share of each query's relevant ids found in its top k, averaged over queries.

    >>> recall_fraction_at_k({"q": ["a", "x", "b"]}, {"q": {"a", "b", "c", "d"}}, k=2)
    0.25
    """
    queries = _judged(ranking, relevant)
    return sum(len(set(ranking[q][:k]) & relevant[q]) / len(relevant[q]) for q in queries) / len(queries)


def average_precision_at_k(ranked: Sequence[str], relevant: set[str], k: int) -> float:
    """AP@k with the denominator min(|relevant|, k), as CIRCO's mAP@k.

    >>> average_precision_at_k(["a", "x", "b"], {"a", "b"}, k=3)
    0.8333333333333333
    """
    hits, total = 0, 0.0
    for rank, did in enumerate(ranked[:k], start=1):
        if did in relevant:
            hits += 1
            total += hits / rank
    return total / min(len(relevant), k) if relevant else 0.0


def map_at_k(ranking: Mapping[str, Sequence[str]], relevant: Mapping[str, set[str]], k: int) -> float:
    queries = _judged(ranking, relevant)
    return sum(average_precision_at_k(ranking[q], relevant[q], k) for q in queries) / len(queries)


def ndcg_at_k(
    ranking: Mapping[str, Sequence[str]], gains: Mapping[str, Mapping[str, float]], k: int
) -> float:
    """nDCG@k with linear gains and log2 discounts (BEIR / pytrec_eval convention).

    >>> round(ndcg_at_k({"q": ["x", "a"]}, {"q": {"a": 1}}, k=10), 4)
    0.6309
    """
    queries = _judged(ranking, gains)
    total = 0.0
    for q in queries:
        dcg = sum(gains[q].get(did, 0.0) / math.log2(rank + 1) for rank, did in enumerate(ranking[q][:k], 1))
        ideal = sorted((g for g in gains[q].values() if g > 0), reverse=True)[:k]
        idcg = sum(g / math.log2(rank + 1) for rank, g in enumerate(ideal, 1))
        total += dcg / idcg if idcg > 0 else 0.0
    return total / len(queries)


def mrr_at_k(ranking: Mapping[str, Sequence[str]], relevant: Mapping[str, set[str]], k: int) -> float:
    """Mean reciprocal rank of the first relevant id within the top k.

    >>> mrr_at_k({"q1": ["x", "a"], "q2": ["b"]}, {"q1": {"a"}, "q2": {"b"}}, k=10)
    0.75
    """
    queries = _judged(ranking, relevant)
    total = 0.0
    for q in queries:
        for rank, did in enumerate(ranking[q][:k], start=1):
            if did in relevant[q]:
                total += 1.0 / rank
                break
    return total / len(queries)


def pairwise_accuracy(positive_scores: Sequence[float], negative_scores: Sequence[float]) -> float:
    """Image-text matching accuracy: share of items scoring their positive above their negative.

    >>> pairwise_accuracy([0.9, 0.2], [0.1, 0.5])
    0.5
    """
    if len(positive_scores) != len(negative_scores) or not positive_scores:
        raise ValueError("need equally many positive and negative scores, at least one")
    return sum(p > n for p, n in zip(positive_scores, negative_scores, strict=True)) / len(positive_scores)


def hits_at_k(ranking: Mapping[str, Sequence[str]], relevant: Mapping[str, set[str]], k: int) -> list[int]:
    """Per judged query (in `relevant`'s order), 1 when a relevant id is in its top k: the values
    `recall_at_k` averages, kept for confidence intervals."""
    return [int(any(did in relevant[q] for did in ranking[q][:k])) for q in _judged(ranking, relevant)]


def hit_rate(scores: np.ndarray, relevant: Sequence[Sequence[int]], k: int) -> float:
    """`recall_at_k` over a score matrix (rows queries, columns candidates), in percent to 2 places:
    the share of rows with a relevant column among their top k (ties broken by column order).

    >>> hit_rate(np.array([[0.9, 0.1], [0.2, 0.8]]), [[1], [1]], k=1)
    50.0
    """
    top = top_k(scores, k)
    hits = [bool(set(row.tolist()) & set(rel)) for row, rel in zip(top, relevant, strict=True)]
    return round(100 * float(np.mean(hits)), 2)


def mean_average_precision(scores: np.ndarray, relevant: Sequence[Sequence[int]], k: int) -> float:
    """`map_at_k` over a score matrix, in percent to 2 places, CIRCO's definition (the sum over the top
    k of precision@i x rel_i, divided by min(k, |relevant|)); rows without a relevant column are left
    out."""
    top = top_k(scores, k)
    values = [
        average_precision_at_k(row.tolist(), set(rel), k)
        for row, rel in zip(top, relevant, strict=True)
        if rel
    ]
    return round(100 * float(np.mean(values)), 2) if values else 0.0


def bootstrap_interval(
    groups: Sequence[Sequence[float]], level: float = 0.95, resamples: int = 2000, seed: int = 0
) -> tuple[float, float]:
    """A percentile bootstrap interval, in percent, for the mean over groups of each group's mean
    (an M-BEIR average is the mean of its rows' recalls). Queries are resampled within their group,
    so every resample keeps each row's size; the seed makes it reproducible.

    >>> bootstrap_interval([[1, 1, 1, 1]])
    (100.0, 100.0)
    """
    import numpy as np

    arrays = [np.asarray(g, dtype=np.float64) for g in groups if len(g)]
    if not arrays:
        raise ValueError("no values to resample")
    rng = np.random.default_rng(seed)
    means = np.zeros(resamples)
    for values in arrays:
        picks = rng.integers(0, len(values), size=(resamples, len(values)))
        means += values[picks].mean(axis=1)
    means *= 100 / len(arrays)
    tail = (1 - level) / 2
    low, high = np.quantile(means, [tail, 1 - tail])
    return round(float(low), 2), round(float(high), 2)
