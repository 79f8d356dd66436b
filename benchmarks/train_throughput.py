"""Training step time and achieved FLOP/s of LoRA training against this machine's matmul peak, in one run.

One process, one model (default: the offline backbone, LoRA rank 8 on every linear layer of the LM, the
projector trainable), one batch shape like the quickstart's image stages: queries are class descriptions,
positives clothing photos, plus one photo negative each. Variants, timed in interleaved rounds so that
machine noise hits them alike:
- `gradcache`: the B/C-stage path (GradCache, chunk 8) with the frozen image encoder's feature cache;
- `gradcache, no feature cache`: the same with the cache off (every image through the encoder twice);
- `plain`: one forward and backward of the whole batch, feature cache on;
- `plain, checkpointing`: the same with gradient checkpointing (recompute in backward);
- `plain, sdpa attention`: `plain` with PyTorch's fused attention instead of the kernel training picks
  (`attn_implementation: auto`: eager on a CPU, whose backward is the faster one at these lengths).
Every other variant uses the kernel training picks, as `umarvel train` does.

Useful FLOPs are those of the `plain` step without checkpointing, counted by FlopCounterMode; every
variant is scored against them (recomputation is overhead, not work). The peak is the best of large
square matmuls in the training dtype, measured in the same run. Writes train_throughput.json / .md.

    python benchmarks/train_throughput.py --batch 16 --rounds 3
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

import torch
from torch.utils.flop_counter import FlopCounterMode

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from benchmarks.digest_cost import _cpu_flags, _cpu_name
from benchmarks.encode_flops import matmul_peak

VARIANTS = (
    "gradcache",
    "gradcache, no feature cache",
    "plain",
    "plain, checkpointing",
    "plain, sdpa attention",
)


def _rows(batch: int, steps: int):
    from umarvel.data.convert import CLOTHING_CLASSES
    from umarvel.data.records import Candidate, Query
    from umarvel.data.training import TrainRow
    from umarvel.quickstart.benchmark import shipped_data

    photos = sorted((shipped_data() / "clothing" / "train").glob("*/*.jpg"))
    rows = []
    for i in range(batch * steps):
        photo = photos[(2 * i) % len(photos)]
        other = photos[(2 * i + 1) % len(photos)]
        cls = photo.parent.name.replace("-", " ")
        assert photo.parent.name in CLOTHING_CLASSES
        rows.append(
            TrainRow(
                Query(qid=f"q{i}", text=f"a product picture of a {cls}", instruction="Find the garment."),
                (Candidate(did=f"p{i}", image=str(photo)),),
                (Candidate(did=f"n{i}", image=str(other)),),
            )
        )
    return rows


def _trainer(
    model: str, batch: int, dtype: str, chunk: int, checkpointing: bool, rows, attention: str = "auto"
):
    from umarvel.config.schema import LoraSettings, TrainConfig
    from umarvel.data.training import TrainingSet
    from umarvel.modeling.embedder import Embedder
    from umarvel.training.adapters import prepare_for_training
    from umarvel.training.trainer import ContrastiveCollator, EmbedderTrainer, training_arguments

    config = TrainConfig(
        per_device_batch_size=batch,
        gradcache_chunk_size=chunk,
        hard_negatives=1,
        bf16=dtype == "bfloat16",
        gradient_checkpointing=checkpointing,
        max_steps=1,
        lora=LoraSettings(rank=8, alpha=16, dropout=0.0),
    )
    from umarvel.modeling.backbones import resolve_attention

    kernel = resolve_attention(attention, training=True)
    embedder = Embedder.from_pretrained(model, dtype=dtype, max_text_tokens=64, attn_implementation=kernel)
    prepare_for_training(embedder, config.lora, ("projector",))
    trainer = EmbedderTrainer(
        model=embedder,
        train_config=config,
        args=training_arguments(config, Path("/tmp/umarvel-train-throughput"), seed=0),
        train_dataset=TrainingSet(rows, seed=0, hard_negatives=1),
        data_collator=ContrastiveCollator(embedder.collator, chunk),
    )
    if checkpointing:
        embedder.activation_checkpointing_enable()
    embedder.train()
    return trainer, embedder


def _tokens(inputs) -> int:
    from benchmarks.gradcache_memory import _tokens as count

    return count(inputs)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="offline")
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--rounds", type=int, default=3, help="timed steps per variant")
    parser.add_argument("--dtype", default="auto")
    parser.add_argument("--output-dir", type=Path, default=Path("benchmarks/results"))
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from umarvel.modeling.composed import ComposedModel, clear_feature_cache
    from umarvel.modeling.embedder import resolve_dtype

    dtype = resolve_dtype(args.dtype)
    dtype_name = str(dtype).removeprefix("torch.")
    print(f"training dtype: {dtype_name} (from {args.dtype}); CPU flags: {_cpu_flags()}")
    peak = max(matmul_peak(torch.device("cpu"), dtype, n) for n in (1024, 2048))
    steps = args.rounds + 1  # one warm-up batch, then a fresh batch per round
    rows = _rows(args.batch, steps)
    settings = {  # (GradCache chunk, checkpointing, feature cache, attention)
        "gradcache": (8, False, True, "auto"),
        "gradcache, no feature cache": (8, False, False, "auto"),
        "plain": (0, False, True, "auto"),
        "plain, checkpointing": (0, True, True, "auto"),
        "plain, sdpa attention": (0, False, True, "sdpa"),
    }
    trainers = {
        name: _trainer(args.model, args.batch, dtype_name, chunk, ckpt, rows, attention)
        for name, (chunk, ckpt, _, attention) in settings.items()
    }

    def inputs(trainer, step: int):
        indices = range(step * args.batch, (step + 1) * args.batch)
        return trainer.data_collator([trainer.train_dataset[i] for i in indices])

    def run(name: str, step: int) -> float:
        trainer, embedder = trainers[name]
        cache_on = settings[name][2]
        ComposedModel.feature_cache_bytes = 256 * 2**20 if cache_on else 0
        clear_feature_cache()  # one cache serves every model in the process: each variant starts cold
        batch = inputs(trainer, step)
        embedder.zero_grad(set_to_none=True)
        started = time.perf_counter()
        trainer.training_step(trainer.model, batch)
        return time.perf_counter() - started

    plain_trainer, _ = trainers["plain"]
    ComposedModel.feature_cache_bytes = 0
    with FlopCounterMode(display=False) as counter:
        plain_trainer.training_step(plain_trainer.model, inputs(plain_trainer, 0))
    useful = counter.get_total_flops()
    tokens = _tokens(inputs(plain_trainer, 0))
    for name in VARIANTS:  # warm-up: first-call overheads and the feature cache of batch 0
        run(name, 0)
    seconds: dict[str, list[float]] = {name: [] for name in VARIANTS}
    for step in range(1, steps):
        for name in VARIANTS:
            seconds[name].append(run(name, step))
    result = {
        "model": args.model,
        "cpu": _cpu_name(),
        "cpu_flags": _cpu_flags(),
        "threads": torch.get_num_threads(),
        "dtype": dtype_name,
        "batch": args.batch,
        "items_per_step": 3 * args.batch,
        "tokens_per_step": tokens,
        "useful_gflop_per_step": round(useful / 1e9, 1),
        "matmul_peak_gflops": round(peak * 1e3, 1),
        "variants": {},
    }
    for name in VARIANTS:
        median = statistics.median(seconds[name])
        result["variants"][name] = {
            "seconds_per_step": [round(s, 2) for s in seconds[name]],
            "median_seconds": round(median, 2),
            "tokens_per_second": round(tokens / median, 1),
            "achieved_gflops": round(useful / median / 1e9, 1),
            "fraction_of_peak": round(useful / median / 1e12 / peak, 3),
        }
    args.output_dir.mkdir(parents=True, exist_ok=True)
    (args.output_dir / "train_throughput.json").write_text(json.dumps(result, indent=2) + "\n")
    lines = [
        f"# Training throughput: `{args.model}`, LoRA r8 + projector, {dtype_name}",
        "",
        f"CPU: {result['cpu']} ({result['threads']} threads); flags: {result['cpu_flags']}. Matmul peak "
        f"in the same run: {result['matmul_peak_gflops']} GFLOP/s ({dtype_name}). A step: {args.batch} "
        f"queries + {args.batch} positive photos + {args.batch} negative photos, {tokens} tokens, "
        f"{result['useful_gflop_per_step']} useful GFLOP (counted on the plain step).",
        "",
        "| variant | s / step (median) | tokens/s | useful GFLOP/s | of peak |",
        "|---|---|---|---|---|",
    ]
    for name, row in result["variants"].items():
        lines.append(
            f"| {name} | {row['median_seconds']} | {row['tokens_per_second']} | "
            f"{row['achieved_gflops']} | {row['fraction_of_peak']:.0%} |"
        )
    (args.output_dir / "train_throughput.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
