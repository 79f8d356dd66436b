"""Choosing hard negatives from a query's shortlist, with false-negative filters (method doc section 5).

Rules, applied in this order, each counted in the audit:
    positive     a labelled positive is never a negative;
    duplicate    same normalised text or same image file as a positive (a copy of the answer);
    threshold    score above an absolute cosine (the paper's 0.7);
    margin       score above the best positive's score minus a margin (relative to the query);
    relative     score above a fraction of the best positive's score (NV-Retriever's TopK-PercPos: 0.95
                 drops candidates within 5 % of the positive; unlike a margin, it scales with how
                 spread the model's scores are);
then k negatives are taken from the rank window [rank_start, rank_end) of what is left: the top k, or
k sampled, seeded by (seed, row).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Literal

from umarvel.data.sampling import row_rng

RULES = ("positive", "duplicate", "threshold", "margin", "relative")


@dataclass(frozen=True)
class NegativeRules:
    """Filter and selection settings (see module docstring)."""

    k: int = 5
    max_score: float | None = 0.7
    margin: float | None = None
    relative: float | None = None
    drop_duplicates: bool = True
    rank_start: int = 0
    rank_end: int = 100
    selection: Literal["top", "sample"] = "top"
    seed: int = 42


@dataclass
class Selection:
    """The chosen negatives (best first) and what each rule dropped."""

    negatives: list[tuple[str, float]]
    dropped: dict[str, list[tuple[str, float]]] = field(default_factory=lambda: {rule: [] for rule in RULES})


def select_negatives(
    shortlist: Sequence[tuple[str, float]],
    positives: set[str],
    rules: NegativeRules,
    row: int,
    positive_score: float | None = None,
    duplicates: set[str] | None = None,
) -> Selection:
    """Negatives for one query from its `shortlist` of (did, score), best first.

    Args:
        shortlist: retrieved candidates with scores, in rank order.
        positives: the query's labelled positives.
        rules: filters and selection.
        row: the query's row number (seeds sampling).
        positive_score: the best positive's score, needed by the margin and relative rules.
        duplicates: dids known to duplicate a positive's content.
    """
    selection = Selection(negatives=[])
    kept: list[tuple[str, float]] = []
    for did, score in shortlist:
        if did in positives:
            selection.dropped["positive"].append((did, score))
        elif rules.drop_duplicates and duplicates and did in duplicates:
            selection.dropped["duplicate"].append((did, score))
        elif rules.max_score is not None and score > rules.max_score:
            selection.dropped["threshold"].append((did, score))
        elif (
            rules.margin is not None and positive_score is not None and score > positive_score - rules.margin
        ):
            selection.dropped["margin"].append((did, score))
        elif (
            rules.relative is not None
            and positive_score is not None
            and score > rules.relative * positive_score
        ):
            selection.dropped["relative"].append((did, score))
        else:
            kept.append((did, score))
    window = kept[rules.rank_start : rules.rank_end]
    if rules.selection == "top":
        selection.negatives = window[: rules.k]
    else:
        picked = sorted(row_rng(rules.seed, 0, row).sample(range(len(window)), min(rules.k, len(window))))
        selection.negatives = [window[i] for i in picked]
    return selection
