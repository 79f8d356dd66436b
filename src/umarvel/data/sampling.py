"""Deterministic choices: a row's positive and negatives from (seed, epoch, row), stable ids, splits."""

from __future__ import annotations

import hashlib
import random
from collections.abc import Sequence
from typing import Literal, TypeVar

T = TypeVar("T")
HeldSplit = Literal["train", "val", "test"]


def stable_hash(*parts: object) -> int:
    """A 63-bit hash of `parts` that is the same in every process and every run (unlike `hash`)."""
    digest = hashlib.sha256("\x1f".join(str(p) for p in parts).encode()).digest()
    return int.from_bytes(digest[:8], "big") >> 1


def stable_id(identifier: str) -> int:
    """An integer id for a did/qid string, for false-negative masking inside a batch."""
    return stable_hash("id", identifier)


def row_rng(seed: int, epoch: int, row: int) -> random.Random:
    """The random generator for one training row in one epoch."""
    return random.Random(stable_hash(seed, epoch, row))


def pick_positive(options: Sequence[T], seed: int, epoch: int, row: int) -> T:
    """One positive among a row's positives: uniform, and the same for the same (seed, epoch, row)."""
    if not options:
        raise ValueError(f"row {row} has no positive")
    return options[row_rng(seed, epoch, row).randrange(len(options))]


def pick_negatives(
    options: Sequence[T], k: int, seed: int, epoch: int, row: int, mode: Literal["top", "sample"] = "top"
) -> list[T]:
    """k negatives from a ranked list: the first k, or k sampled without replacement; short lists repeat
    their first entries so every row has exactly k."""
    if k == 0:
        return []
    if not options:
        raise ValueError(f"row {row} needs {k} negatives but has none")
    chosen = (
        list(options[:k])
        if mode == "top"
        else row_rng(seed + 1, epoch, row).sample(list(options), min(k, len(options)))
    )
    while len(chosen) < k:
        chosen.append(chosen[len(chosen) % max(1, len(options))])
    return chosen


def held_split(name: str, val_share: float = 0.1, test_share: float = 0.2) -> HeldSplit:
    """The split a named item (a photo, a claim) belongs to, by a stable hash of its name."""
    bucket = stable_hash("split", name) % 1000 / 1000
    if bucket < test_share:
        return "test"
    if bucket < test_share + val_share:
        return "val"
    return "train"
