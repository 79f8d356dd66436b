"""`umarvel pipeline`: run a multi-stage recipe in order, each stage reading the previous one's manifest.

A stage folder `<output_dir>/<name>/` holds its artifact and `stage.json` (its fingerprint: the resolved
stage config plus the fingerprints of the artifacts it reads). A stage whose `stage.json` is complete
for the same fingerprint is skipped; a half-done stage resumes (training from its newest checkpoint,
encoding from its finished shards). The LoRA is merged at the end of every training stage, and each
stage starts a fresh one.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from umarvel.config.io import ConfigError, load_config
from umarvel.config.manifest import fingerprint
from umarvel.data.io import write_json

logger = logging.getLogger(__name__)

STAGE_FILE = "stage.json"


@dataclass(frozen=True)
class StageSpec:
    """One stage.

    kind: `train` (an embedder stage recipe), `mine`, `train_reranker` (a re-ranker recipe), or `score`
        (the distillation teacher from an embedder and a re-ranker).
    recipe / overrides: the stage recipe and its `key=value` overrides (train, train_reranker).
    model_from: the stage whose merged embedder this stage starts from (train) or uses (mine, score).
    negatives_from: train / train_reranker: the `mine` stage whose negatives.jsonl feeds the first
        data source.
    reranker_from: score: the `train_reranker` stage whose re-ranker scores the shortlists.
    teacher_from: train: the `score` stage whose teacher.jsonl feeds the first data source (stage C).
    root, queries, pool, k, max_score, margin, shortlist, selection, rank_end: mine settings (root,
        queries and pool also for score).
    fraction, top, alpha: score settings.
    """

    name: str
    kind: Literal["train", "mine", "train_reranker", "score"]
    recipe: str | None = None
    overrides: tuple[str, ...] = ()
    model_from: str | None = None
    negatives_from: str | None = None
    reranker_from: str | None = None
    teacher_from: str | None = None
    root: str | None = None
    queries: str = "query/union_train/mbeir_union_up_train.jsonl"
    pool: str = "cand_pool/global/mbeir_union_train_cand_pool.jsonl"
    k: int = 5
    max_score: float | None = 0.7
    margin: float | None = None
    shortlist: int = 100
    selection: Literal["top", "sample"] = "top"
    rank_end: int = 100
    fraction: float = 0.1
    top: int = 50
    alpha: float = 0.5


@dataclass(frozen=True)
class PipelineConfig:
    """A multi-stage recipe: stages in order, a seed shared by all, and the output folder."""

    stages: tuple[StageSpec, ...] = field(default_factory=tuple)
    output_dir: str = "runs/pipeline"
    seed: int = 42


def _artifact(stage_dir: Path) -> dict[str, Any]:
    record = json.loads((stage_dir / STAGE_FILE).read_text())
    if not record.get("complete"):
        raise ConfigError(f"stage {stage_dir.name} has not finished")
    return record


def _stage_fingerprint(spec: StageSpec, seed: int, inputs: dict[str, Any]) -> str:
    payload = json.dumps({"spec": dataclasses.asdict(spec), "seed": seed, "inputs": inputs}, sort_keys=True)
    return hashlib.sha256(payload.encode()).hexdigest()


def run_pipeline(
    config: PipelineConfig, start: str | None = None, until: str | None = None, progress: bool = True
) -> dict[str, str]:
    """Run the stages from `start` through `until` (names; default: all). Returns name -> status
    ("ran", "skipped")."""
    names = [s.name for s in config.stages]
    if len(set(names)) != len(names):
        raise ConfigError(f"stage names must be unique: {names}")
    for bound in (start, until):
        if bound is not None and bound not in names:
            raise ConfigError(f"no stage named {bound!r}; stages: {names}")
    first = names.index(start) if start else 0
    last = names.index(until) if until else len(names) - 1
    root = Path(config.output_dir)
    status: dict[str, str] = {}
    for spec in config.stages[first : last + 1]:
        stage_dir = root / spec.name
        inputs = {}
        wiring = (
            ("model", spec.model_from),
            ("negatives", spec.negatives_from),
            ("reranker", spec.reranker_from),
            ("teacher", spec.teacher_from),
        )
        for role, source in wiring:
            if source is not None:
                if source not in names[: names.index(spec.name)]:
                    raise ConfigError(f"stage {spec.name}: {role}_from {source!r} is not an earlier stage")
                inputs[role] = _artifact(root / source)
        key = _stage_fingerprint(spec, config.seed, inputs)
        if (stage_dir / STAGE_FILE).is_file():
            previous = json.loads((stage_dir / STAGE_FILE).read_text())
            if previous.get("complete") and previous.get("fingerprint") == key:
                logger.info("stage %s is up to date; skipped", spec.name)
                status[spec.name] = "skipped"
                continue
        stage_dir.mkdir(parents=True, exist_ok=True)
        write_json(stage_dir / STAGE_FILE, {"fingerprint": key, "complete": False})
        artifact = _run_stage(spec, stage_dir, inputs, config.seed, progress)
        write_json(stage_dir / STAGE_FILE, {"fingerprint": key, "complete": True, **artifact})
        status[spec.name] = "ran"
    return status


def _with_first_source(config: Any, stage: str, **fields: str) -> Any:
    """`config` with `fields` set on its first data.train source (negatives or teacher wiring)."""
    if not config.data.train:
        raise ConfigError(f"stage {stage}: wiring {sorted(fields)} needs a data.train source")
    first = dataclasses.replace(config.data.train[0], **fields)
    return dataclasses.replace(
        config, data=dataclasses.replace(config.data, train=(first, *config.data.train[1:]))
    )


def _run_stage(
    spec: StageSpec, stage_dir: Path, inputs: dict[str, Any], seed: int, progress: bool
) -> dict[str, Any]:
    overrides = [*spec.overrides, f"output_dir={stage_dir}", f"seed={seed}", f"stage={spec.name}"]
    if spec.kind == "train":
        from umarvel.pipeline.train import train_stage

        if "model" in inputs:
            overrides.append(f"embedder.model={inputs['model']['model']}")
        config = load_config(spec.recipe, overrides)
        if "negatives" in inputs:
            config = _with_first_source(config, spec.name, negatives=inputs["negatives"]["negatives"])
        if "teacher" in inputs:
            config = _with_first_source(config, spec.name, teacher=inputs["teacher"]["teacher"])
        model_dir = train_stage(config, progress=progress)
        return {"model": str(model_dir), "weights": fingerprint(model_dir / "model.safetensors")["sha256"]}
    if spec.kind == "train_reranker":
        from umarvel.config.schema import RerankerRunConfig
        from umarvel.pipeline.rerank import train_reranker

        config = load_config(spec.recipe, overrides, RerankerRunConfig)
        if "negatives" in inputs:
            config = _with_first_source(config, spec.name, negatives=inputs["negatives"]["negatives"])
        model_dir = train_reranker(config, progress=progress)
        return {"reranker": str(model_dir), "weights": fingerprint(model_dir / "model.safetensors")["sha256"]}
    from umarvel.modeling.embedder import Embedder

    if "model" not in inputs or spec.root is None:
        raise ConfigError(f"{spec.kind} stage {spec.name} needs model_from and root")
    embedder = Embedder.from_pretrained(inputs["model"]["model"])
    if spec.kind == "score":
        from umarvel.modeling.reranker import Reranker
        from umarvel.pipeline.rerank import score_teacher

        if "reranker" not in inputs:
            raise ConfigError(f"score stage {spec.name} needs reranker_from")
        path = score_teacher(
            embedder,
            Reranker.from_pretrained(inputs["reranker"]["reranker"]),
            spec.root,
            stage_dir,
            spec.queries,
            spec.pool,
            spec.fraction,
            spec.top,
            spec.alpha,
            seed=seed,
            progress=progress,
        )
        return {"teacher": str(path), "sha256": fingerprint(path)["sha256"]}
    from umarvel.mining.filters import NegativeRules
    from umarvel.mining.mine import mine_negatives

    rules = NegativeRules(
        k=spec.k,
        max_score=spec.max_score,
        margin=spec.margin,
        selection=spec.selection,
        rank_end=spec.rank_end,
        seed=seed,
    )
    path = mine_negatives(
        embedder, spec.root, spec.queries, spec.pool, stage_dir, rules, spec.shortlist, progress=progress
    )
    return {"negatives": str(path), "sha256": fingerprint(path)["sha256"]}
