"""The distillation teacher (method 7.1): re-ranker scores over the stage-B embedder's shortlists.

`score_teacher` output folder:
    embeddings/        resumable query and pool embeddings of the stage-B embedder
    parts/             re-ranker scores, one file per chunk of queries (a rerun skips finished chunks)
    teacher.jsonl      per sampled query: qid, task_id, positives, candidates (top K of its local
                       training pool), cosine, p_yes, alpha, teacher = alpha * cosine + (1 - alpha) * p_yes
    summary.json       per task: queries, the alpha used (and, when chosen from a grid, each candidate
                       alpha's MRR), mean P(Yes) of labelled positives and of the rest, and how often the
                       embedder's and the teacher's top 1 is a labelled positive
    manifest.json

The parts hold cosines and P(Yes) only: a rerun with another alpha fuses again and scores nothing.
With `alpha_grid`, each task's alpha is the grid value whose fused score ranks the labelled positives of
its scored queries best (mean reciprocal rank; ties go to the larger alpha, the one nearer the embedder),
the automatic form of the official code's per-task weights (method 7.1): a re-ranker that cannot yet
tell positives apart (a small one trained a few steps) leaves the embedder's scores as the teacher
instead of distilling its noise.
"""

from __future__ import annotations

import json
import logging
import time
from collections import defaultdict
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from umarvel.config.digest import json_digest
from umarvel.config.io import ConfigError
from umarvel.config.manifest import write_manifest
from umarvel.data.io import InputError, read_jsonl, write_json, write_jsonl
from umarvel.data.mbeir import Instructions, dataset_id_of, read_pool, read_queries
from umarvel.data.records import Candidate, Query
from umarvel.data.sampling import row_rng
from umarvel.distributed import each_rank_does, my_share, run_on_main, world
from umarvel.evaluation.metrics import mrr_at_k
from umarvel.reranker.data import RerankPair
from umarvel.retrieval.encode import encode_corpus, item_key
from umarvel.retrieval.search import top_k

logger = logging.getLogger(__name__)


def sample_queries(queries: Sequence[Query], fraction: float, seed: int) -> list[Query]:
    """A seeded sample of `fraction` of the distinct qids of each task (at least one per task), in
    file order. The same seed and queries give the same sample."""
    if not 0 < fraction <= 1:
        raise ConfigError(f"fraction must be in (0, 1], got {fraction}")
    first: dict[str, Query] = {}
    for query in queries:
        first.setdefault(query.qid, query)
    by_task: dict[int | None, list[str]] = defaultdict(list)
    for qid, query in first.items():
        by_task[query.task_id].append(qid)
    chosen: set[str] = set()
    for task, qids in sorted(by_task.items(), key=lambda item: str(item[0])):
        count = max(1, round(len(qids) * fraction))
        chosen.update(row_rng(seed, 0, hash_task(task)).sample(sorted(qids), count))
    return [q for q in first.values() if q.qid in chosen]


def hash_task(task: int | None) -> int:
    return -1 if task is None else int(task)


def local_pool_key(identifier: str, modality: str) -> tuple[int, str]:
    """M-BEIR local pools are per dataset and candidate modality: (dataset id, modality)."""
    return dataset_id_of(identifier), modality


def parse_alphas(pairs: Sequence[str]) -> dict[int, float]:
    """`TASK=ALPHA` strings (e.g. `0=0.5`) -> {task: alpha}, each alpha in [0, 1]."""
    alphas = {}
    for pair in pairs:
        task, _, value = pair.partition("=")
        try:
            alphas[int(task)] = float(value)
        except ValueError:
            raise ConfigError(f"per-task alpha {pair!r} is not TASK=ALPHA (e.g. 0=0.5)") from None
        if not 0 <= alphas[int(task)] <= 1:
            raise ConfigError(f"alpha for task {task} must be in [0, 1], got {value}")
    return alphas


def choose_alphas(
    records: Sequence[dict[str, Any]], grid: Sequence[float]
) -> dict[str, tuple[float, dict[float, float]]]:
    """Per task id (as a string): the grid alpha whose fused score `alpha * cosine + (1 - alpha) * p_yes`
    gives the highest mean reciprocal rank of the labelled positives (ties in score keep the shortlist
    order, ties in MRR go to the larger alpha), with the MRR of every grid value."""
    by_task: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for record in records:
        by_task[str(record["task_id"])].append(record)
    chosen = {}
    for task, rows in by_task.items():
        relevant = {r["qid"]: set(r["positives"]) for r in rows}
        longest = max(len(r["candidates"]) for r in rows)
        mrr = {}
        for alpha in sorted(set(grid)):
            ranking = {}
            for r in rows:
                fused = alpha * np.asarray(r["cosine"]) + (1 - alpha) * np.asarray(r["p_yes"])
                ranking[r["qid"]] = [r["candidates"][i] for i in np.argsort(-fused, kind="stable")]
            mrr[alpha] = round(mrr_at_k(ranking, relevant, longest), 6)
        best = max(mrr.values())
        chosen[task] = (max(a for a, value in mrr.items() if value == best), mrr)
    return chosen


def _shortlists(
    queries: Sequence[Query],
    query_vectors: np.ndarray,
    pool: Sequence[Candidate],
    pool_vectors: np.ndarray,
    top: int,
) -> list[tuple[list[str], list[float]]]:
    """Top `top` of each query's local training pool: candidates of its dataset and of its positives'
    modality (the whole dataset when its positives are absent from the pool)."""
    modality = {c.did: c.modality.value for c in pool}
    groups: dict[tuple[int, str], list[int]] = defaultdict(list)
    by_dataset: dict[int, list[int]] = defaultdict(list)
    for i, candidate in enumerate(pool):
        groups[local_pool_key(candidate.did, modality[candidate.did])].append(i)
        by_dataset[dataset_id_of(candidate.did)].append(i)
    lists: list[tuple[list[str], list[float]]] = []
    for query, vector in zip(queries, query_vectors, strict=True):
        kinds = [modality[d] for d in query.positives if d in modality]
        members = (
            groups[local_pool_key(query.qid, kinds[0])] if kinds else by_dataset[dataset_id_of(query.qid)]
        )
        if not members:
            raise InputError(
                query.source, f"no training-pool candidate of dataset {dataset_id_of(query.qid)}"
            )
        scores = pool_vectors[members] @ vector
        order = top_k(scores, top)
        lists.append(([pool[members[i]].did for i in order], [float(scores[i]) for i in order]))
    return lists


def score_teacher(
    embedder: Any,
    reranker: Any,
    root: str | Path,
    out_dir: str | Path,
    queries_file: str = "query/union_train/mbeir_union_up_train.jsonl",
    pool_file: str = "cand_pool/global/mbeir_union_train_cand_pool.jsonl",
    fraction: float = 0.1,
    top: int = 50,
    alpha: float = 0.5,
    alpha_by_task: Mapping[int, float] | None = None,
    seed: int = 42,
    chunk_queries: int = 8,
    progress: bool = True,
    instruction_choice: str = "hash",
    alpha_grid: Sequence[float] = (),
) -> Path:
    """Write `teacher.jsonl` for a stratified sample of training queries (see module docstring).
    `alpha_by_task` fixes a task's alpha; `alpha_grid` chooses the others' per task (else `alpha`)."""
    if not all(0 <= a <= 1 for a in (alpha, *alpha_grid)):
        raise ConfigError(f"alpha and alpha_grid values must be in [0, 1], got {alpha}, {list(alpha_grid)}")
    alpha_by_task = dict(alpha_by_task or {})
    root, out_dir = Path(root), Path(out_dir)
    instructions = Instructions.from_tsv(root / "instructions" / "query_instructions.tsv", instruction_choice)  # type: ignore[arg-type]
    queries = sample_queries(read_queries(root / queries_file, instructions, image_root=root), fraction, seed)
    pool = read_pool(root / pool_file, image_root=root)
    if not queries or not pool:
        raise InputError(root, "no queries or no candidates to score")
    logger.info("scoring %d sampled queries (%.0f%%) against their top %d", len(queries), 100 * fraction, top)
    embeddings = out_dir / "embeddings"
    query_vectors = np.load(
        encode_corpus(embedder, queries, embeddings / "queries.npy", "query", progress=progress)
    )
    pool_vectors = np.load(
        encode_corpus(embedder, pool, embeddings / "pool.npy", "candidate", progress=progress)
    )
    shortlists = _shortlists(queries, query_vectors, pool, pool_vectors, top)
    by_did = {c.did: c for c in pool}
    parts = out_dir / "parts"
    parts.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    chunks = range(0, len(queries), chunk_queries)
    # A part is named by the digest of everything its records depend on: both models' identities and
    # its queries' content with their shortlists. A rerun reuses exactly the parts whose inputs are
    # unchanged and deletes the others.
    settings = {"embedder": embedder.fingerprint, "reranker": reranker.fingerprint}
    shortlisted = {did for dids, _ in shortlists for did in dids}
    content = {did: item_key(by_did[did], "candidate", None, "") for did in shortlisted}
    content.update({q.qid: item_key(q, "query", None, "") for q in queries})
    names = [
        f"{number:05d}-{_part_key(settings, content, queries, shortlists, start, chunk_queries)}.jsonl"
        for number, start in enumerate(chunks)
    ]
    run_on_main(_drop_stale_parts, parts, names)

    def score_part(start: int, part: Path) -> None:
        chunk_records = []
        chunk = queries[start : start + chunk_queries]
        lists = shortlists[start : start + chunk_queries]
        # The chunk's pairs in one call, so that a batch holds several queries' shortlists; one item per
        # candidate, so a candidate in several shortlists is read once.
        items = {d: reranker.item(by_did[d], with_instruction=False) for dids, _ in lists for d in dids}
        pairs = []
        for query, (dids, _) in zip(chunk, lists, strict=True):
            query_item = reranker.item(query, with_instruction=True)
            pairs.extend(RerankPair(query_item, items[d]) for d in dids)
        scores = reranker.score(pairs)
        ends = np.cumsum([len(dids) for dids, _ in lists]).tolist()
        for query, (dids, cosines), end in zip(chunk, lists, ends, strict=True):
            chunk_records.append(
                {
                    "qid": query.qid,
                    "task_id": query.task_id,
                    "positives": list(query.positives),
                    "candidates": dids,
                    "cosine": [round(c, 6) for c in cosines],
                    "p_yes": [round(float(p), 6) for p in scores[end - len(dids) : end]],
                }
            )
        write_jsonl(part, chunk_records)

    # Under several processes each rank scores every world-size-th part; rank 0 then assembles them.
    current = world()
    mine = [(start, parts / names[number]) for number, start in my_share(list(chunks))]
    todo = [(start, part) for start, part in mine if not part.is_file()]

    def score_mine() -> None:
        for start, part in _track(todo, progress and current.main, "re-ranker scoring"):
            score_part(start, part)

    each_rank_does(score_mine, f"scoring the teacher in {parts}")
    return run_on_main(
        _write_teacher,
        out_dir,
        [parts / name for name in names],
        started,
        embedder,
        reranker,
        root,
        {
            "fraction": fraction,
            "top": top,
            "alpha": alpha,
            "alpha_by_task": alpha_by_task,
            "alpha_grid": list(alpha_grid),
            "seed": seed,
        },
    )


def _drop_stale_parts(parts: Path, names: Sequence[str]) -> None:
    for stale in parts.glob("*.jsonl"):
        if stale.name not in set(names):
            stale.unlink()


def _write_teacher(
    out_dir: Path,
    part_files: Sequence[Path],
    started: float,
    embedder: Any,
    reranker: Any,
    root: Path,
    settings: dict[str, Any],
) -> Path:
    """teacher.jsonl from the parts in order, fused with each task's alpha; summary.json and the
    manifest."""
    records = [record for part in part_files for _, record in read_jsonl(part)]
    # Records name their task as in the query file (None where it has none, -1 in `alpha_by_task`).
    fixed = {str(None if task == -1 else task): a for task, a in settings["alpha_by_task"].items()}
    free = [r for r in records if str(r["task_id"]) not in fixed]
    searched = choose_alphas(free, settings["alpha_grid"]) if settings["alpha_grid"] else {}
    alphas = {task: chosen for task, (chosen, _) in searched.items()} | fixed
    for record in records:
        weight = alphas.get(str(record["task_id"]), settings["alpha"])
        record["alpha"] = weight
        record["teacher"] = [
            round(weight * c + (1 - weight) * p, 6)
            for c, p in zip(record["cosine"], record["p_yes"], strict=True)
        ]
    seconds = round(time.perf_counter() - started, 1)
    write_jsonl(out_dir / "teacher.jsonl", records)
    summary = _summary(records)
    for task, values in summary["tasks"].items():
        values["alpha"] = alphas.get(task, settings["alpha"])
        if task in searched:
            values["mrr_by_alpha"] = {str(a): mrr for a, mrr in searched[task][1].items()}
    summary["rerank_seconds_this_run"] = seconds
    summary["pairs"] = sum(len(r["candidates"]) for r in records)
    write_json(out_dir / "summary.json", summary)
    write_manifest(
        out_dir,
        "score",
        {**settings, "embedder": vars(embedder.settings), "reranker": vars(reranker.settings)},
        inputs={"mbeir_root": root},
        extra={"queries": len(records)},
    )
    logger.info("teacher scores for %d queries: %s", len(records), json.dumps(summary["tasks"]))
    return out_dir / "teacher.jsonl"


def _part_key(
    settings: dict[str, Any],
    content: dict[str, str],
    queries: Sequence[Query],
    shortlists: Sequence[tuple[list[str], list[float]]],
    start: int,
    size: int,
) -> str:
    """16 hex digits of the digest of one part's inputs (see `score_teacher`); `content` maps qids and
    dids to their records' content keys."""
    chunk = [
        (content[query.qid], [content[d] for d in dids], [round(c, 6) for c in cosines])
        for query, (dids, cosines) in zip(
            queries[start : start + size], shortlists[start : start + size], strict=True
        )
    ]
    return json_digest({**settings, "chunk": chunk})[:16]


def _track(items: Sequence[Any], progress: bool, description: str) -> Any:
    if not progress:
        return items
    from rich.progress import track

    return track(items, description=description)


def _summary(records: Sequence[dict[str, Any]]) -> dict[str, Any]:
    tasks: dict[str, dict[str, list[float]]] = defaultdict(lambda: defaultdict(list))
    for record in records:
        task = tasks[str(record["task_id"])]
        positives = set(record["positives"])
        for did, p in zip(record["candidates"], record["p_yes"], strict=True):
            task["p_yes_positive" if did in positives else "p_yes_other"].append(p)
        cos_top = record["candidates"][int(np.argmax(record["cosine"]))]
        teacher_top = record["candidates"][int(np.argmax(record["teacher"]))]
        task["embedder_top1_positive"].append(float(cos_top in positives))
        task["teacher_top1_positive"].append(float(teacher_top in positives))
        task["queries"].append(1.0)
    return {
        "tasks": {
            name: {
                "queries": int(sum(values["queries"])),
                **{
                    key: round(float(np.mean(v)), 4) if v else None
                    for key, v in values.items()
                    if key != "queries"
                },
            }
            for name, values in sorted(tasks.items())
        }
    }
