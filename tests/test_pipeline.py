"""The multi-stage runner: stages chain through manifests, unchanged stages are skipped, an interrupted
stage resumes to the same artifacts as an uninterrupted run."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest

from umarvel.config.io import load_config
from umarvel.config.stages import PipelineConfig
from umarvel.pipeline.run import run_pipeline
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
  - {{name: mine, kind: mine, inputs: {{model: a3}}, config: {{root: {mini}, k: 2, max_score: 0.99, shortlist: 10}}}}
  - {{name: b, kind: train, recipe: {hard}, inputs: {{model: a3, negatives: mine}}}}
""")
    return load_config(pipeline, cls=PipelineConfig)


def _artifacts(output: Path) -> dict[str, str]:
    return {
        name: json.loads((output / name / "stage.json").read_text())["artifact"]["digest"]
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
            "tune",
            "eval_C",
            "eval_C_plus",
        ]
        for spec in config.stages:
            for source in (spec.inputs or {}).values():
                assert names.index(source) < names.index(spec.name)
            assert spec.recipe is None or Path(spec.recipe).is_file()


def test_a_recipe_change_upstream_reruns_every_later_stage_and_keeps_the_old_folders(
    mini_mbeir: Path, tmp_path: Path
) -> None:
    config = _recipes(tmp_path, mini_mbeir, tmp_path / "run")
    run_pipeline(config, progress=False)
    before = _artifacts(tmp_path / "run")
    old_key = json.loads((tmp_path / "run" / "a3" / "stage.json").read_text())["fingerprint"]
    recipe = tmp_path / "a3.yaml"
    recipe.write_text(recipe.read_text().replace("lora: {rank: 4, alpha: 8}", "lora: {rank: 4, alpha: 16}"))
    assert run_pipeline(config, progress=False) == {"a3": "ran", "mine": "ran", "b": "ran"}
    after = _artifacts(tmp_path / "run")
    assert all(after[name] != before[name] for name in ("a3", "mine", "b"))
    kept = tmp_path / "run" / f"a3.{old_key[:12]}"
    assert json.loads((kept / "stage.json").read_text())["artifact"]["digest"] == before["a3"]
    assert run_pipeline(config, progress=False) == {"a3": "skipped", "mine": "skipped", "b": "skipped"}


def test_a_changed_data_file_reruns_the_stage_that_reads_it(mini_mbeir: Path, tmp_path: Path) -> None:
    import shutil

    root = tmp_path / "M-BEIR"
    shutil.copytree(mini_mbeir, root)
    config = _recipes(tmp_path, root, tmp_path / "run")
    run_pipeline(config, progress=False)
    instructions = root / "instructions" / "query_instructions.tsv"
    instructions.write_text(instructions.read_text().replace("caption", "Caption"))
    assert run_pipeline(config, progress=False) == {"a3": "ran", "mine": "ran", "b": "ran"}


def test_a_rerun_of_train_with_another_recipe_does_not_resume_its_checkpoints(
    mini_mbeir: Path, tmp_path: Path
) -> None:
    from umarvel.pipeline.train import train_stage

    overrides = [
        "embedder.model=tiny:qwen2_vl",
        f"data.train=[{{kind: mbeir, path: {mini_mbeir}}}]",
        "train.max_steps=2",
        "train.per_device_batch_size=4",
        "train.save_steps=1",
        "train.lora.rank=4",
        "train.lora.alpha=8",
        f"output_dir={tmp_path / 'stage'}",
    ]
    first = train_stage(load_config(None, overrides), progress=False)
    digest = json.loads((first / "umarvel_digest.json").read_text())["sha256"]
    again = train_stage(load_config(None, [*overrides, "train.learning_rate=1e-3"]), progress=False)
    metrics = json.loads((tmp_path / "stage" / "metrics.json").read_text())
    assert metrics["train_loss"] is not None  # it trained; a resumed finished run reports None
    assert json.loads((again / "umarvel_digest.json").read_text())["sha256"] != digest
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith("stage.")]  # the old run kept aside


def test_a_pipeline_stage_config_is_validated_before_any_stage_runs(mini_mbeir: Path, tmp_path: Path) -> None:
    from umarvel.config.io import ConfigError

    config = _recipes(tmp_path, mini_mbeir, tmp_path / "run")
    spec = config.stages[1]
    broken = dataclasses.replace(spec, config={**spec.config, "shortlst": 10})
    config = dataclasses.replace(config, stages=(config.stages[0], broken, config.stages[2]))
    with pytest.raises(ConfigError, match=r"stage mine .*unknown key shortlst"):
        run_pipeline(config, progress=False)
    assert not (tmp_path / "run").exists()


def test_a_reranker_named_by_its_folder_is_fingerprinted_by_content(mini_mbeir: Path, tmp_path: Path) -> None:
    from umarvel.config.stages import EvalConfig
    from umarvel.pipeline.run import stage_fingerprint

    folder = tmp_path / "reranker"
    folder.mkdir()
    (folder / "model.safetensors").write_bytes(b"\x00" * 64)
    config = EvalConfig(model="tiny:qwen2_vl", root=str(mini_mbeir), reranker=str(folder))
    before = stage_fingerprint("eval", config, 42, {})
    (folder / "model.safetensors").write_bytes(b"\x01" * 64)
    assert stage_fingerprint("eval", config, 42, {}) != before


def test_a_path_that_an_input_fills_in_need_not_exist_and_only_the_inputs_digest_counts(
    mini_mbeir: Path, tmp_path: Path
) -> None:
    from umarvel.pipeline.run import stage_fingerprint, validate
    from umarvel.pipeline.stages import Artifact, _first_source

    unwired = validate(_recipes(tmp_path, mini_mbeir, tmp_path / "run"))["b"]
    model = Artifact("model", str(tmp_path / "run" / "a3" / "model"), "a" * 64)

    def key(recipe_path: str, mined_digest: str) -> str:
        config = _first_source(unwired, "b", negatives=recipe_path)
        mined = Artifact("negatives", str(tmp_path / "run" / "mine" / "negatives.jsonl"), mined_digest)
        return stage_fingerprint("train", config, 42, {"model": model, "negatives": mined}, "b")

    assert key("runs/nowhere/negatives.jsonl", "b" * 64) == key("runs/elsewhere/n.jsonl", "b" * 64)
    assert key("runs/nowhere/negatives.jsonl", "b" * 64) != key("runs/nowhere/negatives.jsonl", "c" * 64)


def test_every_stage_of_the_shipped_pipelines_that_embeds_names_its_dtype() -> None:
    expected = {
        "recipes/cpu/pipeline.yaml": "dtype=auto",
        "recipes/qwen2vl-7b/pipeline.yaml": "dtype=bfloat16",
    }
    for recipe, dtype in expected.items():
        config = load_config(recipe, cls=PipelineConfig)
        embedding = [s for s in config.stages if s.kind in ("mine", "score", "tune_fusion", "eval")]
        assert embedding and all(dtype in (s.config or {}).get("settings", ()) for s in embedding), recipe
