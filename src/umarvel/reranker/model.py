"""The pointwise generative re-ranker (method section 6).

A backbone of any registered family, with causal attention, reads one chat turn: a fixed instruction,
then "Query:" with the query's image and text, then "Candidate:" with the candidate's image and text,
then the generation prompt. The score is P(Yes) = softmax(logit_Yes, logit_No)[Yes] at the first answer
position: one forward pass, no generate loop. Training is next-token cross-entropy over the whole
vocabulary on that answer token only ("Yes" for a positive, "No" for a negative).

The answer logits come from the language model's output embedding: the checkpoint's `lm_head` where it
has an untied one (read from the hub checkpoint, saved as `answer_head.safetensors` with a re-ranker),
else the tied input embeddings (SmolLM2, the tiny test models).
"""

from __future__ import annotations

import dataclasses
import inspect
import json
import logging
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch import nn

from umarvel.config.digest import json_digest, record_digests
from umarvel.config.io import from_dict
from umarvel.config.schema import RerankerConfig
from umarvel.data.collator import EncodeItem, resolve_system_prompt
from umarvel.data.inputs import MediaSettings, to_item
from umarvel.data.io import InputError, write_json
from umarvel.modeling.attention import set_attention_mode
from umarvel.modeling.backbones import CHECKPOINT_FILE, Backbone, load_backbone
from umarvel.modeling.embedder import resolve_dtype
from umarvel.reranker.data import ANSWERS, PairBatch, PairCollator, RerankPair

logger = logging.getLogger(__name__)

RERANKER_FILE = "reranker.json"
# The tuned U-MARVEL+ fusion choice: a provenance file, outside the re-ranker's content digest, since it
# changes how scores are fused, never a P(Yes).
FUSION_FILE = "fusion.json"
HEAD_FILE = "answer_head.safetensors"
# Shorter shared prefixes are not worth a second pass through the language model.
MIN_SHARED_PREFIX = 8


def _cache_argument(language_model: nn.Module) -> str:
    """The name a decoder's forward takes its key/value cache by: `cache` from transformers 5.24 on,
    `past_key_values` before."""
    return "cache" if "cache" in inspect.signature(language_model.forward).parameters else "past_key_values"


def answer_token_ids(tokenizer: Any) -> tuple[int, int]:
    """First token ids of "Yes" and "No" as the assistant would start its answer."""
    ids = [tokenizer(word, add_special_tokens=False)["input_ids"] for word in ANSWERS]
    if not ids[0] or not ids[1] or ids[0][0] == ids[1][0]:
        raise ValueError(f"the tokenizer cannot tell {ANSWERS} apart by their first token: {ids}")
    return ids[0][0], ids[1][0]


def _hub_lm_head(name: str) -> torch.Tensor | None:
    """The untied `lm_head.weight` of a hub checkpoint (or a plain folder), read alone from its
    safetensors; None when the checkpoint ties it to the input embeddings."""
    from huggingface_hub import hf_hub_download

    def fetch(filename: str) -> Path:
        local = Path(name) / filename
        return local if local.exists() else Path(hf_hub_download(name, filename))

    config = json.loads(fetch("config.json").read_text())
    tied = config.get("tie_word_embeddings", config.get("text_config", {}).get("tie_word_embeddings"))
    if tied:
        return None
    try:
        index = json.loads(fetch("model.safetensors.index.json").read_text())
        shard = index["weight_map"].get("lm_head.weight")
    except (OSError, KeyError, ValueError):
        shard = "model.safetensors"
    if shard is None:
        return None
    with safe_open(str(fetch(shard)), framework="pt") as handle:
        names = set(handle.keys())
        return handle.get_tensor("lm_head.weight") if "lm_head.weight" in names else None


class Reranker(nn.Module):
    """Scores (query, candidate) pairs with P(Yes).

    Args:
        backbone: any registered family; its language model is set to causal attention.
        config: the re-ranker settings.
        head: the untied output embedding (V, H), or None to use the tied input embeddings.
        fusion: the U-MARVEL+ fusion choice stored with it by `tune-fusion` ({} when never tuned).
    """

    def __init__(
        self,
        backbone: Backbone,
        config: RerankerConfig,
        head: torch.Tensor | None = None,
        fusion: dict[str, Any] | None = None,
    ) -> None:
        super().__init__()
        self.settings = config
        self.backbone = backbone
        self.model = backbone.model
        set_attention_mode(backbone.language_model, "causal")
        self.head = None if head is None else nn.Parameter(head, requires_grad=False)
        self.collator = PairCollator(
            backbone.processor,
            backbone.spec.nested_images,
            config.max_text_tokens,
            config.format_text,
            native_video=backbone.spec.native_video,
            system_prompt=resolve_system_prompt(config.system_prompt, backbone.spec.family),
        )
        self.yes_id, self.no_id = answer_token_ids(backbone.processor.tokenizer)
        self.fusion: dict[str, Any] = dict(fusion or {})

    @classmethod
    def from_pretrained(cls, model: str, **overrides: Any) -> Reranker:
        """Load `model` (`offline`, `tiny:<family>`, hub id, or a re-ranker folder)."""
        path = Path(model)
        saved: dict[str, Any] = {}
        fusion: dict[str, Any] = {}
        if (path / RERANKER_FILE).is_file():
            saved = json.loads((path / RERANKER_FILE).read_text())
            fusion = saved.pop("fusion", {}) or {}  # where re-rankers saved before fusion.json keep it
        if (path / FUSION_FILE).is_file():
            fusion = json.loads((path / FUSION_FILE).read_text())
        config = from_dict(RerankerConfig, {**saved, **overrides, "model": model})
        dtype = resolve_dtype(config.dtype)
        backbone = load_backbone(model, dtype, config.attn_implementation, config.visual_tokens)
        if (path / HEAD_FILE).is_file():
            head = load_file(path / HEAD_FILE)["weight"]
        elif model == "offline" or model.startswith("tiny:") or (path / CHECKPOINT_FILE).is_file():
            head = None
        else:
            head = _hub_lm_head(model)
        return cls(backbone, config, None if head is None else head.to(dtype), fusion)

    @classmethod
    def from_config(cls, config: RerankerConfig) -> Reranker:
        fields = {k: v for k, v in dataclasses.asdict(config).items() if k != "model"}
        return cls.from_pretrained(config.model, **fields)

    def save_pretrained(self, directory: str | Path) -> None:
        directory = Path(directory)
        self.backbone.save(directory)
        if self.head is not None:
            save_file({"weight": self.head.detach().cpu().contiguous()}, directory / HEAD_FILE)
        settings = {k: v for k, v in dataclasses.asdict(self.settings).items() if k != "model"}
        (directory / RERANKER_FILE).write_text(json.dumps(settings, indent=2))
        if self.fusion:
            store_fusion(directory, self.fusion)
        self.backbone.digest = record_digests(directory)

    def identity(self) -> dict[str, Any]:
        """What decides this re-ranker's P(Yes): the weights digest, how pairs are rendered, and the
        numbers' dtype and kernel."""
        return self.backbone.identity(self.settings)

    def item(self, record: Any, with_instruction: bool) -> EncodeItem:
        """A query or candidate record as this re-ranker reads it (image budget, video sampling)."""
        return to_item(record, MediaSettings.of(self.settings), with_instruction=with_instruction)

    def pair(self, query: Any, candidate: Any) -> RerankPair:
        """The (query with its instruction, candidate) pair of two records."""
        return RerankPair(self.item(query, True), self.item(candidate, False))

    @property
    def fingerprint(self) -> str:
        """sha256 of `identity()`: the key of every cached P(Yes) of this re-ranker."""
        return json_digest(self.identity())

    def train(self, mode: bool = True) -> Reranker:
        super().train(mode)
        if mode:
            self.backbone.digest = ""  # the weights may change: digest them again when asked
        return self

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def output_embedding(self) -> torch.Tensor:
        if self.head is not None:
            return self.head
        return self.backbone.language_model.get_input_embeddings().weight

    @property
    def shares_prefix(self) -> bool:
        """Whether a batch's shared prompt prefix runs once (`share_prefix`, on the composed backbone:
        its language model takes input embeddings and a key/value cache with 1-D positions). Other
        families run every pair in full."""
        return self.settings.share_prefix and callable(
            getattr(self.backbone.base_model, "input_embeds", None)
        )

    def forward(self, batch: PairBatch) -> torch.Tensor:
        """Next-token logits over the vocabulary at each row's answer position, float32 (B, V)."""
        return self._logits(self._answer_states(batch), self.output_embedding())

    def answer_logits(self, batch: PairBatch) -> torch.Tensor:
        """The Yes and No logits at each row's answer position, float32 (B, 2): what scoring needs,
        without the rest of the vocabulary."""
        weight = self.output_embedding()
        return self._logits(self._answer_states(batch), weight[[self.yes_id, self.no_id]])

    def _answer_states(self, batch: PairBatch) -> torch.Tensor:
        """Last-layer hidden state at each row's answer position (B, H)."""
        if self.shares_prefix:
            return self._shared_answer_states(batch)
        hidden = self.backbone.forward(batch.inputs)  # (B, L, H)
        rows = torch.arange(hidden.shape[0], device=hidden.device)
        return hidden[rows, batch.answer_positions]

    @staticmethod
    def _logits(states: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        """`states @ weight.T` in float32, autocast or not. In bfloat16 logits of magnitude 16 to 32
        round to steps of 0.125, so P(Yes) took a handful of values (0.245, 0.269, 0.294, ...) and most
        candidates of a query tied (measured on the quickstart's teacher)."""
        with torch.autocast(states.device.type, enabled=False):
            return states.float() @ weight.float().T

    def _shared_answer_states(self, batch: PairBatch) -> torch.Tensor:
        """Answer-position hidden states (B, H), each shared prompt prefix computed once.

        Under causal attention a prefix's keys and values do not depend on what follows, so a prefix that
        several rows share runs once and its cache is repeated for them. Two levels: the prefix every
        row shares (the instruction), computed on one row; then, for each run of consecutive rows with a
        longer common prefix (the pairs of one query), that part once per run. Each row then runs only
        its own tokens (the candidate and the generation prompt). Rows are packed at the start (left
        padding is undone), so the cache holds padding between the levels: the attention mask hides it
        and explicit position ids keep every token at its true position. Gradients flow through the
        repeated caches, so training gets the same saving.
        """
        inputs = batch.inputs
        model = self.backbone.base_model
        embeds = model.input_embeds(inputs["input_ids"], inputs.get("pixel_values"))  # (B, L, H)
        mask = inputs["attention_mask"].bool()
        embeds, mask = _packed(embeds, mask)
        lengths = mask.sum(dim=1)  # (B,); each row's answer position is its last real token
        language = model.language_model
        # Checkpointed layers return no cache while training.
        checkpointed = self.training and any(
            getattr(m, "gradient_checkpointing", False) for m in language.modules()
        )
        plan = _prefix_plan(embeds, mask, lengths)
        if plan is None or checkpointed:
            hidden = language(inputs_embeds=embeds, attention_mask=mask.long(), use_cache=False)
            rows = torch.arange(embeds.shape[0], device=embeds.device)
            return hidden.last_hidden_state[rows, lengths - 1]
        common, groups, spans = plan
        device = embeds.device
        cache, past = None, torch.ones(1, 0, dtype=torch.long, device=device)

        def with_cache() -> dict[str, Any]:
            return {_cache_argument(language): cache} if cache is not None else {}

        if common:
            cache = _cache(language(inputs_embeds=embeds[:1, :common], use_cache=True))
            past = past.new_ones(1, common)
        # Each run's own shared part, right-padded, once per run.
        firsts = [run[0] for run in groups]
        own = [span - common for span in spans]
        width = max(own)
        past = past.expand(len(groups), -1)
        if width:
            part, part_mask = _right_padded(
                [embeds[r, common : common + n] for r, n in zip(firsts, own, strict=True)], width
            )
            if cache is not None:
                cache.batch_repeat_interleave(len(groups))
            step = language(
                inputs_embeds=part,
                attention_mask=torch.cat([past, part_mask], dim=1),
                position_ids=common + torch.arange(width, device=device).expand(len(groups), -1),
                use_cache=True,
                **with_cache(),
            )
            cache, past = _cache(step), torch.cat([past, part_mask], dim=1)
        # Each row's remaining tokens, with its run's cache.
        run_of = torch.tensor([g for g, run in enumerate(groups) for _ in run], device=device)
        starts = torch.tensor([spans[g] for g, run in enumerate(groups) for _ in run], device=device)
        rest = lengths - starts
        tail, tail_mask = _right_padded(
            [
                embeds[r, s : s + n]
                for r, (s, n) in enumerate(zip(starts.tolist(), rest.tolist(), strict=True))
            ],
            int(rest.max()),
        )
        if cache is not None:  # one row per run after level 2, else the single common row
            cache.reorder_cache(run_of if width else torch.zeros_like(run_of))
        out = language(
            inputs_embeds=tail,
            attention_mask=torch.cat([past[run_of], tail_mask], dim=1),
            position_ids=starts[:, None] + torch.arange(tail.shape[1], device=device),
            use_cache=True,
            **with_cache(),
        )
        rows = torch.arange(embeds.shape[0], device=device)
        return out.last_hidden_state[rows, rest - 1]

    def p_yes(self, answers: torch.Tensor) -> torch.Tensor:
        """Softmax over the Yes and No logits (B, 2), as `answer_logits` gives them (or
        `logits[:, [yes_id, no_id]]` of `forward`'s), the Yes side: (B,) in [0, 1]."""
        return torch.softmax(answers, dim=1)[:, 0]

    def iter_scores(self, pairs: Sequence[RerankPair], batch_size: int | None = None) -> Iterator[np.ndarray]:
        """P(Yes) per pair, batch by batch in input order."""
        for scores, _ in self._scored_batches(pairs, batch_size):
            yield scores

    @torch.inference_mode()
    def _scored_batches(
        self, pairs: Sequence[RerankPair], batch_size: int | None
    ) -> Iterator[tuple[np.ndarray, int]]:
        """Each batch's P(Yes) and the tokens its pairs took (template and visual tokens included)."""
        batch_size = batch_size or self.settings.batch_size
        self.eval()
        for start, stop in self._batches(pairs, batch_size):
            batch = self.collator(pairs[start:stop]).to(self.device)
            tokens = int(batch.inputs["attention_mask"].sum())
            yield self.p_yes(self.answer_logits(batch)).cpu().numpy(), tokens

    def _batches(self, pairs: Sequence[RerankPair], batch_size: int) -> Iterator[tuple[int, int]]:
        """(start, stop) of each batch, in order: `batch_size` pairs at a time, except that where the
        backbone shares prefixes a batch holds whole runs of one query's pairs where they fit, so the
        pairs of a query share the query as well as the instruction."""
        start = 0
        while start < len(pairs):
            stop = min(start + batch_size, len(pairs))
            if self.shares_prefix and stop < len(pairs):
                cut = stop  # the last query boundary inside the batch, if any
                while cut > start + 1 and pairs[cut].query == pairs[cut - 1].query:
                    cut -= 1
                if cut > start + 1:
                    stop = cut
            yield start, stop
            start = stop

    def score(self, pairs: Sequence[RerankPair], batch_size: int | None = None) -> np.ndarray:
        """P(Yes) for every pair, (N,) float32."""
        return self.score_with_tokens(pairs, batch_size)[0]

    def score_with_tokens(
        self, pairs: Sequence[RerankPair], batch_size: int | None = None
    ) -> tuple[np.ndarray, int]:
        """P(Yes) for every pair, (N,) float32, and the tokens the pairs took, as a server reports."""
        parts = list(self._scored_batches(pairs, batch_size))
        if not parts:
            return np.zeros(0, dtype=np.float32), 0
        return np.concatenate([p for p, _ in parts]).astype(np.float32), sum(t for _, t in parts)


def _cache(output: Any) -> Any:
    """The key/value cache a decoder's forward returned (`cache` from transformers 5.24 on)."""
    return output.cache if hasattr(output, "cache") else output.past_key_values


def _packed(embeds: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Rows moved so that each starts with its first real token (undoes left padding); (B, L, H), (B, L)."""
    starts = mask.int().argmax(dim=1)
    if not bool(starts.any()):
        return embeds, mask
    length = mask.shape[1]
    order = (torch.arange(length, device=mask.device) + starts[:, None]) % length
    rows = torch.arange(mask.shape[0], device=mask.device)[:, None]
    return embeds[rows, order], mask[rows, order]


def _right_padded(parts: Sequence[torch.Tensor], width: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(n_i, H) pieces stacked to (N, width, H) with zeros after each, and their (N, width) mask."""
    first = parts[0]
    stacked = first.new_zeros(len(parts), width, first.shape[-1])
    mask = torch.zeros(len(parts), width, dtype=torch.long, device=first.device)
    for i, part in enumerate(parts):
        stacked[i, : part.shape[0]] = part
        mask[i, : part.shape[0]] = 1
    return stacked, mask


def _common_length(equal: torch.Tensor) -> torch.Tensor:
    """Length of the leading run of True along the last dimension."""
    return equal.int().cumprod(dim=-1).sum(dim=-1)


def _prefix_plan(
    embeds: torch.Tensor, mask: torch.Tensor, lengths: torch.Tensor
) -> tuple[int, list[list[int]], list[int]] | None:
    """How a packed batch shares its prompt: the prefix length every row shares, the runs of consecutive
    rows that share a longer one, and each run's shared length; None where nothing worth a pass is shared.
    Every shared length stops before the shortest of its rows' answer positions."""
    rows = embeds.shape[0]
    if rows < 2:
        return None
    shortest = int(lengths.min()) - 1
    everywhere = (embeds == embeds[:1]).all(dim=-1).all(dim=0) & mask.all(dim=0)  # (L,)
    common = min(int(_common_length(everywhere)), shortest)
    if common < MIN_SHARED_PREFIX:
        common = 0
    neighbours = (embeds[1:] == embeds[:-1]).all(dim=-1) & mask[1:] & mask[:-1]  # (B-1, L)
    lcp = _common_length(neighbours).tolist()
    groups: list[list[int]] = [[0]]
    for row in range(1, rows):
        if lcp[row - 1] >= common + MIN_SHARED_PREFIX:
            groups[-1].append(row)
        else:
            groups.append([row])
    spans = []
    for run in groups:
        if len(run) == 1:
            spans.append(common)
        else:
            inside = min(lcp[r - 1] for r in run[1:])
            spans.append(min(inside, int(lengths[run].min()) - 1))
    if not common and all(len(run) == 1 for run in groups):
        return None
    return common, groups, spans


def store_fusion(directory: str | Path, fusion: dict[str, Any]) -> None:
    """Record a tuned fusion choice beside a saved re-ranker (`fusion.json`; its digest is unchanged)."""
    directory = Path(directory)
    if not (directory / RERANKER_FILE).is_file():
        raise InputError(directory / RERANKER_FILE, "not a saved re-ranker folder (no reranker.json)")
    write_json(directory / FUSION_FILE, fusion)
