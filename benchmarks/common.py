"""What several benchmarks read the same way."""

from __future__ import annotations

import csv
from pathlib import Path


def flickr8k_test_rows(shared: Path) -> list[dict[str, str]]:
    """The rows (image, caption, split) of the full Flickr8k's standard test split, in file order."""
    with (shared / "flickr8k" / "captions.csv").open(encoding="utf-8") as handle:
        return [row for row in csv.DictReader(handle) if row["split"] == "test"]
