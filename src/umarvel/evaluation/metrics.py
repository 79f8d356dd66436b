"""Retrieval metrics as pure functions of rankings and relevance sets."""

from __future__ import annotations

from collections.abc import Mapping, Sequence


def recall_at_k(ranking: Mapping[str, Sequence[str]], relevant: Mapping[str, set[str]], k: int) -> float:
    """Hit rate (M-BEIR's recall): share of queries with at least one relevant id in their top k.

    >>> recall_at_k({"q1": ["a", "b"], "q2": ["c", "d"]}, {"q1": {"b"}, "q2": {"x"}}, k=2)
    0.5
    """
    if not relevant:
        raise ValueError("no queries with relevance judgements")
    hits = 0
    for qid, wanted in relevant.items():
        if qid not in ranking:
            raise KeyError(f"query {qid} has relevance judgements but no ranking")
        hits += any(did in wanted for did in ranking[qid][:k])
    return hits / len(relevant)
