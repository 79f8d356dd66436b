"""LLaVA stage-1 pre-alignment of the composed backbone's projector: captioning loss, everything else frozen.

The offline backbone joins an ImageNet image encoder and a chat LM through a projector that starts random.
Before contrastive training, the projector is taught to speak the LM's language: for each photo, the LM
(frozen, causal, as it was trained) must predict a human caption after the projected visual tokens,

    <|im_start|>user\\n [visual tokens] <|im_end|>\\n<|im_start|>assistant\\n [caption] <|im_end|>

and only the caption tokens carry loss. The image encoder is frozen too, so its feature maps are computed
once per photo (`feature_maps`) and every step costs one LM forward and backward.

`scripts/align_projector.py` runs this on Flickr8k and writes the weights the offline backbone ships
with (`umarvel/modeling/weights/`).
"""

from __future__ import annotations

import copy
import math
import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from PIL import Image
from torch.nn import functional

from umarvel.modeling.composed import ComposedModel, ComposedProcessor


@dataclass(frozen=True)
class AlignmentConfig:
    """Steps and optimiser of a projector pre-alignment (LLaVA-1.5 stage 1 uses lr 1e-3, one epoch)."""

    steps: int = 360
    batch_size: int = 16
    learning_rate: float = 1e-3
    warmup_fraction: float = 0.03
    max_caption_tokens: int = 40
    seed: int = 0


@torch.inference_mode()
def feature_maps(
    model: ComposedModel,
    processor: ComposedProcessor,
    paths: Sequence[Path],
    batch_size: int = 32,
    progress: Callable[[int], None] | None = None,
) -> torch.Tensor:
    """The frozen image encoder's last feature map of every photo: (n, C, h, w), float16."""
    model.vision_tower.eval()
    maps = []
    for start in range(0, len(paths), batch_size):
        chunk = paths[start : start + batch_size]
        images = []
        for path in chunk:
            with Image.open(path) as image:
                images.append(image.convert("RGB"))
        pixels = processor.pixel_values(images).to(model.vision_dtype)
        maps.append(model.vision_tower.forward_features(pixels).to(torch.float16))
        if progress is not None:
            progress(len(chunk))
    return torch.cat(maps)


def visual_tokens(model: ComposedModel, maps: torch.Tensor) -> torch.Tensor:
    """Feature maps (n, C, h, w) -> projected visual tokens (n, T, hidden), exactly as the model's forward
    computes them from pixels."""
    return model.project(model.visual_pool(maps.to(model.projector[0].weight.dtype)))


class CaptionSequences:
    """Token ids around the visual tokens, and each caption's ids, for the captioning loss."""

    def __init__(self, processor: ComposedProcessor, max_caption_tokens: int) -> None:
        tokenizer = processor.tokenizer
        self.tokenizer = tokenizer
        self.prefix = tokenizer("<|im_start|>user\n", add_special_tokens=False)["input_ids"]
        self.middle = tokenizer("<|im_end|>\n<|im_start|>assistant\n", add_special_tokens=False)["input_ids"]
        self.end = tokenizer("<|im_end|>", add_special_tokens=False)["input_ids"]
        self.max_caption_tokens = max_caption_tokens

    def caption_ids(self, caption: str) -> list[int]:
        ids = self.tokenizer(caption.strip(), add_special_tokens=False)["input_ids"]
        return ids[: self.max_caption_tokens] + self.end

    def batch(
        self, model: ComposedModel, tokens: torch.Tensor, captions: Sequence[str]
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Input embeddings (B, L, H), attention mask (B, L) and labels (B, L; -100 where no loss) for
        photos' visual tokens (B, T, H) and one caption each."""
        embed = model.get_input_embeddings()
        n, visual, _ = tokens.shape
        caption_ids = [self.caption_ids(c) for c in captions]
        head = len(self.prefix) + visual + len(self.middle)
        length = head + max(len(ids) for ids in caption_ids)
        pad = self.tokenizer.pad_token_id
        ids = torch.full((n, length), pad, dtype=torch.long)
        labels = torch.full((n, length), -100, dtype=torch.long)
        mask = torch.zeros((n, length), dtype=torch.long)
        for row, caption in enumerate(caption_ids):
            sequence = [*self.prefix, *[pad] * visual, *self.middle, *caption]
            ids[row, : len(sequence)] = torch.tensor(sequence)
            labels[row, head : len(sequence)] = torch.tensor(caption)
            mask[row, : len(sequence)] = 1
        embeds = embed(ids).clone()  # (B, L, H)
        start = len(self.prefix)
        embeds[:, start : start + visual] = tokens.to(embeds.dtype)
        return embeds, mask, labels


def caption_log_likelihoods(
    model: ComposedModel, sequences: CaptionSequences, tokens: torch.Tensor, captions: Sequence[str]
) -> torch.Tensor:
    """Summed log-probability of each caption (its closing token included) given its visual tokens: (B,)."""
    embeds, mask, labels = sequences.batch(model, tokens, captions)
    hidden = model.language_model(inputs_embeds=embeds, attention_mask=mask).last_hidden_state  # (B, L, H)
    # Position t predicts token t + 1; only caption positions are scored, so only they meet the LM head.
    targets = labels[:, 1:]  # (B, L-1)
    return summed_log_probs(model, hidden[:, :-1], targets, targets != -100)


def summed_log_probs(
    model: ComposedModel, states: torch.Tensor, targets: torch.Tensor, scored: torch.Tensor
) -> torch.Tensor:
    """Per row, the summed log-probability of `targets` (B, L) predicted from `states` (B, L, H) where
    `scored` (B, L) holds: (B,). Only scored positions meet the LM head (SmolLM2 ties it to the input
    embeddings)."""
    logits = states[scored] @ model.get_input_embeddings().weight.T  # (N, V)
    log_probs = -functional.cross_entropy(logits.float(), targets[scored], reduction="none")  # (N,)
    rows = scored.nonzero()[:, 0]
    return torch.zeros(len(targets), dtype=log_probs.dtype).index_add_(0, rows, log_probs)


def caption_loss(
    model: ComposedModel, sequences: CaptionSequences, tokens: torch.Tensor, captions: Sequence[str]
) -> torch.Tensor:
    """Mean negative log-likelihood per caption token over the batch (the LLaVA stage-1 loss)."""
    total = -caption_log_likelihoods(model, sequences, tokens, captions).sum()
    count = sum(len(sequences.caption_ids(c)) for c in captions)
    return total / count


def freeze_all_but_projector(model: ComposedModel) -> list[torch.nn.Parameter]:
    for parameter in model.parameters():
        parameter.requires_grad_(False)
    trainable = list(model.projector.parameters())
    for parameter in trainable:
        parameter.requires_grad_(True)
    return trainable


def train_projector(
    model: ComposedModel,
    sequences: CaptionSequences,
    maps: torch.Tensor,
    captions: Sequence[Sequence[str]],
    config: AlignmentConfig,
    on_step: Callable[[int, float, float], None] | None = None,
) -> list[float]:
    """Train the projector on (photo feature map, one of its captions) pairs; returns the loss per step.

    Photos are visited in a seeded shuffled order, epoch after epoch, each time with a random one of
    their captions. `on_step(step, loss, learning_rate)` is called after every step.
    """
    if model.config.text_config.tie_word_embeddings is not True:
        raise ValueError("the captioning loss reuses the input embeddings as the LM head (tied weights)")
    trainable = freeze_all_but_projector(model)
    model.eval()  # no dropout, frozen BatchNorm; gradients still flow to the projector
    optimizer = torch.optim.AdamW(trainable, lr=config.learning_rate, weight_decay=0.0)
    warmup = max(1, round(config.steps * config.warmup_fraction))

    def schedule(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress = (step - warmup) / max(1, config.steps - warmup)
        return 0.5 * (1 + math.cos(math.pi * progress))

    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, schedule)
    rng = random.Random(config.seed)
    order: list[int] = []
    losses = []
    for step in range(config.steps):
        while len(order) < config.batch_size:
            photos = list(range(len(captions)))
            rng.shuffle(photos)
            order.extend(photos)
        chosen, order = order[: config.batch_size], order[config.batch_size :]
        texts = [rng.choice(captions[i]) for i in chosen]
        tokens = visual_tokens(model, maps[chosen])
        loss = caption_loss(model, sequences, tokens, texts)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(trainable, 1.0)
        optimizer.step()
        scheduler.step()
        losses.append(loss.item())
        if on_step is not None:
            on_step(step, losses[-1], scheduler.get_last_lr()[0])
    for parameter in model.parameters():
        parameter.requires_grad_(False)
    return losses


@torch.inference_mode()
def matched_vs_shuffled(
    model: ComposedModel,
    sequences: CaptionSequences,
    maps: torch.Tensor,
    captions: Sequence[str],
    seed: int = 0,
    batch_size: int = 32,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Each caption's log-likelihood given its own photo and given another photo (a seeded derangement):
    two (n,) tensors. The caption is the same in both, so its text prior cancels; only the image differs."""
    n = len(captions)
    generator = torch.Generator().manual_seed(seed)
    shift = torch.randint(1, n, (n,), generator=generator)
    other = (torch.arange(n) + shift) % n  # never the photo itself
    own, shuffled = [], []
    for start in range(0, n, batch_size):
        rows = slice(start, start + batch_size)
        texts = captions[rows]
        own.append(caption_log_likelihoods(model, sequences, visual_tokens(model, maps[rows]), texts))
        foreign = visual_tokens(model, maps[other[rows]])
        shuffled.append(caption_log_likelihoods(model, sequences, foreign, texts))
    return torch.cat(own), torch.cat(shuffled)


@torch.inference_mode()
def caption_likelihood_matrix(
    model: ComposedModel,
    sequences: CaptionSequences,
    maps: torch.Tensor,
    captions: Sequence[str],
    batch_size: int = 100,
) -> torch.Tensor:
    """Every caption's summed log-likelihood given every photo: (n_photos, n_captions).

    Ranking the photos of column j by it is zero-shot text -> image retrieval by the VLM itself (no
    embedding, no contrastive step): the caption is fixed down a column, so its text prior cancels. Each
    photo's part of the sequence (prefix, visual tokens, assistant turn) is run once and its keys and
    values reused for every caption, so a pair costs only its caption tokens."""
    embed = model.get_input_embeddings()
    head = embed(torch.tensor(sequences.prefix))
    middle = embed(torch.tensor(sequences.middle))
    ids = [sequences.caption_ids(c) for c in captions]
    lengths = torch.tensor([len(i) for i in ids])
    padded = torch.nn.utils.rnn.pad_sequence(
        [torch.tensor(i) for i in ids], batch_first=True, padding_value=sequences.tokenizer.pad_token_id
    )  # (n, Lc), right-padded
    scored = torch.arange(padded.shape[1])[None] < lengths[:, None]  # (n, Lc)
    tokens = visual_tokens(model, maps)  # (P, T, H)
    rows = []
    for photo in tokens:
        prefix = torch.cat([head, photo.to(head.dtype), middle])[None]  # (1, Lp, H)
        first = model.language_model(inputs_embeds=prefix, use_cache=True)
        columns = []
        for start in range(0, len(ids), batch_size):
            chunk = slice(start, start + batch_size)
            count = len(ids[chunk])
            cache = copy.deepcopy(first.past_key_values)  # widened in place below
            cache.batch_repeat_interleave(count)
            mask = torch.cat([torch.ones(count, prefix.shape[1], dtype=torch.long), scored[chunk].long()], 1)
            hidden = model.language_model(
                inputs_embeds=embed(padded[chunk]), attention_mask=mask, past_key_values=cache
            ).last_hidden_state  # (b, Lc, H)
            # Caption token 0 is predicted by the photo part's last position, token t + 1 by position t.
            states = torch.cat([first.last_hidden_state[:, -1:].expand(count, -1, -1), hidden[:, :-1]], 1)
            columns.append(summed_log_probs(model, states, padded[chunk], scored[chunk]))
        rows.append(torch.cat(columns))
    return torch.stack(rows)


@torch.inference_mode()
def one_word_embeddings(
    model: ComposedModel,
    processor: ComposedProcessor,
    maps: torch.Tensor | None = None,
    texts: Sequence[str] | None = None,
    batch_size: int = 32,
) -> torch.Tensor:
    """E5-V-style prompted embeddings (Jiang et al., 2024) of photos (their feature maps) or texts: the
    LM, causal as trained, reads the item followed by "Summarize above image/sentence in one word:",
    and the last hidden state is the embedding (L2-normalised, (n, H)). This asks whether the aligned
    model puts a photo and its caption in the same place with no contrastive training at all."""
    tokenizer = processor.tokenizer

    def ids(text: str) -> list[int]:
        return tokenizer(text, add_special_tokens=False)["input_ids"]

    prefix = ids("<|im_start|>user\n")
    kind = "image" if maps is not None else "sentence"
    suffix = ids(f"\nSummarize above {kind} in one word:<|im_end|>\n<|im_start|>assistant\n")
    embed = model.get_input_embeddings()
    count = len(maps) if maps is not None else len(texts or ())
    out = []
    for start in range(0, count, batch_size):
        if maps is not None:
            visual = visual_tokens(model, maps[start : start + batch_size])  # (b, T, H)
            middle = [visual[i] for i in range(len(visual))]
        else:
            chunk = (texts or [])[start : start + batch_size]
            middle = [embed(torch.tensor(ids(t.strip()), dtype=torch.long)) for t in chunk]
        head, tail = embed(torch.tensor(prefix)), embed(torch.tensor(suffix))
        rows = [torch.cat([head, m.to(head.dtype), tail]) for m in middle]
        lengths = torch.tensor([len(r) for r in rows])
        embeds = torch.nn.utils.rnn.pad_sequence(rows, batch_first=True)  # (b, L, H), right-padded
        mask = (torch.arange(embeds.shape[1])[None] < lengths[:, None]).long()
        hidden = model.language_model(inputs_embeds=embeds, attention_mask=mask).last_hidden_state
        last = hidden[torch.arange(len(rows)), lengths - 1]  # (b, H)
        out.append(functional.normalize(last.float(), dim=-1))
    return torch.cat(out)
