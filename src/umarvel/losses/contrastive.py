"""InfoNCE over in-batch and hard negatives, one-directional or symmetric, on embeddings only.

U-MARVEL (Li et al., ICLR 2026), method doc section 3: stage A uses in-batch negatives; stage B adds
k mined negatives per query, and every query's hard negatives are negatives for every other query.
"""

from __future__ import annotations

import torch
from torch.nn import functional

from umarvel.losses.distributed import gather_with_local_grad


def info_nce(
    queries: torch.Tensor,
    positives: torch.Tensor,
    temperature: torch.Tensor | float,
    negatives: torch.Tensor | None = None,
    positive_ids: torch.Tensor | None = None,
    negative_ids: torch.Tensor | None = None,
    relevant_ids: torch.Tensor | None = None,
    symmetric: bool = False,
    gather: bool = False,
) -> dict[str, torch.Tensor]:
    """Contrastive loss of queries against their positives, other rows' positives and hard negatives.

    Row i's logits are [q_i . p_j for every j] ++ [q_i . h_{j,m} for every j, m], divided by the
    temperature, with target i. When ids are given, a candidate that has the same id as row i's positive
    (another row sharing that positive, or a hard negative that is in fact it) is masked out of row i;
    with `relevant_ids`, so is every candidate labelled relevant to query i (another photo of the class
    a query asks for is not a negative).

    Args:
        queries: (N, D) query embeddings (normalised for cosine scores).
        positives: (N, D) one positive per query.
        temperature: scalar; logits are scores / temperature.
        negatives: optional (N, k, D) hard negatives per query.
        positive_ids: optional (N,) integer ids of the positives, for false-negative masking.
        negative_ids: optional (N, k) integer ids of the hard negatives.
        relevant_ids: optional (N, W) ids of every labelled positive of each query (padded by repeating
            one of them), masked as false negatives; needs `positive_ids`.
        symmetric: also add the candidate->query direction over the positives (CLIP-style).
        gather: first gather every tensor across processes (see `gather_with_local_grad`).

    Returns:
        {"query_to_candidate": loss} plus {"candidate_to_query": loss} when symmetric; means over rows.
    """
    if gather:
        queries, positives = gather_with_local_grad(queries), gather_with_local_grad(positives)
        negatives = gather_with_local_grad(negatives) if negatives is not None else None
        positive_ids = gather_with_local_grad(positive_ids) if positive_ids is not None else None
        negative_ids = gather_with_local_grad(negative_ids) if negative_ids is not None else None
        relevant_ids = gather_with_local_grad(relevant_ids) if relevant_ids is not None else None
    n = queries.shape[0]
    candidates = positives  # (N, D)
    candidate_ids = positive_ids
    if negatives is not None:
        candidates = torch.cat([positives, negatives.reshape(-1, negatives.shape[-1])])  # (N + N*k, D)
        if positive_ids is not None and negative_ids is not None:
            candidate_ids = torch.cat([positive_ids, negative_ids.reshape(-1)])  # (N + N*k,)
    scores = queries @ candidates.T / temperature  # (N, N + N*k)
    target = torch.arange(n, device=queries.device)  # (N,)
    if candidate_ids is not None and positive_ids is not None:
        same = positive_ids[:, None] == candidate_ids[None, :]  # (N, N + N*k)
        if relevant_ids is not None:
            for column in relevant_ids.T:  # one (N, N + N*k) comparison per positive slot, not (N, W, C)
                same |= column[:, None] == candidate_ids[None, :]
        same[target, target] = False  # never mask the target itself
        scores = scores.masked_fill(same, torch.finfo(scores.dtype).min)
    parts = {"query_to_candidate": functional.cross_entropy(scores, target)}
    if symmetric:
        reverse = positives @ queries.T / temperature  # (N, N): candidate j against every query
        if positive_ids is not None:
            duplicate = positive_ids[:, None] == positive_ids[None, :]  # (N, N)
            if relevant_ids is not None:
                # Candidate j against query i is masked when j's positive is relevant to query i.
                duplicate |= same[:, :n].T
            duplicate[target, target] = False
            reverse = reverse.masked_fill(duplicate, torch.finfo(reverse.dtype).min)
        parts["candidate_to_query"] = functional.cross_entropy(reverse, target)
    return parts


def truncated(embeddings: torch.Tensor | None, dim: int) -> torch.Tensor | None:
    """The first `dim` coordinates of each embedding (last axis), L2-normalised again."""
    if embeddings is None:
        return None
    return functional.normalize(embeddings[..., :dim], dim=-1)


def matryoshka_info_nce(
    queries: torch.Tensor,
    positives: torch.Tensor,
    temperature: torch.Tensor | float,
    dims: tuple[int, ...],
    negatives: torch.Tensor | None = None,
    **options: object,
) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """`info_nce` at every prefix dimension in `dims` (Matryoshka representation learning, as
    sentence-transformers' MatryoshkaLoss trains it): each loss part averaged over the dimensions, and
    every part at every dimension (`<part>@<dim>`) for logging. List the full dimension to keep it in
    the objective. With `gather`, embeddings are gathered once per dimension."""
    width = queries.shape[-1]
    if not dims or any(d < 1 or d > width for d in dims):
        raise ValueError(f"Matryoshka dimensions must lie in [1, {width}], got {list(dims)}")
    each: dict[str, torch.Tensor] = {}
    totals: dict[str, torch.Tensor] = {}
    for dim in dims:
        parts = info_nce(
            truncated(queries, dim),  # type: ignore[arg-type]
            truncated(positives, dim),  # type: ignore[arg-type]
            temperature,
            negatives=truncated(negatives, dim),
            **options,  # type: ignore[arg-type]
        )
        for name, value in parts.items():
            each[f"{name}@{dim}"] = value
            totals[name] = totals.get(name, 0) + value / len(dims)  # type: ignore[assignment]
    return totals, each
