"""Typed configuration groups. A choice among options is one `Literal` field, validated once on load."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

Pooling = Literal["mean", "last_token"]
AttentionMode = Literal["causal", "bidirectional"]
AttentionKernel = Literal["eager", "sdpa", "flash_attention_2"]
DType = Literal["float32", "bfloat16", "float16"]
InstructionChoice = Literal["hash", "first"]


@dataclass(frozen=True)
class EmbedderConfig:
    """How a backbone becomes an embedder.

    Model:
        model: `offline`, `tiny:<family>`, a hub id, or a checkpoint folder.
        dtype / attn_implementation: weights dtype and attention kernel.
        visual_tokens: visual tokens per image for the composed backbone (a square number).
    Embedding (U-MARVEL defaults, method doc section 2):
        attention: bidirectional attention in the language model.
        pooling: mean over the pooling mask, or the last pooled token.
        mask_instruction: leave the instruction span out of the pooled tokens.
        normalize: L2-normalise embeddings.
    Temperature:
        temperature: initial value (0.05); stored as its log and clamped to
        [temperature_min, temperature_max]; trained when learnable_temperature.
    Inputs:
        max_text_tokens: texts (instruction included) are cut to this many tokens.
        max_image_pixels: images are downscaled to at most this many pixels (300 x 28 x 28).
        format_text: apply M-BEIR's format_string to texts.
        batch_size: items per forward pass when encoding.
    """

    model: str = "offline"
    dtype: DType = "float32"
    attn_implementation: AttentionKernel = "sdpa"
    visual_tokens: int = 16
    attention: AttentionMode = "bidirectional"
    pooling: Pooling = "mean"
    mask_instruction: bool = True
    normalize: bool = True
    temperature: float = 0.05
    learnable_temperature: bool = True
    temperature_min: float = 0.005
    temperature_max: float = 1.0
    max_text_tokens: int = 480
    max_image_pixels: int = 300 * 28 * 28
    format_text: bool = True
    batch_size: int = 16

    def __post_init__(self) -> None:
        if not 0 < self.temperature_min <= self.temperature <= self.temperature_max:
            raise ValueError(
                f"need 0 < temperature_min <= temperature <= temperature_max, got {self.temperature_min}, "
                f"{self.temperature}, {self.temperature_max}"
            )
        for name in ("visual_tokens", "max_text_tokens", "max_image_pixels", "batch_size"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be positive, got {getattr(self, name)}")


@dataclass(frozen=True)
class MBeirConfig:
    """Where M-BEIR lives and how instructions are chosen.

    root: the M-BEIR folder (query/, cand_pool/, qrels/, instructions/, mbeir_images/).
    instruction_choice: `hash` picks prompt[hash(qid) % n] with a stable hash (deterministic, spread
        over the variants); `first` always takes prompt_1.
    """

    root: str = "M-BEIR"
    instruction_choice: InstructionChoice = "hash"


@dataclass(frozen=True)
class RunConfig:
    """Top-level recipe: every group, the seed and the output folder."""

    embedder: EmbedderConfig = field(default_factory=EmbedderConfig)
    mbeir: MBeirConfig = field(default_factory=MBeirConfig)
    seed: int = 42
    output_dir: str = "runs/default"
