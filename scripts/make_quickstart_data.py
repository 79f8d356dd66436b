"""Regenerate the small dataset shipped for `umarvel quickstart` from ../shared/data.

Takes a fixed, sorted selection of clothing-small photos (CC0) per class and split, downscaled to at most
200 px on the long side, and the COCO captions of coco-mini (CC BY 4.0; text only, no photos).

    python scripts/make_quickstart_data.py --shared-data ../shared/data
"""

from __future__ import annotations

import argparse
import csv
import shutil
from pathlib import Path

from PIL import Image

PER_SPLIT = {"train": 24, "validation": 6, "test": 40}
TARGET = Path("src/umarvel/quickstart/data")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shared-data", type=Path, default=Path("../shared/data"))
    args = parser.parse_args()
    clothing = args.shared_data / "clothing-small"
    if (TARGET / "clothing").exists():
        shutil.rmtree(TARGET / "clothing")
    for split, count in PER_SPLIT.items():
        for folder in sorted((clothing / split).iterdir()):
            for photo in sorted(folder.glob("*.jpg"))[:count]:
                out = TARGET / "clothing" / split / folder.name / photo.name
                out.parent.mkdir(parents=True, exist_ok=True)
                image = Image.open(photo).convert("RGB")
                image.thumbnail((200, 200))
                image.save(out, quality=85)
    with (args.shared_data / "coco-mini" / "captions.csv").open(encoding="utf-8", newline="") as handle:
        rows = list(csv.DictReader(handle))
    with (TARGET / "coco_captions.csv").open("w", encoding="utf-8", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["photo", "caption"])
        for row in rows:
            writer.writerow([Path(row["image"]).stem, row["caption"].strip()])


if __name__ == "__main__":
    main()
