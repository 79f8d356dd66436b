"""Our retrieval metrics against pytrec_eval (trec_eval's own code), on the same seeded random runs."""

from __future__ import annotations

import random

import numpy as np
import pytest

from umarvel.evaluation.metrics import (
    hit_rate,
    map_at_k,
    mean_average_precision,
    mrr_at_k,
    ndcg_at_k,
    recall_at_k,
    recall_fraction_at_k,
)

pytrec_eval = pytest.importorskip("pytrec_eval")

K = 10


def _random_runs(seed: int, queries: int = 40, pool: int = 30, max_relevant: int = K):
    """Rankings of `K` distinct ids per query and 1..max_relevant relevant ids each (some unranked)."""
    rng = random.Random(seed)
    ids = [f"d{i}" for i in range(pool)]
    ranking = {f"q{q}": rng.sample(ids, K) for q in range(queries)}
    relevant = {f"q{q}": set(rng.sample(ids, rng.randint(1, max_relevant))) for q in range(queries)}
    return ranking, relevant


def _trec(ranking, relevant, measures):
    qrels = {q: {d: 1 for d in dids} for q, dids in relevant.items()}
    # trec_eval ranks by score: give the ranked ids descending scores.
    run = {q: {d: float(len(dids) - i) for i, d in enumerate(dids)} for q, dids in ranking.items()}
    per_query = pytrec_eval.RelevanceEvaluator(qrels, measures).evaluate(run)
    return {m: float(np.mean([v[m] for v in per_query.values()])) for m in next(iter(per_query.values()))}


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_recall_ndcg_mrr_and_hit_rate_equal_trec_eval(seed: int) -> None:
    ranking, relevant = _random_runs(seed)
    trec = _trec(ranking, relevant, {"recall.5,10", "ndcg_cut.5,10", "recip_rank", "success.1,5,10"})
    for k in (5, 10):
        assert recall_fraction_at_k(ranking, relevant, k) == pytest.approx(trec[f"recall_{k}"], abs=1e-9)
        assert ndcg_at_k(ranking, {q: dict.fromkeys(r, 1) for q, r in relevant.items()}, k) == pytest.approx(
            trec[f"ndcg_cut_{k}"],
            abs=1e-4,  # trec_eval prints 4 decimals of each query's nDCG
        )
    for k in (1, 5, 10):  # M-BEIR's recall is trec_eval's success
        assert recall_at_k(ranking, relevant, k) == pytest.approx(trec[f"success_{k}"], abs=1e-9)
    assert mrr_at_k(ranking, relevant, K) == pytest.approx(trec["recip_rank"], abs=1e-9)


@pytest.mark.parametrize("seed", [0, 1])
def test_map_at_k_equals_trec_eval_where_no_query_has_more_relevant_ids_than_k(seed: int) -> None:
    # trec_eval divides by |relevant|; CIRCO's mAP@k (ours) by min(|relevant|, k): equal when |relevant| <= k.
    ranking, relevant = _random_runs(seed, max_relevant=5)
    trec = _trec(ranking, relevant, {"map_cut.5,10"})
    for k in (5, 10):
        assert map_at_k(ranking, relevant, k) == pytest.approx(trec[f"map_cut_{k}"], abs=1e-4)


def test_the_score_matrix_metrics_equal_the_ranking_metrics_on_the_same_ranking() -> None:
    rng = np.random.default_rng(3)
    scores = rng.standard_normal((25, 18))
    relevant = [sorted(rng.choice(18, size=rng.integers(1, 4), replace=False).tolist()) for _ in range(25)]
    order = np.argsort(-scores, axis=1, kind="stable")
    ranking = {str(i): [str(c) for c in row] for i, row in enumerate(order)}
    judged = {str(i): {str(c) for c in rel} for i, rel in enumerate(relevant)}
    for k in (1, 5, 10):
        assert hit_rate(scores, relevant, k) == pytest.approx(
            100 * recall_at_k(ranking, judged, k), abs=0.006
        )
        assert mean_average_precision(scores, relevant, k) == pytest.approx(
            100 * map_at_k(ranking, judged, k), abs=0.006
        )
