"""One typed config per stage kind: what `umarvel <command>` and a pipeline stage of that kind read.

Every default lives here: the CLI options of a command take their defaults from these classes, and a
pipeline stage's `config:` mapping is validated against the same class before any stage runs. Training
kinds use the recipe classes of `config/schema.py` (`RunConfig`, `RerankerRunConfig`).

Instructions: `instruction_choice` picks each M-BEIR query's instruction among its task's variants:
`hash` (a stable hash of the qid; deterministic and spread over the variants) or `first` (prompt_1).

Models: `model` is `offline`, `tiny:<family>`, a hub id or a checkpoint folder; in a pipeline it comes
from an earlier stage (`inputs: {model: STAGE}`). `settings` are embedder overrides as `key=value`
strings (the CLI's `--set`), checked against `EmbedderConfig` here.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

from umarvel.config.schema import EmbedderConfig, InstructionChoice

PoolChoice = Literal["local", "global", "both"]
EvalSplit = Literal["test", "val"]
UNION_TRAIN_QUERIES = "query/union_train/mbeir_union_up_train.jsonl"
UNION_TRAIN_POOL = "cand_pool/global/mbeir_union_train_cand_pool.jsonl"


def check_settings(settings: tuple[str, ...]) -> dict[str, Any]:
    """`key=value` embedder overrides -> a dict, each key known and each value of the right type."""
    from umarvel.config.io import ConfigError, apply_override, from_dict

    values: dict[str, Any] = {}
    for item in settings:
        apply_override(values, item)
    try:
        from_dict(EmbedderConfig, values, prefix="settings.")
    except ConfigError as error:
        raise ValueError(str(error)) from None
    return values


def _positive(config: Any, *names: str) -> None:
    for name in names:
        if getattr(config, name) < 1:
            raise ValueError(f"{name} must be at least 1, got {getattr(config, name)}")


@dataclass(frozen=True)
class MineConfig:
    """`umarvel mine`: hard negatives with false-negative filters (mining/filters.py for the rules).

    root / queries / pool: the M-BEIR folder and the query and pool files under it.
    k: negatives per query; shortlist: candidates retrieved per query before filtering.
    max_score / margin / relative: drop candidates above an absolute cosine (paper: 0.7) / above the
        positive's score minus a margin / above a fraction of the positive's score (0.95: NV-Retriever's
        TopK-PercPos). keep_duplicates keeps copies of a positive's text or image.
    selection / rank_start / rank_end: take the top k, or sample k, from that rank window.
    cache: a content-addressed embedding cache folder (two mining stages from one model, as for the
        embedder and the re-ranker, then embed the queries and the pool once).
    """

    model: str = "offline"
    settings: tuple[str, ...] = ()
    root: str = "M-BEIR"
    queries: str = UNION_TRAIN_QUERIES
    pool: str = UNION_TRAIN_POOL
    out: str = "runs/mine"
    k: int = 5
    max_score: float | None = 0.7
    margin: float | None = None
    relative: float | None = None
    shortlist: int = 100
    selection: Literal["top", "sample"] = "top"
    rank_start: int = 0
    rank_end: int = 100
    keep_duplicates: bool = False
    seed: int = 42
    instruction_choice: InstructionChoice = "hash"
    cache: str | None = None

    def __post_init__(self) -> None:
        check_settings(self.settings)
        _positive(self, "k", "shortlist")
        if not 0 <= self.rank_start < self.rank_end:
            raise ValueError(f"need 0 <= rank_start < rank_end, got {self.rank_start}, {self.rank_end}")
        if self.relative is not None and not 0 < self.relative <= 1:
            raise ValueError(f"relative must be in (0, 1], got {self.relative}")


@dataclass(frozen=True)
class ScoreConfig:
    """`umarvel score`: the distillation teacher (method 7.1) from an embedder and a re-ranker.

    fraction: share of each task's queries scored; top: shortlist size K per query;
    alpha: teacher = alpha * cos + (1 - alpha) * P(Yes); alpha_task: per-task `TASK=ALPHA` overrides;
    alpha_grid: when given, each other task's alpha is the grid value that ranks its scored queries'
    labelled positives best (`umarvel.reranker.teacher.choose_alphas`).
    """

    model: str = "offline"
    reranker: str = "offline"
    settings: tuple[str, ...] = ()
    root: str = "M-BEIR"
    queries: str = UNION_TRAIN_QUERIES
    pool: str = UNION_TRAIN_POOL
    out: str = "runs/teacher"
    fraction: float = 0.1
    top: int = 50
    alpha: float = 0.5
    alpha_task: tuple[str, ...] = ()
    alpha_grid: tuple[float, ...] = ()
    seed: int = 42
    instruction_choice: InstructionChoice = "hash"

    def __post_init__(self) -> None:
        check_settings(self.settings)
        _positive(self, "top")
        if not 0 < self.fraction <= 1 or not all(0 <= a <= 1 for a in (self.alpha, *self.alpha_grid)):
            raise ValueError(
                f"need 0 < fraction <= 1 and every alpha in [0, 1], got {self.fraction}, "
                f"{self.alpha}, {list(self.alpha_grid)}"
            )


@dataclass(frozen=True)
class IndexConfig:
    """`umarvel index`: embed a pool into a FAISS index folder.

    pool: candidates JSONL (did, txt, img_path, video_path); image_root: media are relative to it
    (default: the pool's folder); factory: FAISS factory string (Flat is exact); cache: a
    content-addressed embedding cache folder; backend: faiss, or milvus (the vectors in a Milvus
    collection at `uri`; the folder keeps the candidates and a record naming the collection).
    """

    model: str = "offline"
    settings: tuple[str, ...] = ()
    pool: str = "pool.jsonl"
    out: str = "runs/index"
    factory: str = "Flat"
    image_root: str | None = None
    cache: str | None = None
    backend: Literal["faiss", "milvus"] = "faiss"
    uri: str | None = None  # milvus: a Milvus Lite file (default out/vectors.db) or a server URI
    collection: str | None = None  # milvus: default umarvel_<out folder name>
    rescore: int = 0  # keep float vectors; rank rescore * k candidates of a compact index exactly

    def __post_init__(self) -> None:
        check_settings(self.settings)
        if self.rescore < 0:
            raise ValueError(f"rescore must be 0 (off) or a positive multiple of k, got {self.rescore}")


@dataclass(frozen=True)
class EvalConfig:
    """`umarvel eval mbeir`: the M-BEIR table (local and global pools), optionally U-MARVEL+.

    tasks: rows to keep (e.g. mscoco_task0), all by default; reranker: re-rank each query's top
    `rerank_top` with cos + w * P(Yes), w = fusion_weight, else the re-ranker's tuned one, else 0.1.
    cache: a content-addressed embedding cache folder shared between evaluations.
    """

    model: str = "offline"
    settings: tuple[str, ...] = ()
    root: str = "M-BEIR"
    out: str = "runs/eval"
    split: EvalSplit = "test"
    pool: PoolChoice = "both"
    tasks: tuple[str, ...] = ()
    factory: str = "Flat"
    reranker: str | None = None
    rerank_top: int = 50
    fusion_weight: float | None = None
    cache: str | None = None
    instruction_choice: InstructionChoice = "hash"

    def __post_init__(self) -> None:
        check_settings(self.settings)
        _positive(self, "rerank_top")


@dataclass(frozen=True)
class TuneFusionConfig:
    """`umarvel tune-fusion`: choose the U-MARVEL+ weight on a validation split (never test) from
    `grid`, by the mean of the local and global averages, and store it with the re-ranker;
    `significant_only` keeps weight 0 unless the best weight's gain has a 95% interval above 0."""

    model: str = "offline"
    reranker: str = "offline"
    settings: tuple[str, ...] = ()
    root: str = "M-BEIR"
    out: str = "runs/fusion"
    split: Literal["val"] = "val"
    pool: PoolChoice = "both"
    rerank_top: int = 50
    grid: tuple[float, ...] = (0.0, 0.05, 0.1, 0.2, 0.3, 0.5, 0.75, 1.0, 1.5, 2.0, 5.0)
    significant_only: bool = False
    cache: str | None = None
    instruction_choice: InstructionChoice = "hash"

    def __post_init__(self) -> None:
        check_settings(self.settings)
        _positive(self, "rerank_top")
        if not self.grid or any(w < 0 for w in self.grid):
            raise ValueError(f"grid must hold non-negative weights, got {list(self.grid)}")


@dataclass(frozen=True)
class ServeConfig:
    """`umarvel serve`: an index folder over HTTP (bound to loopback unless told otherwise)."""

    index: str = "runs/index"
    reranker: str | None = None
    host: str = "127.0.0.1"
    port: int = 8000
    max_k: int = 100
    max_image_mb: float = 8.0
    settings: tuple[str, ...] = ()
    # API keys, one per line ('#' starts a comment), added to those in $UMARVEL_API_KEYS (comma-separated);
    # with none, the server is open (as on loopback it usually should be).
    api_key_file: str | None = None
    cors_origins: tuple[str, ...] = ()
    served_model_name: str | None = None  # the id /v1 requests name; default: the embedder's model
    # Dynamic batching: the most items per model call (0 = every request alone, under a lock) and how
    # long a batch's first request waits for others.
    max_batch: int = 32
    max_wait_ms: float = 5.0

    def __post_init__(self) -> None:
        check_settings(self.settings)
        _positive(self, "max_k")
        if self.max_batch < 0 or self.max_wait_ms < 0:
            raise ValueError(
                f"need max_batch >= 0 and max_wait_ms >= 0, got {self.max_batch}, {self.max_wait_ms}"
            )
        if not 0 < self.port < 65536 or self.max_image_mb <= 0:
            raise ValueError(
                f"need 0 < port < 65536 and max_image_mb > 0, got {self.port}, {self.max_image_mb}"
            )


@dataclass(frozen=True)
class StageSpec:
    """One pipeline stage.

    kind: train | train_reranker | mine | score | index | eval | tune_fusion.
    config: the stage's settings, validated against its kind's config class (for the training kinds
        the recipe's keys; for the others the fields of the classes above).
    recipe / overrides: training kinds: a recipe file and `key=value` overrides, applied under
        `config`.
    inputs: role -> earlier stage whose artifact feeds this one: `model` (an embedder), `reranker`,
        `negatives` (a mine stage), `teacher` (a score stage), `fusion` (a tune_fusion stage).
    """

    name: str
    kind: Literal["train", "train_reranker", "mine", "score", "index", "eval", "tune_fusion"]
    config: dict[str, Any] | None = None
    recipe: str | None = None
    overrides: tuple[str, ...] = ()
    inputs: dict[str, str] | None = None


@dataclass(frozen=True)
class PipelineConfig:
    """A multi-stage recipe: stages in order, a seed shared by all, and the output folder."""

    stages: tuple[StageSpec, ...] = ()
    output_dir: str = "runs/pipeline"
    seed: int = 42
