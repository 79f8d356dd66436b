"""A deterministic mini M-BEIR for tests: the real folder layout and file names, all 16 rows over all
10 dataset ids, local and global pools (MSCOCO's split-specific pools too), qrels, a 16-row
instructions file, tiny generated JPEGs, and the train side (mbeir-protocol.md section 6).

Every candidate and query belongs to a "topic" (a colour and an object); a query's positive shares its
topic, so an oracle embedder that maps topics to vectors gets hand-checkable recall.
"""

from __future__ import annotations

import json
from pathlib import Path

from PIL import Image

from umarvel.data.io import write_jsonl
from umarvel.data.mbeir import DATASET_IDS, DATASETS, ROWS, TASKS, Row, write_instructions, write_qrels
from umarvel.data.records import Modality

COLOURS = {
    "red": (220, 40, 40),
    "green": (40, 180, 60),
    "blue": (40, 70, 220),
    "yellow": (230, 210, 40),
    "purple": (140, 50, 170),
    "orange": (240, 140, 30),
    "black": (20, 20, 20),
    "white": (240, 240, 240),
    "grey": (128, 128, 128),
    "pink": (240, 150, 190),
    "brown": (120, 80, 40),
    "teal": (30, 150, 150),
}
OBJECTS = ("dress", "car", "house", "bird", "boat", "lamp", "chair", "tree", "kite", "train", "cake", "hat")
SPLITS = ("val", "test")


def topic(i: int) -> tuple[str, str]:
    colours = list(COLOURS)
    return colours[i % len(colours)], OBJECTS[(i * 5 + 3) % len(OBJECTS)]


class _Builder:
    def __init__(self, root: Path) -> None:
        self.root = root
        self.counters = dict.fromkeys(DATASETS, 0)
        self.qcounters = dict.fromkeys(DATASETS, 0)

    def next_id(self, dataset: str, query: bool = False) -> str:
        counters = self.qcounters if query else self.counters
        counters[dataset] += 1
        return f"{DATASET_IDS[dataset]}:{counters[dataset]}"

    def image(self, dataset: str, name: str, t: int) -> str:
        relative = f"mbeir_images/{dataset}_images/{name}.jpg"
        path = self.root / relative
        path.parent.mkdir(parents=True, exist_ok=True)
        colour = COLOURS[topic(t)[0]]
        Image.new("RGB", (16, 12), colour).save(path, quality=90)
        return relative

    def candidate(self, dataset: str, modality: Modality, t: int) -> dict:
        did = self.next_id(dataset)
        colour, thing = topic(t)
        text = f"a {colour} {thing} ({dataset} {did})" if modality != Modality.IMAGE else None
        image = self.image(dataset, did.replace(":", "_"), t) if modality != Modality.TEXT else None
        return {
            "did": did,
            "txt": text,
            "img_path": image,
            "modality": modality.value,
            "src_content": None if t % 2 else json.dumps({"topic": t}),
        }

    def query(self, dataset: str, task_id: int, t: int, positives: list[str], negatives: list[str]) -> dict:
        modality = TASKS[task_id][0]
        qid = self.next_id(dataset, query=True)
        colour, thing = topic(t)
        text = None
        if modality != Modality.IMAGE:
            # Some texts need format_string: a leading quote, a trailing \r, no final period.
            text = f'"show the {colour} {thing}\r' if t % 3 == 0 else f"show the {colour} {thing}"
        image = self.image(dataset, f"q{qid.replace(':', '_')}", t) if modality != Modality.TEXT else None
        return {
            "qid": qid,
            "query_txt": text,
            "query_img_path": image,
            "query_modality": modality.value,
            "query_src_content": json.dumps({"topic": t}) if t % 2 else None,
            "pos_cand_list": positives,
            "neg_cand_list": negatives,
            "task_id": task_id,
        }


def _pool_size(row: Row) -> int:
    return 12 if row.k == 10 else 8


def build_mini_mbeir(root: str | Path, queries_per_row: int = 3) -> Path:
    """Write the mini M-BEIR tree under `root` and return `root`."""
    root = Path(root)
    builder = _Builder(root)
    test_pools: dict[str, list[dict]] = {}
    row_queries: dict[tuple[str, str], list[dict]] = {}
    for row in ROWS:
        cand_modality = row.candidate_modality
        pool_splits = SPLITS if row.dataset == "mscoco" else ("test",)
        pools = {
            s: [builder.candidate(row.dataset, cand_modality, t) for t in range(_pool_size(row))]
            for s in pool_splits
        }
        for split in pool_splits:
            name = (
                f"mbeir_{row.name}_{split}_cand_pool.jsonl"
                if row.dataset == "mscoco"
                else f"mbeir_{row.name}_cand_pool.jsonl"
            )
            write_jsonl(root / "cand_pool" / "local" / name, pools[split])
        test_pools[row.name] = pools["test"]
        for split in SPLITS:
            pool = pools[split] if split in pools else pools["test"]
            queries = []
            for i in range(queries_per_row):
                t = i * 2 + (1 if split == "val" else 0)
                positives = [pool[t]["did"]]
                if row.name == "mscoco_task3":
                    # A multi-positive query: five captions of the same topic.
                    positives = [c["did"] for c in pool[:5]] if i == 0 else positives
                negatives = [pool[(t + 1) % len(pool)]["did"]] if i % 2 == 0 else []
                queries.append(builder.query(row.dataset, row.task_id, t, positives, negatives))
            row_queries[(row.name, split)] = queries
    # One OVEN query whose second positive carries the InfoSeek prefix (shared Wikipedia corpus).
    oven_query = row_queries[("oven_task6", "test")][0]
    oven_query["pos_cand_list"].append(test_pools["infoseek_task6"][0]["did"])
    for (name, split), queries in row_queries.items():
        write_jsonl(root / "query" / split / f"mbeir_{name}_{split}.jsonl", queries)
        extra = []
        if name == "webqa_task1" and split == "test":
            first = queries[0]  # one relevance-0 line, which readers must drop
            extra.append(f"{first['qid']} 0 {test_pools[name][-1]['did']} 0 {first['task_id']}\n")
        write_qrels(root / "qrels" / split / f"mbeir_{name}_{split}_qrels.txt", queries, extra)
    union_test = sorted(
        (c for pool in test_pools.values() for c in pool),
        key=lambda c: tuple(int(x) for x in c["did"].split(":")),
    )
    write_jsonl(root / "cand_pool" / "global" / "mbeir_union_test_cand_pool.jsonl", union_test)
    union_val_queries = [q for (name, split), qs in row_queries.items() if split == "val" for q in qs]
    write_jsonl(root / "query" / "union_val" / "mbeir_union_val.jsonl", union_val_queries)
    _write_val_pool(root, union_val_queries)
    _write_train_side(root, builder)
    _write_instructions(root)
    return root


def _write_val_pool(root: Path, queries: list[dict]) -> None:
    wanted = {d for q in queries for d in q["pos_cand_list"] + q["neg_cand_list"]}
    pools = sorted((root / "cand_pool" / "local").glob("*.jsonl"))
    seen: dict[str, dict] = {}
    for path in pools:
        if path.name.endswith("_test_cand_pool.jsonl"):
            continue
        for line in path.read_text().splitlines():
            record = json.loads(line)
            if record["did"] in wanted:
                seen[record["did"]] = record
    write_jsonl(root / "cand_pool" / "global" / "mbeir_union_val_cand_pool.jsonl", list(seen.values()))


def _write_train_side(root: Path, builder: _Builder) -> None:
    train_pool: list[dict] = []
    union: list[dict] = []
    per_dataset: dict[str, list[dict]] = {d: [] for d in DATASETS}
    for row in ROWS:
        pool = [builder.candidate(row.dataset, row.candidate_modality, t) for t in range(6)]
        train_pool.extend(pool)
        for t in range(4):
            negatives = [pool[(t + 2) % len(pool)]["did"]] if t % 2 else []
            query = builder.query(row.dataset, row.task_id, t, [pool[t]["did"]], negatives)
            per_dataset[row.dataset].append(query)
    for dataset, queries in per_dataset.items():
        write_jsonl(root / "query" / "train" / f"mbeir_{dataset}_train.jsonl", queries)
        write_qrels(root / "qrels" / "train" / f"mbeir_{dataset}_train_qrels.txt", queries)
        union.extend(queries)
        if dataset in ("webqa", "nights", "cirr"):
            union.extend(queries[:2])  # upsampling: duplicated qids, as in mbeir_union_up_train
    write_jsonl(root / "query" / "union_train" / "mbeir_union_up_train.jsonl", union)
    write_jsonl(root / "cand_pool" / "global" / "mbeir_union_train_cand_pool.jsonl", train_pool)
    # U-MARVEL-style mined negatives, aligned line by line with the union train file.
    dids = [c["did"] for c in train_pool]
    mined = []
    for i, query in enumerate(union):
        ranked = [d for d in dids[i % len(dids) :] + dids[: i % len(dids)]][:10]
        if i == 0:
            ranked = query["pos_cand_list"] + ranked[:2]  # fewer than k=5 non-positives
        mined.append(
            {
                "qid": query["qid"],
                "gt_docs": query["pos_cand_list"],
                "top100_docs": ranked,
                "score": [round(1.0 - 0.05 * r, 4) for r in range(len(ranked))],
            }
        )
    write_jsonl(root / "mined" / "mbeir_union_up_train_negatives.jsonl", mined)


INSTRUCTION_TEMPLATES = {
    Modality.IMAGE: (
        "Find me an image that matches the given {what}.",
        "Retrieve an image for this {what}.",
        "Show an image matching the {what}.",
        "Identify the image that fits the {what}.",
    ),
    Modality.TEXT: (
        "Find a text that matches the given {what}.",
        "Retrieve a description for this {what}.",
        "Find a caption for the {what}.",
        "",
    ),
    Modality.IMAGE_TEXT: (
        "Find an image with text that matches the {what}.",
        "Retrieve a captioned image for this {what}.",
        "Find a document for the {what}.",
        "Locate an illustrated passage for the {what}.",
    ),
}


def _write_instructions(root: Path) -> None:
    rows = []
    for row in ROWS:
        what = {Modality.TEXT: "caption", Modality.IMAGE: "photo", Modality.IMAGE_TEXT: "photo and question"}[
            row.query_modality
        ]
        rows.append((row, [p.format(what=what) for p in INSTRUCTION_TEMPLATES[row.candidate_modality]]))
    write_instructions(root / "instructions" / "query_instructions.tsv", rows)
