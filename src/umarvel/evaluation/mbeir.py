"""The M-BEIR table: embed queries once, search each row's local pool and the global pool, write
UniIR-named TREC run files, and score any run files against the qrels (mbeir-protocol.md section 2).

Scores are hit-rate recall in percent: R@5, except R@10 for Fashion200K (both tasks) and FashionIQ;
the average is the unweighted mean over the rows present.
"""

from __future__ import annotations

import csv
import itertools
import logging
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np

from umarvel.data.io import InputError, atomic_write, write_json
from umarvel.data.mbeir import ROWS, MBeir, Row, read_qrels
from umarvel.distributed import run_on_main
from umarvel.evaluation.metrics import bootstrap_interval, hits_at_k, recall_at_k
from umarvel.retrieval.encode import encode_corpus
from umarvel.retrieval.index import Index, embedder_record

logger = logging.getLogger(__name__)

PoolSetting = Literal["local", "global"]
SEARCH_K = 50
RECALL_KS = (1, 5, 10, 50)


def run_file_name(row: Row, setting: PoolSetting, split: str, k: int = SEARCH_K) -> str:
    """UniIR's run file name: mbeir_<dataset>_task<N>_{single|union}_pool_<split>_k<k>_run.txt."""
    pool = "single" if setting == "local" else "union"
    return f"mbeir_{row.name}_{pool}_pool_{split}_k{k}_run.txt"


def write_run(
    path: Path, row: Row, qids: Sequence[str], ids: Sequence[Sequence[str]], scores: np.ndarray, run_id: str
) -> None:
    """TREC run lines `qid Q0 did rank score run_id task_id`, ranks from 1."""
    with atomic_write(path) as handle:
        for qid, ranked, row_scores in zip(qids, ids, scores, strict=True):
            for rank, (did, score) in enumerate(zip(ranked, row_scores, strict=True), start=1):
                if did:
                    handle.write(f"{qid} Q0 {did} {rank} {float(score):.6f} {run_id} {row.task_id}\n")


def read_run(path: Path) -> dict[str, list[str]]:
    """qid -> dids in rank order; a malformed line or a did listed twice for one query is an error."""
    return {qid: [did for did, _ in ranked] for qid, ranked in read_scored_run(path).items()}


def read_scored_run(path: Path) -> dict[str, list[tuple[str, float]]]:
    """qid -> [(did, score)] in rank order, checked like `read_run`."""
    if not path.is_file():
        raise InputError(path, "run file not found")
    ranked: dict[str, list[tuple[int, str, float]]] = {}
    seen: set[tuple[str, str]] = set()
    with path.open(encoding="utf-8") as handle:
        for number, line in enumerate(handle, start=1):
            parts = line.split()
            if not parts:
                continue
            if len(parts) < 6:
                raise InputError(f"{path}:{number}", "expected 'qid Q0 did rank score run_id [task_id]'")
            qid, did = parts[0], parts[2]
            try:
                rank, score = int(parts[3]), float(parts[4])
            except ValueError:
                raise InputError(
                    f"{path}:{number}", f"rank {parts[3]!r} or score {parts[4]!r} is not a number"
                ) from None
            if (qid, did) in seen:
                raise InputError(f"{path}:{number}", f"did {did} appears twice in the ranking of {qid}")
            seen.add((qid, did))
            ranked.setdefault(qid, []).append((rank, did, score))
    return {qid: [(did, score) for _, did, score in sorted(items)] for qid, items in ranked.items()}


@dataclass
class RowScore:
    """One row's recalls per pool setting, and each judged query's hit at the row's headline k (for
    confidence intervals)."""

    row: Row
    local: dict[str, float] = field(default_factory=dict)
    global_: dict[str, float] = field(default_factory=dict)
    hits: dict[str, list[int]] = field(default_factory=dict)


@dataclass
class Scores:
    rows: list[RowScore]
    warnings: list[str]

    def headline(self, setting: PoolSetting) -> list[float | None]:
        key = "local" if setting == "local" else "global_"
        return [getattr(s, key).get(f"recall@{s.row.k}") for s in self.rows]

    def average(self, setting: PoolSetting) -> float | None:
        values = [v for v in self.headline(setting) if v is not None]
        return round(sum(values) / len(values), 2) if values else None

    def interval(self, setting: PoolSetting, rows: Sequence[RowScore] | None = None) -> list[float] | None:
        """The bootstrap 95% interval (over queries, within rows) of the average of `rows` (all by
        default) for `setting`; None where no hits were kept."""
        groups = [s.hits[setting] for s in (self.rows if rows is None else rows) if s.hits.get(setting)]
        return list(bootstrap_interval(groups)) if groups else None

    def to_json(self) -> dict:
        return {
            "rows": [
                {
                    "dataset": s.row.dataset,
                    "task_id": s.row.task_id,
                    "metric": f"Recall@{s.row.k}",
                    "local": s.local.get(f"recall@{s.row.k}"),
                    "global": s.global_.get(f"recall@{s.row.k}"),
                    "local_all": s.local,
                    "global_all": s.global_,
                    "interval": {setting: self.interval(setting, [s]) for setting in ("local", "global")},
                    "queries": len(next(iter(s.hits.values()), [])),
                    # Per judged query (qrels order), 1 when it hit at the headline k: for paired
                    # comparisons of two runs on the same queries (benchmarks/ablations.py).
                    "hits": {setting: s.hits.get(setting) for setting in ("local", "global")},
                }
                for s in self.rows
            ],
            "average": {"local": self.average("local"), "global": self.average("global")},
            # Bootstrap 95% intervals over queries (resampled within each row), seed 0.
            "interval": {"local": self.interval("local"), "global": self.interval("global")},
            "warnings": self.warnings,
        }


def score_runs(
    root: str | Path,
    runs_dir: str | Path,
    split: str = "test",
    rows: Iterable[Row] | None = None,
    settings: Sequence[PoolSetting] = ("local", "global"),
) -> Scores:
    """Score the run files in `runs_dir` against the qrels in the M-BEIR `root`.

    A judged query absent from a run counts as a miss and is reported; run queries without qrels are
    ignored and reported; a row whose run file is missing is an error.
    """
    mbeir = MBeir(root)
    runs_dir = Path(runs_dir)
    chosen = list(rows) if rows is not None else present_rows(mbeir, split)
    warnings: list[str] = []
    scored = []
    for row in chosen:
        qrels, _ = read_qrels(mbeir.qrels_file(row, split))  # type: ignore[arg-type]
        pool_file = mbeir.local_pool_file(row, split)  # type: ignore[arg-type]
        if "local" in settings and pool_file.is_file():
            pool = {c.did for c in mbeir.pool(row, split)}  # type: ignore[arg-type]
            absent = sorted({d for dids in qrels.values() for d in dids} - pool)
            if absent:
                # Expected for OVEN/InfoSeek sibling-prefix positives; anything else is a data problem.
                warnings.append(
                    f"{row.name}: {len(absent)} qrels dids are not in the local pool (e.g. {absent[0]})"
                )
        result = RowScore(row)
        for setting in settings:
            run = read_run(runs_dir / run_file_name(row, setting, split))
            unknown = sorted(set(run) - set(qrels))
            if unknown:
                warnings.append(
                    f"{row.name} {setting}: {len(unknown)} run queries have no qrels and were "
                    f"ignored (e.g. {unknown[0]})"
                )
            missing = sorted(set(qrels) - set(run))
            if missing:
                warnings.append(
                    f"{row.name} {setting}: {len(missing)} judged queries are absent from the run "
                    f"and count as misses (e.g. {missing[0]})"
                )
            complete = {qid: run.get(qid, []) for qid in qrels}
            values = {f"recall@{k}": round(100 * recall_at_k(complete, qrels, k), 2) for k in RECALL_KS}
            result.hits[setting] = hits_at_k(complete, qrels, row.k)
            if setting == "local":
                result.local = values
            else:
                result.global_ = values
        scored.append(result)
    for warning in warnings:
        logger.warning(warning)
    return Scores(scored, warnings)


def present_rows(mbeir: MBeir, split: str) -> list[Row]:
    """Rows with a query file and qrels for `split`, in the papers' order."""
    return [
        r
        for r in ROWS
        if mbeir.query_file(r, split).is_file()  # type: ignore[arg-type]
        and mbeir.qrels_file(r, split).is_file()
    ]  # type: ignore[arg-type]


def _blank_if_none(value: float | None) -> float | str:
    """A TSV cell: the value as the row cells write it (0.0 included), blank only when it is missing."""
    return "" if value is None else value


def write_results(scores: Scores, out_dir: str | Path, split: str) -> Path:
    """`mbeir_results.tsv` in UniIR's columns and `results.json`, values in percent."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    with atomic_write(out_dir / "mbeir_results.tsv") as handle:
        writer = csv.writer(handle, delimiter="\t", lineterminator="\n")
        writer.writerow(
            ["TaskID", "Task", "Dataset", "Split", "Metric", "CandPool", "Value", "UnionPool", "UnionValue"]
        )
        for s in scores.rows:
            task = f"{s.row.query_modality.value} -> {s.row.candidate_modality.value}"
            metric = f"Recall@{s.row.k}"
            writer.writerow(
                [
                    s.row.task_id,
                    task,
                    s.row.dataset,
                    split,
                    metric,
                    s.row.name,
                    s.local.get(f"recall@{s.row.k}", ""),
                    "union",
                    s.global_.get(f"recall@{s.row.k}", ""),
                ]
            )
        writer.writerow(
            [
                "",
                "average",
                "",
                split,
                "",
                "",
                _blank_if_none(scores.average("local")),
                "",
                _blank_if_none(scores.average("global")),
            ]
        )
    write_json(out_dir / "results.json", scores.to_json())
    return out_dir / "results.json"


def _with_interval(value: float | None, interval: Sequence[float] | None, bold: bool = False) -> str:
    if value is None:
        return "-"
    text = f"**{value:.2f}**" if bold else f"{value:.2f}"
    return text + (f" [{interval[0]:.1f}, {interval[1]:.1f}]" if interval else "")


def render_table(scores: Scores) -> str:
    """A markdown table of the rows and the averages, each with its bootstrap 95% interval."""
    lines = ["| row | metric | queries | local [95% CI] | global [95% CI] |", "|---|---|---|---|---|"]
    for s in scores.rows:
        cells = [
            _with_interval(getattr(s, key).get(f"recall@{s.row.k}"), scores.interval(setting, [s]))  # type: ignore[arg-type]
            for key, setting in (("local", "local"), ("global_", "global"))
        ]
        count = len(next(iter(s.hits.values()), []))
        lines.append(f"| {s.row.name} | R@{s.row.k} | {count} | {cells[0]} | {cells[1]} |")
    averages = [_with_interval(scores.average(t), scores.interval(t), bold=True) for t in ("local", "global")]  # type: ignore[arg-type]
    lines.append(f"| **average** | | | {averages[0]} | {averages[1]} |")
    return "\n".join(lines)


def _encode(
    embedder: object, items: Sequence[Any], path: Path, role: str, progress: bool, cache_dir: Path | None
) -> np.ndarray:

    return np.load(encode_corpus(embedder, items, path, role, cache_dir=cache_dir, progress=progress))  # type: ignore[arg-type]


def evaluate_mbeir(
    embedder: object,
    root: str | Path,
    out_dir: str | Path,
    split: str = "test",
    settings: Sequence[PoolSetting] = ("local", "global"),
    tasks: Sequence[str] | None = None,
    factory: str = "Flat",
    progress: bool = True,
    cache_dir: str | Path | None = None,
    instruction_choice: str = "hash",
) -> Scores:
    """Embed every row's queries once and its local pool, search local pools and the global pool
    (the union pool file when present, else the concatenation of the local pools), write run files
    to `out_dir/runs`, score them, and write the results files.

    Args:
        embedder: an `Embedder`.
        root: the M-BEIR folder.
        out_dir: where runs/, mbeir_results.tsv and results.json go.
        split: `test` or `val`.
        settings: pool settings to run.
        tasks: row names (e.g. `mscoco_task0`) to keep; all present rows by default.
        factory: FAISS factory string for the indexes (exact inner product by default).
        instruction_choice: `hash` or `first` (data/mbeir.py `Instructions`).
        cache_dir: a content-addressed embedding cache shared with other evaluations (e.g. the same
            model on test and val, or with and without re-ranking).
    """
    mbeir = MBeir(root, instruction_choice)  # type: ignore[arg-type]
    rows = present_rows(mbeir, split)
    if tasks:
        unknown = sorted(set(tasks) - {r.name for r in ROWS})
        if unknown:
            raise InputError(None, f"unknown task row(s) {unknown}; rows are named like mscoco_task0")
        rows = [r for r in rows if r.name in set(tasks)]
    if not rows:
        raise InputError(root, f"no M-BEIR rows with {split} queries and qrels")
    runs_dir = Path(out_dir) / "runs"
    runs_dir.mkdir(parents=True, exist_ok=True)
    # Embeddings go through resumable, content-addressed shards: a killed evaluation picks up where it
    # stopped, and a rerun with the same embedder re-encodes nothing.
    embeddings = Path(out_dir) / "embeddings"
    cache = Path(cache_dir) if cache_dir is not None else None
    # Every rank takes part in the encoding (each its share of the shards); rank 0 alone searches and
    # writes the run files and results, and every rank returns the scores.
    candidates: dict[str, np.ndarray] = {}
    queries: dict[str, tuple[list[str], np.ndarray]] = {}
    local_ids: dict[str, list[str]] = {}
    for row in rows:
        row_queries = mbeir.queries(row, split)  # type: ignore[arg-type]
        logger.info("%s: %d queries", row.name, len(row_queries))
        vectors = _encode(
            embedder, row_queries, embeddings / f"{row.name}_{split}_queries.npy", "query", progress, cache
        )
        queries[row.name] = ([q.qid for q in row_queries], vectors)
        local = mbeir.pool(row, split)  # type: ignore[arg-type]
        local_ids[row.name] = [c.did for c in local]
        pool = [c for c in local if c.did not in candidates]
        if pool:
            pool_vectors = _encode(
                embedder, pool, embeddings / f"{row.name}_{split}_pool.npy", "candidate", progress, cache
            )
            candidates.update(zip((c.did for c in pool), pool_vectors, strict=True))
    global_ids: list[str] = []
    if "global" in settings:
        global_file = mbeir.global_pool_file(split)  # type: ignore[arg-type]
        if global_file.is_file():
            union = mbeir.global_pool(split)  # type: ignore[arg-type]
            extra = [c for c in union if c.did not in candidates]
            if extra:
                logger.info("embedding %d global-pool candidates not in any local pool", len(extra))
                vectors = _encode(
                    embedder, extra, embeddings / f"global_{split}_extra.npy", "candidate", progress, cache
                )
                candidates.update(zip((c.did for c in extra), vectors, strict=True))
            global_ids = [c.did for c in union]
        else:
            logger.info("%s absent: the global pool is the concatenation of the local pools", global_file)
            global_ids = list(candidates)
    return run_on_main(
        _search_and_score,
        root,
        Path(out_dir),
        split,
        rows,
        settings,
        factory,
        embedder_record(embedder),
        queries,
        candidates,
        local_ids,
        global_ids,
    )


def _search_and_score(
    root: str | Path,
    out_dir: Path,
    split: str,
    rows: Sequence[Row],
    settings: Sequence[PoolSetting],
    factory: str,
    fingerprint: dict,
    queries: dict[str, tuple[list[str], np.ndarray]],
    candidates: dict[str, np.ndarray],
    local_ids: dict[str, list[str]],
    global_ids: list[str],
) -> Scores:
    """Search each row's local pool and the global pool, write the run files, score and write results."""
    runs_dir = out_dir / "runs"
    run_id = f"umarvel-{str(fingerprint['weights'])[:12]}"

    def index_of(ids: list[str]) -> Index:
        index = Index(next(iter(candidates.values())).shape[0], factory, fingerprint)
        index.add(np.stack([candidates[d] for d in ids]), ids)
        return index

    def write(row: Row, setting: str, index: Index) -> None:
        qids, vectors = queries[row.name]
        result = index.search(vectors, SEARCH_K)
        write_run(runs_dir / run_file_name(row, setting, split), row, qids, result.ids, result.scores, run_id)

    if "local" in settings:
        for row in rows:
            write(row, "local", index_of(local_ids[row.name]))
    if "global" in settings:
        union = index_of(global_ids)
        for row in rows:
            write(row, "global", union)
    scores = score_runs(root, runs_dir, split, rows, settings)
    write_results(scores, out_dir, split)
    (out_dir / "results.md").write_text(render_table(scores) + "\n")
    return scores


def _row_key(row: dict[str, Any]) -> str:
    """A `results.json` row's name, as `Row.name` writes it (`mscoco_task0`)."""
    return f"{row['dataset']}_task{row['task_id']}"


def row_hits(result: dict[str, Any]) -> dict[str, dict[str, list[int] | None]]:
    """Per row (`mscoco_task0`) and pool setting, each judged query's hit at the headline k, from a
    loaded `results.json`."""
    return {_row_key(r): r.get("hits", {}) for r in result["rows"]}


def paired_difference(
    a: dict[str, Any], b: dict[str, Any], setting: PoolSetting | tuple[PoolSetting, ...]
) -> dict[str, Any] | None:
    """Run A minus run B (two loaded `results.json` on the same queries) in points of average headline
    recall, with a bootstrap 95% interval that resamples queries within rows, the same queries on both
    sides (the pairing removes what the queries share). Only rows both runs scored count; None when
    there is none. With several settings, every (row, setting) is one group of the average (`rows`
    then names them `row setting`): the mean of the settings' averages where they share their rows."""
    settings = (setting,) if isinstance(setting, str) else setting
    first, second = row_hits(a), row_hits(b)
    groups, per_row = [], {}
    for (row, hits), pool in itertools.product(first.items(), settings):
        mine, theirs = hits.get(pool), second.get(row, {}).get(pool)
        if not mine or not theirs:
            continue
        if len(mine) != len(theirs):
            raise ValueError(f"{row}: the two runs judged different queries ({len(mine)} vs {len(theirs)})")
        difference = np.asarray(mine, dtype=float) - np.asarray(theirs, dtype=float)
        groups.append(difference)
        per_row[row if len(settings) == 1 else f"{row} {pool}"] = round(100 * float(difference.mean()), 2)
    if not groups:
        return None
    average = round(100 * float(np.mean([g.mean() for g in groups])), 2)
    return {"difference": average, "interval": list(bootstrap_interval(groups)), "rows": per_row}


def compare_results(runs: Sequence[tuple[str, Path]]) -> tuple[str, dict[str, Any]]:
    """A markdown table of several `results.json` side by side (one column pair per run: local and
    global headline recall per row, then the averages) and the same data as a dict."""
    import json

    loaded = {name: json.loads((Path(folder) / "results.json").read_text()) for name, folder in runs}
    rows: list[tuple[str, str]] = []
    for result in loaded.values():
        for row in result["rows"]:
            key = (_row_key(row), row["metric"].replace("Recall", "R"))
            if key not in rows:
                rows.append(key)
    header = "| row | metric | " + " | ".join(f"{n} local | {n} global" for n, _ in runs) + " |"
    lines = [header, "|" + "---|" * (2 + 2 * len(runs))]
    table: dict[str, Any] = {"rows": {}, "average": {}, "interval": {}}
    for name, metric in rows:
        cells = []
        for run, _ in runs:
            found = next((r for r in loaded[run]["rows"] if _row_key(r) == name), None)
            values = (found or {}).get("local"), (found or {}).get("global")
            table["rows"].setdefault(name, {})[run] = values
            cells.extend("-" if v is None else f"{v:.2f}" for v in values)
        lines.append(f"| {name} | {metric} | " + " | ".join(cells) + " |")
    averages = []
    for run, _ in runs:
        average, interval = loaded[run]["average"], loaded[run].get("interval", {})
        table["average"][run], table["interval"][run] = average, interval
        for setting in ("local", "global"):
            averages.append(_with_interval(average.get(setting), interval.get(setting), bold=True))
    lines.append("| **average** | | " + " | ".join(averages) + " |")
    # Each run against the one before it, paired over the same queries (a stage against its input).
    names = [name for name, _ in runs]
    table["versus_previous"] = {
        name: {s: paired_difference(loaded[name], loaded[before], s) for s in ("local", "global")}
        for before, name in itertools.pairwise(names)
    }
    return "\n".join(lines), table


def plot_comparison(table: dict[str, Any], path: Path) -> Path | None:
    """Local and global averages per run as a grouped bar chart (skipped without matplotlib)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    runs = list(table["average"])
    local = [table["average"][r].get("local") or 0 for r in runs]
    global_ = [table["average"][r].get("global") or 0 for r in runs]
    positions = np.arange(len(runs))
    figure, axis = plt.subplots(figsize=(max(5, 1.3 * len(runs)), 3.6))
    bars = ((-0.2, "local", local, "local pools"), (0.2, "global", global_, "global pool"))
    for offset, setting, values, label in bars:
        intervals = [table.get("interval", {}).get(r, {}).get(setting) for r in runs]
        # Bootstrap 95% intervals as error bars (none for a run without that pool, drawn at 0).
        errors = np.array(
            [[v - i[0], i[1] - v] if i else [0, 0] for v, i in zip(values, intervals, strict=True)]
        ).T
        axis.bar(positions + offset, values, 0.4, yerr=errors, capsize=3, label=label)
    axis.set_xticks(positions, runs, rotation=20, ha="right")
    axis.set(ylabel="average headline recall (%)", title="M-BEIR-format benchmark by stage")
    axis.legend()
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)
    return path


def render_stage_rows(table: dict[str, Any]) -> str:
    """The `compare_results` data with one line per run (stage): each row's local / global headline
    recall, then the averages; narrower than the side-by-side table when there are many runs."""
    rows = list(table["rows"])
    header = (
        "| stage | "
        + " | ".join(f"{r} (local / global)" for r in rows)
        + " | average local [95% CI] | average global [95% CI] | local vs previous stage [95% CI] |"
    )
    lines = [header, "|" + "---|" * (4 + len(rows))]
    for run, average in table["average"].items():
        cells = []
        for row in rows:
            local, global_ = table["rows"][row].get(run, (None, None))
            cells.append(" / ".join("-" if v is None else f"{v:.1f}" for v in (local, global_)))
        interval = table.get("interval", {}).get(run, {})
        values = [_with_interval(average.get(s), interval.get(s), bold=True) for s in ("local", "global")]
        step = (table.get("versus_previous", {}).get(run) or {}).get("local")
        values.append(_signed(step))
        lines.append(f"| {run} | " + " | ".join(cells) + " | " + " | ".join(values) + " |")
    return "\n".join(lines)


def _signed(step: dict[str, Any] | None) -> str:
    """A paired difference as `+3.20 [+0.5, +6.0]`, starred when its interval excludes 0."""
    if step is None:
        return "-"
    low, high = step["interval"]
    star = " *" if low > 0 or high < 0 else ""
    return f"{step['difference']:+.2f} [{low:+.1f}, {high:+.1f}]{star}"
