"""Dense retrieval of held-aside queries against the union of their candidates, scored by recall@k."""

from __future__ import annotations

from collections.abc import Sequence

from umarvel.data.training import TrainRow
from umarvel.evaluation.metrics import recall_at_k
from umarvel.modeling.embedder import Embedder
from umarvel.retrieval.search import top_k


def evaluate_rows(
    embedder: Embedder,
    rows: Sequence[TrainRow],
    ks: Sequence[int] = (1, 5, 10),
    batch_size: int | None = None,
    progress: bool = True,
) -> dict[str, float]:
    """Embed each row's query and every distinct candidate among the rows' positives, rank candidates
    by cosine, and report recall@k (hit rate) in percent, with the candidate count."""
    candidates = {}
    for row in rows:
        for positive in row.positives:
            candidates.setdefault(positive.did, positive)
    dids = list(candidates)
    query_vectors = embedder.encode_queries([r.query for r in rows], batch_size=batch_size, progress=progress)
    candidate_vectors = embedder.encode_candidates(
        list(candidates.values()), batch_size=batch_size, progress=progress
    )
    scores = query_vectors @ candidate_vectors.T  # (Q, C)
    top = top_k(scores, max(ks))
    ranking = {f"{i}": [dids[j] for j in top[i]] for i in range(len(rows))}
    relevant = {f"{i}": {p.did for p in row.positives} for i, row in enumerate(rows)}
    result = {f"recall@{k}": round(100 * recall_at_k(ranking, relevant, k), 2) for k in ks}
    result["queries"], result["candidates"] = len(rows), len(dids)
    return result
