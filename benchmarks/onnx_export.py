"""ONNX export of the offline embedder: parity with PyTorch on real inputs, and CPU speed, in one run.

Exports the embedder (`umarvel export onnx`) to a temporary folder, then embeds --items Flickr8k test
captions (text path) and photos (image path) in batches of --batch, with PyTorch (float32, and the
machine's `dtype: auto`) and with onnxruntime (float32). The three alternate, --repeats times each.
Reports the cosine between ONNX and PyTorch float32 rows (min and mean) and the items per second of
each. Writes onnx_export.json / .md to --output-dir.

    python benchmarks/onnx_export.py --model offline --items 64
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from benchmarks.common import flickr8k_test_rows
from benchmarks.digest_cost import _cpu_flags, _cpu_name


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="offline")
    parser.add_argument("--items", type=int, default=64)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument(
        "--shared-data", type=Path, default=Path(os.environ.get("UMARVEL_SHARED_DATA", "../shared/data"))
    )
    parser.add_argument("--output-dir", type=Path, default=Path("benchmarks/results"))
    args = parser.parse_args()

    import torch

    from umarvel.data.records import Candidate, Query
    from umarvel.modeling.embedder import Embedder, resolve_dtype
    from umarvel.modeling.export import OnnxEmbedder, export_onnx

    folder = args.shared_data / "flickr8k"
    rows = flickr8k_test_rows(args.shared_data)
    photos = sorted({r["image"] for r in rows})[: args.items]
    captions = {r["image"]: r["caption"] for r in rows}
    work = Path(tempfile.mkdtemp(prefix="onnx-"))
    tick = time.perf_counter()
    record = export_onnx(args.model, work / "onnx")
    export_seconds = time.perf_counter() - tick
    runners = {
        "pytorch float32": Embedder.from_pretrained(args.model, dtype="float32"),
        f"pytorch auto ({str(resolve_dtype('auto')).removeprefix('torch.')})": Embedder.from_pretrained(
            args.model, dtype="auto"
        ),
    }
    onnx = OnnxEmbedder(work / "onnx", threads=torch.get_num_threads())
    reference = runners["pytorch float32"]
    paths = {
        "text": [
            reference.to_item(Query(qid=p, text=captions[p]), "Retrieve an image that matches the caption.")
            for p in photos
        ],
        "image": [reference.to_item(Candidate(did=p, image=folder / "images" / p), None) for p in photos],
    }

    def run(name: str, items: list) -> np.ndarray:
        batches = [items[i : i + args.batch] for i in range(0, len(items), args.batch)]
        if name == "onnxruntime float32":
            return np.concatenate([onnx(b) for b in batches])
        return np.concatenate([runners[name].encode_batch(b)[0] for b in batches])

    names = [*runners, "onnxruntime float32"]
    report: dict = {
        "machine": {"cpu": _cpu_name(), "flags": _cpu_flags(), "threads": torch.get_num_threads()},
        "model": args.model,
        "items": len(photos),
        "batch": args.batch,
        "export_seconds": round(export_seconds, 1),
        "onnx_bytes": {f: (work / "onnx" / f).stat().st_size for f in record["graphs"]},
        "paths": {},
    }
    for path, items in paths.items():
        vectors = {name: run(name, items) for name in names}  # warm-up, and the vectors compared
        seconds: dict[str, list[float]] = {name: [] for name in names}
        for _ in range(args.repeats):
            for name in names:
                tick = time.perf_counter()
                run(name, items)
                seconds[name].append(time.perf_counter() - tick)
        cosine = (vectors["onnxruntime float32"] * vectors["pytorch float32"]).sum(axis=1)
        report["paths"][path] = {
            "cosine_min": round(float(cosine.min()), 6),
            "cosine_mean": round(float(cosine.mean()), 6),
            "items_per_second": {n: round(len(items) / statistics.median(s), 2) for n, s in seconds.items()},
        }
        print(path, report["paths"][path])
    args.output_dir.mkdir(parents=True, exist_ok=True)
    (args.output_dir / "onnx_export.json").write_text(json.dumps(report, indent=2) + "\n")
    lines = [
        f"# ONNX export: `{args.model}`, {len(photos)} Flickr8k test captions and photos, "
        f"batches of {args.batch}",
        "",
        f"{report['machine']['cpu']}, flags {report['machine']['flags']}, "
        f"{report['machine']['threads']} threads. Export took {report['export_seconds']} s. Graph sizes: "
        + ", ".join(f"{k} {v / 2**20:.0f} MiB" for k, v in report["onnx_bytes"].items())
        + ".",
        "",
        "| path | cosine to PyTorch fp32 (min / mean) | " + " | ".join(f"{n} items/s" for n in names) + " |",
        "|---|---|" + "---|" * len(names),
        *(
            f"| {path} | {r['cosine_min']} / {r['cosine_mean']} | "
            + " | ".join(str(r["items_per_second"][n]) for n in names)
            + " |"
            for path, r in report["paths"].items()
        ),
        "",
        f"Each runner embeds the same items {args.repeats} times, alternating with the others (medians). "
        "Images are loaded once, outside the timing; each runner's time includes the collator.",
    ]
    (args.output_dir / "onnx_export.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
