"""M-BEIR reader: query files, local and global pools, qrels, instructions (mbeir-protocol.md section 1).

Instruction choice is deterministic per qid (a stable hash, or always prompt_1), never `random.choice`.
"""

from __future__ import annotations

import csv
import hashlib
import json
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from umarvel.data.io import InputError, atomic_write, read_jsonl
from umarvel.data.records import Candidate, Modality, Query, check_text

DATASETS = (
    "visualnews",
    "fashion200k",
    "webqa",
    "edis",
    "nights",
    "oven",
    "infoseek",
    "fashioniq",
    "cirr",
    "mscoco",
)
DATASET_IDS = {name: i for i, name in enumerate(DATASETS)}
# task id -> (query modality, candidate modality); task 5 is reserved and unused.
TASKS: dict[int, tuple[Modality, Modality]] = {
    0: (Modality.TEXT, Modality.IMAGE),
    1: (Modality.TEXT, Modality.TEXT),
    2: (Modality.TEXT, Modality.IMAGE_TEXT),
    3: (Modality.IMAGE, Modality.TEXT),
    4: (Modality.IMAGE, Modality.IMAGE),
    5: (Modality.IMAGE, Modality.IMAGE_TEXT),
    6: (Modality.IMAGE_TEXT, Modality.TEXT),
    7: (Modality.IMAGE_TEXT, Modality.IMAGE),
    8: (Modality.IMAGE_TEXT, Modality.IMAGE_TEXT),
}
# OVEN and InfoSeek share one Wikipedia corpus: a query's positives may carry the sibling's prefix.
SIBLING_DATASETS = {
    DATASET_IDS["oven"]: DATASET_IDS["infoseek"],
    DATASET_IDS["infoseek"]: DATASET_IDS["oven"],
}


@dataclass(frozen=True)
class Row:
    """One of the 16 dataset-task rows of the M-BEIR table, with its headline recall cut-off."""

    dataset: str
    task_id: int
    k: int

    @property
    def name(self) -> str:
        return f"{self.dataset}_task{self.task_id}"

    @property
    def dataset_id(self) -> int:
        return DATASET_IDS[self.dataset]

    @property
    def query_modality(self) -> Modality:
        return TASKS[self.task_id][0]

    @property
    def candidate_modality(self) -> Modality:
        return TASKS[self.task_id][1]


# In the order of UniIR's table and the papers.
ROWS = (
    Row("visualnews", 0, 5),
    Row("mscoco", 0, 5),
    Row("fashion200k", 0, 10),
    Row("webqa", 1, 5),
    Row("edis", 2, 5),
    Row("webqa", 2, 5),
    Row("visualnews", 3, 5),
    Row("mscoco", 3, 5),
    Row("fashion200k", 3, 10),
    Row("nights", 4, 5),
    Row("oven", 6, 5),
    Row("infoseek", 6, 5),
    Row("fashioniq", 7, 10),
    Row("cirr", 7, 5),
    Row("oven", 8, 5),
    Row("infoseek", 8, 5),
)
Split = Literal["train", "val", "test"]


def dataset_id_of(identifier: str, where: str | None = None) -> int:
    """The dataset id in a qid/did prefix (`"9:12"` -> 9)."""
    prefix, sep, rest = identifier.partition(":")
    if not sep or not prefix.isdigit() or not rest:
        raise InputError(where, f"id {identifier!r} is not of the form '<dataset_id>:<n>'")
    return int(prefix)


class Instructions:
    """`query_instructions.tsv`: prompts per (dataset id, query modality, candidate modality)."""

    def __init__(
        self,
        prompts: Mapping[tuple[int, Modality, Modality], tuple[str, ...]],
        choice: Literal["hash", "first"] = "hash",
    ) -> None:
        self.prompts = dict(prompts)
        self.choice = choice

    @classmethod
    def from_tsv(cls, path: str | Path, choice: Literal["hash", "first"] = "hash") -> Instructions:
        path = Path(path)
        if not path.is_file():
            raise InputError(path, "instructions file not found")
        prompts: dict[tuple[int, Modality, Modality], tuple[str, ...]] = {}
        with path.open(encoding="utf-8", newline="") as handle:
            reader = csv.reader(handle, delimiter="\t")
            next(reader, None)  # header
            for number, cells in enumerate(reader, start=2):
                if not any(c.strip() for c in cells):
                    continue
                if len(cells) < 5:
                    raise InputError(
                        f"{path}:{number}", f"expected at least 5 tab-separated columns, got {len(cells)}"
                    )
                try:
                    key = (int(cells[3]), Modality.parse(cells[0]), Modality.parse(cells[1]))
                except ValueError as error:
                    raise InputError(f"{path}:{number}", str(error)) from None
                options = tuple(c.strip() for c in cells[4:] if c.strip())
                if not options:
                    raise InputError(f"{path}:{number}", "row has no instruction text")
                prompts[key] = options
        return cls(prompts, choice)

    def choose(
        self, qid: str, query_modality: Modality, candidate_modality: Modality, where: str | None = None
    ) -> str:
        """The instruction for `qid`: the same every run, on every worker."""
        key = (dataset_id_of(qid, where), query_modality, candidate_modality)
        if key not in self.prompts:
            raise InputError(where, f"no instruction for dataset {key[0]}, {key[1].value} -> {key[2].value}")
        options = self.prompts[key]
        if self.choice == "first":
            return options[0]
        digest = hashlib.sha256(qid.encode()).digest()
        return options[int.from_bytes(digest[:8], "big") % len(options)]


def _optional_text(record: dict, field: str, where: str) -> str | None:
    value = record.get(field)
    check_text(value, field, where)
    return value


def _id_list(record: dict, field: str, where: str) -> tuple[str, ...]:
    value = record.get(field) or []
    if not isinstance(value, list):
        raise InputError(where, f"{field} must be a list of dids")
    # The dataset card draws entries as {"did": ...}; the released files hold plain strings.
    return tuple(v["did"] if isinstance(v, dict) else str(v) for v in value)


def read_queries(
    path: str | Path, instructions: Instructions | None = None, image_root: str | Path | None = None
) -> list[Query]:
    """Queries of one M-BEIR query file; with `instructions`, each gets its deterministic instruction."""
    path = Path(path)
    root = Path(image_root) if image_root is not None else None
    queries = []
    for number, record in read_jsonl(path):
        where = f"{path}:{number}"
        for required in ("qid", "query_modality"):
            if required not in record:
                raise InputError(where, f"missing field {required!r}")
        qid = str(record["qid"])
        dataset_id_of(qid, where)
        modality = _parse_modality(record["query_modality"], where)
        text = _optional_text(record, "query_txt", where)
        image = _optional_text(record, "query_img_path", where)
        _check_modality(modality, text, image, where)
        positives = _id_list(record, "pos_cand_list", where)
        if not positives:
            raise InputError(where, f"query {qid} has no positive candidate")
        task_id = record.get("task_id")
        if task_id is not None and task_id not in TASKS:
            raise InputError(where, f"unknown task_id {task_id!r}")
        instruction = None
        if instructions is not None:
            if task_id is None:
                raise InputError(where, "task_id is needed to choose an instruction")
            instruction = instructions.choose(qid, modality, TASKS[task_id][1], where)
        queries.append(
            Query(
                qid=qid,
                text=text,
                image=_resolve(root, image),
                instruction=instruction,
                positives=positives,
                negatives=_id_list(record, "neg_cand_list", where),
                task_id=task_id,
                source=where,
            )
        )
    return queries


def read_pool(path: str | Path, image_root: str | Path | None = None) -> list[Candidate]:
    """Candidates of one pool file, in file order; duplicate dids are an error."""
    path = Path(path)
    root = Path(image_root) if image_root is not None else None
    seen: set[str] = set()
    pool = []
    for number, record in read_jsonl(path):
        where = f"{path}:{number}"
        if "did" not in record:
            raise InputError(where, "missing field 'did'")
        did = str(record["did"])
        dataset_id_of(did, where)
        if did in seen:
            raise InputError(where, f"duplicate did {did}")
        seen.add(did)
        text = _optional_text(record, "txt", where)
        image = _optional_text(record, "img_path", where)
        modality = _parse_modality(record.get("modality", ""), where)
        _check_modality(modality, text, image, where)
        pool.append(
            Candidate(
                did=did,
                text=text,
                image=_resolve(root, image),
                source=where,
            )
        )
    return pool


def read_qrels(path: str | Path) -> tuple[dict[str, set[str]], dict[str, int]]:
    """`qid 0 did relevance task_id` lines -> (qid -> relevant dids, qid -> task id); relevance > 0 kept."""
    path = Path(path)
    if not path.is_file():
        raise InputError(path, "qrels file not found")
    qrels: dict[str, set[str]] = {}
    tasks: dict[str, int] = {}
    with path.open(encoding="utf-8") as handle:
        for number, line in enumerate(handle, start=1):
            parts = line.split()
            if not parts:
                continue
            if len(parts) != 5:
                raise InputError(f"{path}:{number}", f"expected 'qid 0 did relevance task_id', got {line!r}")
            qid, _, did, relevance, task = parts
            try:
                relevance_value, task_id = int(relevance), int(task)
            except ValueError:
                raise InputError(f"{path}:{number}", "relevance and task_id must be integers") from None
            if relevance_value > 0:
                qrels.setdefault(qid, set()).add(did)
                tasks[qid] = task_id
    return qrels, tasks


def _resolve(root: Path | None, image: str | None) -> str | Path | None:
    return root / image if (root is not None and image is not None) else image


INSTRUCTIONS_HEADER = (
    "query_modality",
    "cand_modality",
    "dataset_name",
    "dataset_id",
    "prompt_1",
    "prompt_2",
    "prompt_3",
    "prompt_4",
)


def write_instructions(path: str | Path, rows: Iterable[tuple[Row, Sequence[str]]]) -> None:
    """Write a `query_instructions.tsv` with one line per (row, its prompts); empty prompts stay empty."""
    with atomic_write(path) as handle:
        writer = csv.writer(handle, delimiter="\t", lineterminator="\n")
        writer.writerow(INSTRUCTIONS_HEADER)
        for row, prompts in rows:
            writer.writerow(
                [
                    row.query_modality.value,
                    row.candidate_modality.value,
                    row.dataset,
                    row.dataset_id,
                    *prompts,
                ]
            )


def write_qrels(path: str | Path, queries: Iterable[dict], extra_lines: Sequence[str] = ()) -> None:
    """Write TREC-style qrels (`qid 0 did 1 task_id`) for the positives of M-BEIR query records."""
    lines = [f"{q['qid']} 0 {did} 1 {q['task_id']}\n" for q in queries for did in q["pos_cand_list"]]
    with atomic_write(path) as handle:
        handle.write("".join([*lines, *extra_lines]))


def _parse_modality(value: object, where: str) -> Modality:
    try:
        return Modality.parse(str(value))
    except ValueError as error:
        raise InputError(where, str(error)) from None


def _check_modality(modality: Modality, text: str | None, image: str | None, where: str) -> None:
    has_text, has_image = bool(text and text.strip()), image is not None
    expected = {
        Modality.TEXT: (True, False),
        Modality.IMAGE: (False, True),
        Modality.IMAGE_TEXT: (True, True),
    }
    if modality not in expected:
        raise InputError(where, f"unsupported modality {modality.value!r} in M-BEIR records")
    if expected[modality] != (has_text, has_image):
        raise InputError(
            where,
            f"modality {modality.value!r} but text={'yes' if has_text else 'no'}, "
            f"image={'yes' if has_image else 'no'}"
            + (" (empty text)" if text is not None and not text.strip() else ""),
        )


class MBeir:
    """Paths of an M-BEIR folder (layout of the HF repo TIGER-Lab/M-BEIR)."""

    def __init__(self, root: str | Path, instruction_choice: Literal["hash", "first"] = "hash") -> None:
        self.root = Path(root)
        if not self.root.is_dir():
            raise InputError(self.root, "M-BEIR folder not found")
        self.instruction_choice = instruction_choice

    def query_file(self, row: Row, split: Split) -> Path:
        return self.root / "query" / split / f"mbeir_{row.name}_{split}.jsonl"

    def train_query_file(self, dataset: str) -> Path:
        return self.root / "query" / "train" / f"mbeir_{dataset}_train.jsonl"

    def union_train_file(self) -> Path:
        return self.root / "query" / "union_train" / "mbeir_union_up_train.jsonl"

    def local_pool_file(self, row: Row, split: Literal["val", "test"] = "test") -> Path:
        # MSCOCO's local pools are split-specific; the other rows share one pool for val and test.
        if row.dataset == "mscoco":
            return self.root / "cand_pool" / "local" / f"mbeir_{row.name}_{split}_cand_pool.jsonl"
        return self.root / "cand_pool" / "local" / f"mbeir_{row.name}_cand_pool.jsonl"

    def global_pool_file(self, split: Split = "test") -> Path:
        return self.root / "cand_pool" / "global" / f"mbeir_union_{split}_cand_pool.jsonl"

    def qrels_file(self, row: Row, split: Literal["val", "test"] = "test") -> Path:
        return self.root / "qrels" / split / f"mbeir_{row.name}_{split}_qrels.txt"

    def instructions_file(self) -> Path:
        return self.root / "instructions" / "query_instructions.tsv"

    def instructions(self) -> Instructions:
        return Instructions.from_tsv(self.instructions_file(), self.instruction_choice)

    def queries(self, row: Row, split: Split = "test", with_instructions: bool = True) -> list[Query]:
        return read_queries(
            self.query_file(row, split),
            self.instructions() if with_instructions else None,
            image_root=self.root,
        )

    def pool(self, row: Row, split: Literal["val", "test"] = "test") -> list[Candidate]:
        return read_pool(self.local_pool_file(row, split), image_root=self.root)

    def global_pool(self, split: Split = "test") -> list[Candidate]:
        return read_pool(self.global_pool_file(split), image_root=self.root)

    def qrels(self, row: Row, split: Literal["val", "test"] = "test") -> dict[str, set[str]]:
        return read_qrels(self.qrels_file(row, split))[0]


def local_positives(query: Query) -> tuple[str, ...]:
    """Positives that can be in the query's own local pool: those with the query's dataset prefix.

    In the global pool every positive counts, including OVEN/InfoSeek sibling-prefix ones.
    """
    own = dataset_id_of(query.qid)
    return tuple(did for did in query.positives if dataset_id_of(did) == own)


def instruction_digest(queries: Iterable[Query]) -> dict[str, object]:
    """A compact record of the instruction chosen for each query, for manifests."""
    digest = hashlib.sha256()
    count = 0
    for query in queries:
        digest.update(json.dumps([query.qid, query.instruction]).encode())
        count += 1
    return {"queries": count, "sha256": digest.hexdigest()}
