"""Training the pointwise re-ranker (method section 6.1) on the Hugging Face `Trainer`.

Each query gives two sequences per step: (query, one of its positives) -> "Yes" and (query, one negative
drawn uniformly from its mined shortlist minus positives) -> "No", both chosen by (seed, epoch, row). The
loss is cross-entropy over the vocabulary on the first answer token only.
"""

from __future__ import annotations

import logging
from typing import Any

import torch
from torch.nn import functional

from umarvel.reranker.data import PairBatch
from umarvel.reranker.model import Reranker
from umarvel.training.trainer import StageTrainer

logger = logging.getLogger(__name__)


class RerankerTrainer(StageTrainer):
    """`Trainer` for a `Reranker`: answer-token cross-entropy, logged with the pair accuracy."""

    def batch_loss(self, model: torch.nn.Module, inputs: dict[str, Any]) -> tuple[torch.Tensor, Any]:
        reranker: Reranker = self.accelerator.unwrap_model(model)
        logits = model(PairBatch(inputs["inputs"], inputs["answer_positions"]))  # (B, V)
        labels = inputs["labels"]
        targets = torch.where(labels.bool(), reranker.yes_id, reranker.no_id)
        loss = functional.cross_entropy(logits, targets)
        with torch.no_grad():
            p_yes = reranker.p_yes(logits[:, [reranker.yes_id, reranker.no_id]])
            self._parts["loss/answer_ce"].append(float(loss.detach()))
            self._parts["pair_accuracy"].append(float(((p_yes > 0.5).long() == labels).float().mean()))
        return loss, logits
