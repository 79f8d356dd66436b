"""Re-ranker throughput: shared prompt prefixes over batches of several queries, over one query per
batch, and every pair in full, side by side.

The pairs are the ones a re-ranking run scores: each query with its shortlist of `--top` candidates, in
query order (Flickr8k-800 captions -> photos, and photos -> captions, with the M-BEIR instructions). The
variants score the same pairs with the same re-ranker and dtype, alternating, `--repeats` times each:
batches of `--batch-size` pairs (whole queries where they fit) sharing the instruction across the batch
and each query across its pairs; batches of one query's `--top` pairs sharing instruction and query (how
scoring batched before); and every pair in full, batches of `--batch-size`. A training step (forward and
backward over one batch of pairs of different queries, which share the instruction only) is timed the
same way. Writes rerank_throughput.json and .md to
--output-dir.

    python benchmarks/rerank_throughput.py --queries 24 --top 6
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from benchmarks.digest_cost import _cpu_flags, _cpu_name


def _pairs(shared: Path, queries: int, top: int) -> list:
    from umarvel.data.collator import EncodeItem
    from umarvel.reranker.data import RerankPair

    rows = list(csv.DictReader((shared / "flickr8k-800" / "captions.csv").open(encoding="utf-8")))
    photos = sorted({r["image"] for r in rows})
    images = {
        p: Image.open(shared / "flickr8k-800" / "images" / p).convert("RGB") for p in photos[: queries + top]
    }
    captions = [r["caption"] for r in rows]
    pairs = []
    for q in range(queries):
        if q % 2 == 0:  # caption -> photos
            query = EncodeItem(
                text=captions[q * 5], instruction="Retrieve an image that matches the caption."
            )
            shortlist = [EncodeItem(image=images[photos[(q + k) % len(images)]]) for k in range(top)]
        else:  # photo -> captions
            query = EncodeItem(image=images[photos[q]], instruction="Find a caption for the image.")
            shortlist = [EncodeItem(text=captions[(q + k) * 5 + 1]) for k in range(top)]
        pairs.extend(RerankPair(query, candidate) for candidate in shortlist)
    return pairs


def _train_step(reranker: object, batch: object) -> float:
    start = time.perf_counter()
    logits = reranker(batch)  # type: ignore[operator]
    logits[:, reranker.yes_id].sum().backward()  # type: ignore[attr-defined]
    reranker.zero_grad(set_to_none=True)  # type: ignore[attr-defined]
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="offline")
    parser.add_argument("--queries", type=int, default=24)
    parser.add_argument("--top", type=int, default=6)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--dtype", default="auto")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument(
        "--shared-data", type=Path, default=Path(os.environ.get("UMARVEL_SHARED_DATA", "../shared/data"))
    )
    parser.add_argument("--output-dir", type=Path, default=Path("benchmarks/results"))
    args = parser.parse_args()

    from umarvel.modeling.embedder import resolve_dtype
    from umarvel.reranker.model import Reranker

    dtype = str(resolve_dtype(args.dtype)).removeprefix("torch.")  # `auto`: bf16 only where native
    pairs = _pairs(args.shared_data, args.queries, args.top)
    variants = {
        "shared prefixes, several queries a batch": (True, args.batch_size),
        "shared prefix, one query a batch": (True, args.top),
        "every pair in full": (False, args.batch_size),
    }
    rankers = {
        name: Reranker.from_pretrained(args.model, dtype=dtype, batch_size=size, share_prefix=flag)
        for name, (flag, size) in variants.items()
    }
    # One batch of pairs from different queries for the training step: they share the instruction only.
    mixed = rankers[next(iter(variants))].collator(pairs[:: args.top][: args.batch_size])
    seconds: dict[str, list[float]] = {name: [] for name in variants}
    steps: dict[str, list[float]] = {name: [] for name in variants}
    scores: dict[str, np.ndarray] = {}
    for ranker in rankers.values():  # warm-up: the first pass pays one-off costs
        ranker.score(pairs[: args.top])
    for _ in range(args.repeats):
        for name, ranker in rankers.items():
            start = time.perf_counter()
            scores[name] = ranker.score(pairs)
            seconds[name].append(time.perf_counter() - start)
            ranker.train()
            steps[name].append(_train_step(ranker, mixed))
            ranker.eval()
    base = "every pair in full"
    tokens = (
        rankers[base].collator(pairs[: args.batch_size]).inputs["attention_mask"].sum(dim=1).float().mean()
    )
    rows = []
    for name in variants:
        median = statistics.median(seconds[name])
        rows.append(
            {
                "variant": name,
                "pairs_per_s": len(pairs) / median,
                "score_seconds": seconds[name],
                "train_step_seconds": steps[name],
                "speedup_scoring": statistics.median(seconds[base]) / median,
                "speedup_train_step": statistics.median(steps[base]) / statistics.median(steps[name]),
            }
        )
    result = {
        "model": args.model,
        "dtype": dtype,
        "cpu": _cpu_name(),
        "cpu_flags": _cpu_flags(),
        "threads": torch.get_num_threads(),
        "queries": args.queries,
        "top": args.top,
        "pairs": len(pairs),
        "batch_size": args.batch_size,
        "mean_tokens_per_pair": float(tokens),
        "max_abs_p_yes_difference": max(
            float(np.abs(scores[name] - scores[base]).max()) for name in variants
        ),
        # The rounding scale to read it against: the full forward alone, batches of one query's pairs
        # instead of `batch_size` (other padding, other kernels).
        "max_abs_p_yes_difference_of_batch_size": float(
            np.abs(rankers[base].score(pairs, batch_size=args.top) - scores[base]).max()
        ),
        "rows": rows,
    }
    args.output_dir.mkdir(parents=True, exist_ok=True)
    (args.output_dir / "rerank_throughput.json").write_text(json.dumps(result, indent=2) + "\n")
    lines = [
        "# Re-ranker throughput: shared prompt prefixes vs every pair in full",
        "",
        f"CPU: {result['cpu']} ({result['threads']} threads); flags: {result['cpu_flags']}; dtype {dtype}. "
        f"{len(pairs)} pairs ({args.queries} queries x top {args.top}, "
        f"about {float(tokens):.0f} tokens a pair), "
        f"batch {args.batch_size} (one query's {args.top} in the second row), median of {args.repeats} "
        "alternating runs. Largest P(Yes) difference between a variant and the full forward: "
        f"{result['max_abs_p_yes_difference']:.1e}; between two batch sizes of the full forward: "
        f"{result['max_abs_p_yes_difference_of_batch_size']:.1e}.",
        "",
        "| variant | pairs/s | scoring speed-up | training step (s) | training speed-up |",
        "|---|---|---|---|---|",
    ]
    for row in rows:
        lines.append(
            f"| {row['variant']} | {row['pairs_per_s']:.1f} | {row['speedup_scoring']:.2f}x | "
            f"{statistics.median(row['train_step_seconds']):.2f} | {row['speedup_train_step']:.2f}x |"
        )
    (args.output_dir / "rerank_throughput.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
