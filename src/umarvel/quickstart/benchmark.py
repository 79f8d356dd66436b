"""The quickstart's M-BEIR-format benchmark, built from the clothing photos shipped with the package.

Three rows, all with class-level relevance (semi-synthetic; the README says so):
- mscoco_task0 slot, text -> image: a templated description of a garment class -> its photos;
- nights_task4 slot, image -> image: a photo -> the other photos of its class;
- fashioniq_task7 slot, image + text -> image: a photo + "as a <class> instead" -> photos of that class.
Photos are split by the source folders (train / validation / test) and spread over the rows by a stable
hash, so the global pool holds each photo once.
"""

from __future__ import annotations

import random
from collections import defaultdict
from importlib import resources
from pathlib import Path

from umarvel.data.convert import CLOTHING_CLASSES, SPLITS, Bench, bucket, link_images, write_benchmark
from umarvel.data.io import InputError
from umarvel.data.mbeir import Row

# Ten descriptions per class: ten classes give each split's text -> image row 100 queries, enough for
# a bootstrap interval of about +-10 points on that row.
DESCRIPTIONS = (
    "a photo of a {c}",
    "a {c} photographed on a plain background",
    "a product picture of a {c}",
    "someone is selling this {c}",
    "a second-hand {c} for sale",
    "the {c} I am looking for",
    "a {c} laid out flat",
    "a close-up of a {c}",
    "a catalogue photo showing a {c}",
    "an everyday {c}",
)
NOTES = {
    ("mscoco", 0): "semi-synthetic: templated garment description -> every photo of that class",
    ("nights", 4): "semi-synthetic: clothing photo -> the other photos of its class",
    ("fashioniq", 7): "semi-synthetic: photo + 'as a <class> instead' -> photos of that class",
}
LICENCES = "Licence: clothing photos CC0 (clothing-dataset-small by Alexey Grigorev)."


def shipped_data() -> Path:
    """The folder of the data shipped with the package (clothing/, coco_captions.csv)."""
    return Path(str(resources.files("umarvel.quickstart").joinpath("data")))


def build_quickstart_benchmark(output: str | Path, data: Path | None = None, seed: int = 0) -> Path:
    """Write the benchmark under `output` (an M-BEIR root) and return it."""
    data = data or shipped_data()
    clothing, root = data / "clothing", Path(output)
    if not clothing.is_dir():
        raise InputError(clothing, "the quickstart's clothing photos are missing from the package")
    rng = random.Random(seed)
    bench = Bench(root)
    rows = {key: Row(key[0], key[1], 5) for key in NOTES}
    prefixes = {d: link_images(root, d, "clothing", clothing) for d, _ in NOTES}
    photos: dict[tuple[str, str, str], list[str]] = defaultdict(list)
    for folder, split in (("train", "train"), ("validation", "val"), ("test", "test")):
        for cls in CLOTHING_CLASSES:
            for path in sorted((clothing / folder / cls).glob("*.jpg")):
                dataset = ("mscoco", "nights", "fashioniq")[bucket(path.name, "quickstart", 3)]
                photos[(dataset, split, cls)].append(f"{folder}/{cls}/{path.name}")
    for split in SPLITS:
        by_class = {
            dataset: {c: photos[(dataset, split, c)] for c in CLOTHING_CLASSES} for dataset, _ in NOTES
        }
        # Text -> image: every description of a class finds all its photos.
        text_row = rows[("mscoco", 0)]
        dids = {
            c: [bench.candidate(text_row, split, None, f"{prefixes['mscoco']}/{p}") for p in ps]
            for c, ps in by_class["mscoco"].items()
        }
        for cls in CLOTHING_CLASSES:
            if dids[cls]:
                for template in DESCRIPTIONS:
                    bench.query(text_row, split, template.format(c=cls.replace("-", " ")), None, dids[cls])
        # Image -> image (same class) and image + text -> image (another class): half of each class's
        # photos are queries, the other half the pool.
        for dataset, task in (("nights", 4), ("fashioniq", 7)):
            row = rows[(dataset, task)]
            pool: dict[str, list[str]] = defaultdict(list)
            queries: list[tuple[str, str]] = []
            for cls, paths in by_class[dataset].items():
                for i, path in enumerate(paths):
                    image = f"{prefixes[dataset]}/{path}"
                    if i % 2 == 0:
                        queries.append((cls, image))
                    else:
                        pool[cls].append(bench.candidate(row, split, None, image))
            for cls, image in queries:
                if task == 4 and pool[cls]:
                    bench.query(row, split, None, image, pool[cls])
                elif task == 7:
                    target = rng.choice([c for c in CLOTHING_CLASSES if c != cls and pool[c]])
                    wanted = target.replace("-", " ")
                    text = f"I want the same style but as a {wanted} instead of a {cls}"
                    bench.query(row, split, text, image, pool[target])
    title = "# The quickstart benchmark\n\nBuilt by `umarvel quickstart` from the clothing photos it ships."
    write_benchmark(bench, rows, 10_000, rng, (title, NOTES, LICENCES))
    return root
