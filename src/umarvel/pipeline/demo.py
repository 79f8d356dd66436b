"""The offline demo: embed a small real sample with the offline backbone and show nearest neighbours."""

from __future__ import annotations

import csv
import logging
import random
import time
from collections import defaultdict
from pathlib import Path

import numpy as np
from rich.console import Console
from rich.table import Table

from umarvel.config.manifest import write_manifest
from umarvel.config.schema import EmbedderConfig
from umarvel.data.io import InputError, write_json
from umarvel.data.records import Candidate

logger = logging.getLogger(__name__)


def _flickr_sample(folder: Path, photos: int, rng: random.Random) -> list[tuple[str, str]]:
    captions: dict[str, list[str]] = defaultdict(list)
    with (folder / "captions.csv").open(encoding="utf-8", newline="") as handle:
        for row in csv.DictReader(handle):
            captions[row["image"]].append(row["caption"].strip())
    chosen = rng.sample(sorted(captions), photos)
    return [(image, text) for image in chosen for text in captions[image][:2]]


def run_demo(
    shared_data: str | Path,
    output_dir: str | Path,
    config: EmbedderConfig,
    photos: int = 40,
    seed: int = 0,
    console: Console | None = None,
) -> dict[str, float]:
    """Embed 2 captions of `photos` Flickr8k photos and the photos themselves; print neighbours and
    the share of captions whose nearest other caption describes the same photo. Returns the figures."""
    from umarvel.modeling.embedder import Embedder

    console = console or Console()
    flickr = Path(shared_data) / "flickr8k-800"
    if not (flickr / "captions.csv").is_file():
        raise InputError(flickr, "the demo needs ../shared/data/flickr8k-800 (captions.csv and images/)")
    rng = random.Random(seed)
    pairs = _flickr_sample(flickr, photos, rng)
    started = time.perf_counter()
    embedder = Embedder.from_config(config)
    load_s = time.perf_counter() - started
    texts = [Candidate(did=f"c{i}", text=text) for i, (_, text) in enumerate(pairs)]
    images = sorted({image for image, _ in pairs})
    started = time.perf_counter()
    text_vectors = embedder.encode_candidates(texts)
    text_s = time.perf_counter() - started
    started = time.perf_counter()
    image_vectors = embedder.encode_candidates(
        [Candidate(did=i, image=flickr / "images" / i) for i in images]
    )
    image_s = time.perf_counter() - started

    scores = text_vectors @ text_vectors.T  # (N, N)
    np.fill_diagonal(scores, -np.inf)
    nearest = scores.argmax(axis=1)
    same_photo = float(np.mean([pairs[i][0] == pairs[j][0] for i, j in enumerate(nearest)]))
    chance = 1.0 / (len(pairs) - 1)

    table = Table(title=f"Nearest caption (offline backbone, {config.model}, untrained projector)")
    table.add_column("query caption")
    table.add_column("nearest other caption")
    table.add_column("same photo?")
    for i in range(0, min(len(pairs), 16), 2):
        j = int(nearest[i])
        table.add_row(pairs[i][1], pairs[j][1], "yes" if pairs[i][0] == pairs[j][0] else "no")
    console.print(table)
    image_scores = image_vectors @ image_vectors.T
    console.print(
        f"caption -> same-photo caption at rank 1: {same_photo:.1%} (chance {chance:.1%}); "
        f"{len(pairs)} captions, {len(images)} photos; mean image-image cosine "
        f"{float(image_scores[np.triu_indices(len(images), 1)].mean()):.3f}"
    )
    figures = {
        "load_seconds": round(load_s, 2),
        "text_items_per_second": round(len(texts) / text_s, 2),
        "image_items_per_second": round(len(images) / image_s, 2),
        "caption_same_photo_at_1": round(same_photo, 4),
        "chance_at_1": round(chance, 4),
    }
    console.print(
        f"load {load_s:.1f} s; text {figures['text_items_per_second']} items/s; "
        f"images {figures['image_items_per_second']} items/s"
    )
    output_dir = Path(output_dir)
    write_json(output_dir / "demo.json", figures)
    np.save(output_dir / "captions.npy", text_vectors)
    write_manifest(
        output_dir, "demo", config, inputs={"flickr8k": flickr / "captions.csv"}, extra={"figures": figures}
    )
    return figures
