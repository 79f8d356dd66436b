"""Encode throughput of umarvel's encoder vs a naive per-batch Hugging Face loop, side by side.

Both embed the same items with the same model, dtype and batch size. The naive loop goes through the
items in input order, batch by batch (processor -> model -> mean pool); ours sorts by length within
windows, caps padded tokens with a token budget, and runs under inference mode. Writes
encode_vs_naive.json and .md to --output-dir.

    python benchmarks/encode_vs_naive.py --model offline --texts 256 --images 96
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image


def _inputs(shared: Path, texts: int, images: int) -> tuple[list[str], list[Image.Image]]:
    rows = list(csv.DictReader((shared / "flickr8k-800" / "captions.csv").open(encoding="utf-8")))
    scifact = [json.loads(line) for line in (shared / "scifact" / "corpus.jsonl").open(encoding="utf-8")]
    # A realistic mix of lengths: short captions and long abstracts, interleaved.
    mixed = []
    for i in range(texts):
        mixed.append(rows[i]["caption"] if i % 3 else f"{scifact[i]['title']}. {scifact[i]['text']}")
    photos = sorted({r["image"] for r in rows})[:images]
    return mixed, [Image.open(shared / "flickr8k-800" / "images" / p).convert("RGB") for p in photos]


def _naive(embedder: object, inputs: list, batch_size: int) -> np.ndarray:
    """The loop people write first: input order, fixed batches, no_grad, mean over the attention mask."""
    from umarvel.data.collator import EncodeItem

    out = []
    model = embedder.backbone  # type: ignore[attr-defined]
    with torch.no_grad():
        for start in range(0, len(inputs), batch_size):
            chunk = inputs[start : start + batch_size]
            items = [EncodeItem(text=x) if isinstance(x, str) else EncodeItem(image=x) for x in chunk]
            batch = embedder.collator(items)  # type: ignore[attr-defined]
            hidden = model.forward(batch.inputs).float()
            mask = batch.inputs["attention_mask"].unsqueeze(-1).float()
            pooled = (hidden * mask).sum(1) / mask.sum(1)
            out.append(torch.nn.functional.normalize(pooled, dim=-1).numpy())
    return np.concatenate(out)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="offline")
    parser.add_argument("--texts", type=int, default=256)
    parser.add_argument("--images", type=int, default=96)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--token-budget", type=int, default=4096)
    parser.add_argument("--dtype", default="auto")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument(
        "--shared-data", type=Path, default=Path(os.environ.get("UMARVEL_SHARED_DATA", "../shared/data"))
    )
    parser.add_argument("--output-dir", type=Path, default=Path("benchmarks/results"))
    args = parser.parse_args()
    from umarvel.modeling.embedder import resolve_dtype

    args.dtype = str(resolve_dtype(args.dtype)).removeprefix("torch.")  # `auto`: bf16 only where native

    from umarvel.modeling.embedder import Embedder

    texts, images = _inputs(args.shared_data, args.texts, args.images)
    embedder = Embedder.from_pretrained(
        args.model, dtype=args.dtype, batch_size=args.batch_size, token_budget=args.token_budget
    )
    result: dict = {
        "model": args.model,
        "dtype": args.dtype,
        "batch_size": args.batch_size,
        "token_budget": args.token_budget,
        "threads": torch.get_num_threads(),
    }
    for kind, inputs in (("text", texts), ("image", images)):
        # Alternate the two, and keep each one's best of `repeats`: first calls pay one-time kernel set-up.
        ours_s = naive_s = float("inf")
        for _ in range(args.repeats):
            started = time.perf_counter()
            ours = embedder.encode_candidates(inputs, progress=False)
            ours_s = min(ours_s, time.perf_counter() - started)
            started = time.perf_counter()
            naive = _naive(embedder, inputs, args.batch_size)
            naive_s = min(naive_s, time.perf_counter() - started)
        result[kind] = {
            "items": len(inputs),
            "umarvel_items_per_second": round(len(inputs) / ours_s, 2),
            "naive_items_per_second": round(len(inputs) / naive_s, 2),
            "speedup": round(naive_s / ours_s, 2),
            "mean_cosine_agreement": round(float(np.mean(np.sum(ours * naive, axis=1))), 4),
        }
    args.output_dir.mkdir(parents=True, exist_ok=True)
    (args.output_dir / "encode_vs_naive.json").write_text(json.dumps(result, indent=2) + "\n")
    lines = [
        f"# umarvel encoder vs a naive per-batch loop: `{args.model}`, {args.dtype}, batch {args.batch_size}",
        "",
        "| input | items | umarvel items/s | naive items/s | speed-up | cosine agreement |",
        "|---|---|---|---|---|---|",
    ]
    for kind in ("text", "image"):
        r = result[kind]
        lines.append(
            f"| {kind} | {r['items']} | {r['umarvel_items_per_second']} | {r['naive_items_per_second']} | "
            f"{r['speedup']}x | {r['mean_cosine_agreement']} |"
        )
    lines += ["", "Texts mix Flickr8k captions with SciFact abstracts (1 in 3), in input order."]
    (args.output_dir / "encode_vs_naive.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
