"""Contrastive training: loss goes down on every family, GradCache equals the plain path, a crashed run
resumes to the same weights, merging LoRA keeps embeddings, rows are sampled per (seed, epoch, row)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from transformers import TrainerCallback

from umarvel.config.io import load_config
from umarvel.config.schema import LoraSettings, TrainConfig
from umarvel.data.records import Candidate, Query
from umarvel.data.training import TrainingSet, TrainRow
from umarvel.modeling.embedder import Embedder
from umarvel.training.adapters import merge_adapters, prepare_for_training
from umarvel.training.trainer import ContrastiveCollator, EmbedderTrainer, training_arguments

COLOURS = ["red", "green", "blue", "yellow", "purple", "orange", "black", "white"]


def _rows(tmp_path: Path, with_images: bool = True) -> list[TrainRow]:
    tmp_path.mkdir(parents=True, exist_ok=True)
    rows = []
    for i, colour in enumerate(COLOURS):
        image = None
        if with_images and i % 2:
            image = tmp_path / f"{colour}.png"
            rng = np.random.default_rng(i)
            Image.fromarray((rng.random((20, 28, 3)) * 255).astype("uint8")).save(image)
        positives = (
            Candidate(did=f"c{i}", text=f"a {colour} thing", image=image),
            Candidate(did=f"c{i}b", text=f"something {colour}"),
        )
        rows.append(
            TrainRow(
                Query(qid=f"q{i}", text=f"find the {colour} one", instruction="Find it."),
                positives,
                (Candidate(did=f"n{i}", text=f"a {COLOURS[i - 1]} thing"),),
            )
        )
    return rows


def _trainer(tmp_path: Path, family: str = "qwen2_vl", **train: object) -> EmbedderTrainer:
    config = TrainConfig(
        **{
            "per_device_batch_size": 4,
            "learning_rate": 1e-3,
            "max_steps": 4,
            "save_steps": 2,
            "logging_steps": 1,
            "lora": LoraSettings(rank=4, alpha=8, dropout=0.0),
            **train,
        }
    )
    embedder = Embedder.from_pretrained(f"tiny:{family}")
    prepare_for_training(embedder, config.lora, config.trainable_modules)
    dataset = TrainingSet(_rows(tmp_path), seed=0, hard_negatives=config.hard_negatives)
    return EmbedderTrainer(
        model=embedder,
        train_config=config,
        args=training_arguments(config, tmp_path / "checkpoints", seed=0),
        train_dataset=dataset,
        data_collator=ContrastiveCollator(embedder.collator, config.gradcache_chunk_size),
    )


def _fixed_batch(trainer: EmbedderTrainer, chunk_size: int = 0) -> dict:
    collate = ContrastiveCollator(trainer.model.collator, chunk_size)
    return collate([trainer.train_dataset[i] for i in range(4)])


def _loss(trainer: EmbedderTrainer, batch: dict) -> float:
    with torch.no_grad():
        return float(trainer.compute_loss(trainer.model, batch))


def test_one_step_lowers_the_loss_on_a_fixed_batch(tmp_path: Path, family: str) -> None:
    trainer = _trainer(tmp_path, family, hard_negatives=1, symmetric=True)
    batch = _fixed_batch(trainer)
    trainer.model.eval()  # no dropout in the measurement
    before = _loss(trainer, batch)
    trainer.create_optimizer()
    trainer.training_step(trainer.model, batch)
    trainer.optimizer.step()
    assert _loss(trainer, batch) < before


def test_a_matryoshka_step_lowers_the_loss_and_logs_every_prefix(tmp_path: Path) -> None:
    trainer = _trainer(tmp_path, hard_negatives=1, matryoshka_dims=(16, 64))
    batch = _fixed_batch(trainer)
    trainer.model.eval()
    before = _loss(trainer, batch)
    trainer.create_optimizer()
    trainer.training_step(trainer.model, batch)
    trainer.optimizer.step()
    assert _loss(trainer, batch) < before
    assert {"matryoshka/query_to_candidate@16", "matryoshka/query_to_candidate@64"} <= set(trainer._parts)


def _gradients(trainer: EmbedderTrainer, batch: dict) -> dict[str, torch.Tensor]:
    trainer.model.zero_grad()
    torch.manual_seed(123)
    trainer.training_step(trainer.model, batch)
    return {n: p.grad.clone() for n, p in trainer.model.named_parameters() if p.requires_grad}


@pytest.mark.parametrize("dropout", [0.0, 0.1])
def test_gradcache_gives_the_gradients_of_the_plain_path(tmp_path: Path, dropout: float) -> None:
    lora = LoraSettings(rank=4, alpha=8, dropout=dropout)
    plain = _trainer(tmp_path / "a", lora=lora, hard_negatives=1, symmetric=True)
    cached = _trainer(tmp_path / "b", lora=lora, hard_negatives=1, symmetric=True, gradcache_chunk_size=2)
    cached.model.load_state_dict(plain.model.state_dict())
    # With dropout, the plain path must draw its masks per chunk too, to be comparable.
    expected = _gradients(plain, _fixed_batch(plain, chunk_size=2 if dropout else 0))
    got = _gradients(cached, _fixed_batch(cached, chunk_size=2))
    assert expected.keys() == got.keys() and len(got) > 2
    for name in expected:
        torch.testing.assert_close(got[name], expected[name], rtol=1e-4, atol=1e-6, msg=name)


def test_gradcache_for_deepspeed_calls_backward_once_with_the_plain_paths_gradients(
    tmp_path: Path, monkeypatch
) -> None:
    lora = LoraSettings(rank=4, alpha=8, dropout=0.1)
    plain = _trainer(tmp_path / "a", lora=lora, hard_negatives=1)
    cached = _trainer(tmp_path / "b", lora=lora, hard_negatives=1, gradcache_chunk_size=2)
    cached.model.load_state_dict(plain.model.state_dict())
    # As under DeepSpeed, whose engine also steps in `backward`: the one-backward path.
    monkeypatch.setattr(cached, "_engine_steps_in_backward", lambda: True)
    calls: list[float] = []
    original = cached.accelerator.backward

    def counting(loss: torch.Tensor, **kwargs: object) -> None:
        calls.append(float(loss.detach()))
        original(loss, **kwargs)

    monkeypatch.setattr(cached.accelerator, "backward", counting)
    expected = _gradients(plain, _fixed_batch(plain, chunk_size=2))
    got = _gradients(cached, _fixed_batch(cached, chunk_size=2))
    assert len(calls) == 1
    for name in expected:
        torch.testing.assert_close(got[name], expected[name], rtol=1e-4, atol=1e-6, msg=name)


class _Crash(TrainerCallback):
    def on_save(self, args, state, control, **kwargs):
        if state.global_step == 2:
            raise KeyboardInterrupt("simulated kill after the step-2 checkpoint")


def _trainable(trainer: EmbedderTrainer) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in trainer.model.named_parameters() if p.requires_grad}


def test_a_crashed_run_resumes_to_the_same_weights_as_an_uninterrupted_one(tmp_path: Path) -> None:
    lora = LoraSettings(rank=4, alpha=8, dropout=0.1)
    uninterrupted = _trainer(tmp_path / "full", lora=lora)
    uninterrupted.train()
    crashed = _trainer(tmp_path / "crash", lora=lora)
    crashed.add_callback(_Crash())
    with pytest.raises(KeyboardInterrupt):
        crashed.train()
    resumed = _trainer(tmp_path / "crash", lora=lora)
    resumed.train(resume_from_checkpoint=str(tmp_path / "crash" / "checkpoints" / "checkpoint-2"))
    expected, got = _trainable(uninterrupted), _trainable(resumed)
    for name in expected:
        torch.testing.assert_close(got[name], expected[name], msg=name)


def test_merging_lora_leaves_embeddings_unchanged(tmp_path: Path) -> None:
    trainer = _trainer(tmp_path)
    trainer.train()
    embedder = trainer.model
    embedder.eval()
    inputs = ["find the red one", "a blue thing"]
    before = embedder.encode_candidates(inputs, progress=False)
    merge_adapters(embedder)
    assert not hasattr(embedder.backbone.model, "merge_and_unload")
    np.testing.assert_allclose(embedder.encode_candidates(inputs, progress=False), before, atol=1e-5)


def test_the_temperature_has_its_own_learning_rate(tmp_path: Path) -> None:
    trainer = _trainer(tmp_path, temperature_lr=0.05)
    optimizer = trainer.create_optimizer()
    assert [g["lr"] for g in optimizer.param_groups] == [1e-3, 0.05]
    assert optimizer.param_groups[1]["params"][0] is trainer.model.log_temperature


def test_positives_are_sampled_per_seed_epoch_and_row(tmp_path: Path) -> None:
    rows = _rows(tmp_path, with_images=False)
    first, again = TrainingSet(rows, seed=3), TrainingSet(rows, seed=3)
    picks = [first[i]["positive_id"] for i in range(8)]
    assert picks == [again[i]["positive_id"] for i in range(8)]
    first.set_epoch(1)
    assert picks != [first[i]["positive_id"] for i in range(8)]


def test_every_item_carries_the_ids_of_all_its_rows_positives(tmp_path: Path) -> None:
    from umarvel.data.sampling import stable_id

    dataset = TrainingSet(_rows(tmp_path, with_images=False), seed=0)
    item = dataset[2]
    assert item["relevant_ids"] == [stable_id("c2"), stable_id("c2b")]
    assert item["positive_id"] in item["relevant_ids"]


def test_a_recipe_with_an_unknown_key_fails_before_any_work(tmp_path: Path) -> None:
    from typer.testing import CliRunner

    from umarvel.cli import app

    recipe = tmp_path / "r.yaml"
    recipe.write_text("train:\n  learning_rat: 1.0e-4\n")
    result = CliRunner().invoke(app, ["train", str(recipe)])
    assert result.exit_code == 2 and "unknown key train.learning_rat" in result.output


def test_every_paper_recipe_validates_in_a_dry_run(tmp_path: Path) -> None:
    from umarvel.pipeline.train import dry_run

    recipes = [r for r in sorted(Path("recipes/qwen2vl-7b").glob("0*.yaml")) if "reranker" not in r.stem]
    assert len(recipes) == 5
    for recipe in recipes:
        config = load_config(recipe)
        assert config.embedder.dtype == "bfloat16" and config.train.bf16
        summary = dry_run(config, tmp_path / recipe.stem)
        assert summary["steps"] == 2 and summary["model"].startswith("tiny:qwen2_vl")


def test_the_reranker_recipes_parse_as_reranker_runs() -> None:
    from umarvel.config.schema import RerankerRunConfig

    for recipe, dtype in (
        ("recipes/qwen2vl-7b/05_reranker.yaml", "bfloat16"),
        ("recipes/cpu/05_reranker.yaml", "auto"),
    ):
        config = load_config(recipe, cls=RerankerRunConfig)
        assert config.reranker.dtype == dtype and config.data.train[0].kind == "mbeir"


def test_no_cpu_recipe_hard_codes_bfloat16() -> None:
    for recipe in sorted(Path("recipes/cpu").glob("0*.yaml")):
        text = recipe.read_text()
        assert "bfloat16" not in text and "bf16: true" not in text, recipe


def test_bf16_auto_follows_the_hardware(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from umarvel.training import trainer as module

    for native in (True, False):
        monkeypatch.setattr(module, "native_bf16", lambda native=native: native)
        args = module.training_arguments(TrainConfig(bf16="auto"), tmp_path, seed=0)
        assert args.bf16 is native


def test_a_frozen_vision_tower_stays_in_eval_mode_while_training(tmp_path: Path) -> None:
    trainer = _trainer(tmp_path, family="composed", trainable_modules=("projector",))
    embedder = trainer.model
    embedder.train()
    assert not embedder.backbone.submodule("vision").training
    assert embedder.backbone.submodule("projector").training
    stats = embedder.backbone.submodule("vision").bn1.running_mean.clone()
    trainer.train()
    torch.testing.assert_close(embedder.backbone.submodule("vision").bn1.running_mean, stats)


def test_rerunning_a_finished_stage_takes_no_extra_step(tmp_path: Path) -> None:
    from umarvel.pipeline.train import train_stage

    captions = tmp_path / "captions.csv"
    (tmp_path / "images").mkdir()
    for i in range(8):
        Image.new("RGB", (24, 16), (30 * i, 90, 200 - 20 * i)).save(tmp_path / "images" / f"{i}.jpg")
    captions.write_text("image,caption\n" + "".join(f"{i}.jpg,a photo of thing {i}\n" for i in range(8)))
    config = load_config(
        None,
        [
            "embedder.model=tiny:composed",
            f"data.train=[{{kind: image_captions, path: {captions}, split: all}}]",
            "train.max_steps=2",
            "train.per_device_batch_size=4",
            "train.save_steps=2",
            "train.trainable_modules=[projector]",
            f"output_dir={tmp_path / 'run'}",
        ],
    )
    first = train_stage(config, progress=False)
    assert json.loads((tmp_path / "run" / "run.json").read_text())["complete"]
    saved = (first / "model.safetensors").stat().st_mtime_ns
    train_stage(config, progress=False)
    assert (first / "model.safetensors").stat().st_mtime_ns == saved  # not even saved again
    assert sorted(p.name for p in (tmp_path / "run" / "checkpoints").iterdir()) == ["checkpoint-2"]


def test_to_item_keeps_the_earlier_images_of_a_multi_round_query_in_order(tmp_path: Path) -> None:
    from umarvel.data.inputs import MediaSettings, to_item

    paths = []
    for i, colour in enumerate([(200, 0, 0), (0, 200, 0), (0, 0, 200)]):
        paths.append(tmp_path / f"{i}.png")
        Image.new("RGB", (16, 12), colour).save(paths[-1])
    query = Query(qid="q", text="now make it blue", image=paths[2], images=(paths[0], paths[1]))
    item = to_item(query, MediaSettings(300 * 28 * 28))
    assert [im.getpixel((0, 0)) for im in item.images] == [(200, 0, 0), (0, 200, 0)]
    assert item.image is not None and item.image.getpixel((0, 0)) == (0, 0, 200)


def test_to_item_samples_a_video_with_the_callers_frame_settings(tmp_path: Path) -> None:
    pytest.importorskip("av")
    from umarvel.config.schema import EmbedderConfig
    from umarvel.data.inputs import MediaSettings, to_item
    from umarvel.data.video import load_video
    from umarvel.testing.media import write_test_video

    clip = write_test_video(tmp_path / "clip.mp4", [(220, 20, 20)] * 12, fps=4)  # 3 s at 4 fps
    candidate = Candidate(did="v", video=clip)
    pixels = EmbedderConfig().max_image_pixels
    default = to_item(candidate, MediaSettings(pixels))
    assert default.video is not None and len(default.video) == 6  # 2 fps x 3 s, EmbedderConfig defaults
    fixed = to_item(candidate, MediaSettings(pixels, video_frames=4))
    expected = load_video(clip, nframes=4, max_pixels=pixels)
    assert [f.tobytes() for f in fixed.video] == [f.tobytes() for f in expected]


def test_stage_b_fallback_negatives_follow_the_run_seed(mini_mbeir: Path, tmp_path: Path) -> None:
    import json

    from umarvel.config.schema import DataSource
    from umarvel.data.training import load_rows

    queries = (mini_mbeir / "query/union_train/mbeir_union_up_train.jsonl").read_text().splitlines()
    path = tmp_path / "negatives.jsonl"
    path.write_text(
        "".join(json.dumps({"qid": json.loads(q)["qid"], "negatives": ["gone"]}) + "\n" for q in queries)
    )
    source = DataSource(kind="mbeir", path=str(mini_mbeir), negatives=str(path))

    def fallback(seed: int) -> list[list[str]]:
        return [[c.did for c in row.negatives] for row in load_rows(source, seed=seed)]

    assert fallback(1) == fallback(1)
    assert fallback(1) != fallback(2)


@pytest.mark.skipif(torch.cuda.is_available(), reason="FSDP does run where there is a GPU")
def test_fsdp_without_a_gpu_stops_instead_of_quietly_training_with_ddp(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from umarvel.config.io import ConfigError

    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")  # what `accelerate launch --use_fsdp` sets
    monkeypatch.setenv("FSDP_VERSION", "2")
    with pytest.raises(ConfigError, match="accelerate runs FSDP only on GPUs"):
        _trainer(tmp_path)
