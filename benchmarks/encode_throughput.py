"""Load time and encode throughput of an embedder, fp32 vs bf16, text vs images, side by side in one run.

Writes `encode_throughput.json` and `encode_throughput.md` to --output-dir. Uses real Flickr8k captions
and photos from ../shared/data when present, generated ones otherwise (said in the results).

    python benchmarks/encode_throughput.py --model offline --items 64
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

from umarvel.config.manifest import describe_machine, machine


def _inputs(shared: Path, count: int) -> tuple[list[str], list[Image.Image], str]:
    flickr = shared / "flickr8k-800"
    if (flickr / "captions.csv").is_file():
        with (flickr / "captions.csv").open(encoding="utf-8", newline="") as handle:
            rows = list(csv.DictReader(handle))
        texts = [r["caption"] for r in rows[: count * 5 : 5]]
        images = [Image.open(flickr / "images" / r["image"]).convert("RGB") for r in rows[: count * 5 : 5]]
        return texts, images, "flickr8k-800 captions and photos"
    rng = np.random.default_rng(0)
    texts = [f"a photo of item {i} with words about its colour and shape" for i in range(count)]
    images = [Image.fromarray((rng.random((240, 320, 3)) * 255).astype("uint8")) for _ in range(count)]
    return texts, images, "generated texts and noise images (shared data absent)"


def _measure(model: str, dtype: str, texts: list[str], images: list[Image.Image], batch_size: int) -> dict:
    from umarvel.modeling.embedder import Embedder

    started = time.perf_counter()
    embedder = Embedder.from_pretrained(model, dtype=dtype, batch_size=batch_size)
    load_s = time.perf_counter() - started
    embedder.encode_candidates(texts[:batch_size], progress=False)  # warm-up
    started = time.perf_counter()
    text_vectors = embedder.encode_candidates(texts, progress=False)
    text_s = time.perf_counter() - started
    started = time.perf_counter()
    image_vectors = embedder.encode_candidates(images, progress=False)
    image_s = time.perf_counter() - started
    return {
        "dtype": dtype,
        "load_seconds": round(load_s, 2),
        "text_items_per_second": round(len(texts) / text_s, 2),
        "image_items_per_second": round(len(images) / image_s, 2),
        "text_vectors": text_vectors,
        "image_vectors": image_vectors,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="offline")
    parser.add_argument("--items", type=int, default=64)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument(
        "--shared-data", type=Path, default=Path(os.environ.get("UMARVEL_SHARED_DATA", "../shared/data"))
    )
    parser.add_argument("--output-dir", type=Path, default=Path("benchmarks/results"))
    args = parser.parse_args()

    texts, images, source = _inputs(args.shared_data, args.items)
    runs = [_measure(args.model, dtype, texts, images, args.batch_size) for dtype in ("float32", "bfloat16")]
    fp32, bf16 = runs
    agreement = {
        kind: float(np.mean(np.sum(fp32[f"{kind}_vectors"] * bf16[f"{kind}_vectors"], axis=1)))
        for kind in ("text", "image")
    }
    for run in runs:
        run.pop("text_vectors")
        run.pop("image_vectors")
    result = {
        "model": args.model,
        "items": len(texts),
        "batch_size": args.batch_size,
        "inputs": source,
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "machine": machine(),
        "runs": runs,
        "bf16_over_fp32": {
            "text": round(bf16["text_items_per_second"] / fp32["text_items_per_second"], 2),
            "image": round(bf16["image_items_per_second"] / fp32["image_items_per_second"], 2),
        },
        "mean_cosine_fp32_vs_bf16": {k: round(v, 4) for k, v in agreement.items()},
    }
    args.output_dir.mkdir(parents=True, exist_ok=True)
    (args.output_dir / "encode_throughput.json").write_text(json.dumps(result, indent=2) + "\n")
    lines = [
        f"# Encode throughput: `{args.model}`, {len(texts)} items, batch {args.batch_size}, "
        f"{torch.get_num_threads()} threads",
        "",
        f"{describe_machine(result['machine'])}. Inputs: {source}.",
        "",
        "| dtype | load (s) | text items/s | image items/s |",
        "|---|---|---|---|",
        *(
            f"| {r['dtype']} | {r['load_seconds']} | {r['text_items_per_second']} "
            f"| {r['image_items_per_second']} |"
            for r in runs
        ),
        "",
        f"bf16 / fp32 speed: text {result['bf16_over_fp32']['text']}x, "
        f"image {result['bf16_over_fp32']['image']}x. "
        f"Mean cosine between fp32 and bf16 embeddings: text {result['mean_cosine_fp32_vs_bf16']['text']}, "
        f"image {result['mean_cosine_fp32_vs_bf16']['image']}.",
    ]
    (args.output_dir / "encode_throughput.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
