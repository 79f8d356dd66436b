"""The multi-stage runner: stages chain through manifests, unchanged stages are skipped, an interrupted
stage resumes to the same artifacts as an uninterrupted run."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from umarvel.config.io import load_config
from umarvel.pipeline.run import PipelineConfig, run_pipeline
from umarvel.training.trainer import EmbedderTrainer


def _recipes(tmp_path: Path, mini: Path, output: Path) -> PipelineConfig:
    tmp_path.mkdir(parents=True, exist_ok=True)
    stage = tmp_path / "a3.yaml"
    stage.write_text(f"""embedder: {{model: tiny:qwen2_vl}}
data:
  train: [{{kind: mbeir, path: {mini}}}]
train: {{max_steps: 2, per_device_batch_size: 4, save_steps: 1, logging_steps: 1, lora: {{rank: 4, alpha: 8}}}}
""")
    hard = tmp_path / "b.yaml"
    hard.write_text(stage.read_text().replace("max_steps: 2", "max_steps: 1, hard_negatives: 2"))
    pipeline = tmp_path / "pipeline.yaml"
    pipeline.write_text(f"""output_dir: {output}
stages:
  - {{name: a3, kind: train, recipe: {stage}}}
  - {{name: mine, kind: mine, model_from: a3, root: {mini}, k: 2, max_score: 0.99, shortlist: 10}}
  - {{name: b, kind: train, recipe: {hard}, model_from: a3, negatives_from: mine}}
""")
    return load_config(pipeline, cls=PipelineConfig)


def _artifacts(output: Path) -> dict[str, str]:
    return {
        name: json.loads((output / name / "stage.json").read_text()).get("weights")
        or json.loads((output / name / "stage.json").read_text())["sha256"]
        for name in ("a3", "mine", "b")
    }


def test_stages_chain_and_an_unchanged_stage_is_skipped(mini_mbeir: Path, tmp_path: Path) -> None:
    config = _recipes(tmp_path, mini_mbeir, tmp_path / "run")
    assert run_pipeline(config, progress=False) == {"a3": "ran", "mine": "ran", "b": "ran"}
    stage_b = json.loads((tmp_path / "run" / "b" / "manifest.json").read_text())
    assert stage_b["config"]["embedder"]["model"] == str(tmp_path / "run" / "a3" / "model")
    assert run_pipeline(config, progress=False) == {"a3": "skipped", "mine": "skipped", "b": "skipped"}


def test_an_interrupted_stage_resumes_to_the_same_artifacts(
    mini_mbeir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    reference = _recipes(tmp_path / "ref", mini_mbeir, tmp_path / "ref_run")
    run_pipeline(reference, progress=False)
    config = _recipes(tmp_path / "cut", mini_mbeir, tmp_path / "cut_run")
    original, calls = EmbedderTrainer.training_step, []

    def dies_on_step_two(self: EmbedderTrainer, *args: object, **kwargs: object) -> object:
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt("simulated kill in the middle of stage a3")
        return original(self, *args, **kwargs)

    monkeypatch.setattr(EmbedderTrainer, "training_step", dies_on_step_two)
    with pytest.raises(KeyboardInterrupt):
        run_pipeline(config, progress=False)
    monkeypatch.setattr(EmbedderTrainer, "training_step", original)
    assert run_pipeline(config, progress=False) == {"a3": "ran", "mine": "ran", "b": "ran"}
    assert _artifacts(tmp_path / "cut_run") == _artifacts(tmp_path / "ref_run")


def test_the_shipped_pipeline_recipes_parse_and_wire_earlier_stages() -> None:
    for recipe in ("recipes/qwen2vl-7b/pipeline.yaml", "recipes/cpu/pipeline.yaml"):
        config = load_config(recipe, cls=PipelineConfig)
        names = [s.name for s in config.stages]
        assert names[3:] == [
            "mine",
            "04_hard_negatives",
            "mine_r1",
            "R1",
            "teacher",
            "06_distill",
            "mine_r2",
            "R2",
        ]
        for spec in config.stages:
            for source in (spec.model_from, spec.negatives_from, spec.reranker_from, spec.teacher_from):
                assert source is None or names.index(source) < names.index(spec.name)
            assert spec.recipe is None or Path(spec.recipe).is_file()
