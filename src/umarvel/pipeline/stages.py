"""Stage kinds: one run function per kind over its typed config, and the registry the pipeline
dispatches through.

Every run function validates nothing itself (its config class did), does its work, writes its own
`manifest.json` and returns an `Artifact`: what it made, where, and its content digest. The CLI commands
call the same functions, so `umarvel mine ...` and a `mine` pipeline stage are one code path.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from umarvel.config.digest import content_digest
from umarvel.config.io import ConfigError, load_config
from umarvel.config.manifest import write_manifest
from umarvel.config.schema import RerankerRunConfig, RunConfig
from umarvel.config.stages import (
    EvalConfig,
    IndexConfig,
    MineConfig,
    ScoreConfig,
    StageSpec,
    TuneFusionConfig,
)
from umarvel.distributed import run_on_main
from umarvel.evaluation.mbeir import evaluate_mbeir
from umarvel.mining.filters import NegativeRules
from umarvel.mining.mine import mine_negatives, selection_digest

logger = logging.getLogger(__name__)

POOL_SETTINGS = {"local": ("local",), "global": ("global",), "both": ("local", "global")}


@dataclass(frozen=True)
class Artifact:
    """What a stage made.

    kind: model | reranker | negatives | teacher | index | results | fusion.
    path: the file or folder a later stage reads.
    digest: its content digest (config/digest.py): what later stages' fingerprints hold.
    extra: small facts a later stage or a table reads (averages, the tuned weight, ...).
    """

    kind: str
    path: str
    digest: str
    extra: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def of(cls, kind: str, path: str | Path, **extra: Any) -> Artifact:
        return cls(kind, str(path), content_digest(path), dict(extra))


def _embedder(model: str, settings: tuple[str, ...]) -> Any:
    from umarvel.modeling.embedder import Embedder, resolve_config

    return Embedder.from_config(resolve_config(model, settings))


# ---- run functions -----------------------------------------------------------------------------------


def run_train(config: RunConfig, progress: bool = True) -> Artifact:
    """An embedder training stage (pipeline/train.py) -> its merged checkpoint."""
    from umarvel.pipeline.train import train_stage

    return Artifact.of("model", train_stage(config, progress=progress))


def run_train_reranker(config: RerankerRunConfig, progress: bool = True) -> Artifact:
    """A re-ranker training stage (pipeline/train.py) -> its merged re-ranker."""
    from umarvel.pipeline.train import train_reranker

    return Artifact.of("reranker", train_reranker(config, progress=progress))


def run_mine(config: MineConfig, progress: bool = True) -> Artifact:
    """Hard negatives with false-negative filters -> negatives.jsonl (and audit.json)."""
    rules = NegativeRules(
        k=config.k,
        max_score=config.max_score,
        margin=config.margin,
        relative=config.relative,
        drop_duplicates=not config.keep_duplicates,
        rank_start=config.rank_start,
        rank_end=config.rank_end,
        selection=config.selection,
        seed=config.seed,
    )
    embedder = _embedder(config.model, config.settings)
    root = Path(config.root)
    path = mine_negatives(
        embedder,
        root,
        config.queries,
        config.pool,
        config.out,
        rules,
        config.shortlist,
        progress,
        config.instruction_choice,
        config.cache,
    )
    run_on_main(
        write_manifest,
        config.out,
        "mine",
        config,
        inputs={"queries": root / config.queries, "pool": root / config.pool},
        extra={"embedder": embedder.identity()},
    )
    # By the negatives chosen, not the file's bytes: stored scores may differ in their last bits.
    return Artifact("negatives", str(path), selection_digest(path))


def run_score(config: ScoreConfig, progress: bool = True) -> Artifact:
    """The distillation teacher -> teacher.jsonl (score_teacher writes its manifest)."""
    from umarvel.reranker.model import Reranker
    from umarvel.reranker.teacher import parse_alphas, score_teacher

    path = score_teacher(
        _embedder(config.model, config.settings),
        Reranker.from_pretrained(config.reranker),
        config.root,
        config.out,
        config.queries,
        config.pool,
        config.fraction,
        config.top,
        config.alpha,
        parse_alphas(config.alpha_task),
        config.seed,
        progress=progress,
        instruction_choice=config.instruction_choice,
        alpha_grid=config.alpha_grid,
    )
    return Artifact.of("teacher", path)


def run_index(config: IndexConfig, progress: bool = True) -> Artifact:
    """Embed a pool into a FAISS index folder (build_index writes its manifest)."""
    from umarvel.modeling.embedder import resolve_config
    from umarvel.pipeline.index import build_index

    size = build_index(
        resolve_config(config.model, config.settings),
        config.pool,
        config.out,
        config.factory,
        config.image_root,
        config.cache,
        progress=progress,
        backend=config.backend,
        uri=config.uri,
        collection=config.collection,
        rescore=config.rescore,
    )
    return Artifact.of("index", config.out, size=size)


def run_eval(config: EvalConfig, progress: bool = True) -> tuple[Artifact, Any, Any]:
    """The M-BEIR table -> results.json; with a re-ranker also U-MARVEL+ into `out/rerank/`.

    Returns the artifact (the re-ranked results when re-ranking) and the retrieval and re-ranked
    `Scores` (None without a re-ranker)."""
    from umarvel.reranker.scoring import rerank_runs

    out, settings = Path(config.out), POOL_SETTINGS[config.pool]
    embedder = _embedder(config.model, config.settings)
    identity = embedder.identity()
    scores = evaluate_mbeir(
        embedder,
        config.root,
        out,
        config.split,
        settings,
        config.tasks or None,
        config.factory,
        progress,
        config.cache,
        config.instruction_choice,
    )
    averages = {"local": scores.average("local"), "global": scores.average("global")}
    run_on_main(
        write_manifest,
        out,
        "eval mbeir",
        config,
        inputs={"mbeir_root": config.root},
        extra={"embedder": identity, "average": averages},
    )
    if config.reranker is None:
        return Artifact.of("results", out / "results.json", average=averages), scores, None
    del embedder
    ranker, weight = load_reranker(config.reranker, config.fusion_weight)
    reranked = rerank_runs(
        ranker,
        config.root,
        out / "runs",
        out / "rerank",
        [s.row for s in scores.rows],
        config.split,
        settings,
        config.rerank_top,
        (weight,),
        progress,
        config.instruction_choice,
    )[weight]
    reranked_averages = {"local": reranked.average("local"), "global": reranked.average("global")}
    run_on_main(
        write_manifest,
        out / "rerank",
        "eval mbeir --reranker",
        config,
        inputs={"mbeir_root": config.root},
        extra={
            "embedder": identity,
            "reranker": ranker.identity(),
            "fusion_weight": weight,
            "average": reranked_averages,
        },
    )
    artifact = Artifact.of(
        "results", out / "rerank" / "results.json", average=reranked_averages, weight=weight
    )
    return artifact, scores, reranked


def load_reranker(name: str, weight: float | None) -> tuple[Any, float]:
    """The re-ranker and the fusion weight: the given one, else its tuned one, else the paper's 0.1."""
    from umarvel.reranker.model import Reranker
    from umarvel.reranker.scoring import DEFAULT_WEIGHT

    ranker = Reranker.from_pretrained(name)
    if weight is None:
        weight = ranker.fusion.get("weight")
        if weight is None:
            logger.info("%s has no tuned fusion weight (umarvel tune-fusion); using %s", name, DEFAULT_WEIGHT)
            weight = DEFAULT_WEIGHT
    return ranker, float(weight)


def run_tune_fusion(config: TuneFusionConfig, progress: bool = True) -> Artifact:
    """Choose the fusion weight on val, store it beside the re-ranker (fusion.json) -> out/fusion.json."""
    from umarvel.reranker.model import Reranker, store_fusion
    from umarvel.reranker.scoring import tune_fusion

    out, settings = Path(config.out), POOL_SETTINGS[config.pool]
    embedder = _embedder(config.model, config.settings)
    identity = embedder.identity()
    retrieval = evaluate_mbeir(
        embedder,
        config.root,
        out / "retrieval",
        config.split,
        settings,
        progress=progress,
        cache_dir=config.cache,
        instruction_choice=config.instruction_choice,
    )
    del embedder
    ranker = Reranker.from_pretrained(config.reranker)
    choice = tune_fusion(
        ranker,
        config.root,
        out / "retrieval" / "runs",
        out,
        [s.row for s in retrieval.rows],
        config.split,
        settings,
        config.rerank_top,
        config.grid,
        progress,
        config.instruction_choice,
        config.significant_only,
    )
    fusion = {**choice, "retriever": config.model}
    run_on_main(store_fusion, config.reranker, fusion)
    extra = {"fusion": fusion, "embedder": identity, "reranker": ranker.identity()}
    run_on_main(write_manifest, out, "tune-fusion", config, inputs={"mbeir_root": config.root}, extra=extra)
    run_on_main(
        write_manifest,
        Path(config.reranker),
        "tune-fusion",
        config,
        inputs={"mbeir_root": config.root},
        extra=extra,
        filename="fusion_manifest.json",
    )
    kept = {key: choice[key] for key in ("weight", "by_weight", "best", "gain_over_weight_0")}
    return Artifact.of("fusion", out / "fusion.json", **kept)


# ---- the registry ------------------------------------------------------------------------------------


def _first_source(config: Any, stage: str, **fields: str) -> Any:
    """`config` with `fields` set on its first data.train source (negatives or teacher wiring)."""
    if not config.data.train:
        raise ConfigError(f"stage {stage}: wiring {sorted(fields)} needs a data.train source")
    first = dataclasses.replace(config.data.train[0], **fields)
    return dataclasses.replace(
        config, data=dataclasses.replace(config.data, train=(first, *config.data.train[1:]))
    )


def _set(name: str) -> Callable[[Any, Artifact, str], Any]:
    return lambda config, artifact, stage: dataclasses.replace(config, **{name: artifact.path})


def _embedder_model(config: Any, artifact: Artifact, stage: str) -> Any:
    return dataclasses.replace(config, embedder=dataclasses.replace(config.embedder, model=artifact.path))


def _reads_sources(config: Any) -> list[str]:
    paths = []
    for source in config.data.train:
        paths += [source.path, *(p for p in (source.image_root, source.negatives, source.teacher) if p)]
    if config.data.eval is not None:
        paths.append(config.data.eval.path)
    return paths


@dataclass(frozen=True)
class StageKind:
    """A stage kind: its config class, how its config is built from a spec, which upstream roles it
    takes and how each enters its config, which local paths it reads (fingerprinted by content), and
    the function that runs it."""

    config: type
    run: Callable[[Any, bool], Artifact]
    inputs: dict[str, Callable[[Any, Artifact, str], Any]]
    reads: Callable[[Any], list[str]]
    output_key: str = "out"


REGISTRY: dict[str, StageKind] = {
    "train": StageKind(
        RunConfig,
        run_train,
        {
            "model": _embedder_model,
            "negatives": lambda c, a, s: _first_source(c, s, negatives=a.path),
            "teacher": lambda c, a, s: _first_source(c, s, teacher=a.path),
        },
        _reads_sources,
        output_key="output_dir",
    ),
    "train_reranker": StageKind(
        RerankerRunConfig,
        run_train_reranker,
        {
            "model": lambda c, a, s: dataclasses.replace(
                c, reranker=dataclasses.replace(c.reranker, model=a.path)
            ),
            "negatives": lambda c, a, s: _first_source(c, s, negatives=a.path),
        },
        _reads_sources,
        output_key="output_dir",
    ),
    "mine": StageKind(MineConfig, run_mine, {"model": _set("model")}, lambda c: [c.root]),
    "score": StageKind(
        ScoreConfig, run_score, {"model": _set("model"), "reranker": _set("reranker")}, lambda c: [c.root]
    ),
    "index": StageKind(
        IndexConfig,
        run_index,
        {"model": _set("model")},
        lambda c: [c.pool, c.image_root or str(Path(c.pool).parent)],
    ),
    "eval": StageKind(
        EvalConfig,
        lambda config, progress: run_eval(config, progress)[0],
        {
            "model": _set("model"),
            "reranker": _set("reranker"),
            "fusion": lambda c, a, s: dataclasses.replace(c, fusion_weight=float(a.extra["weight"])),
        },
        lambda c: [c.root],
    ),
    "tune_fusion": StageKind(
        TuneFusionConfig,
        run_tune_fusion,
        {"model": _set("model"), "reranker": _set("reranker")},
        lambda c: [c.root],
    ),
}


def stage_config(spec: StageSpec, stage_dir: Path, seed: int) -> Any:
    """The spec's typed config (validated; unknown keys and wrong types fail naming the stage and the
    key), with its output in `stage_dir` and the pipeline's seed; upstream inputs not yet wired."""
    kind = REGISTRY[spec.kind]
    overrides = [*spec.overrides, f"{kind.output_key}={stage_dir}"]
    fields = {f.name for f in dataclasses.fields(kind.config)}
    if "seed" in fields:
        overrides.append(f"seed={seed}")
    if "stage" in fields:
        overrides.append(f"stage={spec.name}")
    try:
        return load_config(spec.recipe, overrides, kind.config, base=spec.config or {})
    except ConfigError as error:
        raise ConfigError(f"stage {spec.name} ({spec.kind}): {error}") from None
