"""Warm-up training data of the progressive transition: NLI triples, image-caption pairs, BEIR text sets."""

from __future__ import annotations

import csv
from dataclasses import dataclass
from pathlib import Path

from umarvel.data.io import InputError, read_jsonl
from umarvel.data.records import Candidate, Query, TrainGroup


def _require(row: dict, fields: tuple[str, ...], where: str) -> None:
    missing = [f for f in fields if f not in row]
    if missing:
        raise InputError(where, f"missing column(s) {missing}")


def _text(value: str | None, field: str, where: str) -> str:
    if value is None or not value.strip():
        raise InputError(where, f"empty {field}")
    return value.strip()


def read_nli_triples(path: str | Path, with_hard_negatives: bool = True) -> list[TrainGroup]:
    """SimCSE NLI csv (`sent0`, `sent1`, optional `hard_neg`) -> text-to-text training groups."""
    path = Path(path)
    if not path.is_file():
        raise InputError(path, "file not found")
    groups = []
    with path.open(encoding="utf-8", newline="") as handle:
        reader = csv.DictReader(handle)
        for number, row in enumerate(reader, start=2):
            where = f"{path}:{number}"
            _require(row, ("sent0", "sent1"), where)
            negatives: tuple[Candidate, ...] = ()
            if with_hard_negatives and row.get("hard_neg"):
                negatives = (Candidate(did=f"nli:{number}:neg", text=row["hard_neg"].strip(), source=where),)
            groups.append(
                TrainGroup(
                    query=Query(qid=f"nli:{number}", text=_text(row["sent0"], "sent0", where), source=where),
                    positive=Candidate(
                        did=f"nli:{number}:pos", text=_text(row["sent1"], "sent1", where), source=where
                    ),
                    negatives=negatives,
                )
            )
    return groups


def read_image_captions(path: str | Path, image_root: str | Path | None = None) -> list[TrainGroup]:
    """Image-caption pairs -> caption-to-image training groups.

    Accepts a csv with columns `image,caption` (Flickr8k / COCO style) or a jsonl with fields `image`
    and `caption`. Image paths are relative to `image_root` (default: the file's folder / "images").
    """
    path = Path(path)
    root = Path(image_root) if image_root is not None else path.parent / "images"
    rows: list[tuple[str, dict]] = []
    if path.suffix == ".jsonl":
        rows = [(f"{path}:{n}", r) for n, r in read_jsonl(path)]
    else:
        if not path.is_file():
            raise InputError(path, "file not found")
        with path.open(encoding="utf-8", newline="") as handle:
            rows = [(f"{path}:{n}", r) for n, r in enumerate(csv.DictReader(handle), start=2)]
    groups = []
    for index, (where, row) in enumerate(rows):
        _require(row, ("image", "caption"), where)
        image = _text(row["image"], "image", where)
        groups.append(
            TrainGroup(
                query=Query(
                    qid=f"caption:{index}", text=_text(row["caption"], "caption", where), source=where
                ),
                positive=Candidate(did=f"image:{image}", image=root / image, source=where),
            )
        )
    return groups


@dataclass(frozen=True)
class BeirSet:
    """A BEIR text retrieval set: queries, corpus and qrels (qid -> {did: relevance})."""

    queries: list[Query]
    corpus: list[Candidate]
    qrels: dict[str, dict[str, int]]


def read_beir(folder: str | Path, split: str = "test") -> BeirSet:
    """Read a BEIR folder: `corpus.jsonl`, `queries.jsonl` or `queries_<split>.jsonl`, `qrels/<split>.tsv`.

    Corpus texts are "title. text", as BEIR evaluations usually join them. Only queries with qrels in
    the split are returned.
    """
    folder = Path(folder)
    qrels_path = folder / "qrels" / f"{split}.tsv"
    if not qrels_path.is_file():
        raise InputError(qrels_path, "qrels file not found")
    qrels: dict[str, dict[str, int]] = {}
    with qrels_path.open(encoding="utf-8") as handle:
        for number, line in enumerate(handle, start=1):
            parts = line.rstrip("\n").split("\t")
            if number == 1 and not parts[-1].lstrip("-").isdigit():
                continue  # header
            if len(parts) != 3 or not parts[2].lstrip("-").isdigit():
                raise InputError(f"{qrels_path}:{number}", "expected 'query-id<TAB>corpus-id<TAB>score'")
            qrels.setdefault(parts[0], {})[parts[1]] = int(parts[2])
    queries_path = folder / f"queries_{split}.jsonl"
    if not queries_path.is_file():
        queries_path = folder / "queries.jsonl"
    queries = []
    for number, record in read_jsonl(queries_path):
        where = f"{queries_path}:{number}"
        qid = str(record.get("_id", ""))
        if qid in qrels:
            queries.append(Query(qid=qid, text=_text(record.get("text"), "text", where), source=where))
    corpus = []
    corpus_path = folder / "corpus.jsonl"
    for number, record in read_jsonl(corpus_path):
        where = f"{corpus_path}:{number}"
        if "_id" not in record:
            raise InputError(where, "missing field '_id'")
        title, body = (record.get("title") or "").strip(), (record.get("text") or "").strip()
        text = f"{title}. {body}" if title and body else (title or body)
        corpus.append(Candidate(did=str(record["_id"]), text=_text(text, "title/text", where), source=where))
    return BeirSet(queries=queries, corpus=corpus, qrels=qrels)


def read_sick_entailment(path: str | Path) -> list[TrainGroup]:
    """SICK (`pair_ID, sentence_A, sentence_B, relatedness_score, entailment_judgment`): the ENTAILMENT
    pairs as text-to-text training groups."""
    path = Path(path)
    if not path.is_file():
        raise InputError(path, "file not found")
    groups = []
    with path.open(encoding="utf-8", newline="") as handle:
        for number, row in enumerate(csv.DictReader(handle, delimiter="\t"), start=2):
            where = f"{path}:{number}"
            _require(row, ("pair_ID", "sentence_A", "sentence_B", "entailment_judgment"), where)
            if row["entailment_judgment"] != "ENTAILMENT":
                continue
            groups.append(
                TrainGroup(
                    query=Query(
                        qid=f"sick:{row['pair_ID']}",
                        text=_text(row["sentence_A"], "sentence_A", where),
                        source=where,
                    ),
                    positive=Candidate(
                        did=f"sick:{row['pair_ID']}:b",
                        text=_text(row["sentence_B"], "sentence_B", where),
                        source=where,
                    ),
                )
            )
    return groups


def read_stsb(path: str | Path) -> list[tuple[str, str, float, str]]:
    """STS Benchmark tsv (genre, file, year, id, score, s1, s2[, sources]): (s1, s2, score, "file:line")."""
    path = Path(path)
    if not path.is_file():
        raise InputError(path, "file not found")
    rows = []
    with path.open(encoding="utf-8") as handle:
        for number, line in enumerate(handle, start=1):
            cells = line.rstrip("\n").split("\t")
            where = f"{path}:{number}"
            if len(cells) < 7:
                raise InputError(where, f"expected at least 7 tab-separated columns, got {len(cells)}")
            try:
                score = float(cells[4])
            except ValueError:
                raise InputError(where, f"score {cells[4]!r} is not a number") from None
            rows.append((_text(cells[5], "s1", where), _text(cells[6], "s2", where), score, where))
    return rows


def read_stsb_pairs(path: str | Path, min_score: float = 4.0) -> list[TrainGroup]:
    """STS Benchmark pairs scored >= min_score, as (s1 -> s2) training groups."""
    path = Path(path)
    groups = []
    for first, second, score, where in read_stsb(path):
        if score >= min_score:
            number = where.rsplit(":", 1)[1]
            groups.append(
                TrainGroup(
                    query=Query(qid=f"stsb:{path.stem}:{number}", text=first, source=where),
                    positive=Candidate(did=f"stsb:{path.stem}:{number}:b", text=second, source=where),
                )
            )
    return groups
