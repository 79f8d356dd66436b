"""The paper's ablation directions at CPU scale: each one a paired difference with its 95% interval.

Every variant trains the same stage on the same budget: M-BEIR instruction tuning (stage A3's recipe)
from the offline backbone on the quickstart benchmark's train split, with the same steps, batch,
learning rate and seed. Only the setting under study changes:

1. attention and pooling: bidirectional + mean (U-MARVEL) against causal + last token (method doc
   section 9, Table 1: row 4 against row 0);
2. the instruction masked out of mean pooling against pooled with the rest (Table 2: row 0 against 1);
3. stage B from the U-MARVEL variant's model: mined negatives filtered by NV-Retriever's relative rule
   (drop candidates scoring above 95 % of the positive) against the unfiltered top k (Table 5: row 2
   against row 1). Both drop labelled positives; this benchmark's labels are complete, so what the
   filter removes here is near-duplicates of the positive, not unlabelled positives;
4. SmolLM2's default system turn (about 20 tokens an item) left out against kept (issue 15 item 4):
   quality, and seconds per training step beside it.

Each variant is a stage of one pipeline recipe (`<output>/pipeline.yaml`), run by the same runner as
`umarvel pipeline`: a rerun skips finished stages and resumes a half-done one. A difference is the mean
over queries of (hit of A - hit of B) at the row's headline k, averaged over rows as M-BEIR averages are,
with a bootstrap 95% interval resampling queries within rows (the same queries on both sides, so the
pairing removes the queries' shared difficulty). Writes ablations.json / .md / .png.

    python benchmarks/ablations.py                      # about 30 min on 2 CPU cores
    python benchmarks/ablations.py --steps 20 --batch 4  # a quicker, noisier look
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from umarvel.config.io import from_dict
from umarvel.config.manifest import describe_machine, machine
from umarvel.config.stages import PipelineConfig
from umarvel.data.io import atomic_write, write_json
from umarvel.evaluation.mbeir import paired_difference
from umarvel.pipeline.run import run_stage, validate
from umarvel.quickstart.benchmark import build_quickstart_benchmark

logger = logging.getLogger("ablations")

# name -> embedding definition of the variant (everything else is the recipe's).
VARIANTS = {
    "umarvel": {"attention": "bidirectional", "pooling": "mean", "mask_instruction": True},
    "causal_last": {"attention": "causal", "pooling": "last_token", "mask_instruction": True},
    "instruction_pooled": {"attention": "bidirectional", "pooling": "mean", "mask_instruction": False},
    # The chat template's default system turn kept (`auto` leaves it out for the composed backbone).
    "system_prompt": {
        "attention": "bidirectional",
        "pooling": "mean",
        "mask_instruction": True,
        "system_prompt": "default",
    },
}
# (question, A, B, paper's local / global A - B on M-BEIR with Qwen2-VL-7B, method doc section 9).
COMPARISONS = (
    ("bidirectional + mean vs causal + last token", "umarvel", "causal_last", (0.6, 0.4), "Table 1"),
    ("instruction masked vs pooled", "umarvel", "instruction_pooled", (0.1, 0.3), "Table 2"),
    ("stage B: filtered vs unfiltered negatives", "B_filtered", "B_unfiltered", (4.3, 4.5), "Table 5"),
    ("system prompt left out vs kept", "umarvel", "system_prompt", None, "not in the paper"),
)


def _recipe(root: Path, definition: dict[str, Any], args: argparse.Namespace, negatives: bool) -> dict:
    train: dict[str, Any] = {
        "bf16": "auto",
        "learning_rate": args.lr if not negatives else args.lr / 2,
        "max_steps": args.steps if not negatives else max(1, args.steps // 2),
        "warmup_ratio": 0.1,
        "per_device_batch_size": args.batch,
        "logging_steps": 1,
        "save_steps": max(1, args.steps // 2),
        "lora": {"rank": 8, "alpha": 16, "dropout": 0.0},
        "trainable_modules": ["projector"],
    }
    if negatives:
        train.update({"hard_negatives": 2, "gradcache_chunk_size": 8})
    return {
        "stage": "ablation",
        "embedder": {"model": "offline", "dtype": "auto", "max_text_tokens": 64, **definition},
        "data": {"train": [{"kind": "mbeir", "path": str(root)}]},
        "train": train,
    }


def build_pipeline(out: Path, root: Path, args: argparse.Namespace) -> dict[str, Any]:
    """The ablation as one pipeline recipe: a train and an eval stage per variant, then the two stage-B
    variants from the U-MARVEL variant's model."""
    recipes = out / "recipes"
    recipes.mkdir(parents=True, exist_ok=True)

    def write(name: str, recipe: dict) -> str:
        path = recipes / f"{name}.yaml"
        with atomic_write(path) as handle:
            yaml.safe_dump(recipe, handle, sort_keys=False)
        return str(path)

    evaluation = {
        "root": str(root),
        "cache": str(out / "stages" / "embedding_cache"),
        "settings": ["dtype=auto"],
    }
    stages: list[dict[str, Any]] = []
    for name, definition in VARIANTS.items():
        stages.append(
            {"name": name, "kind": "train", "recipe": write(name, _recipe(root, definition, args, False))}
        )
        stages.append(
            {"name": f"eval_{name}", "kind": "eval", "inputs": {"model": name}, "config": evaluation}
        )
    mine = {"root": str(root), "shortlist": 40, "max_score": None, "k": 2}
    negatives = write("B", _recipe(root, VARIANTS["umarvel"], args, True))
    for name, rule in (("B_filtered", {"relative": 0.95}), ("B_unfiltered", {})):
        stages.append(
            {
                "name": f"mine_{name}",
                "kind": "mine",
                "inputs": {"model": "umarvel"},
                "config": {**mine, **rule},
            }
        )
        stages.append(
            {
                "name": name,
                "kind": "train",
                "recipe": negatives,
                "inputs": {"model": "umarvel", "negatives": f"mine_{name}"},
            }
        )
        stages.append(
            {"name": f"eval_{name}", "kind": "eval", "inputs": {"model": name}, "config": evaluation}
        )
    return {"output_dir": str(out / "stages"), "seed": args.seed, "stages": stages}


def _verdict(interval: list[float], paper: float | None) -> str:
    if paper is None:
        return (
            "A better" if interval[0] > 0 else "B better" if interval[1] < 0 else "no significant difference"
        )
    if interval[0] > 0:
        return "agrees (A better)" if paper > 0 else "disagrees (A better)"
    if interval[1] < 0:
        return "disagrees (B better)" if paper > 0 else "agrees (B better)"
    return "no significant difference"


def render(report: dict[str, Any]) -> str:
    lines = [
        f"# Ablations at CPU scale: {report['budget']}",
        "",
        f"{report['machine_line']}. Benchmark: the quickstart's (semi-synthetic clothing rows, "
        f"{report['test_queries']} test queries). {report['minutes']:.0f} min for this run (a rerun "
        "skips finished stages; all of them from scratch take about 37 min).",
        "",
        "Each cell: A - B in points of M-BEIR average recall (local / global), bootstrap 95% interval over "
        "queries, paired; the paper's difference (Qwen2-VL-7B on M-BEIR) beside it.",
        "",
        "| question (A vs B) | local A - B [95% CI] | global A - B [95% CI] | paper local / global "
        "| verdict (local) |",
        "|---|---|---|---|---|",
    ]
    for c in report["comparisons"]:
        cells = [
            f"{c[s]['difference']:+.2f} [{c[s]['interval'][0]:+.1f}, {c[s]['interval'][1]:+.1f}]"
            for s in ("local", "global")
        ]
        paper = f"{c['paper'][0]:+.1f} / {c['paper'][1]:+.1f} ({c['table']})" if c["paper"] else c["table"]
        lines.append(f"| {c['question']} | {cells[0]} | {cells[1]} | {paper} | {c['verdict']} |")
    lines += [
        "",
        "| variant | average local [95% CI] | average global [95% CI] | final train loss | s / step |",
        "|---|---|---|---|---|",
    ]
    for name, v in report["variants"].items():
        lo, gl = v["interval"]["local"], v["interval"]["global"]
        lines.append(
            f"| {name} | {v['average']['local']:.2f} [{lo[0]:.1f}, {lo[1]:.1f}] "
            f"| {v['average']['global']:.2f} [{gl[0]:.1f}, {gl[1]:.1f}] "
            f"| {v['final_loss']} | {v['seconds_per_step']} |"
        )
    lines += [
        "",
        "s / step is the wall time of each variant's training, comparable only where the machine was "
        "otherwise idle for all of them (it is not when variants were added on a later run).",
    ]
    return "\n".join(lines) + "\n"


def plot(report: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    comparisons = report["comparisons"]
    fig, ax = plt.subplots(figsize=(8, 0.9 * len(comparisons) + 1.5))
    for i, c in enumerate(comparisons):
        for offset, setting, colour in ((-0.15, "local", "tab:blue"), (0.15, "global", "tab:orange")):
            d = c[setting]
            ax.errorbar(
                d["difference"],
                i + offset,
                xerr=[[d["difference"] - d["interval"][0]], [d["interval"][1] - d["difference"]]],
                fmt="o",
                color=colour,
                capsize=4,
                label=setting if i == 0 else None,
            )
        if c["paper"]:
            ax.plot(c["paper"][0], i - 0.15, "x", color="black", label="paper" if i == 0 else None)
            ax.plot(c["paper"][1], i + 0.15, "x", color="black")
    ax.axvline(0, color="grey", lw=0.8)
    ax.set_yticks(range(len(comparisons)), [c["question"] for c in comparisons])
    ax.invert_yaxis()
    ax.set_xlabel("A - B, points of average recall (95% CI)")
    ax.set_title(f"Ablations at CPU scale\n{report['budget']}", fontsize=10)
    ax.legend(loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--output-dir", default="runs/ablations")
    parser.add_argument("--results", default="benchmarks/results")
    parser.add_argument("--steps", type=int, default=60, help="stage A3 steps per variant (B gets half)")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--lr", type=float, default=1e-3, help="A3's learning rate (B gets half)")
    parser.add_argument("--seed", type=int, default=42)
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    out = Path(args.output_dir)
    started = time.perf_counter()
    root = build_quickstart_benchmark(out / "M-BEIR")
    recipe = build_pipeline(out, root, args)
    with atomic_write(out / "pipeline.yaml") as handle:
        yaml.safe_dump(recipe, handle, sort_keys=False)
    pipeline = from_dict(PipelineConfig, recipe)
    configs = validate(pipeline)
    stages = Path(pipeline.output_dir)
    for spec in pipeline.stages:
        status = run_stage(spec, configs[spec.name], stages, pipeline.seed, progress=False)
        logger.info("stage %s: %s", spec.name, status)
    results, variants = {}, {}
    for name in (*VARIANTS, "B_filtered", "B_unfiltered"):
        result = results[name] = json.loads((stages / f"eval_{name}" / "results.json").read_text())
        metrics = json.loads((stages / name / "metrics.json").read_text())
        history = metrics["log_history"]
        losses = [h["loss"] for h in history if "loss" in h]
        variants[name] = {
            "average": result["average"],
            "interval": result["interval"],
            "final_loss": round(float(np.mean(losses[-5:])), 3) if losses else None,
            "seconds_per_step": round(metrics["train_seconds_this_run"] / max(1, metrics["steps"]), 2),
        }
    comparisons = []
    for question, a, b, paper, table in COMPARISONS:
        local, global_ = (paired_difference(results[a], results[b], s) for s in ("local", "global"))
        comparisons.append(
            {
                "question": question,
                "a": a,
                "b": b,
                "local": local,
                "global": global_,
                "paper": paper,
                "table": table,
                "verdict": _verdict(local["interval"], paper[0] if paper else None),
            }
        )
    facts = machine()
    report = {
        "budget": f"{args.steps} steps x {args.batch} queries, lr {args.lr:g} (stage B: half of each)",
        "machine": facts,
        "machine_line": describe_machine(facts),
        "test_queries": sum(r["queries"] for r in results["umarvel"]["rows"]),
        "minutes": (time.perf_counter() - started) / 60,
        "variants": variants,
        "comparisons": comparisons,
    }
    results = Path(args.results)
    results.mkdir(parents=True, exist_ok=True)
    write_json(results / "ablations.json", report)
    (results / "ablations.md").write_text(render(report))
    plot(report, results / "ablations.png")
    print(render(report))


if __name__ == "__main__":
    main()
