"""Achieved FLOP/s of encoding vs this device's measured matmul peak, umarvel's encoder vs a naive loop.

Measures, in one run on one device:
- the peak: the best of several large square matmuls in the encode dtype (and fp32 on CPU);
- for texts (captions mixed with long abstracts), long texts (abstracts only: long batches) and images:
  the FLOPs of encoding, counted by
  `torch.utils.flop_counter.FlopCounterMode` on a counting pass, then the wall time of a timed pass, for
  umarvel's encoder (length-sorted, token-budgeted batches) and for the naive loop (input order, fixed
  batches). Achieved = counted FLOPs / seconds; "useful" divides umarvel's FLOPs (less padding) by the
  naive loop's time, so padding the naive loop computes for nothing does not count as work;
- with --compile, umarvel's encoder again with `compile=True` (torch.compile, weights frozen into the
  graph): the one-off compile time, then the best timed pass, against the same counted FLOPs.

Models: any umarvel model name (`offline`, a folder, a hub id) or `random:qwen2_vl-2b` (the published
Qwen2-VL-2B shape, random weights; runs anywhere without a download). Writes encode_flops_<device>.json
and .md to --output-dir.

    python benchmarks/encode_flops.py --model offline
    python benchmarks/encode_flops.py --model random:qwen2_vl-2b --device cuda --texts 512 --images 128
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import platform
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch.utils.flop_counter import FlopCounterMode


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def matmul_peak(device: torch.device, dtype: torch.dtype, size: int, repeats: int = 5) -> float:
    """Best TFLOP/s of `size`³ matmuls on random data in `dtype`."""
    a = torch.randn(size, size, device=device, dtype=dtype)
    b = torch.randn(size, size, device=device, dtype=dtype)
    for _ in range(2):
        a @ b
    _sync(device)
    best = float("inf")
    for _ in range(repeats):
        started = time.perf_counter()
        a @ b
        _sync(device)
        best = min(best, time.perf_counter() - started)
    return 2 * size**3 / best / 1e12


def _cpu_name() -> str:
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.is_file():
        for line in cpuinfo.read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


def _abstract(record: dict) -> str:
    return f"{record['title']}. {record['text']}"


def _inputs(shared: Path, texts: int, images: int) -> tuple[list[str], list[str], list[Image.Image], str]:
    flickr, scifact = shared / "flickr8k-800", shared / "scifact" / "corpus.jsonl"
    if (flickr / "captions.csv").is_file() and scifact.is_file():
        rows = list(csv.DictReader((flickr / "captions.csv").open(encoding="utf-8")))
        abstracts = [json.loads(line) for line in scifact.open(encoding="utf-8")]
        mixed = [
            rows[i % len(rows)]["caption"] if i % 3 else _abstract(abstracts[i % len(abstracts)])
            for i in range(texts)
        ]
        long = [_abstract(abstracts[i]) for i in range(texts // 3)]
        photos = sorted({r["image"] for r in rows})[:images]
        pictures = [Image.open(flickr / "images" / p).convert("RGB") for p in photos]
        source = "Flickr8k captions with 1 in 3 SciFact abstracts; SciFact abstracts alone; Flickr8k photos"
        return mixed, long, pictures, source
    rng = np.random.default_rng(0)
    words = ["a", "dog", "runs", "across", "the", "green", "park", "near", "two", "children"]
    mixed = [" ".join(rng.choice(words, size=12 if i % 3 else 200)) for i in range(texts)]
    long = [" ".join(rng.choice(words, size=200)) for _ in range(texts // 3)]
    pictures = [Image.fromarray((rng.random((375, 500, 3)) * 255).astype("uint8")) for _ in range(images)]
    return (
        mixed,
        long,
        pictures,
        "generated word salad (1 in 3 long; long only) and noise images (shared data absent)",
    )


def _load(model: str, device: torch.device, dtype: str, settings: dict, layers: int):
    from umarvel.config.io import from_dict
    from umarvel.config.schema import EmbedderConfig
    from umarvel.modeling.backbones import Backbone, get_spec
    from umarvel.modeling.embedder import Embedder, resolve_dtype

    settings = {"dtype": dtype, **settings}
    if model != "random:qwen2_vl-2b":
        return Embedder.from_pretrained(model, **settings).to(device)
    from umarvel.testing.models import build_random_qwen2_vl_2b

    torch.manual_seed(0)
    network, processor = build_random_qwen2_vl_2b(device=device, layers=layers)
    network = network.to(resolve_dtype(dtype)).eval()
    backbone = Backbone(model=network, processor=processor, spec=get_spec("qwen2_vl"), source=model)
    return Embedder(backbone, from_dict(EmbedderConfig, {**settings, "model": model})).to(device)


def _naive(embedder, inputs: list, batch_size: int) -> None:
    """The loop people write first: input order, fixed batches, no_grad, mean over the attention mask."""
    from umarvel.data.collator import EncodeItem

    with torch.no_grad():
        for start in range(0, len(inputs), batch_size):
            chunk = inputs[start : start + batch_size]
            items = [EncodeItem(text=x) if isinstance(x, str) else EncodeItem(image=x) for x in chunk]
            batch = embedder.collator(items).to(embedder.device)
            hidden = embedder.backbone.forward(batch.inputs).float()
            mask = batch.inputs["attention_mask"].unsqueeze(-1).float()
            torch.nn.functional.normalize((hidden * mask).sum(1) / mask.sum(1), dim=-1).cpu()


def _run(embedder, inputs: list, batch_size: int, which: str, repeats: int) -> tuple[float, float]:
    """(counted FLOPs, best seconds) of encoding `inputs` the `which` way."""

    def once() -> None:
        if which == "umarvel":
            embedder.encode_candidates(inputs, progress=False)
        else:
            _naive(embedder, inputs, batch_size)

    counter = FlopCounterMode(display=False)
    with counter:
        once()  # also the warm-up
    return float(counter.get_total_flops()), _best(once, embedder.device, repeats)


def _best(once, device: torch.device, repeats: int) -> float:
    best = float("inf")
    for _ in range(repeats):
        _sync(device)
        started = time.perf_counter()
        once()
        _sync(device)
        best = min(best, time.perf_counter() - started)
    return best


def _compiled(embedder, inputs: list, repeats: int) -> tuple[float, float]:
    """(compile seconds, best seconds) of umarvel's encoder with `compile=True`."""
    compiled = embedder.with_settings(compile=True)
    started = time.perf_counter()
    compiled.encode_candidates(inputs, progress=False)  # compiles (dynamic shapes) and warms up
    _sync(embedder.device)
    first = time.perf_counter() - started
    return first, _best(lambda: compiled.encode_candidates(inputs, progress=False), embedder.device, repeats)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="offline")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", default="auto")
    parser.add_argument("--texts", type=int, default=192)
    parser.add_argument("--images", type=int, default=48)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--token-budget", type=int, default=4096)
    parser.add_argument("--loader-workers", type=int, default=0, help="processes preparing items")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--layers", type=int, default=28, help="random:qwen2_vl-2b only: LM depth")
    parser.add_argument(
        "--peak-size",
        type=int,
        action="append",
        help="matmul sizes; the best counts (8192 GPU; 1024-4096 CPU)",
    )
    parser.add_argument(
        "--compile", action="store_true", help="also time umarvel's encoder with compile=True"
    )
    parser.add_argument(
        "--shared-data", type=Path, default=Path(os.environ.get("UMARVEL_SHARED_DATA", "../shared/data"))
    )
    parser.add_argument("--output-dir", type=Path, default=Path("benchmarks/results"))
    args = parser.parse_args()

    device = torch.device(args.device)
    from umarvel.modeling.embedder import resolve_dtype

    dtype = resolve_dtype(args.dtype)
    sizes = args.peak_size or ([8192] if device.type == "cuda" else [1024, 2048, 4096])
    kinds = [dtype] if dtype == torch.float32 else [dtype, torch.float32]
    by_size = {str(d).removeprefix("torch."): {n: matmul_peak(device, d, n) for n in sizes} for d in kinds}
    peaks = {name: max(values.values()) for name, values in by_size.items()}
    peak = peaks[str(dtype).removeprefix("torch.")]

    texts, long, images, source = _inputs(args.shared_data, args.texts, args.images)
    settings = {
        "batch_size": args.batch_size,
        "token_budget": args.token_budget,
        "loader_workers": args.loader_workers,
    }
    embedder = _load(args.model, device, args.dtype, settings, args.layers)
    result: dict = {
        "model": args.model,
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else _cpu_name(),
        "threads": torch.get_num_threads(),
        "dtype": args.dtype,
        "batch_size": args.batch_size,
        "token_budget": args.token_budget,
        "inputs": source,
        "matmul_peak_tflops": {k: round(v, 2) for k, v in peaks.items()},
        "peak_matmul_sizes": sizes,
        "matmul_tflops_by_size": {k: {n: round(v, 3) for n, v in d.items()} for k, d in by_size.items()},
    }
    for kind, inputs in (("text", texts), ("long text", long), ("image", images)):
        ours_flops, ours_s = _run(embedder, inputs, args.batch_size, "umarvel", args.repeats)
        naive_flops, naive_s = _run(embedder, inputs, args.batch_size, "naive", args.repeats)
        result[kind] = {
            "items": len(inputs),
            "umarvel_items_per_second": round(len(inputs) / ours_s, 2),
            "naive_items_per_second": round(len(inputs) / naive_s, 2),
            "speedup": round(naive_s / ours_s, 2),
            "umarvel_tflops": round(ours_flops / ours_s / 1e12, 3),
            "naive_tflops": round(naive_flops / naive_s / 1e12, 3),
            "naive_useful_tflops": round(ours_flops / naive_s / 1e12, 3),
            "umarvel_fraction_of_peak": round(ours_flops / ours_s / 1e12 / peak, 3),
            "naive_useful_fraction_of_peak": round(ours_flops / naive_s / 1e12 / peak, 3),
            "padding_flops_ratio_naive_over_umarvel": round(naive_flops / ours_flops, 2),
        }
        if args.compile:
            first, compiled_s = _compiled(embedder, inputs, args.repeats)
            result[kind].update(
                {
                    "compile_seconds": round(first - compiled_s, 1),
                    "compiled_items_per_second": round(len(inputs) / compiled_s, 2),
                    "compiled_tflops": round(ours_flops / compiled_s / 1e12, 3),
                    "compiled_fraction_of_peak": round(ours_flops / compiled_s / 1e12 / peak, 3),
                    "compiled_speedup_over_umarvel": round(ours_s / compiled_s, 2),
                }
            )
        print(kind, result[kind], flush=True)
    _write(args.output_dir, f"encode_flops_{device.type}", result)


def _write(directory: Path, stem: str, result: dict) -> None:
    directory.mkdir(parents=True, exist_ok=True)
    (directory / f"{stem}.json").write_text(json.dumps(result, indent=2) + "\n")
    peaks = ", ".join(f"{k} {v} TFLOP/s" for k, v in result["matmul_peak_tflops"].items())
    sizes = ", ".join(f"{n}³" for n in result["peak_matmul_sizes"])
    lines = [
        f"# Encode FLOP/s vs matmul peak: `{result['model']}` on {result['device']}, {result['dtype']}",
        "",
        f"Measured matmul peak (best of {sizes}, same run): {peaks}. "
        f"Batch {result['batch_size']}, token budget {result['token_budget']}, {result['threads']} threads.",
        "",
        "| input | items | umarvel items/s | naive items/s | speed-up | umarvel TFLOP/s (of peak) "
        "| naive useful TFLOP/s (of peak) | naive FLOPs / umarvel FLOPs |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for kind in ("text", "long text", "image"):
        r = result[kind]
        lines.append(
            f"| {kind} | {r['items']} | {r['umarvel_items_per_second']} | {r['naive_items_per_second']} | "
            f"{r['speedup']}x | {r['umarvel_tflops']} ({r['umarvel_fraction_of_peak']:.0%}) | "
            f"{r['naive_useful_tflops']} ({r['naive_useful_fraction_of_peak']:.0%}) | "
            f"{r['padding_flops_ratio_naive_over_umarvel']} |"
        )
    compiled = [k for k in ("text", "long text", "image") if "compiled_tflops" in result[k]]
    if compiled:
        lines += [
            "",
            "With `compile=True` (torch.compile, dynamic shapes, frozen weights), same inputs and FLOPs:",
            "",
            "| input | compile (s, once) | items/s | TFLOP/s (of peak) | vs umarvel eager |",
            "|---|---|---|---|---|",
        ]
        for kind in compiled:
            r = result[kind]
            lines.append(
                f"| {kind} | {r['compile_seconds']} | {r['compiled_items_per_second']} | "
                f"{r['compiled_tflops']} ({r['compiled_fraction_of_peak']:.0%}) | "
                f"{r['compiled_speedup_over_umarvel']}x |"
            )
    counted = "FLOPs counted by torch's FlopCounterMode (matmuls, attention)."
    lines += ["", f"Inputs: {result['inputs']}. {counted}"]
    (directory / f"{stem}.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
