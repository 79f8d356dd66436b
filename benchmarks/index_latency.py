"""Exact vs IVF search at scale: build time, query latency and recall@10 of IVF against exact, side by side.

Random unit vectors around random centres (the cluster structure embeddings have), 1M x 576 by default
(the offline backbone's dimension). Writes index_latency.json and .md to --output-dir.

    python benchmarks/index_latency.py --vectors 1000000 --dim 576 --queries 200
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np


def _clustered(
    n: int, d: int, centres: np.ndarray, rng: np.random.Generator, chunk: int = 100_000
) -> np.ndarray:
    out = np.empty((n, d), dtype=np.float32)
    for start in range(0, n, chunk):
        m = min(chunk, n - start)
        x = centres[rng.integers(0, len(centres), m)] + rng.standard_normal((m, d), dtype=np.float32) * (
            0.4 / d**0.5
        )
        out[start : start + m] = x / np.linalg.norm(x, axis=1, keepdims=True)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--vectors", type=int, default=1_000_000)
    parser.add_argument("--dim", type=int, default=576)
    parser.add_argument("--queries", type=int, default=200)
    parser.add_argument("--ivf", default="IVF1024,Flat")
    parser.add_argument("--nprobe", type=int, default=16)
    parser.add_argument("--output-dir", type=Path, default=Path("benchmarks/results"))
    args = parser.parse_args()

    import faiss

    from umarvel.retrieval.index import Index

    rng = np.random.default_rng(0)
    centres = rng.standard_normal((4096, args.dim), dtype=np.float32)
    centres /= np.linalg.norm(centres, axis=1, keepdims=True)
    corpus = _clustered(args.vectors, args.dim, centres, rng)
    queries = _clustered(args.queries, args.dim, centres, rng)
    ids = [str(i) for i in range(args.vectors)]
    runs = {}
    results = {}
    for name, factory in (("exact", "Flat"), ("ivf", args.ivf)):
        index = Index(args.dim, factory, nprobe=args.nprobe)
        started = time.perf_counter()
        index.add(corpus, ids)
        build = time.perf_counter() - started
        index.search(queries[:4], 10)  # warm-up
        started = time.perf_counter()
        found = index.search(queries, 10)
        latency = (time.perf_counter() - started) / args.queries
        results[name] = found.ids
        runs[name] = {
            "factory": factory,
            "build_seconds": round(build, 2),
            "ms_per_query": round(1000 * latency, 3),
        }
    overlap = np.mean(
        [len(set(a) & set(b)) / 10 for a, b in zip(results["exact"], results["ivf"], strict=True)]
    )
    report = {
        "vectors": args.vectors,
        "dim": args.dim,
        "queries": args.queries,
        "nprobe": args.nprobe,
        "faiss_threads": faiss.omp_get_max_threads(),
        "runs": runs,
        "ivf_recall@10_vs_exact": round(float(overlap), 4),
        "speedup": round(runs["exact"]["ms_per_query"] / runs["ivf"]["ms_per_query"], 1),
    }
    args.output_dir.mkdir(parents=True, exist_ok=True)
    (args.output_dir / "index_latency.json").write_text(json.dumps(report, indent=2) + "\n")
    lines = [
        f"# Exact vs IVF search: {args.vectors:,} x {args.dim} vectors, {args.queries} queries, "
        f"{faiss.omp_get_max_threads()} threads",
        "",
        "| index | build (s) | ms / query |",
        "|---|---|---|",
        *(f"| {r['factory']} | {r['build_seconds']} | {r['ms_per_query']} |" for r in runs.values()),
        "",
        f"IVF (nprobe {args.nprobe}) is {report['speedup']}x faster, with recall@10 "
        f"{report['ivf_recall@10_vs_exact']} of the exact top 10.",
    ]
    (args.output_dir / "index_latency.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
