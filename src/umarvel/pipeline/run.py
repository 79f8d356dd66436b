"""`umarvel pipeline`: run a multi-stage recipe, each stage a `{name, kind, config}` dispatched through the
stage registry (pipeline/stages.py), later stages reading earlier stages' artifacts (`inputs:`).

A stage folder `<output_dir>/<name>/` holds the stage's outputs and `stage.json`: its fingerprint and,
once finished, its artifact. The fingerprint is the digest of what decides the stage's result: its kind,
its resolved config (recipe file, inline config and overrides merged; output paths left out), the
pipeline seed, the content digests of the upstream artifacts it reads, and the content digests of the
local files and folders its config names (data, base models). So:
  - a finished stage with the same fingerprint is skipped;
  - a half-done stage with the same fingerprint resumes (training from its newest checkpoint, encoding
    from its finished shards);
  - a stage whose fingerprint changed is moved aside, kept as `<name>.<old fingerprint[:12]>/`, and runs
    fresh; every later stage then sees new digests and reruns too.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
from pathlib import Path
from typing import Any

from umarvel.config.digest import content_digest, json_digest
from umarvel.config.io import ConfigError
from umarvel.config.schema import RerankerRunConfig, RunConfig
from umarvel.config.stages import PipelineConfig, StageSpec
from umarvel.data.io import write_json
from umarvel.distributed import main_only
from umarvel.pipeline.stages import REGISTRY, Artifact, stage_config

logger = logging.getLogger(__name__)

STAGE_FILE = "stage.json"


RUN_FILE = "run.json"
# What a wired field holds while a fingerprint is taken: the input role, not a path.
WIRED = "<input>:"


@main_only
def claim(folder: Path, fingerprint: str, marker: str = STAGE_FILE, unmarked: str | None = "*") -> bool:
    """Make `folder` the home of the work with `fingerprint`; True when that work already finished.
    Rank 0 decides and moves folders; every rank gets the answer.

    Work with another fingerprint found there (finished or not) is moved aside to
    `<folder>.<its fingerprint[:12]>` (kept, never deleted); work with the same one is left to resume.
    Without a marker file, the folder is moved aside as `<folder>.unclaimed` when it holds anything
    (`unmarked="*"`) or the named entry (e.g. "checkpoints")."""
    record_file = folder / marker
    if record_file.is_file():
        try:
            record = json.loads(record_file.read_text())
        except json.JSONDecodeError:
            record = {}
        if record.get("fingerprint") == fingerprint:
            return bool(record.get("complete"))
        old = str(record.get("fingerprint") or "unknown")[:12]
        aside = _free_name(folder.with_name(f"{folder.name}.{old}"))
        logger.warning("%s was made by another recipe or other inputs; moved aside to %s", folder, aside)
        os.replace(folder, aside)
    elif unmarked is not None and (
        (folder / unmarked).exists() if unmarked != "*" else folder.is_dir() and any(folder.iterdir())
    ):
        aside = _free_name(folder.with_name(f"{folder.name}.unclaimed"))
        logger.warning("%s holds work of unknown origin; moved aside to %s", folder, aside)
        os.replace(folder, aside)
    folder.mkdir(parents=True, exist_ok=True)
    write_json(record_file, {"fingerprint": fingerprint, "complete": False})
    return False


def claim_run(kind: str, config: Any) -> tuple[bool, str]:
    """`claim` for a training run in `config.output_dir` (`umarvel train` alone or inside a pipeline
    stage): (finished already, fingerprint). Checkpoints left by a run of another recipe, other data
    or another base model are moved aside rather than resumed."""
    key = stage_fingerprint(kind, config, config.seed, {})
    return claim(Path(config.output_dir), key, RUN_FILE, unmarked="checkpoints"), key


def _free_name(path: Path) -> Path:
    candidate, number = path, 1
    while candidate.exists():
        candidate = path.with_name(f"{path.name}-{number}")
        number += 1
    return candidate


@main_only
def finish(folder: Path, fingerprint: str, artifact: Artifact, marker: str = STAGE_FILE) -> None:
    write_json(
        folder / marker,
        {"fingerprint": fingerprint, "complete": True, "artifact": dataclasses.asdict(artifact)},
    )


def read_artifact(stage_dir: Path) -> Artifact:
    """The artifact of a finished stage folder."""
    record_file = stage_dir / STAGE_FILE
    record = json.loads(record_file.read_text()) if record_file.is_file() else {}
    if not record.get("complete") or "artifact" not in record:
        raise ConfigError(f"stage {stage_dir.name} has not finished (no complete {record_file})")
    return Artifact(**record["artifact"])


def _without_outputs(values: Any, output_key: str) -> Any:
    return {k: v for k, v in dataclasses.asdict(values).items() if k != output_key}


def stage_fingerprint(
    kind: str, config: Any, seed: int, inputs: dict[str, Artifact], stage: str | None = None
) -> str:
    """The digest of what decides a stage's result (see module docstring); `config` is the stage's
    config before its inputs are wired in. A field an input fills in counts by that input's digest, not
    by whatever path the recipe names there: that path need not exist, and editing it changes nothing."""
    entry = REGISTRY[kind]
    for role, artifact in inputs.items():
        config = entry.inputs[role](config, dataclasses.replace(artifact, path=WIRED + role), stage or kind)
    reads = {}
    for path in entry.reads(config):
        if str(path).startswith(WIRED):
            continue
        if not Path(path).exists():
            raise ConfigError(f"{path}: no such file or folder (read by a {kind} stage)")
        reads[str(Path(path).resolve())] = content_digest(path)
    # Models named by a local folder rather than wired from an earlier stage: by content too.
    for role, model in _named_models(config).items():
        if role not in inputs and model is not None and Path(model).is_dir():
            reads[str(Path(model).resolve())] = content_digest(model)
    return json_digest(
        {
            "kind": kind,
            "config": _without_outputs(config, entry.output_key),
            "seed": seed,
            "inputs": {role: artifact.digest for role, artifact in sorted(inputs.items())},
            "reads": reads,
        }
    )


def _named_models(config: Any) -> dict[str, str | None]:
    """The models a stage config names, by the input role that would replace them."""
    if isinstance(config, RunConfig):
        return {"model": config.embedder.model}
    if isinstance(config, RerankerRunConfig):
        return {"model": config.reranker.model}
    return {role: getattr(config, role, None) for role in ("model", "reranker")}


def validate(config: PipelineConfig) -> dict[str, Any]:
    """Check the whole recipe before any stage runs: unique names, known kinds, inputs that name earlier
    stages in roles the kind takes, and every stage config against its kind's class. Returns the
    unwired configs by stage name."""
    names = [s.name for s in config.stages]
    if not names:
        raise ConfigError("the pipeline has no stages")
    if len(set(names)) != len(names):
        raise ConfigError(f"stage names must be unique: {names}")
    root = Path(config.output_dir)
    configs = {}
    for position, spec in enumerate(config.stages):
        entry = REGISTRY[spec.kind]
        for role, source in (spec.inputs or {}).items():
            if role not in entry.inputs:
                raise ConfigError(
                    f"stage {spec.name}: a {spec.kind} stage takes inputs {sorted(entry.inputs)}, "
                    f"not {role!r}"
                )
            if source not in names[:position]:
                raise ConfigError(f"stage {spec.name}: input {role} {source!r} is not an earlier stage")
        configs[spec.name] = stage_config(spec, root / spec.name, config.seed)
    return configs


def run_pipeline(
    config: PipelineConfig, start: str | None = None, until: str | None = None, progress: bool = True
) -> dict[str, str]:
    """Run the stages from `start` through `until` (names; default: all). Returns name -> status
    ("ran", "skipped")."""
    configs = validate(config)
    names = [s.name for s in config.stages]
    for bound in (start, until):
        if bound is not None and bound not in names:
            raise ConfigError(f"no stage named {bound!r}; stages: {names}")
    first = names.index(start) if start else 0
    last = names.index(until) if until else len(names) - 1
    root = Path(config.output_dir)
    status: dict[str, str] = {}
    for spec in config.stages[first : last + 1]:
        status[spec.name] = run_stage(spec, configs[spec.name], root, config.seed, progress)
    return status


def run_stage(spec: StageSpec, stage_config: Any, root: Path, seed: int, progress: bool = True) -> str:
    """Run (or skip, or resume) one stage in `root/<name>`; returns "ran" or "skipped"."""
    entry = REGISTRY[spec.kind]
    inputs = {role: read_artifact(root / source) for role, source in (spec.inputs or {}).items()}
    key = stage_fingerprint(spec.kind, stage_config, seed, inputs, spec.name)
    stage_dir = root / spec.name
    if claim(stage_dir, key):
        logger.info("stage %s is up to date; skipped", spec.name)
        return "skipped"
    wired = stage_config
    for role, artifact in inputs.items():
        wired = entry.inputs[role](wired, artifact, spec.name)
    logger.info("stage %s (%s) runs", spec.name, spec.kind)
    artifact = entry.run(wired, progress)
    finish(stage_dir, key, artifact)
    return "ran"


__all__ = ["PipelineConfig", "StageSpec", "claim", "read_artifact", "run_pipeline", "stage_fingerprint"]
