"""U-MARVEL+: re-rank the retriever's top K with the re-ranker, final score cos + w * P(Yes) (method 6.3).

`rerank_runs` reads the retriever's TREC run files, scores each query's top K pairs with the re-ranker
(P(Yes) cached by pair content and re-ranker identity in an append-only file, so a killed run resumes
and a second weight costs nothing), and writes re-ranked run files. `tune_fusion` picks w on a
validation split from a grid by the mean of the local and global averages; the test split is refused.
"""

from __future__ import annotations

import hashlib
import json
import logging
import tempfile
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from umarvel.config.io import ConfigError
from umarvel.config.stages import TuneFusionConfig
from umarvel.data.io import InputError, write_json
from umarvel.data.mbeir import MBeir, Row
from umarvel.data.records import Candidate, Query
from umarvel.distributed import each_rank_does, run_on_main, world
from umarvel.evaluation.mbeir import (
    PoolSetting,
    Scores,
    paired_difference,
    read_scored_run,
    render_table,
    run_file_name,
    score_runs,
    write_results,
    write_run,
)
from umarvel.reranker.data import RerankPair
from umarvel.retrieval.encode import item_key, prime_media_digests

logger = logging.getLogger(__name__)

DEFAULT_WEIGHT = 0.1  # the paper's shipped U-MARVEL+ weight (method 6.3)
DEFAULT_GRID = TuneFusionConfig.grid


class PairScoreCache:
    """P(Yes) by pair content key (see `pair_keys`), kept in an append-only JSONL file; a torn last line
    and lines of another format are ignored."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.scores: dict[str, float] = {}
        if path.is_file():
            for line in path.read_text(encoding="utf-8").splitlines():
                try:
                    record = json.loads(line)
                    self.scores[record["key"]] = float(record["p_yes"])
                except (json.JSONDecodeError, KeyError, TypeError, ValueError):
                    continue

    def add(self, keys: Sequence[str], pairs: Sequence[tuple[str, str]], values: np.ndarray) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with self.path.open("a", encoding="utf-8") as handle:
            for key, (qid, did), value in zip(keys, pairs, values, strict=True):
                self.scores[key] = float(value)
                record = {"key": key, "qid": qid, "did": did, "p_yes": round(float(value), 6)}
                handle.write(json.dumps(record) + "\n")


def pair_keys(
    fingerprint: str,
    wanted: Sequence[tuple[str, str]],
    queries: dict[str, Query],
    candidates: dict[str, Candidate],
) -> dict[tuple[str, str], str]:
    """(qid, did) -> the content key of the pair's P(Yes): the re-ranker's fingerprint (weights digest
    and settings) and both records' content (text, instruction, image digests), so a changed re-ranker,
    query or candidate is scored again."""
    qids, dids = dict.fromkeys(q for q, _ in wanted), dict.fromkeys(d for _, d in wanted)
    prime_media_digests([*(queries[q] for q in qids), *(candidates[d] for d in dids)])
    query_keys = {qid: item_key(queries[qid], "query", None, fingerprint) for qid in qids}
    candidate_keys = {did: item_key(candidates[did], "candidate", None, fingerprint) for did in dids}
    return {
        (qid, did): hashlib.sha256(f"{query_keys[qid]}:{candidate_keys[did]}".encode()).hexdigest()
        for qid, did in wanted
    }


def score_pairs(
    reranker: Any,
    wanted: Sequence[tuple[str, str]],
    queries: dict[str, Query],
    candidates: dict[str, Candidate],
    cache: PairScoreCache,
    progress: bool = True,
    chunk: int = 128,
) -> dict[tuple[str, str], float]:
    """P(Yes) of every (qid, did) in `wanted`: cached pairs are read, the others scored chunk by chunk
    and added to `cache`."""
    keys = pair_keys(reranker.fingerprint, wanted, queries, candidates)
    missing = list(dict.fromkeys(pair for pair in wanted if keys[pair] not in cache.scores))
    if missing:
        logger.info("re-ranker: %d pairs to score (%d cached)", len(missing), len(keys) - len(missing))
        # Under several processes each round gives every rank its own chunk; rank 0 appends the round's
        # scores to the cache file, so a killed run keeps every finished round.
        current = world()
        rounds = range(0, len(missing), chunk * current.size)
        if progress and current.main:
            from rich.progress import track

            rounds = track(rounds, description="re-ranking")  # type: ignore[assignment]
        for start in rounds:
            mine = missing[start + current.rank * chunk : start + (current.rank + 1) * chunk]

            def score_mine(mine: list[tuple[str, str]] = mine) -> tuple[list[tuple[str, str]], list[float]]:
                if not mine:  # the last round can leave a rank without a chunk
                    return mine, []
                # One item per record: its media are read once and its pairs share the object.
                query_items = {q: reranker.item(queries[q], True) for q in dict.fromkeys(q for q, _ in mine)}
                candidate_items = {
                    d: reranker.item(candidates[d], False) for d in dict.fromkeys(d for _, d in mine)
                }
                pairs = [RerankPair(query_items[q], candidate_items[d]) for q, d in mine]
                return mine, [float(v) for v in reranker.score(pairs)]

            for batch, scores in each_rank_does(score_mine, "re-ranking"):
                if batch:
                    if current.main:
                        cache.add([keys[pair] for pair in batch], batch, np.asarray(scores))
                    else:
                        cache.scores.update((keys[pair], v) for pair, v in zip(batch, scores, strict=True))
    return {pair: cache.scores[key] for pair, key in keys.items()}


def fuse(
    ranked: Sequence[tuple[str, float]], p_yes: dict[str, float], weight: float, top: int
) -> list[tuple[str, float]]:
    """The top `top` re-sorted by cos + weight * P(Yes) (stable), followed by the rest unchanged."""
    head = [(did, score + weight * p_yes[did]) for did, score in ranked[:top]]
    order = sorted(range(len(head)), key=lambda i: -head[i][1])
    return [head[i] for i in order] + list(ranked[top:])


def rerank_hits(
    ranker: Any,
    query: Query,
    ranked: list[tuple[str, float]],
    records: dict[str, Candidate],
    top: int,
    weight: float,
) -> list[tuple[str, float]]:
    """U-MARVEL+ for one query: the first `top` hits re-scored cos + weight * P(Yes), then the rest."""
    head = [d for d, _ in ranked[:top]]
    if weight == 0:  # cos + 0 * P(Yes) keeps the retriever's order: as in `rerank_runs`, nothing to score
        return fuse(ranked, dict.fromkeys(head, 0.0), weight, top)
    query_item = ranker.item(query, with_instruction=True)
    p_yes = ranker.score([RerankPair(query_item, ranker.item(records[d], False)) for d in head])
    return fuse(ranked, dict(zip(head, p_yes.tolist(), strict=True)), weight, top)


def _records(mbeir: MBeir, rows: Sequence[Row], split: str, settings: Iterable[PoolSetting]):
    queries = {q.qid: q for row in rows for q in mbeir.queries(row, split)}  # type: ignore[arg-type]
    candidates: dict[str, Candidate] = {}
    for row in rows:
        candidates.update((c.did, c) for c in mbeir.pool(row, split))  # type: ignore[arg-type]
    global_file = mbeir.global_pool_file(split)  # type: ignore[arg-type]
    if "global" in settings and global_file.is_file():
        candidates.update((c.did, c) for c in mbeir.global_pool(split))  # type: ignore[arg-type]
    return queries, candidates


def blind_rows(rows: Sequence[Row], top: int) -> list[Row]:
    """The rows whose headline Recall@k re-ranking the top `top` cannot change: reordering only the
    first `top` <= k candidates never moves one into or out of the top k."""
    return [row for row in rows if top <= row.k]


def rerank_runs(
    reranker: Any,
    root: str | Path,
    runs_dir: str | Path,
    out_dir: str | Path,
    rows: Sequence[Row],
    split: str = "test",
    settings: Sequence[PoolSetting] = ("local", "global"),
    top: int = 50,
    weights: Sequence[float] = (DEFAULT_WEIGHT,),
    progress: bool = True,
    instruction_choice: str = "hash",
) -> dict[float, Scores]:
    """Re-rank the run files in `runs_dir` for each weight; the first weight's runs and results go to
    `out_dir` (runs/, results.json, results.md); every weight's scores are returned."""
    mbeir, runs_dir, out_dir = MBeir(root, instruction_choice), Path(runs_dir), Path(out_dir)  # type: ignore[arg-type]
    for row in blind_rows(rows, top):
        logger.warning(
            "%s: re-ranking the top %d cannot change its Recall@%d (use a top above %d)",
            row.name,
            top,
            row.k,
            row.k,
        )
    queries, candidates = _records(mbeir, rows, split, settings)
    retrieved = {
        (row.name, setting): read_scored_run(runs_dir / run_file_name(row, setting, split))
        for row in rows
        for setting in settings
    }
    wanted = [
        (qid, did) for runs in retrieved.values() for qid, ranked in runs.items() for did, _ in ranked[:top]
    ]
    unknown = sorted({did for _, did in wanted if did not in candidates})
    if unknown:
        raise InputError(
            runs_dir, f"run files name {len(unknown)} candidates absent from the pools (e.g. {unknown[0]})"
        )
    if all(weight == 0 for weight in weights):
        # cos + 0 * P(Yes) keeps the retriever's order whatever P(Yes) is: no pair needs the re-ranker.
        logger.info("fusion weight 0: the runs stay the retriever's; %d pairs not scored", len(set(wanted)))
        p_yes = dict.fromkeys(wanted, 0.0)
    else:
        cache = PairScoreCache(out_dir / "pair_scores.jsonl")
        p_yes = score_pairs(reranker, wanted, queries, candidates, cache, progress)
    return run_on_main(_fuse_runs, root, out_dir, rows, split, settings, top, weights, retrieved, p_yes)


def _fuse_runs(
    root: str | Path,
    out_dir: Path,
    rows: Sequence[Row],
    split: str,
    settings: Sequence[PoolSetting],
    top: int,
    weights: Sequence[float],
    retrieved: dict[tuple[str, str], dict[str, list[tuple[str, float]]]],
    p_yes: dict[tuple[str, str], float],
) -> dict[float, Scores]:
    """Fuse and write the re-ranked run files for each weight, and score them (see `rerank_runs`)."""
    results: dict[float, Scores] = {}
    for position, weight in enumerate(weights):
        target = out_dir / "runs" if position == 0 else Path(tempfile.mkdtemp(prefix="fusion-", dir=out_dir))
        target.mkdir(parents=True, exist_ok=True)
        for (name, setting), runs in retrieved.items():
            row = next(r for r in rows if r.name == name)
            fused = {
                qid: fuse(ranked, {d: p_yes[(qid, d)] for d, _ in ranked[:top]}, weight, top)
                for qid, ranked in runs.items()
            }
            qids = list(fused)
            write_run(
                target / run_file_name(row, setting, split),
                row,
                qids,
                [[did for did, _ in fused[qid]] for qid in qids],
                [[score for _, score in fused[qid]] for qid in qids],  # type: ignore[arg-type]
                f"rerank_w{weight}",
            )
        results[weight] = score_runs(root, target, split, rows, settings)
        if position == 0:
            write_results(results[weight], out_dir, split)
            (out_dir / "results.md").write_text(render_table(results[weight]) + "\n")
        else:
            for path in target.iterdir():
                path.unlink()
            target.rmdir()
    return results


def objective(scores: Scores) -> float:
    """What the fusion weight maximises: the mean of the local and global averages present."""
    values = [v for v in (scores.average("local"), scores.average("global")) if v is not None]
    return float(np.mean(values)) if values else 0.0


def tune_fusion(
    reranker: Any,
    root: str | Path,
    runs_dir: str | Path,
    out_dir: str | Path,
    rows: Sequence[Row],
    split: str = "val",
    settings: Sequence[PoolSetting] = ("local", "global"),
    top: int = 50,
    grid: Sequence[float] = DEFAULT_GRID,
    progress: bool = True,
    instruction_choice: str = "hash",
    significant_only: bool = False,
) -> dict[str, Any]:
    """Choose the fusion weight on `split` (never `test`) and return {weight, top, split, objective per
    weight, the best weight's gain over weight 0 with its bootstrap 95% interval}; also writes
    `fusion.json` to `out_dir`. With `significant_only`, weight 0 (the retriever alone) is kept unless
    the best weight's gain on `split` has an interval above 0: on a small validation split a weak
    re-ranker's best weight is often noise that costs points on test."""
    if split == "test":
        raise ConfigError("the fusion weight is tuned on a validation split, never on the test split")
    if rows and len(blind_rows(rows, top)) == len(rows):
        largest = max(row.k for row in rows)
        raise ConfigError(
            f"re-ranking the top {top} cannot change any row's headline recall (k up to {largest}), so "
            f"every weight would tie: tune with rerank_top above {min(row.k for row in rows)}"
        )
    results = rerank_runs(
        reranker, root, runs_dir, out_dir, rows, split, settings, top, grid, progress, instruction_choice
    )
    table = {str(w): round(objective(s), 3) for w, s in results.items()}
    best = max(grid, key=lambda w: (objective(results[w]), -w))  # ties: the smaller weight
    gain = None
    if best != 0 and 0 in grid:
        gain = paired_difference(results[best].to_json(), results[0.0].to_json(), tuple(settings))
    chosen = best
    if significant_only and gain is not None and gain["interval"][0] <= 0:
        logger.info("weight %s gains %s points on %s, not significantly: keeping weight 0", best, gain, split)
        chosen = 0.0
    # Leave the chosen weight's runs and results in out_dir (the cache makes this free).
    rerank_runs(
        reranker, root, runs_dir, out_dir, rows, split, settings, top, (chosen,), False, instruction_choice
    )
    choice = {
        "weight": chosen,
        "top": top,
        "split": split,
        "objective": "mean of local and global averages",
        "by_weight": table,
        "best": best,
        "gain_over_weight_0": gain and {"difference": gain["difference"], "interval": gain["interval"]},
        "significant_only": significant_only,
    }
    run_on_main(write_json, Path(out_dir) / "fusion.json", choice)
    logger.info("fusion weight %s on %s: %s", chosen, split, table)
    return choice
