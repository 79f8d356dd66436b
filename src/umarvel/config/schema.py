"""Typed configuration groups. A choice among options is one `Literal` field, validated once on load."""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from typing import Any, Literal

Pooling = Literal["mean", "last_token"]
AttentionMode = Literal["causal", "bidirectional"]
AttentionKernel = Literal["auto", "eager", "sdpa", "flash_attention_2"]
DType = Literal["float32", "bfloat16", "float16", "auto"]
SystemPrompt = Literal["auto", "default", "none"]
InstructionChoice = Literal["hash", "first"]
SourceKind = Literal["nli_csv", "sick", "stsb", "beir", "image_captions", "mbeir"]
SplitName = Literal["train", "val", "test", "all"]
TrainableModule = Literal["vision", "projector"]
LossKind = Literal["infonce", "distill"]


# Every embedder setting has one role (its field's metadata), read by every consumer through
# `fields_with_role`:
#   definition - what an embedding means (how items are rendered, encoded and pooled). Kept from a
#                checkpoint unless overridden; part of every identity (encode keys, caches, indexes,
#                stage fingerprints); an index refuses queries embedded under another definition.
#   numeric    - how the numbers are computed (weights dtype, attention kernel). The embedding space is
#                the same, so an index built in bf16 on one machine can be searched in fp32 on another,
#                but the vectors differ in their last bits, so every cache keys on the resolved value:
#                a cache never hands bf16 vectors to an fp32 run. Chosen per run (dtype `auto`), never
#                kept from a checkpoint.
#   state      - learned state saved with a checkpoint (the temperature): kept from it, but it scales
#                scores in the loss and never changes an embedding.
#   runtime    - batching, workers, compilation: the same rows come out (up to float rounding).
Role = Literal["definition", "numeric", "state", "runtime"]


def _setting(default: Any, role: Role) -> Any:
    return field(default=default, metadata={"role": role})


def fields_with_role(cls: type, *roles: Role) -> tuple[str, ...]:
    """The names of `cls`'s fields whose metadata role is one of `roles`, in declaration order."""
    return tuple(f.name for f in fields(cls) if f.metadata.get("role") in roles)


@dataclass(frozen=True)
class EmbedderConfig:
    """How a backbone becomes an embedder.

    Model:
        model: `offline`, `tiny:<family>`, a hub id, or a checkpoint folder.
        dtype / attn_implementation: weights dtype and attention kernel; dtype `auto` is bfloat16 where
            the hardware computes it natively (a bf16 GPU, or a CPU with AMX / AVX512-BF16), else float32;
            attention `auto` is eager for training on a CPU (faster backward) and sdpa otherwise.
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
        system_prompt: `default` renders items with the chat template's default system turn (the
            paper's template for the Qwen families); `none` leaves it out (SmolLM2's adds 20 tokens, about
            a third of a caption item's, and mean pooling would average them in); `auto` is `none` for
            the composed (offline) backbone and `default` for every other family.
        batch_size: items per forward pass when encoding.
        token_budget: when > 0, also cap a batch at this many padded tokens (estimated), so batches of
            short texts are large and batches of long ones small.
        loader_workers: processes that decode images while the model encodes (0: decode inline).
        compile: encode through `torch.compile` (inductor, dynamic shapes, weights frozen into the
            graph). The first batches pay a one-off compile (about 1.5 min on 2 CPU cores); long encoding
            jobs then run faster (benchmarks/encode_flops.py). Inference only; training is unaffected.
        shard_size: items per encode shard, the unit of resumption and of the work shared among
            processes (rank r encodes shards r, r + N, ...).
    Video (mbeir-protocol.md 3):
        video_frames: a fixed frame count per video (MSVD: 12); 0 samples `video_fps` frames a second.
        video_fps / video_max_frames: 2 fps, clamped to [4, video_max_frames] (MSR-VTT).
    """

    model: str = "offline"
    dtype: DType = _setting("float32", "numeric")
    attn_implementation: AttentionKernel = _setting("auto", "numeric")
    visual_tokens: int = _setting(16, "definition")
    attention: AttentionMode = _setting("bidirectional", "definition")
    pooling: Pooling = _setting("mean", "definition")
    mask_instruction: bool = _setting(True, "definition")
    normalize: bool = _setting(True, "definition")
    temperature: float = _setting(0.05, "state")
    learnable_temperature: bool = _setting(True, "state")
    temperature_min: float = _setting(0.005, "state")
    temperature_max: float = _setting(1.0, "state")
    max_text_tokens: int = _setting(480, "definition")
    max_image_pixels: int = _setting(300 * 28 * 28, "definition")
    format_text: bool = _setting(True, "definition")
    system_prompt: SystemPrompt = _setting("auto", "definition")
    batch_size: int = _setting(16, "runtime")
    token_budget: int = _setting(0, "runtime")
    loader_workers: int = _setting(0, "runtime")
    compile: bool = _setting(False, "runtime")
    shard_size: int = _setting(4096, "runtime")
    video_frames: int = _setting(0, "definition")
    video_fps: float = _setting(2.0, "definition")
    video_max_frames: int = _setting(768, "definition")

    def __post_init__(self) -> None:
        if self.video_frames < 0 or self.video_fps <= 0 or self.video_max_frames < 4:
            raise ValueError("need video_frames >= 0, video_fps > 0 and video_max_frames >= 4")
        if not 0 < self.temperature_min <= self.temperature <= self.temperature_max:
            raise ValueError(
                f"need 0 < temperature_min <= temperature <= temperature_max, got {self.temperature_min}, "
                f"{self.temperature}, {self.temperature_max}"
            )
        for name in ("visual_tokens", "max_text_tokens", "max_image_pixels", "batch_size", "shard_size"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be positive, got {getattr(self, name)}")


@dataclass(frozen=True)
class DataSource:
    """One training or evaluation source.

    kind: `nli_csv` (SimCSE sent0/sent1/hard_neg), `sick` (ENTAILMENT pairs), `stsb` (pairs scored
        >= 4), `beir` (queries -> relevant documents), `image_captions` (caption -> photo, csv or jsonl),
        `mbeir` (an M-BEIR query file with instructions; candidates from `pool`).
    path: the file (or BEIR folder, or M-BEIR root for `mbeir`).
    split: `beir` split name; for `image_captions`, the held split by a stable hash of the image name
        (test 20 %, val 10 %, train the rest), or `all`.
    pool: `mbeir` only: the candidate pool file, relative to the M-BEIR root.
    image_root: images are relative to this folder (default: beside the file).
    max_rows: keep the first n rows (after splitting); 0 keeps all.
    negatives: `mbeir` only: a `negatives.jsonl` written by `umarvel mine`, aligned line by line
        with the query file; its negatives become the rows' hard negatives (stage B).
    teacher: `mbeir` only: a `teacher.jsonl` written by `umarvel score`; the rows become its queries,
        each with its shortlist and teacher scores (stage C, re-ranker distillation).
    instruction_choice: `mbeir` only: `hash` picks prompt[hash(qid) % n] with a stable hash
        (deterministic, spread over the variants); `first` always takes prompt_1.
    """

    kind: SourceKind
    path: str
    split: SplitName = "train"
    pool: str = "cand_pool/global/mbeir_union_train_cand_pool.jsonl"
    queries: str = "query/union_train/mbeir_union_up_train.jsonl"
    image_root: str | None = None
    max_rows: int = 0
    negatives: str | None = None
    teacher: str | None = None
    instruction_choice: InstructionChoice = "hash"


@dataclass(frozen=True)
class DataConfig:
    """Training sources (mixed and shuffled together) and an optional held-aside evaluation source."""

    train: tuple[DataSource, ...] = ()
    eval: DataSource | None = None
    eval_k: tuple[int, ...] = (1, 5, 10)


@dataclass(frozen=True)
class LoraSettings:
    """LoRA on the language model's linear layers (targets from the backbone registry)."""

    enabled: bool = True
    rank: int = 64
    alpha: int = 128
    dropout: float = 0.05


@dataclass(frozen=True)
class TrainConfig:
    """One training stage.

    Loss: symmetric adds the candidate->query direction; hard_negatives k per query (stage B);
        mask_false_negatives masks in-batch candidates that share the positive's id or are any other
        labelled positive of the query (the first 64; class-level relevance has many); gather_across_devices
        uses every device's batch as negatives.
    Optimiser: AdamW, cosine schedule with warm-up; temperature_lr is the temperature's own learning
        rate (defaults to learning_rate).
    Batching: per_device_batch_size queries per step and device; gradcache_chunk_size > 0 embeds the
        batch in chunks of that size with GradCache (same gradients, activations of one chunk).
    Model: LoRA on the language model; trainable_modules are trained in full (the composed backbone's
        projector must be); everything else is frozen.
    Precision: bf16 mixed precision when `bf16` is true; `auto` turns it on only where the hardware
        computes bf16 natively (as dtype `auto` does), since on a CPU without AMX / AVX512-BF16 bf16 is
        several times slower than fp32.
    Distillation (loss `distill`, stage C): KL(teacher || student) over each query's shortlist of
        `distill_top` candidates from a teacher file (method section 7.2); `distill_infonce_weight` > 0
        adds InfoNCE with the labelled positive against the shortlist and the batch.
    """

    learning_rate: float = 2e-4
    temperature_lr: float | None = None
    weight_decay: float = 0.0
    warmup_ratio: float = 0.03
    epochs: float = 1.0
    max_steps: int = -1
    per_device_batch_size: int = 32
    gradcache_chunk_size: int = 0
    symmetric: bool = False
    hard_negatives: int = 0
    mask_false_negatives: bool = True
    gather_across_devices: bool = True
    max_grad_norm: float = 1.0
    bf16: bool | Literal["auto"] = False
    gradient_checkpointing: bool = False
    lora: LoraSettings = field(default_factory=LoraSettings)
    trainable_modules: tuple[TrainableModule, ...] = ()
    merge_lora: bool = True
    logging_steps: int = 10
    save_steps: int = 500
    save_total_limit: int = 2
    dataloader_workers: int = 0
    deepspeed: str | None = None
    loss: LossKind = "infonce"
    distill_top: int = 50
    distill_infonce_weight: float = 0.0
    # Matryoshka: the InfoNCE loss averaged over these prefix dimensions (each renormalised), so a
    # prefix of the embedding is itself a usable embedding (`dimensions` of /v1/embeddings). Empty: off.
    matryoshka_dims: tuple[int, ...] = ()

    def __post_init__(self) -> None:
        if self.matryoshka_dims and (self.loss != "infonce" or any(d < 1 for d in self.matryoshka_dims)):
            raise ValueError("matryoshka_dims needs loss: infonce and positive dimensions")
        if self.max_steps == 0 or self.max_steps < -1:
            raise ValueError(
                f"max_steps must be a positive number of steps, or -1 for whole epochs, got {self.max_steps}"
            )
        if self.distill_top < 1 or self.distill_infonce_weight < 0:
            raise ValueError("distill_top must be at least 1 and distill_infonce_weight not negative")
        if self.per_device_batch_size < 1:
            raise ValueError("per_device_batch_size must be at least 1")
        if self.gradcache_chunk_size < 0 or self.hard_negatives < 0:
            raise ValueError("gradcache_chunk_size and hard_negatives cannot be negative")


@dataclass(frozen=True)
class RunConfig:
    """Top-level recipe: every group, the seed and the output folder."""

    embedder: EmbedderConfig = field(default_factory=EmbedderConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    stage: str = "train"
    seed: int = 42
    output_dir: str = "runs/default"


@dataclass(frozen=True)
class RerankerConfig:
    """The pointwise generative re-ranker (method section 6): causal attention, a chat prompt with the
    query then the candidate, and P(Yes) from the Yes/No logits at the first answer position.

    model: `offline`, `tiny:<family>`, a hub id, or a re-ranker folder.
    max_text_tokens: the query text and the candidate text are each cut to this many tokens (256).
    max_image_pixels: images are downscaled to at most this many pixels.
    batch_size: pairs per forward pass when scoring (whole queries' shortlists where they fit).
    share_prefix: run the prompt prefix a batch's pairs share once: the instruction once per batch, each
        query once for its pairs, then each pair's own tokens; the composed backbone only, same P(Yes) up
        to rounding (`reranker/model.py`). Off: every pair in full.
    system_prompt: keep the chat template's default system turn, as for the embedder (`auto`: left out
        for the composed backbone only).
    video_frames / video_fps / video_max_frames: how videos are sampled, as for the embedder.
    """

    model: str = "offline"
    dtype: DType = _setting("float32", "numeric")
    attn_implementation: AttentionKernel = _setting("auto", "numeric")
    visual_tokens: int = _setting(16, "definition")
    max_text_tokens: int = _setting(256, "definition")
    max_image_pixels: int = _setting(300 * 28 * 28, "definition")
    format_text: bool = _setting(True, "definition")
    system_prompt: SystemPrompt = _setting("auto", "definition")
    batch_size: int = _setting(32, "runtime")
    share_prefix: bool = _setting(True, "runtime")
    video_frames: int = _setting(0, "definition")
    video_fps: float = _setting(2.0, "definition")
    video_max_frames: int = _setting(768, "definition")

    def __post_init__(self) -> None:
        if self.video_frames < 0 or self.video_fps <= 0 or self.video_max_frames < 4:
            raise ValueError("need video_frames >= 0, video_fps > 0 and video_max_frames >= 4")
        for name in ("visual_tokens", "max_text_tokens", "max_image_pixels", "batch_size"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be positive, got {getattr(self, name)}")


@dataclass(frozen=True)
class RerankerRunConfig:
    """A re-ranker training recipe: `data.train` are `mbeir` sources with mined negatives (one positive
    and one negative per query and epoch), trained with next-token cross-entropy on the answer."""

    reranker: RerankerConfig = field(default_factory=RerankerConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    stage: str = "rerank"
    seed: int = 42
    output_dir: str = "runs/reranker"
