"""Exact vs IVF search at scale: build time, query latency and recall@10 of IVF against exact, side by side.

Two corpora at each size (100k and 1M x 576 by default, the offline backbone's dimension): unit vectors
around random centres (the cluster structure embeddings have), and uniform random unit vectors (IVF's
worst case). Writes index_latency.json and .md to --output-dir.

    python benchmarks/index_latency.py --vectors 100000 1000000 --dim 576 --queries 200
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np


def _unit(x: np.ndarray) -> np.ndarray:
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def _corpus(
    kind: str, n: int, d: int, centres: np.ndarray, rng: np.random.Generator, chunk: int = 100_000
) -> np.ndarray:
    out = np.empty((n, d), dtype=np.float32)
    for start in range(0, n, chunk):
        m = min(chunk, n - start)
        noise = rng.standard_normal((m, d), dtype=np.float32)
        if kind == "clustered":
            noise = centres[rng.integers(0, len(centres), m)] + noise * (0.4 / d**0.5)
        out[start : start + m] = _unit(noise)
    return out


def _measure(
    factory: str, corpus: np.ndarray, queries: np.ndarray, ids: list[str], nprobe: int
) -> tuple[dict, list]:
    from umarvel.retrieval.index import Index

    index = Index(corpus.shape[1], factory, nprobe=nprobe)
    started = time.perf_counter()
    index.add(corpus, ids)
    build = time.perf_counter() - started
    index.search(queries[:4], 10)  # warm-up
    started = time.perf_counter()
    found = index.search(queries, 10).ids
    per_query = (time.perf_counter() - started) / len(queries)
    return {
        "factory": factory,
        "build_seconds": round(build, 2),
        "ms_per_query": round(1000 * per_query, 3),
    }, found


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--vectors", type=int, nargs="+", default=[100_000, 1_000_000])
    parser.add_argument("--dim", type=int, default=576)
    parser.add_argument("--queries", type=int, default=200)
    parser.add_argument("--ivf", default="IVF1024,Flat")
    parser.add_argument("--nprobe", type=int, default=16)
    parser.add_argument("--output-dir", type=Path, default=Path("benchmarks/results"))
    args = parser.parse_args()

    import faiss

    rng = np.random.default_rng(0)
    centres = _unit(rng.standard_normal((4096, args.dim), dtype=np.float32))
    report: dict = {
        "dim": args.dim,
        "queries": args.queries,
        "nprobe": args.nprobe,
        "faiss_threads": faiss.omp_get_max_threads(),
        "sizes": {},
    }
    for n in args.vectors:
        ids = [str(i) for i in range(n)]
        report["sizes"][n] = {}
        for kind in ("clustered", "uniform"):
            corpus = _corpus(kind, n, args.dim, centres, rng)
            queries = _corpus(kind, args.queries, args.dim, centres, rng)
            exact, exact_ids = _measure("Flat", corpus, queries, ids, args.nprobe)
            ivf, ivf_ids = _measure(args.ivf, corpus, queries, ids, args.nprobe)
            overlap = np.mean([len(set(a) & set(b)) / 10 for a, b in zip(exact_ids, ivf_ids, strict=True)])
            report["sizes"][n][kind] = {
                "exact": exact,
                "ivf": ivf,
                "ivf_recall@10_vs_exact": round(float(overlap), 4),
                "speedup": round(exact["ms_per_query"] / ivf["ms_per_query"], 1),
            }
            print(n, kind, report["sizes"][n][kind], flush=True)
            del corpus
    args.output_dir.mkdir(parents=True, exist_ok=True)
    (args.output_dir / "index_latency.json").write_text(json.dumps(report, indent=2) + "\n")
    lines = [
        f"# Exact vs IVF search: {args.dim}-d vectors, {args.queries} queries, "
        f"{faiss.omp_get_max_threads()} threads, nprobe {args.nprobe}",
        "",
        "| vectors | corpus | index | build (s) | ms / query | IVF recall@10 vs exact | speed-up |",
        "|---|---|---|---|---|---|---|",
    ]
    for n, corpora in report["sizes"].items():
        for kind, entry in corpora.items():
            exact, ivf = entry["exact"], entry["ivf"]
            lines.append(
                f"| {n:,} | {kind} | {exact['factory']} | {exact['build_seconds']} | "
                f"{exact['ms_per_query']} | | |"
            )
            lines.append(
                f"| {n:,} | {kind} | {ivf['factory']} | {ivf['build_seconds']} | {ivf['ms_per_query']} | "
                f"{entry['ivf_recall@10_vs_exact']} | {entry['speedup']}x |"
            )
    (args.output_dir / "index_latency.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
