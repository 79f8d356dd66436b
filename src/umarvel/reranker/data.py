"""The re-ranker's inputs: (query, candidate) pairs, their rendering as one chat turn, and training rows.

`PairCollator` renders a pair as the instruction, "Query:" with the query's media and text, "Candidate:"
with the candidate's, then the generation prompt, and finds each row's answer position. `RerankSet`
gives each training query one positive and one mined negative per epoch, `RerankCollator` batches them
with their labels.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch.utils.data import Dataset

from umarvel.config.schema import RerankerConfig
from umarvel.data.collator import ChatCollator, EncodeItem
from umarvel.data.inputs import MediaSettings, to_item
from umarvel.data.io import InputError
from umarvel.data.sampling import pick_positive, row_rng
from umarvel.data.training import TrainRow

INSTRUCTION = (
    "I will provide you with a query and a candidate. Please evaluate whether the candidate meets the "
    "requirements of the query. If it does, respond with 'Yes'; if it doesn't, respond with 'No'."
)
ANSWERS = ("Yes", "No")


@dataclass(frozen=True)
class RerankPair:
    """A query (its instruction included) and one candidate to judge."""

    query: EncodeItem
    candidate: EncodeItem


@dataclass
class PairBatch:
    """Backbone inputs and the position of the first answer token in each row."""

    inputs: dict[str, torch.Tensor]
    answer_positions: torch.Tensor  # (B,)

    def to(self, device: torch.device | str) -> PairBatch:
        moved = {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in self.inputs.items()}
        return PairBatch(moved, self.answer_positions.to(device))


class PairCollator(ChatCollator):
    """Renders (query, candidate) pairs as one user turn plus the generation prompt (see `ChatCollator`
    for the arguments)."""

    def render(self, pair: RerankPair) -> str:
        """The prompt: the instruction, then each side's media (video, earlier images, image) and text,
        in the same placeholder order as the embedder's collator."""
        content: list[dict[str, str]] = [{"type": "text", "text": f"{INSTRUCTION}\nQuery:"}]
        for label, item, with_instruction in (
            ("Query", pair.query, True),
            ("Candidate", pair.candidate, False),
        ):
            if not (item.text or "").strip() and not item.has_media:
                raise InputError(item.where, f"empty {label.lower()}: no text, image or video")
            if label == "Candidate":
                content.append({"type": "text", "text": "\nCandidate:"})
            content.extend(self.media_content(item))
            text, _ = self.joined_text(item, with_instruction)
            if text:
                content.append({"type": "text", "text": f" {text}"})
        return self._apply_template([{"role": "user", "content": content}], add_generation_prompt=True)

    def __call__(self, pairs: Sequence[RerankPair]) -> PairBatch:
        rendered = [self.render(pair) for pair in pairs]
        kwargs = self.media_arguments([(pair.query, pair.candidate) for pair in pairs])
        encoding = self.processor(text=rendered, padding=True, return_tensors="pt", **kwargs)
        attention = encoding["attention_mask"]
        # The last real token of each row (right or left padding alike) predicts the answer.
        length = attention.shape[1]
        positions = length - 1 - torch.flip(attention, dims=[1]).argmax(dim=1)
        return PairBatch(dict(encoding), positions)


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
        media = MediaSettings.of(self.settings)
        query = to_item(row.query, media)
        pairs = [RerankPair(query, to_item(positive, media)), RerankPair(query, to_item(negative, media))]
        return {"pairs": pairs, "labels": [1, 0]}


class RerankCollator:
    """Examples -> one batch of rendered pairs and their labels (1 = Yes)."""

    def __init__(self, collator: PairCollator) -> None:
        self.collator = collator

    def __call__(self, examples: list[dict[str, Any]]) -> dict[str, Any]:
        batch = self.collator([p for e in examples for p in e["pairs"]])
        labels = torch.tensor([label for e in examples for label in e["labels"]], dtype=torch.long)
        return {"inputs": batch.inputs, "answer_positions": batch.answer_positions, "labels": labels}
