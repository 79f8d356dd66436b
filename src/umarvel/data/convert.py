"""Build an M-BEIR-format benchmark (train / val / test, local + global pools, instructions) from the
small real datasets in ../shared/data, so every M-BEIR code path runs on real photos and texts.

Each source is put in the M-BEIR dataset slot whose task it resembles; images and texts are never
shared between rows, so the global pool holds no duplicate content. Which rows are semi-synthetic is
written into the benchmark's README.md.
"""

from __future__ import annotations

import csv
import logging
import os
import random
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path

from umarvel.data.io import InputError, read_jsonl, write_jsonl
from umarvel.data.mbeir import DATASET_IDS, ROWS, TASKS, Row, write_instructions, write_qrels
from umarvel.data.pairs import read_beir
from umarvel.data.records import Modality
from umarvel.data.sampling import held_split, stable_hash

logger = logging.getLogger(__name__)

SPLITS = ("train", "val", "test")
CLOTHING_CLASSES = (
    "dress",
    "hat",
    "longsleeve",
    "outwear",
    "pants",
    "shirt",
    "shoes",
    "shorts",
    "skirt",
    "t-shirt",
)

INSTRUCTIONS = {
    ("mscoco", 0): (
        "Find me an everyday image that matches the given caption.",
        "Retrieve the photo this caption describes.",
        "Show me a picture of the scene described.",
        "Identify the everyday image that fits this description.",
    ),
    ("mscoco", 3): (
        "Find an image caption describing the following everyday image.",
        "Write down a caption that matches this photo.",
        "Retrieve a description of this image.",
        "Which caption describes this everyday photo?",
    ),
    ("webqa", 1): (
        "Retrieve a scientific abstract that supports or refutes this claim.",
        "Find the paper abstract relevant to the following claim.",
        "Which study abstract gives evidence about this claim?",
        "",
    ),
    ("edis", 2): (
        "Find a captioned photo that shows the described scene.",
        "Retrieve an image with its caption that matches this description.",
        "Identify the photo and caption pair for this text.",
        "",
    ),
    ("nights", 4): (
        "Find a clothing photo of the same kind of garment.",
        "Retrieve a similar clothing item to the one shown.",
        "Show me another photo of this type of garment.",
        "",
    ),
    ("oven", 6): (
        "Answer with a caption describing what is happening in this photo.",
        "Retrieve a description that answers the question about the image.",
        "Find the text that answers the question about this photo.",
        "",
    ),
    ("fashioniq", 7): (
        "Find the clothing item that matches the requested change to the shown garment.",
        "Retrieve a garment photo that applies the described modification.",
        "Show me the item described by the change to this one.",
        "",
    ),
}

ROW_NOTES = {
    ("mscoco", 0): "real: Flickr8k and COCO captions -> their photos",
    ("mscoco", 3): "real: Flickr8k and COCO photos -> their five human captions",
    ("webqa", 1): "real: SciFact claims -> the abstracts in their qrels (plus distractor abstracts)",
    (
        "edis",
        2,
    ): "real texts, composed pairing: a Flickr8k caption -> (the same photo + another of its captions)",
    (
        "nights",
        4,
    ): "semi-synthetic: clothing photo -> every photo of the same garment class (class-level relevance)",
    ("oven", 6): "semi-synthetic: Flickr8k photo + a templated question -> its human captions",
    (
        "fashioniq",
        7,
    ): "semi-synthetic: clothing photo + templated modification text ('as a skirt instead') -> "
    "photos of the target class",
}
QUESTIONS = ("What is happening in this photo?", "What does this picture show?", "Describe the scene.")


def bucket(name: str, salt: str, n: int) -> int:
    return stable_hash(salt, name) % n


@dataclass
class Bench:
    root: Path
    queries: dict[tuple[Row, str], list[dict]] = field(default_factory=lambda: defaultdict(list))
    pools: dict[tuple[Row, str], list[dict]] = field(default_factory=lambda: defaultdict(list))
    counters: dict[str, int] = field(default_factory=lambda: defaultdict(int))

    def new_id(self, dataset: str, kind: str) -> str:
        self.counters[f"{dataset}:{kind}"] += 1
        return f"{DATASET_IDS[dataset]}:{self.counters[f'{dataset}:{kind}']}"

    def candidate(self, row: Row, split: str, text: str | None, image: str | None) -> str:
        did = self.new_id(row.dataset, "did")
        modality = row.candidate_modality
        self.pools[(row, split)].append(
            {"did": did, "txt": text, "img_path": image, "modality": modality.value, "src_content": None}
        )
        return did

    def query(self, row: Row, split: str, text: str | None, image: str | None, positives: list[str]) -> None:
        self.queries[(row, split)].append(
            {
                "qid": self.new_id(row.dataset, "qid"),
                "query_txt": text,
                "query_img_path": image,
                "query_modality": row.query_modality.value,
                "query_src_content": None,
                "pos_cand_list": positives,
                "neg_cand_list": [],
                "task_id": row.task_id,
            }
        )


def link_images(root: Path, dataset: str, name: str, source: Path) -> str:
    """Expose `source` under mbeir_images/<dataset>_images/<name> (a symlink) and return that prefix."""
    link = root / "mbeir_images" / f"{dataset}_images" / name
    link.parent.mkdir(parents=True, exist_ok=True)
    if link.is_symlink() or link.exists():
        link.unlink()
    os.symlink(source.resolve(), link, target_is_directory=True)
    return f"mbeir_images/{dataset}_images/{name}"


def _read_captions(path: Path) -> dict[str, list[str]]:
    if not path.is_file():
        raise InputError(path, "captions file not found")
    captions: dict[str, list[str]] = defaultdict(list)
    with path.open(encoding="utf-8", newline="") as handle:
        for number, row in enumerate(csv.DictReader(handle), start=2):
            if not row.get("image") or not (row.get("caption") or "").strip():
                raise InputError(f"{path}:{number}", "expected non-empty 'image' and 'caption'")
            captions[row["image"]].append(row["caption"].strip().rstrip(" .") + ".")
    return dict(captions)


def build_benchmark(
    shared_data: str | Path,
    output: str | Path,
    seed: int = 0,
    max_queries: int = 150,
    scifact_distractors: int = 800,
) -> Path:
    """Write the benchmark under `output` (an M-BEIR root) and return it.

    Args:
        shared_data: the folder with flickr8k-800/, coco-mini/, clothing-small/, scifact/.
        output: where the M-BEIR tree goes; images are symlinked, not copied.
        seed: seeds every random choice (positive caption, distractors, modification targets).
        max_queries: cap on queries per row and split.
        scifact_distractors: abstracts added to the SciFact pool besides the relevant ones.
    """
    shared, root = Path(shared_data), Path(output)
    rng = random.Random(seed)
    bench = Bench(root)
    rows = {key: Row(key[0], key[1], 5) for key in INSTRUCTIONS}

    flickr = _read_captions(shared / "flickr8k-800" / "captions.csv")
    coco = _read_captions(shared / "coco-mini" / "captions.csv")
    photos: list[tuple[str, list[str]]] = []
    for prefix_name, captions in (("flickr", flickr), ("coco", coco)):
        for image, texts in sorted(captions.items()):
            photos.append((f"{prefix_name}/{image}", texts))
    # Every photo serves exactly one row family, so the global pool has no duplicate content.
    groups: dict[str, list[tuple[str, list[str]]]] = defaultdict(list)
    for name, texts in photos:
        family = "mscoco" if name.startswith("coco/") else ("mscoco", "edis", "oven")[bucket(name, "row", 3)]
        groups[family].append((name, texts))
    for family in ("mscoco", "edis", "oven"):
        link_images(root, family, "flickr", shared / "flickr8k-800" / "images")
    link_images(root, "mscoco", "coco", shared / "coco-mini" / "images")

    for name, texts in groups["mscoco"]:
        split, image = held_split(name), f"mbeir_images/mscoco_images/{name}"
        pool_split = split
        did_image = bench.candidate(rows[("mscoco", 0)], pool_split, None, image)
        bench.query(rows[("mscoco", 0)], split, rng.choice(texts), None, [did_image])
        caption_dids = [bench.candidate(rows[("mscoco", 3)], pool_split, t, None) for t in texts]
        bench.query(rows[("mscoco", 3)], split, None, image, caption_dids)
    for name, texts in groups["edis"]:
        split, image = held_split(name), f"mbeir_images/edis_images/{name}"
        query_text, candidate_text = rng.sample(texts, 2)
        did = bench.candidate(rows[("edis", 2)], split, candidate_text, image)
        bench.query(rows[("edis", 2)], split, query_text, None, [did])
    for name, texts in groups["oven"]:
        split, image = held_split(name), f"mbeir_images/oven_images/{name}"
        dids = [bench.candidate(rows[("oven", 6)], split, t, None) for t in texts]
        bench.query(rows[("oven", 6)], split, rng.choice(QUESTIONS), image, dids)

    _scifact(shared / "scifact", bench, rows[("webqa", 1)], rng, scifact_distractors)
    _clothing(shared / "clothing-small", bench, rows[("nights", 4)], rows[("fashioniq", 7)], rng)
    write_benchmark(bench, rows, max_queries, rng)
    return root


def _scifact(folder: Path, bench: Bench, row: Row, rng: random.Random, distractors: int) -> None:

    corpus = {}
    for number, record in read_jsonl(folder / "corpus.jsonl"):
        title, body = (record.get("title") or "").strip(), (record.get("text") or "").strip()
        if not (title or body):
            raise InputError(f"{folder / 'corpus.jsonl'}:{number}", "abstract has no title or text")
        corpus[str(record["_id"])] = f"{title}. {body}" if title and body else title or body
    used: set[str] = set()
    for beir_split in ("train", "test"):
        data = read_beir(folder, beir_split)
        for query in data.queries:
            # BEIR test -> our test; BEIR train queries -> our train and val.
            split = (
                "test" if beir_split == "test" else ("val" if bucket(query.qid, "sf", 10) == 0 else "train")
            )
            relevant = [d for d, score in data.qrels[query.qid].items() if score > 0 and d in corpus]
            if not relevant:
                continue
            dids = [bench.candidate(row, split, _cut(corpus[d]), None) for d in relevant]
            used.update(relevant)
            bench.query(row, split, query.text, None, dids)
    spare = sorted(set(corpus) - used)
    for doc in rng.sample(spare, min(distractors, len(spare))):
        bench.candidate(row, ("test", "val", "train")[bucket(doc, "sfd", 3)], _cut(corpus[doc]), None)


def _cut(text: str, words: int = 120) -> str:
    parts = text.split()
    return " ".join(parts[:words])


def _clothing(folder: Path, bench: Bench, same: Row, modify: Row, rng: random.Random) -> None:
    if not folder.is_dir():
        raise InputError(folder, "clothing-small folder not found")
    prefixes = {d: link_images(bench.root, d, "clothing", folder) for d in ("nights", "fashioniq")}
    by_class: dict[tuple[str, str, str], list[str]] = defaultdict(list)
    source_split = {"train": "train", "validation": "val", "test": "test"}
    for sub, split in source_split.items():
        for cls in CLOTHING_CLASSES:
            for path in sorted((folder / sub / cls).glob("*.jpg")):
                row_name = ("nights", "fashioniq")[bucket(path.name, "cl", 2)]
                by_class[(row_name, split, cls)].append(f"{sub}/{cls}/{path.name}")
    for split in SPLITS:
        # nights_task4: half of each class are queries, the other half the pool; positives = same class.
        pool_ids: dict[str, list[str]] = defaultdict(list)
        query_images: list[tuple[str, str]] = []
        for cls in CLOTHING_CLASSES:
            images = by_class[("nights", split, cls)]
            for i, image in enumerate(images):
                if i % 4 == 0:
                    query_images.append((cls, image))
                else:
                    pool_ids[cls].append(bench.candidate(same, split, None, f"{prefixes['nights']}/{image}"))
        for cls, image in query_images:
            if pool_ids[cls]:
                bench.query(same, split, None, f"{prefixes['nights']}/{image}", pool_ids[cls])
        # fashioniq_task7: reference photo + "as a <target> instead" -> photos of the target class.
        targets: dict[str, list[str]] = defaultdict(list)
        references: list[tuple[str, str]] = []
        for cls in CLOTHING_CLASSES:
            for i, image in enumerate(by_class[("fashioniq", split, cls)]):
                if i % 4 == 0:
                    references.append((cls, image))
                else:
                    targets[cls].append(
                        bench.candidate(modify, split, None, f"{prefixes['fashioniq']}/{image}")
                    )
        for cls, image in references:
            target = rng.choice([c for c in CLOTHING_CLASSES if c != cls and targets[c]])
            wanted, current = target.replace("-", " "), cls.replace("-", " ")
            text = f"I want the same style but as a {wanted} instead of a {current}"
            bench.query(modify, split, text, f"{prefixes['fashioniq']}/{image}", targets[target])


def write_benchmark(
    bench: Bench,
    rows: dict[tuple[str, int], Row],
    max_queries: int,
    rng: random.Random,
    readme: tuple[str, dict[tuple[str, int], str], str] | None = None,
) -> None:
    """Write queries, pools, qrels, instructions and README; `readme` is (title, row notes, licences)
    for benchmarks other than make-benchmark's."""
    root = bench.root
    union_pools: dict[str, list[dict]] = defaultdict(list)
    train_by_dataset: dict[str, list[dict]] = defaultdict(list)
    union_val: list[dict] = []
    for row in rows.values():
        for split in SPLITS:
            queries = bench.queries[(row, split)]
            if len(queries) > max_queries:
                queries = sorted(rng.sample(queries, max_queries), key=lambda q: int(q["qid"].split(":")[1]))
            pool = bench.pools[(row, split)]
            if split == "train":
                train_by_dataset[row.dataset].extend(queries)
                union_pools["train"].extend(pool)
                continue
            write_jsonl(root / "query" / split / f"mbeir_{row.name}_{split}.jsonl", queries)
            write_qrels(root / "qrels" / split / f"mbeir_{row.name}_{split}_qrels.txt", queries)
            if split == "val":
                union_val.extend(queries)
        # The global pool of a split is the union of the local pools its queries are searched in.
        if row.dataset == "mscoco":
            for split in ("val", "test"):
                write_jsonl(
                    root / "cand_pool" / "local" / f"mbeir_{row.name}_{split}_cand_pool.jsonl",
                    bench.pools[(row, split)],
                )
                union_pools[split].extend(bench.pools[(row, split)])
        else:
            # One local pool serves val and test, as in M-BEIR.
            shared = bench.pools[(row, "val")] + bench.pools[(row, "test")]
            write_jsonl(root / "cand_pool" / "local" / f"mbeir_{row.name}_cand_pool.jsonl", shared)
            union_pools["val"].extend(shared)
            union_pools["test"].extend(shared)
    for split, pool in union_pools.items():
        write_jsonl(root / "cand_pool" / "global" / f"mbeir_union_{split}_cand_pool.jsonl", pool)
    union_train = []
    for dataset, queries in sorted(train_by_dataset.items()):
        write_jsonl(root / "query" / "train" / f"mbeir_{dataset}_train.jsonl", queries)
        write_qrels(root / "qrels" / "train" / f"mbeir_{dataset}_train_qrels.txt", queries)
        union_train.extend(queries)
    rng.shuffle(union_train)
    write_jsonl(root / "query" / "union_train" / "mbeir_union_up_train.jsonl", union_train)
    write_jsonl(root / "query" / "union_val" / "mbeir_union_val.jsonl", union_val)
    write_instructions(
        root / "instructions" / "query_instructions.tsv",
        [(row, INSTRUCTIONS[key]) for key, row in rows.items()],
    )
    _write_readme(root, bench, rows, readme)


def _write_readme(
    root: Path,
    bench: Bench,
    rows: dict[tuple[str, int], Row],
    readme: tuple[str, dict[tuple[str, int], str], str] | None = None,
) -> None:
    title, notes, licences = readme or (
        "# M-BEIR-format benchmark built from ../shared/data\n\nBuilt by `umarvel make-benchmark`.",
        ROW_NOTES,
        "Licences: Flickr8k research use only; COCO captions CC BY 4.0; clothing-small CC0;\n"
        "SciFact claims CC BY 4.0, abstracts ODC-By. Not for redistribution beyond these terms.",
    )
    lines = [
        title,
        "Same layout and file formats as M-BEIR; the rows occupy the M-BEIR dataset slots whose tasks",
        "they resemble. Images are symlinks into the source data folder.",
        "",
        "| row | task | source | queries train/val/test | pool val+test |",
        "|---|---|---|---|---|",
    ]
    for key, row in rows.items():
        q_mod, c_mod = TASKS[row.task_id]
        counts = "/".join(str(len(bench.queries[(row, s)])) for s in SPLITS)
        pool = len(bench.pools[(row, "val")]) + len(bench.pools[(row, "test")])
        lines.append(f"| {row.name} | {q_mod.value} -> {c_mod.value} | {notes[key]} | {counts} | {pool} |")
    lines += [
        "",
        "Task types without a row here have no honest pairing in this data.",
        "Query counts above are before the per-row cap (see the query files).",
        licences,
    ]
    (root / "README.md").write_text("\n".join(lines) + "\n")


def benchmark_rows(root: str | Path) -> list[Row]:
    """The rows present in a benchmark folder (those with a test query file), in M-BEIR order."""
    root = Path(root)
    return [row for row in ROWS if (root / "query" / "test" / f"mbeir_{row.name}_test.jsonl").is_file()]


__all__ = ["Modality", "benchmark_rows", "build_benchmark"]
