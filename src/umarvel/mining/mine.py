"""The `mine` stage: shortlist candidates for training queries, filter false negatives, keep k negatives.

Writes `negatives.jsonl` (one line per query, in query-file order: qid, positives, negatives with
scores, and what each rule dropped), `audit.json` (per task: rule counts, score summaries, examples of
dropped candidates) and `audit_scores.png` (score histograms of kept vs dropped, per task).
"""

from __future__ import annotations

import json
import logging
from collections import defaultdict
from pathlib import Path
from typing import Any

import numpy as np

from umarvel.data.io import InputError, write_json, write_jsonl
from umarvel.data.mbeir import Instructions, read_pool, read_queries
from umarvel.distributed import run_on_main
from umarvel.mining.filters import RULES, NegativeRules, select_negatives
from umarvel.retrieval.encode import encode_corpus
from umarvel.retrieval.index import Index, embedder_record

logger = logging.getLogger(__name__)


def selection_digest(path: str | Path) -> str:
    """The digest of what a `negatives.jsonl` decides for training: each line's qid, positives and
    negatives, in order. The stored scores and drop counts are left out, so two mining runs that pick
    the same negatives (their scores differing in the last bits, as across thread counts) give the same
    digest and the stage that trains on them is not rerun."""
    from umarvel.config.digest import json_digest
    from umarvel.data.io import read_jsonl

    chosen = [
        [record.get("qid"), record.get("positives"), record.get("negatives")]
        for _, record in read_jsonl(Path(path))
    ]
    return json_digest(chosen)


def _content(text: str | None, image: object) -> tuple[str, str]:
    return (" ".join((text or "").lower().split()), str(image) if image is not None else "")


def mine_negatives(
    embedder: Any,
    root: str | Path,
    queries_file: str,
    pool_file: str,
    out_dir: str | Path,
    rules: NegativeRules,
    shortlist_size: int = 100,
    progress: bool = True,
    instruction_choice: str = "hash",
    cache_dir: str | Path | None = None,
) -> Path:
    """Mine hard negatives for every query of `queries_file` from `pool_file` (both under the M-BEIR
    `root`) and return the path of `negatives.jsonl`. With `cache_dir`, embeddings come from (and go
    to) that content-addressed cache."""
    root, out_dir = Path(root), Path(out_dir)
    instructions = Instructions.from_tsv(root / "instructions" / "query_instructions.tsv", instruction_choice)  # type: ignore[arg-type]
    queries = read_queries(root / queries_file, instructions, image_root=root)
    pool = read_pool(root / pool_file, image_root=root)
    if not queries or not pool:
        raise InputError(root, "no queries or no candidates to mine from")
    embeddings = out_dir / "embeddings"
    query_vectors = np.load(
        encode_corpus(
            embedder, queries, embeddings / "queries.npy", "query", cache_dir=cache_dir, progress=progress
        )
    )
    pool_vectors = np.load(
        encode_corpus(
            embedder, pool, embeddings / "pool.npy", "candidate", cache_dir=cache_dir, progress=progress
        )
    )
    # Under several processes the encoding above was shared; the search and the files are rank 0's.
    return run_on_main(
        _select, embedder, queries, pool, query_vectors, pool_vectors, out_dir, rules, shortlist_size
    )


def _select(
    embedder: Any,
    queries: list,
    pool: list,
    query_vectors: np.ndarray,
    pool_vectors: np.ndarray,
    out_dir: Path,
    rules: NegativeRules,
    shortlist_size: int,
) -> Path:
    """Search, filter and write negatives.jsonl, audit.json and the audit plot."""
    row_of = {c.did: i for i, c in enumerate(pool)}
    index = Index(pool_vectors.shape[1], "Flat", embedder_record(embedder))
    index.add(pool_vectors, [c.did for c in pool])
    found = index.search(query_vectors, shortlist_size + rules.k)
    # Candidates whose content equals another candidate's: a copy of a positive is a false negative.
    by_content: dict[tuple[str, str], list[str]] = defaultdict(list)
    for candidate in pool:
        by_content[_content(candidate.text, candidate.image)].append(candidate.did)
    lines = []
    audit = defaultdict(
        lambda: {"queries": 0, **{r: 0 for r in RULES}, "kept": 0, "short": 0, "with_mined": 0}
    )
    scores_kept: dict[str, list[float]] = defaultdict(list)
    scores_dropped: dict[str, list[float]] = defaultdict(list)
    examples: dict[str, list[dict]] = defaultdict(list)
    for row, (query, ids, scores) in enumerate(zip(queries, found.ids, found.scores, strict=True)):
        positives = set(query.positives)
        in_pool = [row_of[d] for d in positives if d in row_of]
        positive_score = float(np.max(pool_vectors[in_pool] @ query_vectors[row])) if in_pool else None
        duplicates = {
            d for p in in_pool for d in by_content[_content(pool[p].text, pool[p].image)]
        } - positives
        shortlist = [(d, float(s)) for d, s in zip(ids, scores, strict=True) if d]
        selection = select_negatives(shortlist, positives, rules, row, positive_score, duplicates)
        task = str(query.task_id)
        audit[task]["queries"] += 1
        audit[task]["kept"] += len(selection.negatives)
        audit[task]["short"] += len(selection.negatives) < rules.k
        audit[task]["with_mined"] += bool(selection.negatives)
        for rule, dropped in selection.dropped.items():
            audit[task][rule] += len(dropped)
            scores_dropped[task].extend(s for _, s in dropped)
            if rule != "positive" and dropped and len(examples[task]) < 5:
                examples[task].append(
                    {
                        "qid": query.qid,
                        "query": query.text,
                        "rule": rule,
                        "did": dropped[0][0],
                        "text": pool[row_of[dropped[0][0]]].text,
                        "score": round(dropped[0][1], 4),
                        "positive_score": positive_score,
                    }
                )
        scores_kept[task].extend(s for _, s in selection.negatives)
        lines.append(
            {
                "qid": query.qid,
                "positives": sorted(positives),
                "positive_score": positive_score,
                "negatives": [d for d, _ in selection.negatives],
                "scores": [round(s, 5) for _, s in selection.negatives],
                "dropped": {r: len(v) for r, v in selection.dropped.items()},
            }
        )
    out_dir.mkdir(parents=True, exist_ok=True)
    write_jsonl(out_dir / "negatives.jsonl", lines)
    for counts in audit.values():
        # Queries left with no mined negative fall back to random ones in training (data/training.py).
        counts["with_mined_fraction"] = round(counts["with_mined"] / max(1, counts["queries"]), 4)
    queries = sum(v["queries"] for v in audit.values())
    report = {
        "rules": vars(rules),
        "shortlist": shortlist_size,
        "with_mined_fraction": round(sum(v["with_mined"] for v in audit.values()) / max(1, queries), 4),
        "tasks": {t: dict(v) for t, v in audit.items()},
        "examples": dict(examples),
    }
    write_json(out_dir / "audit.json", report)
    _plot(scores_kept, scores_dropped, out_dir / "audit_scores.png")
    logger.info("mined %d queries: %s", len(lines), json.dumps({t: dict(v) for t, v in audit.items()}))
    return out_dir / "negatives.jsonl"


def _plot(kept: dict[str, list[float]], dropped: dict[str, list[float]], path: Path) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        logger.info("matplotlib is not installed; no audit plot")
        return
    tasks = sorted(set(kept) | set(dropped))
    figure, axes = plt.subplots(1, len(tasks), figsize=(3.2 * len(tasks), 2.8), squeeze=False)
    for axis, task in zip(axes[0], tasks, strict=True):
        axis.hist(dropped.get(task, []), bins=20, alpha=0.6, label="dropped")
        axis.hist(kept.get(task, []), bins=20, alpha=0.6, label="kept")
        axis.set(title=f"task {task}", xlabel="cosine")
    axes[0][0].legend()
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)
