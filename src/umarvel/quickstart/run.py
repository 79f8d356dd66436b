"""Run the quickstart: build the benchmark, run every U-MARVEL stage small, evaluate each, index the result.

Stages (through the pipeline runner, so a rerun skips finished stages and resumes a half-done one):
A1 text pairs (COCO captions of the same photo) -> A2 text -> image -> A3 every task with instructions ->
mine (margin filter) -> B hard negatives -> mine for the re-ranker -> R1 -> teacher -> C distillation.
Then each stage is evaluated on the test split (local and global pools), the fusion weight is tuned on
val, U-MARVEL+ is evaluated on test, and the final model indexes the test pool.

Output folder: M-BEIR/ (the benchmark), stages/ (one folder per stage), eval/ (one per stage),
stages.md / stages.json / stages.png (the table and its chart), index/ (for search and serve).
"""

from __future__ import annotations

import csv
import logging
import random
import time
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from umarvel.data.io import atomic_write, write_json
from umarvel.quickstart.benchmark import build_quickstart_benchmark, shipped_data

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class QuickstartScale:
    """Steps and sizes; `full` fits 10 minutes on 2 CPU cores, `smoke` checks the wiring in about one."""

    model: str
    text_steps: int
    image_steps: int
    mbeir_steps: int
    negative_steps: int
    reranker_steps: int
    distill_steps: int
    batch: int
    teacher_fraction: float
    shortlist: int
    rerank_top: int


SCALES = {
    "full": QuickstartScale("offline", 8, 10, 12, 8, 12, 6, 16, 0.5, 8, 3),
    "smoke": QuickstartScale("tiny:composed", 1, 1, 1, 1, 1, 1, 4, 0.2, 4, 3),
}


def _pairs(captions: Path, out: Path, seed: int) -> Path:
    """Caption pairs of the same photo, with a caption of another photo as the hard negative (the
    `nli_csv` layout: sent0, sent1, hard_neg)."""
    by_photo: dict[str, list[str]] = defaultdict(list)
    with captions.open(encoding="utf-8", newline="") as handle:
        for row in csv.DictReader(handle):
            by_photo[row["photo"]].append(row["caption"])
    rng = random.Random(seed)
    photos = sorted(by_photo)
    with atomic_write(out) as handle:
        writer = csv.writer(handle)
        writer.writerow(["sent0", "sent1", "hard_neg"])
        for photo in photos:
            first, second = rng.sample(by_photo[photo], 2)
            other = rng.choice([p for p in photos if p != photo])
            writer.writerow([first, second, rng.choice(by_photo[other])])
    return out


def _recipes(folder: Path, root: Path, pairs: Path, scale: QuickstartScale) -> dict[str, Path]:
    """Write the stage recipes (YAML, as a user would) and return their paths by stage."""
    embedder = {"model": scale.model, "dtype": "bfloat16", "max_text_tokens": 64}
    lora = {"rank": 8, "alpha": 16, "dropout": 0.05}
    common = {"bf16": True, "logging_steps": 1, "per_device_batch_size": scale.batch, "lora": lora}
    mbeir = {"kind": "mbeir", "path": str(root)}
    recipes = {
        "A1_text": {
            "stage": "A1_text",
            "embedder": embedder,
            "data": {"train": [{"kind": "nli_csv", "path": str(pairs)}]},
            "train": {
                **common,
                "learning_rate": 2e-4,
                "max_steps": scale.text_steps,
                "save_steps": max(1, scale.text_steps // 2),
            },
        },
        "A2_image_text": {
            "stage": "A2_image_text",
            "embedder": embedder,
            "data": {"train": [{**mbeir, "queries": "query/train/mbeir_mscoco_train.jsonl"}]},
            "train": {
                **common,
                "learning_rate": 2e-4,
                "max_steps": scale.image_steps,
                "symmetric": True,
                "trainable_modules": ["projector"],
                "save_steps": max(1, scale.image_steps // 2),
            },
        },
        "A3_mbeir": {
            "stage": "A3_mbeir",
            "embedder": embedder,
            "data": {"train": [mbeir]},
            "train": {
                **common,
                "learning_rate": 1e-4,
                "max_steps": scale.mbeir_steps,
                "trainable_modules": ["projector"],
                "save_steps": max(1, scale.mbeir_steps // 2),
            },
        },
        "B_hard_negatives": {
            "stage": "B_hard_negatives",
            "embedder": embedder,
            "data": {"train": [mbeir]},
            "train": {
                **common,
                "learning_rate": 5e-5,
                "max_steps": scale.negative_steps,
                "hard_negatives": 2,
                "per_device_batch_size": max(2, scale.batch // 2),
                "gradcache_chunk_size": 8,
                "trainable_modules": ["projector"],
                "save_steps": max(1, scale.negative_steps // 2),
            },
        },
        "R1": {
            "stage": "R1",
            "reranker": {"model": scale.model, "dtype": "bfloat16", "max_text_tokens": 64},
            "data": {"train": [mbeir]},
            "train": {
                **common,
                "learning_rate": 2e-4,
                "max_steps": scale.reranker_steps,
                "per_device_batch_size": max(2, scale.batch // 2),
                "trainable_modules": ["projector"],
                "save_steps": max(1, scale.reranker_steps // 2),
            },
        },
        "C_distill": {
            "stage": "C_distill",
            "embedder": embedder,
            "data": {"train": [mbeir]},
            "train": {
                **common,
                "loss": "distill",
                "distill_top": scale.shortlist,
                "learning_rate": 5e-5,
                "max_steps": scale.distill_steps,
                "per_device_batch_size": max(2, scale.batch // 4),
                "gradcache_chunk_size": 8,
                "trainable_modules": ["projector"],
                "save_steps": max(1, scale.distill_steps // 2),
            },
        },
    }
    folder.mkdir(parents=True, exist_ok=True)
    paths = {}
    for name, recipe in recipes.items():
        paths[name] = folder / f"{name}.yaml"
        with atomic_write(paths[name]) as handle:
            yaml.safe_dump(recipe, handle, sort_keys=False)
    return paths


def _pipeline(out: Path, root: Path, recipes: dict[str, Path], scale: QuickstartScale) -> Any:
    from umarvel.pipeline.run import PipelineConfig, StageSpec

    mine = {"root": str(root), "shortlist": 40, "max_score": None}
    return PipelineConfig(
        stages=(
            StageSpec("A1_text", "train", recipe=str(recipes["A1_text"])),
            StageSpec("A2_image_text", "train", recipe=str(recipes["A2_image_text"]), model_from="A1_text"),
            StageSpec("A3_mbeir", "train", recipe=str(recipes["A3_mbeir"]), model_from="A2_image_text"),
            StageSpec("mine", "mine", model_from="A3_mbeir", k=2, margin=0.02, **mine),
            StageSpec(
                "B_hard_negatives",
                "train",
                recipe=str(recipes["B_hard_negatives"]),
                model_from="A3_mbeir",
                negatives_from="mine",
            ),
            StageSpec("mine_r1", "mine", model_from="A3_mbeir", k=4, selection="sample", rank_end=20, **mine),
            StageSpec("R1", "train_reranker", recipe=str(recipes["R1"]), negatives_from="mine_r1"),
            StageSpec(
                "teacher",
                "score",
                model_from="B_hard_negatives",
                reranker_from="R1",
                root=str(root),
                fraction=scale.teacher_fraction,
                top=scale.shortlist,
                alpha=0.5,
            ),
            StageSpec(
                "C_distill",
                "train",
                recipe=str(recipes["C_distill"]),
                model_from="B_hard_negatives",
                teacher_from="teacher",
            ),
        ),
        output_dir=str(out / "stages"),
        seed=42,
    )


def run_quickstart(
    output_dir: str | Path = "runs/quickstart", scale: str = "full", console: Any = None
) -> dict:
    """Run everything (resumable) and return the stage table as a dict; prints it to `console`."""
    from umarvel.evaluation.mbeir import compare_results, evaluate_mbeir, plot_comparison, render_stage_rows
    from umarvel.evaluation.rerank import rerank_runs, tune_fusion
    from umarvel.modeling.embedder import Embedder
    from umarvel.modeling.reranker import Reranker
    from umarvel.pipeline.run import run_pipeline

    settings = SCALES[scale]
    out = Path(output_dir)
    times: dict[str, float] = {}
    started = time.perf_counter()
    root = build_quickstart_benchmark(out / "M-BEIR")
    pairs = _pairs(shipped_data() / "coco_captions.csv", out / "coco_pairs.csv", seed=42)
    recipes = _recipes(out / "recipes", root, pairs, settings)
    pipeline = _pipeline(out, root, recipes, settings)
    times["benchmark"] = time.perf_counter() - started
    for spec in pipeline.stages:
        tick = time.perf_counter()
        run_pipeline(pipeline, start=spec.name, until=spec.name)
        times[spec.name] = time.perf_counter() - tick
    stages = out / "stages"
    evaluated = [("untrained", settings.model)] + [
        (name, str(stages / name / "model"))
        for name in ("A1_text", "A2_image_text", "A3_mbeir", "B_hard_negatives", "C_distill")
    ]
    runs = []
    test_rows = []
    for name, model in evaluated:
        tick = time.perf_counter()
        embedder = Embedder.from_pretrained(model, dtype="bfloat16")
        test_rows = [s.row for s in evaluate_mbeir(embedder, root, out / "eval" / name, progress=False).rows]
        runs.append((name, out / "eval" / name))
        times[f"eval {name}"] = time.perf_counter() - tick
    tick = time.perf_counter()
    reranker = Reranker.from_pretrained(str(stages / "R1" / "model"))
    final = Embedder.from_pretrained(str(stages / "C_distill" / "model"), dtype="bfloat16")
    val = evaluate_mbeir(final, root, out / "tune" / "retrieval", "val", progress=False)
    rows = [s.row for s in val.rows]
    choice = tune_fusion(
        reranker,
        root,
        out / "tune" / "retrieval" / "runs",
        out / "tune",
        rows,
        "val",
        top=settings.rerank_top,
        grid=(0.0, 0.1, 0.3, 1.0),
        progress=False,
    )
    rerank_runs(
        reranker,
        root,
        out / "eval" / "C_distill" / "runs",
        out / "eval" / "C_rerank",
        test_rows,
        top=settings.rerank_top,
        weights=(choice["weight"],),
        progress=False,
    )
    runs.append((f"C + rerank (w={choice['weight']})", out / "eval" / "C_rerank"))
    times["tune fusion + rerank"] = time.perf_counter() - tick
    _, table = compare_results(runs)
    markdown = render_stage_rows(table)
    (out / "stages.md").write_text(markdown + "\n")
    plot_comparison(table, out / "stages.png")
    tick = time.perf_counter()
    _index(final, root, out / "index")
    times["index"] = time.perf_counter() - tick
    times["total"] = time.perf_counter() - started
    table["seconds"] = {k: round(v, 1) for k, v in times.items()}
    table["fusion"] = choice
    write_json(out / "stages.json", table)
    if console is not None:
        console.print(markdown)
        console.print("seconds per step: " + ", ".join(f"{k} {v:.0f}" for k, v in table["seconds"].items()))
        console.print(f"chart: {out / 'stages.png'}; index: {out / 'index'}")
        console.print(f'try: umarvel search {out / "index"} --text "a red dress" -k 5')
    return table


def _index(embedder: Any, root: Path, folder: Path) -> None:
    """Index the test pool with the final model (candidates and media copied into the folder)."""
    import dataclasses

    from umarvel.pipeline.index import build_index

    pool = root / "cand_pool" / "global" / "mbeir_union_test_cand_pool.jsonl"
    config = dataclasses.replace(embedder.settings)
    build_index(config, pool, folder, image_root=root, progress=False)
