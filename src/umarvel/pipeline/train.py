"""The `train` stage: one progressive-transition stage, from a recipe to a merged checkpoint.

Output folder:
    run.json              the run's fingerprint (recipe, seed, content digests of its data and base model)
                          and, once finished, its artifact; a rerun with another fingerprint moves the
                          folder aside (`<folder>.<old fingerprint[:12]>`) instead of resuming it
    config.yaml           the resolved recipe
    checkpoints/          Trainer checkpoints (trainable weights, optimiser, scheduler, RNG); a rerun of
                          the same recipe resumes from the newest
    model/                the merged Hugging Face-format checkpoint, loadable with `--model`, with its
                          content digest in umarvel_digest.json
    metrics.json          recall before / after on the held-aside source, time, loss history
    training_curve.png    loss and temperature per logged step
    manifest.json         resolved config, git commit, input fingerprints
"""

from __future__ import annotations

import dataclasses
import json
import logging
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from umarvel.config.io import ConfigError, save_config
from umarvel.config.manifest import write_manifest
from umarvel.config.schema import DataSource, RerankerRunConfig, RunConfig
from umarvel.data.io import write_json
from umarvel.data.training import TrainingSet, load_rows
from umarvel.distributed import main_only, run_on_main
from umarvel.testing.mbeir import build_mini_mbeir

logger = logging.getLogger(__name__)


def for_training(settings: Any) -> Any:
    """An embedder's or re-ranker's config with its attention kernel resolved for training."""
    from umarvel.modeling.backbones import resolve_attention

    return dataclasses.replace(
        settings, attn_implementation=resolve_attention(settings.attn_implementation, training=True)
    )


def build_trainer(config: RunConfig, output_dir: Path) -> Any:
    """Load the embedder, open what the stage trains, and build the `EmbedderTrainer` with its data."""
    from umarvel.modeling.embedder import Embedder
    from umarvel.training.adapters import prepare_for_training
    from umarvel.training.trainer import ContrastiveCollator, EmbedderTrainer, training_arguments

    if not config.data.train:
        raise ValueError("the recipe has no data.train sources")
    embedder = Embedder.from_config(for_training(config.embedder))
    rows = [row for source in config.data.train for row in load_rows(source, seed=config.seed)]
    distill = config.train.loss == "distill"
    dataset = TrainingSet(
        rows,
        seed=config.seed,
        hard_negatives=config.train.hard_negatives,
        max_image_pixels=config.embedder.max_image_pixels,
        distill_top=config.train.distill_top if distill else 0,
        with_positive=not distill or config.train.distill_infonce_weight > 0,
        video_frames=config.embedder.video_frames,
        video_fps=config.embedder.video_fps,
        video_max_frames=config.embedder.video_max_frames,
    )
    prepare_for_training(embedder, config.train.lora, config.train.trainable_modules, seed=config.seed)
    return EmbedderTrainer(
        model=embedder,
        train_config=config.train,
        args=training_arguments(config.train, output_dir / "checkpoints", config.seed),
        train_dataset=dataset,
        data_collator=ContrastiveCollator(embedder.collator, config.train.gradcache_chunk_size),
    )


def train_stage(config: RunConfig, progress: bool = True) -> Path:
    """Run one stage to completion (resuming from the newest checkpoint) and return the model folder."""
    from transformers.trainer_utils import get_last_checkpoint

    from umarvel.evaluation.retrieval import evaluate_rows
    from umarvel.pipeline.run import RUN_FILE, claim_run
    from umarvel.training.adapters import merge_adapters

    output_dir = Path(config.output_dir)
    finished, key = claim_run("train", config)
    if finished and (output_dir / "model").is_dir():
        logger.info("%s: this recipe already finished training here (%s)", output_dir, RUN_FILE)
        return output_dir / "model"
    run_on_main(save_config, config, output_dir / "config.yaml")
    trainer = build_trainer(config, output_dir)
    embedder = trainer.model
    eval_rows = load_rows(config.data.eval, seed=config.seed) if config.data.eval is not None else []
    metrics: dict[str, Any] = {"stage": config.stage}
    checkpoints = output_dir / "checkpoints"
    resume = get_last_checkpoint(str(checkpoints)) if checkpoints.is_dir() else None
    before_file = output_dir / "metrics_before.json"
    if eval_rows and resume is None:

        def before() -> dict[str, Any]:
            found = evaluate_rows(embedder, eval_rows, config.data.eval_k, progress=progress)
            write_json(before_file, found)
            logger.info("before training: %s", found)
            return found

        metrics["before"] = run_on_main(before)
    elif eval_rows:
        metrics["before"] = json.loads(before_file.read_text()) if before_file.is_file() else None
    metrics.update(train_or_resume(trainer, resume))
    if config.train.lora.enabled and config.train.merge_lora:
        merge_adapters(embedder)
    embedder.eval()
    inputs = {f"train_{i}_{s.kind}": s.path for i, s in enumerate(config.data.train)}
    if config.data.eval is not None:
        inputs["eval"] = config.data.eval.path
    if Path(config.embedder.model).exists():
        inputs["base_model"] = config.embedder.model

    def after() -> dict[str, Any]:
        found = evaluate_rows(embedder, eval_rows, config.data.eval_k, progress=progress)
        logger.info("after training: %s", found)
        return found

    history = trainer.state.log_history
    return save_stage(embedder, config, key, "train", metrics, history, inputs, after if eval_rows else None)


@main_only
def save_stage(
    model: Any,
    config: RunConfig | RerankerRunConfig,
    key: str,
    command: str,
    metrics: dict[str, Any],
    history: list[dict[str, Any]],
    inputs: dict[str, str],
    evaluate_after: Callable[[], dict[str, Any]] | None = None,
) -> Path:
    """The end of a training run, by rank 0: the merged model in `model/`, its evaluation after
    training, `metrics.json`, the training curve, both manifests, and the run marked finished."""
    from umarvel.pipeline.run import RUN_FILE, finish
    from umarvel.pipeline.stages import Artifact

    output_dir = Path(config.output_dir)
    model_dir = output_dir / "model"
    model.save_pretrained(model_dir)
    if evaluate_after is not None:
        metrics["after"] = evaluate_after()
    metrics["log_history"] = history
    write_json(output_dir / "metrics.json", metrics)
    plot_training_curve(history, output_dir / "training_curve.png")
    extra = {"model": str(model_dir), "steps": metrics["steps"]}
    write_manifest(output_dir, command, config, inputs=inputs, extra=extra)
    write_manifest(model_dir, command, config, inputs=inputs, extra={"stage": config.stage})
    kind = "model" if command == "train" else "reranker"
    finish(output_dir, key, Artifact.of(kind, model_dir), RUN_FILE)
    return model_dir


def train_or_resume(trainer: Any, resume: str | None) -> dict[str, Any]:
    """Train from scratch or from `resume`; a finished checkpoint is loaded, not trained again (Trainer
    would take one more step). Returns train_loss, train_seconds_this_run and steps."""
    started = time.perf_counter()
    if resume and _finished(Path(resume)):
        from transformers import TrainerState

        logger.info("training already finished at %s; loading it", resume)
        trainer._load_from_checkpoint(resume)
        trainer.state = TrainerState.load_from_json(str(Path(resume) / "trainer_state.json"))
        loss = None
    else:
        if resume:
            logger.info("resuming from %s", resume)
        loss = trainer.train(resume_from_checkpoint=resume).training_loss
    return {
        "train_loss": loss,
        "train_seconds_this_run": round(time.perf_counter() - started, 1),
        "steps": trainer.state.global_step,
    }


def _finished(checkpoint: Path) -> bool:
    state = json.loads((checkpoint / "trainer_state.json").read_text())
    return state.get("max_steps", 0) > 0 and state.get("global_step", 0) >= state["max_steps"]


def plot_training_curve(history: list[dict[str, Any]], path: Path) -> Path | None:
    """Loss parts and temperature against the step, as a PNG (skipped without matplotlib)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        logger.info("matplotlib is not installed; no training curve plot")
        return None
    logged = [h for h in history if "loss" in h]
    if not logged:
        return None
    figure, (left, right) = plt.subplots(1, 2, figsize=(10, 3.5))
    steps = [h["step"] for h in logged]
    left.plot(steps, [h["loss"] for h in logged], label="total")
    for key in sorted({k for h in logged for k in h if k.startswith("loss/")}):
        left.plot(steps, [h.get(key) for h in logged], label=key.removeprefix("loss/"), alpha=0.7)
    left.set(xlabel="step", ylabel="loss", title="training loss")
    left.legend()
    right.plot(steps, [h.get("temperature") for h in logged])
    right.set(xlabel="step", ylabel="temperature", title="temperature")
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)
    return path


def _family_of(model: str, fallback: str) -> str:
    from umarvel.modeling.backbones import CHECKPOINT_FILE, REGISTRY

    if model == "offline":
        return "composed"
    if model.startswith("tiny:"):
        return model.removeprefix("tiny:")
    marker = Path(model) / CHECKPOINT_FILE
    if marker.is_file():
        return json.loads(marker.read_text())["family"]
    for spec in REGISTRY.values():
        if model in spec.hub_ids:
            return spec.family
    logger.info("dry run: %s is not built yet; standing in with tiny:%s", model, fallback)
    return fallback


def _stand_in(source: DataSource, folder: Path, distill: bool = False) -> DataSource:
    """A tiny file of the same kind, for a dry run where the real data is not on this machine."""
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    sentences = [
        (f"a photo of item {i}", f"a picture showing item {i}", f"nothing like item {i}") for i in range(8)
    ]
    if source.kind == "nli_csv":
        path = folder / "nli.csv"
        path.write_text("sent0,sent1,hard_neg\n" + "".join(f"{a},{b},{c}\n" for a, b, c in sentences))
    elif source.kind == "sick":
        path = folder / "SICK.txt"
        lines = [f"{i}\t{a}\t{b}\t4.5\tENTAILMENT\n" for i, (a, b, _) in enumerate(sentences)]
        path.write_text(
            "pair_ID\tsentence_A\tsentence_B\trelatedness_score\tentailment_judgment\n" + "".join(lines)
        )
    elif source.kind == "stsb":
        path = folder / "sts.csv"
        path.write_text("".join(f"g\tf\t2012\t{i}\t4.8\t{a}\t{b}\n" for i, (a, b, _) in enumerate(sentences)))
    elif source.kind == "beir":
        path = folder / "beir"
        (path / "qrels").mkdir(parents=True, exist_ok=True)
        (path / "corpus.jsonl").write_text(
            "".join(
                json.dumps({"_id": f"d{i}", "title": "", "text": b}) + "\n"
                for i, (_, b, _) in enumerate(sentences)
            )
        )
        (path / f"queries_{source.split}.jsonl").write_text(
            "".join(json.dumps({"_id": f"q{i}", "text": a}) + "\n" for i, (a, _, _) in enumerate(sentences))
        )
        (path / "qrels" / f"{source.split}.tsv").write_text(
            "query-id\tcorpus-id\tscore\n" + "".join(f"q{i}\td{i}\t1\n" for i in range(8))
        )
    elif source.kind == "image_captions":
        path = folder / "captions.csv"
        (folder / "images").mkdir(exist_ok=True)
        for i in range(8):
            Image.new("RGB", (32, 24), (30 * i, 200 - 20 * i, 90)).save(folder / "images" / f"{i}.jpg")
        path.write_text(
            "image,caption\n" + "".join(f"{i}.jpg,{a}\n" for i, (a, _, _) in enumerate(sentences))
        )
        return dataclasses.replace(source, path=str(path), split="all", image_root=str(folder / "images"))
    else:
        path = build_mini_mbeir(folder / "M-BEIR")
        # Negatives for a hard-negative stage: the first pool candidates that are not a positive.
        pool = [json.loads(line)["did"] for line in (path / DataSource.pool).read_text().splitlines()]
        mined = []
        for line in (path / DataSource.queries).read_text().splitlines():
            query = json.loads(line)
            negatives = [d for d in pool if d not in query["pos_cand_list"]][:8]
            mined.append(json.dumps({"qid": query["qid"], "negatives": negatives}))
        (folder / "negatives.jsonl").write_text("\n".join(mined) + "\n")
        # A teacher for a distillation stage: the first pool candidates, scored by rank.
        teacher = [
            json.dumps({"qid": q["qid"], "candidates": pool[:8], "teacher": [1.0 - i / 8 for i in range(8)]})
            for q in (json.loads(line) for line in (path / DataSource.queries).read_text().splitlines())
        ]
        (folder / "teacher.jsonl").write_text("\n".join(dict.fromkeys(teacher)) + "\n")
        return dataclasses.replace(
            source,
            path=str(path),
            pool=DataSource.pool,
            queries=DataSource.queries,
            negatives=str(folder / "negatives.jsonl"),
            teacher=str(folder / "teacher.jsonl") if source.teacher or distill else None,
        )
    return dataclasses.replace(source, path=str(path))


def dry_run(config: RunConfig, output_dir: str | Path, family: str = "qwen2_vl") -> dict[str, Any]:
    """Validate a recipe by building everything with a tiny model of its family and training 2 steps.

    Real data is used (16 rows) where present, stand-ins of the same format elsewhere; a DeepSpeed
    config is parsed but not launched. Returns the steps taken and the stand-in model name.
    """
    output_dir = Path(output_dir)
    if config.train.deepspeed is not None:
        json.loads(Path(config.train.deepspeed).read_text())  # must exist and parse
    sources = []
    stand_ins = []
    for i, source in enumerate(config.data.train):
        present = Path(source.path).exists()
        if not present:
            stand_ins.append(source.path)
            logger.warning(
                "dry run: %s does not exist; a stand-in of the same format is used instead (a real run "
                "would fail here)",
                source.path,
            )
        sources.append(
            dataclasses.replace(source, max_rows=16)
            if present
            else _stand_in(
                source, output_dir / "stand_ins" / f"{i}_{source.kind}", config.train.loss == "distill"
            )
        )
    model = f"tiny:{_family_of(config.embedder.model, family)}"
    small = dataclasses.replace(
        config,
        embedder=dataclasses.replace(config.embedder, model=model, attn_implementation="sdpa"),
        data=dataclasses.replace(config.data, train=tuple(sources), eval=None),
        train=dataclasses.replace(
            config.train,
            max_steps=2,
            per_device_batch_size=4,
            save_steps=1000,
            deepspeed=None,
            dataloader_workers=0,
            logging_steps=1,
        ),
        output_dir=str(output_dir / "run"),
    )
    train_stage(small, progress=False)
    metrics = json.loads((output_dir / "run" / "metrics.json").read_text())
    return {
        "steps": metrics["steps"],
        "model": model,
        "output_dir": str(output_dir / "run"),
        "stand_ins": stand_ins,
    }


def train_reranker(config: RerankerRunConfig, progress: bool = True) -> Path:
    """Train a re-ranker stage to completion (resuming from the newest checkpoint); returns model/."""
    from transformers.trainer_utils import get_last_checkpoint

    from umarvel.reranker.data import RerankCollator, RerankSet
    from umarvel.reranker.model import Reranker
    from umarvel.reranker.training import RerankerTrainer
    from umarvel.training.adapters import merge_adapters, prepare_for_training
    from umarvel.training.trainer import training_arguments

    if not config.data.train:
        raise ConfigError("the recipe has no data.train sources")
    from umarvel.pipeline.run import claim_run

    output_dir = Path(config.output_dir)
    finished, key = claim_run("train_reranker", config)
    if finished and (output_dir / "model").is_dir():
        logger.info("%s: this recipe already finished training here", output_dir)
        return output_dir / "model"
    run_on_main(save_config, config, output_dir / "config.yaml")
    reranker = Reranker.from_config(for_training(config.reranker))
    rows = [row for source in config.data.train for row in load_rows(source, seed=config.seed)]
    dataset = RerankSet(rows, config.seed, config.reranker)
    prepare_for_training(reranker, config.train.lora, config.train.trainable_modules, seed=config.seed)
    trainer = RerankerTrainer(
        model=reranker,
        args=training_arguments(config.train, output_dir / "checkpoints", config.seed),
        train_dataset=dataset,
        data_collator=RerankCollator(reranker.collator),
    )
    checkpoints = output_dir / "checkpoints"
    resume = get_last_checkpoint(str(checkpoints)) if checkpoints.is_dir() else None
    metrics: dict[str, Any] = {"stage": config.stage, "queries": len(rows)}
    metrics.update(train_or_resume(trainer, resume))
    if config.train.lora.enabled and config.train.merge_lora:
        merge_adapters(reranker)
    reranker.eval()
    inputs = {f"train_{i}_{s.kind}": s.path for i, s in enumerate(config.data.train)}
    for i, source in enumerate(config.data.train):
        if source.negatives:
            inputs[f"train_{i}_negatives"] = source.negatives
    return save_stage(reranker, config, key, "train-reranker", metrics, trainer.state.log_history, inputs)
