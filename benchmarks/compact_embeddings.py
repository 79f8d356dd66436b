"""Compact embeddings: recall against dimension (Matryoshka truncation) and bits (float32, int8, binary,
binary with float rescoring), with index size and query latency, on held-aside real data.

Flickr8k's standard test split, less the Flickr8k-800 photos the CPU recipes train on (so no photo was
seen in projector alignment or in training): --photos of them, each photo's first caption as a
text -> image query. The embedder (offline
backbone by default) encodes both once. Every (dimension, codes) pair then builds an index over
truncated, renormalised photo vectors and searches every caption. Recall@k comes with a 95% bootstrap
interval over queries for R@5. Latency is the median, over --repeats, of one batched search of every
query, per query. Writes compact_embeddings.json / .md / .png to --output-dir.

    python benchmarks/compact_embeddings.py --photos 1000
"""

from __future__ import annotations

import argparse
import csv
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

CODES = {
    "float32": {"factory": "Flat", "rescore": 0},
    "int8": {"factory": "SQ8", "rescore": 0},
    "binary": {"factory": "Binary", "rescore": 0},
    "binary + rescore x10": {"factory": "Binary", "rescore": 10},
}


def _bootstrap(hits: np.ndarray, rounds: int = 1000, seed: int = 0) -> tuple[float, float]:
    rng = np.random.default_rng(seed)
    means = hits[rng.integers(0, len(hits), (rounds, len(hits)))].mean(axis=1)
    return float(np.percentile(means, 2.5) * 100), float(np.percentile(means, 97.5) * 100)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="offline")
    parser.add_argument("--dtype", default="auto")
    parser.add_argument("--photos", type=int, default=1000)
    parser.add_argument("--dims", type=int, nargs="+", default=[576, 256, 128, 64])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument(
        "--shared-data", type=Path, default=Path(os.environ.get("UMARVEL_SHARED_DATA", "../shared/data"))
    )
    parser.add_argument("--output-dir", type=Path, default=Path("benchmarks/results"))
    args = parser.parse_args()

    import torch

    from umarvel.data.records import Candidate, Query
    from umarvel.modeling.embedder import Embedder, resolve_dtype
    from umarvel.retrieval.index import Index
    from umarvel.serve.v1 import matryoshka

    folder = args.shared_data / "flickr8k"
    rows = flickr8k_test_rows(args.shared_data)
    # Photos of Flickr8k-800 (what the CPU recipes train on) are left out, so every test photo is unseen.
    seen = {r["image"] for r in csv.DictReader((args.shared_data / "flickr8k-800" / "captions.csv").open())}
    photos = sorted({r["image"] for r in rows} - seen)[: args.photos]
    first_caption: dict[str, str] = {}
    for row in rows:
        first_caption.setdefault(row["image"], row["caption"])
    embedder = Embedder.from_pretrained(args.model, dtype=args.dtype)
    started = time.perf_counter()
    queries = embedder.encode_queries(
        [Query(qid=p, text=first_caption[p]) for p in photos],
        instruction="Retrieve an image that matches the given caption.",
        progress=False,
    )
    pool = embedder.encode_candidates(
        [Candidate(did=p, image=folder / "images" / p) for p in photos], progress=False
    )
    encode_seconds = time.perf_counter() - started
    table = []
    for dim in [d for d in args.dims if d <= embedder.dim]:
        q, c = matryoshka(queries, dim), matryoshka(pool, dim)
        for name, codes in CODES.items():
            index = Index(dim, codes["factory"], rescore=codes["rescore"])
            index.add(c, photos)
            with tempfile.TemporaryDirectory() as work:
                index.save(work)
                size = sum(f.stat().st_size for f in Path(work).iterdir() if f.name != "ids.json")
            times = []
            for _ in range(args.repeats):
                tick = time.perf_counter()
                found = index.search(q, 10)
                times.append(time.perf_counter() - tick)
            ranks = np.array(
                [row.index(p) if p in row else 10 for row, p in zip(found.ids, photos, strict=True)]
            )
            hits5 = (ranks < 5).astype(float)
            low, high = _bootstrap(hits5)
            table.append(
                {
                    "dim": dim,
                    "codes": name,
                    "R@1": round(100 * float((ranks < 1).mean()), 2),
                    "R@5": round(100 * float(hits5.mean()), 2),
                    "R@5 95% CI": [round(low, 1), round(high, 1)],
                    "R@10": round(100 * float((ranks < 10).mean()), 2),
                    "index_bytes": size,
                    "bytes_per_vector": round(size / len(photos), 1),
                    "query_ms": round(1000 * statistics.median(times) / len(photos), 4),
                }
            )
            print(table[-1])
    report = {
        "machine": {"cpu": _cpu_name(), "flags": _cpu_flags(), "threads": torch.get_num_threads()},
        "model": args.model,
        "dtype": str(resolve_dtype(args.dtype)).removeprefix("torch."),
        "queries": len(photos),
        "pool": len(photos),
        "encode_seconds": round(encode_seconds, 1),
        "rows": table,
    }
    args.output_dir.mkdir(parents=True, exist_ok=True)
    (args.output_dir / "compact_embeddings.json").write_text(json.dumps(report, indent=2) + "\n")
    lines = [
        f"# Compact embeddings: Flickr8k test, {len(photos)} captions -> {len(photos)} photos",
        "",
        f"Model `{args.model}`.",
        "",
        f"{report['machine']['cpu']}, flags {report['machine']['flags']}, "
        f"{report['machine']['threads']} threads; embeddings in {report['dtype']}. Truncated dimensions are "
        "renormalised (Matryoshka). This model was not trained with `train.matryoshka_dims`, so truncation "
        "shows what a prefix keeps without it.",
        "",
        "| dim | codes | R@1 | R@5 [95% CI] | R@10 | bytes / vector | ms / query |",
        "|---|---|---|---|---|---|---|",
        *(
            f"| {r['dim']} | {r['codes']} | {r['R@1']} | {r['R@5']} "
            f"[{r['R@5 95% CI'][0]}, {r['R@5 95% CI'][1]}] | {r['R@10']} | {r['bytes_per_vector']} | "
            f"{r['query_ms']} |"
            for r in table
        ),
        "",
        "Bytes per vector: the saved index (codes, plus the float vectors when rescoring) over the pool. "
        "Latency: one batched search of every query, per query (exact search; FAISS, single process).",
    ]
    (args.output_dir / "compact_embeddings.md").write_text("\n".join(lines) + "\n")
    _plot(table, args.output_dir / "compact_embeddings.png")
    print("\n".join(lines))


def _plot(table: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axis = plt.subplots(figsize=(6, 4))
    for name in CODES:
        rows = [r for r in table if r["codes"] == name]
        axis.plot([r["bytes_per_vector"] for r in rows], [r["R@5"] for r in rows], marker="o", label=name)
        for r in rows:
            axis.annotate(str(r["dim"]), (r["bytes_per_vector"], r["R@5"]), fontsize=7)
    axis.set_xscale("log")
    axis.set_xlabel("bytes per vector (log)")
    axis.set_ylabel("text -> image R@5")
    axis.set_title("Recall against index size (labels: dimensions)")
    axis.legend(fontsize=8)
    figure.tight_layout()
    figure.savefig(path, dpi=120)


if __name__ == "__main__":
    main()
