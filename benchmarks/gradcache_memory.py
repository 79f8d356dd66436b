"""Peak memory, time and tokens/s of one training step, plain vs GradCache, same batch, side by side.

Each variant runs in its own process. A thread samples the resident set size every 2 ms during the
step; the figure is the peak minus the size just before the step (loading the model peaks higher, so
the process-lifetime peak would hide the step). Writes gradcache_memory.json and .md to --output-dir.

    python benchmarks/gradcache_memory.py --model offline --batch 64 --chunk 8
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path


class _RssSampler(threading.Thread):
    """Polls this process's resident set size (bytes) and keeps the maximum."""

    def __init__(self) -> None:
        super().__init__(daemon=True)
        self.peak = 0
        self.running = True

    @staticmethod
    def rss() -> int:
        with open("/proc/self/statm") as handle:
            return int(handle.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")

    def run(self) -> None:
        while self.running:
            self.peak = max(self.peak, self.rss())
            time.sleep(0.002)

    def stop(self) -> int:
        self.running = False
        self.join()
        return max(self.peak, self.rss())


def _tokens(value: object) -> int:
    """Non-padding tokens in a collated batch: the sum of every `attention_mask` in it."""
    if isinstance(value, dict):
        return sum(
            int(v.sum()) if k == "attention_mask" and hasattr(v, "sum") else _tokens(v)
            for k, v in value.items()
        )
    if isinstance(value, (list, tuple)):
        return sum(_tokens(v) for v in value)
    inputs = getattr(value, "inputs", None)
    return _tokens(inputs) if isinstance(inputs, dict) else 0


def _step(model: str, batch: int, chunk: int, bf16: bool) -> dict:
    import torch

    from umarvel.config.schema import LoraSettings, TrainConfig
    from umarvel.data.records import Candidate, Query
    from umarvel.data.training import TrainingSet, TrainRow
    from umarvel.modeling.embedder import Embedder
    from umarvel.training.adapters import prepare_for_training
    from umarvel.training.trainer import ContrastiveCollator, EmbedderTrainer, training_arguments

    words = ["red", "green", "blue", "small", "large", "old", "new", "wooden", "shiny", "striped"]
    rows = [
        TrainRow(
            Query(
                qid=f"q{i}",
                text=f"a {words[i % 10]} {words[(i // 10) % 10]} object number {i} "
                "standing near a window in the afternoon light",
            ),
            (Candidate(did=f"c{i}", text=f"the {words[i % 10]} thing {i} by the window"),),
        )
        for i in range(batch)
    ]
    config = TrainConfig(
        per_device_batch_size=batch,
        gradcache_chunk_size=chunk,
        bf16=bf16,
        max_steps=1,
        lora=LoraSettings(rank=16, alpha=32, dropout=0.0),
    )
    embedder = Embedder.from_pretrained(model, dtype="bfloat16" if bf16 else "float32")
    prepare_for_training(embedder, config.lora, ())
    trainer = EmbedderTrainer(
        model=embedder,
        train_config=config,
        args=training_arguments(config, Path("/tmp/umarvel-bench"), seed=0),
        train_dataset=TrainingSet(rows, seed=0),
        data_collator=ContrastiveCollator(embedder.collator, chunk),
    )
    inputs = trainer.data_collator([trainer.train_dataset[i] for i in range(batch)])
    tokens = _tokens(inputs)
    sampler = _RssSampler()
    before = sampler.rss()
    sampler.start()
    started = time.perf_counter()
    trainer.training_step(trainer.model, inputs)
    seconds = time.perf_counter() - started
    after = sampler.stop()
    grad_norm = float(
        torch.sqrt(sum((p.grad.float() ** 2).sum() for p in embedder.parameters() if p.grad is not None))
    )
    return {
        "chunk": chunk,
        "peak_growth_mib": round((after - before) / 2**20, 1),
        "step_seconds": round(seconds, 2),
        "tokens": tokens,
        "tokens_per_second": round(tokens / seconds, 1),
        "grad_norm": round(grad_norm, 5),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="offline")
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--chunk", type=int, default=8)
    from umarvel.modeling.embedder import native_bf16

    # bf16 by default only where the machine computes it natively (dtype auto)
    parser.add_argument("--bf16", action=argparse.BooleanOptionalAction, default=native_bf16())
    parser.add_argument("--output-dir", type=Path, default=Path("benchmarks/results"))
    parser.add_argument("--worker-chunk", type=int, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker_chunk is not None:
        print(json.dumps(_step(args.model, args.batch, args.worker_chunk, args.bf16)))
        return
    runs = []
    for chunk in (0, args.chunk):
        command = [
            sys.executable,
            __file__,
            "--model",
            args.model,
            "--batch",
            str(args.batch),
            "--worker-chunk",
            str(chunk),
            "--bf16" if args.bf16 else "--no-bf16",
        ]
        output = subprocess.run(
            command, capture_output=True, text=True, check=True, env={**os.environ, "HF_HUB_OFFLINE": "1"}
        ).stdout
        runs.append(json.loads(output.strip().splitlines()[-1]))
    plain, cached = runs
    result = {
        "model": args.model,
        "batch": args.batch,
        "bf16": args.bf16,
        "plain": plain,
        "gradcache": cached,
        "memory_ratio": round(cached["peak_growth_mib"] / max(plain["peak_growth_mib"], 1e-9), 3),
        "time_ratio": round(cached["step_seconds"] / plain["step_seconds"], 2),
        "tokens_per_second_ratio": round(cached["tokens_per_second"] / plain["tokens_per_second"], 2),
    }
    args.output_dir.mkdir(parents=True, exist_ok=True)
    (args.output_dir / "gradcache_memory.json").write_text(json.dumps(result, indent=2) + "\n")
    precision = "bf16" if args.bf16 else "fp32"
    lines = [
        f"# GradCache vs plain step: `{args.model}`, batch {args.batch} pairs, {precision}",
        "",
        "| path | chunk | peak RSS growth (MiB) | step (s) | tokens/s | grad norm |",
        "|---|---|---|---|---|---|",
        f"| plain | - | {plain['peak_growth_mib']} | {plain['step_seconds']} | "
        f"{plain['tokens_per_second']} | {plain['grad_norm']} |",
        f"| GradCache | {cached['chunk']} | {cached['peak_growth_mib']} | {cached['step_seconds']} | "
        f"{cached['tokens_per_second']} | {cached['grad_norm']} |",
        "",
        f"GradCache / plain: memory {result['memory_ratio']}x, time {result['time_ratio']}x, tokens/s "
        f"{result['tokens_per_second_ratio']}x. {plain['tokens']} non-padding tokens a step (queries and "
        "positives, instruction included).",
    ]
    (args.output_dir / "gradcache_memory.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
