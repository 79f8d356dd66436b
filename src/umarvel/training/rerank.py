"""Training the pointwise re-ranker (method section 6.1) on the Hugging Face `Trainer`.

Each query gives two sequences per step: (query, one of its positives) -> "Yes" and (query, one negative
drawn uniformly from its mined shortlist minus positives) -> "No", both chosen by (seed, epoch, row). The
loss is cross-entropy over the vocabulary on the first answer token only.
"""

from __future__ import annotations

import logging
from collections import defaultdict
from collections.abc import Sequence
from typing import Any

import torch
from torch.nn import functional
from torch.utils.data import Dataset
from transformers import Trainer

from umarvel.config.schema import RerankerConfig
from umarvel.data.io import InputError
from umarvel.data.sampling import pick_positive, row_rng
from umarvel.data.training import TrainRow, encode_record
from umarvel.modeling.reranker import PairBatch, PairCollator, Reranker, RerankPair
from umarvel.training.trainer import (
    LoggedParts,
    TrainableCheckpoints,
    _EpochCallback,
    refuse_unsupported_engines,
)

logger = logging.getLogger(__name__)


class RerankSet(Dataset):
    """Map-style dataset: item i is query i with one positive and one negative for the epoch."""

    def __init__(self, rows: Sequence[TrainRow], seed: int, settings: RerankerConfig | None = None) -> None:
        self.rows = list(rows)
        self.seed = seed
        self.settings = settings or RerankerConfig()  # image budget and video sampling
        self.epoch = 0
        short = [r.query.source for r in self.rows if not r.negatives]
        if short:
            raise InputError(short[0], "a re-ranker training row needs mined negatives (umarvel mine)")

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, index: int) -> dict[str, Any]:
        row = self.rows[index]
        positive = pick_positive(row.positives, self.seed, self.epoch, index)
        negative = row_rng(self.seed + 1, self.epoch, index).choice(row.negatives)
        query = encode_record(row.query, self.settings, with_instruction=True)
        pairs = [
            RerankPair(query, encode_record(positive, self.settings, with_instruction=False)),
            RerankPair(query, encode_record(negative, self.settings, with_instruction=False)),
        ]
        return {"pairs": pairs, "labels": [1, 0]}


class RerankCollator:
    """Examples -> one batch of rendered pairs and their labels (1 = Yes)."""

    def __init__(self, collator: PairCollator) -> None:
        self.collator = collator

    def __call__(self, examples: list[dict[str, Any]]) -> dict[str, Any]:
        batch = self.collator([p for e in examples for p in e["pairs"]])
        labels = torch.tensor([label for e in examples for label in e["labels"]], dtype=torch.long)
        return {"inputs": batch.inputs, "answer_positions": batch.answer_positions, "labels": labels}


class RerankerTrainer(LoggedParts, TrainableCheckpoints, Trainer):
    """`Trainer` for a `Reranker`: answer-token cross-entropy, logged with the pair accuracy."""

    def __init__(self, *, model: Reranker, **kwargs: Any) -> None:
        self._parts: dict[str, list[float]] = defaultdict(list)
        super().__init__(model=model, **kwargs)
        refuse_unsupported_engines(self)
        self.add_callback(_EpochCallback(self.train_dataset))

    def compute_loss(
        self,
        model: torch.nn.Module,
        inputs: dict[str, Any],
        return_outputs: bool = False,
        num_items_in_batch: Any = None,
    ) -> torch.Tensor:
        reranker: Reranker = self.accelerator.unwrap_model(model)
        logits = model(PairBatch(inputs["inputs"], inputs["answer_positions"]))  # (B, V)
        labels = inputs["labels"]
        targets = torch.where(labels.bool(), reranker.yes_id, reranker.no_id)
        loss = functional.cross_entropy(logits, targets)
        with torch.no_grad():
            p_yes = reranker.p_yes(logits)
            self._parts["loss/answer_ce"].append(float(loss.detach()))
            self._parts["pair_accuracy"].append(float(((p_yes > 0.5).long() == labels).float().mean()))
        return (loss, logits) if return_outputs else loss
