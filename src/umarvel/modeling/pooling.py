"""Pooling of last-layer hidden states into one vector per sequence, over an explicit boolean mask.

The mask comes from the collator: padding is off, and the instruction span is off when instruction
masking is on. New poolings are one function plus one entry in `POOLINGS`.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Literal

import torch

Pooling = Literal["mean", "last_token"]


def mean_pool(hidden: torch.Tensor, pooling_mask: torch.Tensor) -> torch.Tensor:
    """Average of `hidden` (B, L, H) over positions where `pooling_mask` (B, L) is True -> (B, H).

    >>> h = torch.tensor([[[1.0], [3.0], [100.0]]]); m = torch.tensor([[True, True, False]])
    >>> mean_pool(h, m)
    tensor([[2.]])
    """
    weights = pooling_mask.to(hidden.dtype).unsqueeze(-1)  # (B, L, 1)
    total = (hidden * weights).sum(dim=1)  # (B, H)
    count = weights.sum(dim=1).clamp(min=1.0)  # (B, 1)
    return total / count


def last_token_pool(hidden: torch.Tensor, pooling_mask: torch.Tensor) -> torch.Tensor:
    """Hidden state at the last position where `pooling_mask` is True -> (B, H).

    >>> h = torch.tensor([[[1.0], [3.0], [100.0]]]); m = torch.tensor([[True, True, False]])
    >>> last_token_pool(h, m)
    tensor([[3.]])
    """
    positions = torch.arange(pooling_mask.shape[1], device=pooling_mask.device)  # (L,)
    last = torch.where(pooling_mask, positions, -1).max(dim=1).values.clamp(min=0)  # (B,)
    return hidden[torch.arange(hidden.shape[0], device=hidden.device), last]  # (B, H)


POOLINGS: dict[str, Callable[[torch.Tensor, torch.Tensor], torch.Tensor]] = {
    "mean": mean_pool,
    "last_token": last_token_pool,
}


def pool(hidden: torch.Tensor, pooling_mask: torch.Tensor, pooling: Pooling) -> torch.Tensor:
    if pooling not in POOLINGS:
        raise ValueError(f"unknown pooling {pooling!r}; choose one of {sorted(POOLINGS)}")
    # A graph being exported (ONNX) cannot branch on values; the collator never builds an empty mask.
    if not torch.compiler.is_compiling() and not bool(pooling_mask.any(dim=1).all()):
        raise ValueError("a sequence has no position to pool (empty pooling mask)")
    return POOLINGS[pooling](hidden, pooling_mask)
