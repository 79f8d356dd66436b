"""The same retrieval harness for BEIR text sets (nDCG@10) and caption sets (R@k both directions)."""

from __future__ import annotations

import csv
import logging
from collections import defaultdict
from pathlib import Path

import numpy as np

from umarvel.data.io import InputError
from umarvel.data.pairs import read_beir
from umarvel.data.records import Query
from umarvel.data.sampling import held_split
from umarvel.evaluation.metrics import mrr_at_k, ndcg_at_k, recall_at_k, recall_fraction_at_k

logger = logging.getLogger(__name__)


def _rank(
    query_vectors: np.ndarray, candidate_vectors: np.ndarray, ids: list[str], k: int, factory: str = "Flat"
) -> list[list[str]]:
    from umarvel.retrieval.index import Index

    index = Index(candidate_vectors.shape[1], factory)
    index.add(candidate_vectors, ids)
    return index.search(query_vectors, k).ids


def evaluate_beir(
    embedder: object,
    folder: str | Path,
    split: str = "test",
    instruction: str | None = None,
    factory: str = "Flat",
    progress: bool = True,
) -> dict[str, float]:
    """nDCG@10 (the BEIR headline), recall@100 (fraction) and MRR@10, in percent."""
    beir = read_beir(folder, split)
    query_vectors = embedder.encode_queries(
        beir.queries,
        instruction=instruction,  # type: ignore[attr-defined]
        progress=progress,
    )
    corpus_vectors = embedder.encode_candidates(beir.corpus, progress=progress)  # type: ignore[attr-defined]
    ranked = _rank(query_vectors, corpus_vectors, [c.did for c in beir.corpus], 100, factory)
    ranking = {q.qid: r for q, r in zip(beir.queries, ranked, strict=True)}
    gains = {q.qid: {d: float(g) for d, g in beir.qrels[q.qid].items()} for q in beir.queries}
    relevant = {qid: {d for d, g in judged.items() if g > 0} for qid, judged in gains.items()}
    return {
        "ndcg@10": round(100 * ndcg_at_k(ranking, gains, 10), 2),
        "recall@100": round(100 * recall_fraction_at_k(ranking, relevant, 100), 2),
        "mrr@10": round(100 * mrr_at_k(ranking, relevant, 10), 2),
        "queries": len(beir.queries),
        "corpus": len(beir.corpus),
    }


def evaluate_captions(
    embedder: object,
    captions: str | Path,
    split: str = "test",
    image_root: str | Path | None = None,
    text_instruction: str | None = None,
    image_instruction: str | None = None,
    ks: tuple[int, ...] = (1, 5, 10),
    progress: bool = True,
) -> dict[str, float]:
    """Caption -> image and image -> caption recall@k (hit rate, percent) over one score matrix.

    `captions` is a csv `image,caption` (several captions per image); `split` keeps the images of one
    held split (by a stable hash of the image name, as in training) or `all`.
    """
    path = Path(captions)
    root = Path(image_root) if image_root is not None else path.parent / "images"
    by_image: dict[str, list[str]] = defaultdict(list)
    if not path.is_file():
        raise InputError(path, "captions file not found")
    with path.open(encoding="utf-8", newline="") as handle:
        for number, row in enumerate(csv.DictReader(handle), start=2):
            if not row.get("image") or not (row.get("caption") or "").strip():
                raise InputError(f"{path}:{number}", "expected non-empty 'image' and 'caption'")
            if split == "all" or held_split(Path(row["image"]).name) == split:
                by_image[row["image"]].append(row["caption"].strip())
    if not by_image:
        raise InputError(path, f"no images in split {split!r}")
    images = sorted(by_image)
    texts = [(image, caption) for image in images for caption in by_image[image]]
    text_vectors = embedder.encode_queries(
        [Query(qid=str(i), text=t) for i, (_, t) in enumerate(texts)],  # type: ignore[attr-defined]
        instruction=text_instruction,
        progress=progress,
    )
    image_vectors = embedder.encode_queries(
        [Query(qid=i, image=root / i) for i in images],  # type: ignore[attr-defined]
        instruction=image_instruction,
        progress=progress,
    )
    scores = text_vectors @ image_vectors.T  # (T, I): one matrix serves both directions
    top_images = np.argsort(-scores, axis=1)[:, : max(ks)]
    top_texts = np.argsort(-scores.T, axis=1)[:, : max(ks)]
    t2i = {str(t): [images[j] for j in row] for t, row in enumerate(top_images)}
    t2i_relevant = {str(t): {image} for t, (image, _) in enumerate(texts)}
    i2t = {image: [str(j) for j in top_texts[i]] for i, image in enumerate(images)}
    i2t_relevant = {
        image: {str(t) for t, (owner, _) in enumerate(texts) if owner == image} for image in images
    }
    result: dict[str, float] = {}
    for k in ks:
        result[f"text_to_image_recall@{k}"] = round(100 * recall_at_k(t2i, t2i_relevant, k), 2)
        result[f"image_to_text_recall@{k}"] = round(100 * recall_at_k(i2t, i2t_relevant, k), 2)
    result["captions"], result["images"] = len(texts), len(images)
    return result
