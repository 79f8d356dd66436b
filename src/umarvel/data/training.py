"""Training rows from every source kind, and the dataset that samples a positive per (seed, epoch, row).

A row holds a query and all its positives (and optional hard negatives); each epoch, `TrainingSet`
picks one positive per row, seeded by (seed, epoch, row), so a resumed run sees the same data.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from torch.utils.data import Dataset

from umarvel.config.schema import DataSource, EmbedderConfig
from umarvel.data.collator import EncodeItem
from umarvel.data.inputs import MediaSettings, to_item
from umarvel.data.io import InputError, read_jsonl
from umarvel.data.mbeir import Instructions, read_pool, read_queries
from umarvel.data.pairs import (
    read_beir,
    read_image_captions,
    read_nli_triples,
    read_sick_entailment,
    read_stsb_pairs,
)
from umarvel.data.records import Candidate, Query, TrainGroup
from umarvel.data.sampling import held_split, pick_negatives, pick_positive, row_rng, stable_hash, stable_id

logger = logging.getLogger(__name__)

# Stage B: a query whose mined negatives were all filtered out gets FALLBACK_NEGATIVES random pool
# candidates instead, drawn (positives removed) from FALLBACK_SAMPLE pool candidates sampled by the
# run seed and the qid, as the official code does, rather than being dropped from the stage.
FALLBACK_SAMPLE = 64
FALLBACK_NEGATIVES = 8

# Video frame sampling when the caller gives none: the `EmbedderConfig` defaults (mbeir-protocol.md 3).
VIDEO_FRAMES: int = EmbedderConfig.video_frames
VIDEO_FPS: float = EmbedderConfig.video_fps
VIDEO_MAX_FRAMES: int = EmbedderConfig.video_max_frames


@dataclass(frozen=True)
class TrainRow:
    """A query with every acceptable positive and its hard negatives (ranked, best first)."""

    query: Query
    positives: tuple[Candidate, ...]
    negatives: tuple[Candidate, ...] = ()
    shortlist: tuple[Candidate, ...] = ()  # stage C: the candidates the teacher scored
    teacher: tuple[float, ...] = ()  # stage C: their fused teacher scores


def _from_groups(groups: Sequence[TrainGroup]) -> list[TrainRow]:
    return [TrainRow(g.query, (g.positive,), g.negatives) for g in groups]


def _image_name(candidate: Candidate) -> str:
    return Path(str(candidate.image)).name


def load_rows(source: DataSource, seed: int = 0) -> list[TrainRow]:
    """Rows of one source (see `DataSource` for the kinds).

    seed: the run's seed; it fixes the random pool negatives of a stage-B query left without mined ones
        (0, the default, keeps the draws of runs made before the seed was passed).
    """
    path = Path(source.path)
    if source.kind == "nli_csv":
        rows = _from_groups(read_nli_triples(path))
    elif source.kind == "sick":
        rows = _from_groups(read_sick_entailment(path))
    elif source.kind == "stsb":
        rows = _from_groups(read_stsb_pairs(path))
    elif source.kind == "beir":
        beir = read_beir(path, source.split)
        corpus = {c.did: c for c in beir.corpus}
        rows = []
        for query in beir.queries:
            positives = tuple(
                corpus[d] for d, score in beir.qrels[query.qid].items() if score > 0 and d in corpus
            )
            if positives:
                rows.append(TrainRow(query, positives))
    elif source.kind == "image_captions":
        groups = read_image_captions(path, source.image_root)
        if source.split != "all":
            groups = [g for g in groups if held_split(_image_name(g.positive)) == source.split]
        rows = _from_groups(groups)
    elif source.kind == "mbeir":
        rows = _mbeir_rows(path, source, seed)
    else:  # pragma: no cover - the schema's Literal rules this out
        raise ValueError(f"unknown source kind {source.kind!r}")
    if source.max_rows:
        rows = rows[: source.max_rows]
    if not rows:
        raise InputError(path, f"no training rows for split {source.split!r}")
    logger.info("%s %s: %d rows", source.kind, path, len(rows))
    return rows


def _mbeir_rows(root: Path, source: DataSource, seed: int = 0) -> list[TrainRow]:
    instructions = Instructions.from_tsv(
        root / "instructions" / "query_instructions.tsv", source.instruction_choice
    )
    queries = read_queries(root / source.queries, instructions, image_root=root)
    pool = {c.did: c for c in read_pool(root / source.pool, image_root=root)}
    if source.teacher:
        return _teacher_rows(Path(source.teacher), queries, pool)
    mined = _mined_negatives(Path(source.negatives), queries) if source.negatives else None
    dids, filled = list(pool), 0
    rows = []
    for number, query in enumerate(queries):
        positives = tuple(pool[d] for d in query.positives if d in pool)
        if not positives:
            raise InputError(
                query.source, f"none of the positives of {query.qid} is in the pool {source.pool}"
            )
        listed = mined[number] if mined is not None else list(query.negatives)
        negatives = tuple(pool[d] for d in listed if d in pool)
        if mined is not None and not negatives:
            # Every shortlisted candidate was filtered out: fall back to seeded random pool candidates
            # (see FALLBACK_SAMPLE) rather than dropping the query from stage B.
            rng = row_rng(seed, 0, stable_hash(query.qid))
            drawn = rng.sample(dids, min(len(dids), FALLBACK_SAMPLE))
            others = [d for d in drawn if d not in query.positives]
            negatives = tuple(pool[d] for d in others[:FALLBACK_NEGATIVES])
            filled += 1
        rows.append(TrainRow(query, positives, negatives))
    if filled:
        logger.warning(
            "%d of %d queries had no mined negative left and got random pool candidates", filled, len(rows)
        )
    return rows


def _teacher_rows(path: Path, queries: Sequence[Query], pool: dict[str, Candidate]) -> list[TrainRow]:
    """One row per line of a `teacher.jsonl` (umarvel score): the query, its positives, and the scored
    shortlist with its fused teacher scores."""
    by_qid = {}
    for query in queries:
        by_qid.setdefault(query.qid, query)
    rows = []
    for number, record in read_jsonl(path):
        where = f"{path}:{number}"
        query = by_qid.get(str(record.get("qid")))
        if query is None:
            raise InputError(where, f"qid {record.get('qid')!r} is not in the query file")
        candidates, scores = record.get("candidates", []), record.get("teacher", [])
        if not candidates or len(candidates) != len(scores):
            raise InputError(where, "needs equally long, non-empty 'candidates' and 'teacher' lists")
        missing = [d for d in candidates if d not in pool]
        if missing:
            raise InputError(where, f"candidate {missing[0]} is not in the pool")
        positives = tuple(pool[d] for d in query.positives if d in pool)
        rows.append(
            TrainRow(
                query,
                positives,
                shortlist=tuple(pool[d] for d in candidates),
                teacher=tuple(float(s) for s in scores),
            )
        )
    return rows


def _mined_negatives(path: Path, queries: Sequence[Query]) -> list[list[str]]:
    """Negatives per query from a `negatives.jsonl` aligned line by line with the query file."""
    lines = list(read_jsonl(path))
    if len(lines) != len(queries):
        raise InputError(
            path, f"{len(lines)} lines for {len(queries)} queries; it must align with the query file"
        )
    mined = []
    for (number, record), query in zip(lines, queries, strict=True):
        if record.get("qid") != query.qid:
            raise InputError(
                f"{path}:{number}", f"qid {record.get('qid')!r} where the query file has {query.qid!r}"
            )
        mined.append([str(d) for d in record.get("negatives", [])])
    return mined


# At most this many labelled positives per query are masked as in-batch false negatives (queries with
# class-level relevance can have hundreds; the first ones are enough to show the rule and bound memory).
MAX_RELEVANT = 64


class TrainingSet(Dataset):
    """Map-style dataset of training rows; item i is (query, one positive, k negatives) for the epoch.

    Args:
        rows: the training rows (any mix of sources).
        seed: the run's seed; with the epoch and row index it fixes every random choice.
        hard_negatives: k negatives per query, the top k of the row's ranked negatives.
        max_image_pixels: images are downscaled to this budget when loaded.
        distill_top: stage C: each item carries the row's first `distill_top` shortlist candidates and
            teacher scores (a shorter shortlist is padded and marked invalid); 0 for stages A and B.
        with_positive: stage C: also carry a positive (for the optional InfoNCE term).
        video_frames / video_fps / video_max_frames: how videos are sampled (the embedder's settings).
    """

    def __init__(
        self,
        rows: Sequence[TrainRow],
        seed: int,
        hard_negatives: int = 0,
        max_image_pixels: int = 300 * 28 * 28,
        distill_top: int = 0,
        with_positive: bool = True,
        video_frames: int = VIDEO_FRAMES,
        video_fps: float = VIDEO_FPS,
        video_max_frames: int = VIDEO_MAX_FRAMES,
    ) -> None:
        self.rows = list(rows)
        self.seed = seed
        self.hard_negatives = hard_negatives
        self.media = MediaSettings(max_image_pixels, video_frames, video_fps, video_max_frames)
        self.distill_top = distill_top
        self.with_positive = with_positive
        self.epoch = 0
        # Every item carries the ids of all of its row's labelled positives (padded to one width for the
        # whole set, so batches stack and gather across ranks), for in-batch false-negative masking.
        self.relevant_width = min(MAX_RELEVANT, max((len(r.positives) for r in self.rows), default=1))
        if distill_top:
            bare = [r.query.source for r in self.rows if not r.shortlist]
            if bare:
                raise InputError(bare[0], "row has no teacher shortlist (data source needs `teacher`)")
        if with_positive:
            lonely = [r.query.source for r in self.rows if not r.positives]
            if lonely:
                raise InputError(lonely[0], "row has no positive in the pool")
        if hard_negatives:
            short = [r.query.source for r in self.rows if not r.negatives]
            if short:
                raise InputError(short[0], f"row has no hard negatives but hard_negatives={hard_negatives}")

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.rows)

    def _encode(self, record: Query | Candidate) -> EncodeItem:
        return to_item(record, self.media)

    def __getitem__(self, index: int) -> dict[str, Any]:
        row = self.rows[index]
        negatives = pick_negatives(row.negatives, self.hard_negatives, self.seed, self.epoch, index)
        item: dict[str, Any] = {
            "query": self._encode(row.query),
            "positive": None,
            "negatives": [self._encode(n) for n in negatives],
            "negative_ids": [stable_id(n.did) for n in negatives],
        }
        if self.with_positive:
            positive = pick_positive(row.positives, self.seed, self.epoch, index)
            item["positive"] = self._encode(positive)
            item["positive_id"] = stable_id(positive.did)
            relevant = [stable_id(c.did) for c in row.positives[: self.relevant_width]]
            item["relevant_ids"] = relevant + [item["positive_id"]] * (self.relevant_width - len(relevant))
        if self.distill_top:
            kept = list(range(min(self.distill_top, len(row.shortlist))))
            padded = kept + [kept[-1]] * (self.distill_top - len(kept))
            item["shortlist"] = [self._encode(row.shortlist[i]) for i in padded]
            item["shortlist_ids"] = [stable_id(row.shortlist[i].did) for i in padded]
            item["teacher"] = [row.teacher[i] for i in padded]
            item["shortlist_valid"] = [n < len(kept) for n in range(self.distill_top)]
        return item
