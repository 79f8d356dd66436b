"""One retrieval harness for text and image sets: BEIR (nDCG@10), caption sets (R@k both directions),
class-name -> image folders (mAP, zero-shot accuracy) and STS pairs (Spearman)."""

from __future__ import annotations

import csv
import dataclasses
import logging
import random
from collections import defaultdict
from pathlib import Path
from typing import Any

import numpy as np

from umarvel.data.io import InputError
from umarvel.data.pairs import read_beir, read_stsb
from umarvel.data.records import Candidate, Query
from umarvel.data.sampling import held_split
from umarvel.evaluation.metrics import (
    mean_average_precision,
    mrr_at_k,
    ndcg_at_k,
    recall_at_k,
    recall_fraction_at_k,
)
from umarvel.retrieval.search import search_vectors, top_k

logger = logging.getLogger(__name__)


def evaluate_beir(
    embedder: object,
    folder: str | Path,
    split: str = "test",
    instruction: str | None = None,
    factory: str = "Flat",
    progress: bool = True,
    corpus_limit: int | None = None,
    seed: int = 0,
) -> dict[str, float]:
    """nDCG@10 (the BEIR headline), recall@100 (fraction) and MRR@10, in percent.

    corpus_limit: keep every abstract judged for the split's queries plus a seeded sample of the others,
        up to this many in all (a cheaper, easier variant; not comparable with full-corpus figures).
    """
    beir = read_beir(folder, split)
    if corpus_limit is not None and corpus_limit < len(beir.corpus):
        beir = dataclasses.replace(beir, corpus=limit_corpus(beir.corpus, beir.qrels, corpus_limit, seed))
    query_vectors = embedder.encode_queries(
        beir.queries,
        instruction=instruction,  # type: ignore[attr-defined]
        progress=progress,
    )
    corpus_vectors = embedder.encode_candidates(beir.corpus, progress=progress)  # type: ignore[attr-defined]
    ranked = search_vectors(query_vectors, corpus_vectors, [c.did for c in beir.corpus], 100, factory).ids
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


def limit_corpus(
    corpus: list[Candidate], qrels: dict[str, dict[str, int]], limit: int, seed: int = 0
) -> list[Candidate]:
    """Every judged document plus a seeded sample of the rest, `limit` in all, in corpus order."""
    judged = {did for per_query in qrels.values() for did in per_query}
    if len(judged) > limit:
        raise InputError(None, f"corpus_limit {limit} is below the {len(judged)} judged documents")
    others = [c.did for c in corpus if c.did not in judged]
    kept = judged | set(random.Random(seed).sample(others, min(len(others), limit - len(judged))))
    return [c for c in corpus if c.did in kept]


def evaluate_captions(
    embedder: object,
    captions: str | Path,
    split: str = "test",
    image_root: str | Path | None = None,
    text_instruction: str | None = None,
    image_instruction: str | None = None,
    ks: tuple[int, ...] = (1, 5, 10),
    progress: bool = True,
    hits_at: int | None = None,
) -> dict[str, Any]:
    """Caption -> image and image -> caption recall@k (hit rate, percent) over one score matrix.

    `captions` is a csv `image,caption` (several captions per image); `split` keeps the images of one
    held split (by a stable hash of the image name, as in training) or `all`. With `hits_at` = k the
    result also holds `text_to_image_hits@k`: each caption's hit (1) or miss (0) at k, images sorted by
    name and captions in file order, which is what a paired comparison of two models needs.
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
        label="captions",
    )
    image_vectors = embedder.encode_queries(
        [Query(qid=i, image=root / i) for i in images],  # type: ignore[attr-defined]
        instruction=image_instruction,
        progress=progress,
        label="photos",
    )
    scores = text_vectors @ image_vectors.T  # (T, I): one matrix serves both directions
    top_images = top_k(scores, max(*ks, hits_at or 0))
    top_texts = top_k(scores.T, max(ks))
    t2i = {str(t): [images[j] for j in row] for t, row in enumerate(top_images)}
    t2i_relevant = {str(t): {image} for t, (image, _) in enumerate(texts)}
    i2t = {image: [str(j) for j in top_texts[i]] for i, image in enumerate(images)}
    i2t_relevant = {
        image: {str(t) for t, (owner, _) in enumerate(texts) if owner == image} for image in images
    }
    result: dict[str, Any] = {}
    for k in ks:
        result[f"text_to_image_recall@{k}"] = round(100 * recall_at_k(t2i, t2i_relevant, k), 2)
        result[f"image_to_text_recall@{k}"] = round(100 * recall_at_k(i2t, i2t_relevant, k), 2)
    if hits_at is not None:
        result[f"text_to_image_hits@{hits_at}"] = [
            int(image in t2i[str(t)][:hits_at]) for t, (image, _) in enumerate(texts)
        ]
    result["captions"], result["images"] = len(texts), len(images)
    return result


def evaluate_image_classes(
    embedder: object,
    folder: str | Path,
    split: str = "test",
    template: str = "a photo of a {}",
    text_instruction: str | None = None,
    progress: bool = True,
) -> dict[str, float]:
    """Class name -> image retrieval on an image folder `<split>/<class>/*.jpg`, from one score matrix.

    Each class name (hyphens read as spaces) in `template` is a text query over every image of the split:
    mAP over the full ranking and precision@10. Read the other way, each image's best-scoring class name
    is a zero-shot classification: top-1 accuracy, and its mean over classes.
    """
    root = Path(folder) / split
    if not root.is_dir():
        raise InputError(root, "image folder split not found")
    classes = sorted(d.name for d in root.iterdir() if d.is_dir())
    images = [(c, p) for c in classes for p in sorted((root / c).glob("*.jpg"))]
    if len(classes) < 2 or not images:
        raise InputError(root, "need at least two class folders with .jpg images")
    text_vectors = embedder.encode_queries(  # type: ignore[attr-defined]
        [Query(qid=c, text=template.format(c.replace("-", " "))) for c in classes],
        instruction=text_instruction,
        progress=progress,
    )
    image_vectors = embedder.encode_candidates(  # type: ignore[attr-defined]
        [Candidate(did=str(p), image=p) for _, p in images], progress=progress
    )
    scores = text_vectors @ image_vectors.T  # (C, N)
    owner = np.array([classes.index(c) for c, _ in images])
    relevant = [np.flatnonzero(owner == row).tolist() for row in range(len(classes))]
    top = top_k(scores, 10)
    precisions = [float(np.isin(row, wanted).mean()) for row, wanted in zip(top, relevant, strict=True)]
    predicted = scores.argmax(axis=0)
    per_class = [float((predicted[owner == c] == c).mean()) for c in range(len(classes))]
    return {
        "class_to_image_map": mean_average_precision(scores, relevant, k=len(images)),
        "class_to_image_p@10": round(100 * float(np.mean(precisions)), 2),
        "zero_shot_accuracy": round(100 * float((predicted == owner).mean()), 2),
        "zero_shot_mean_class_accuracy": round(100 * float(np.mean(per_class)), 2),
        "classes": len(classes),
        "images": len(images),
    }


def evaluate_sts(
    embedder: object, path: str | Path, instruction: str | None = None, progress: bool = True
) -> dict[str, float]:
    """Spearman correlation (x100) between the cosine of each sentence pair and its gold score."""
    from scipy.stats import spearmanr

    rows = read_stsb(path)
    if not rows:
        raise InputError(path, "no sentence pairs")
    sentences = sorted({s for a, b, _, _ in rows for s in (a, b)})
    vectors = embedder.encode_queries(  # type: ignore[attr-defined]
        [Query(qid=str(i), text=s) for i, s in enumerate(sentences)],
        instruction=instruction,
        progress=progress,
    )
    position = {s: i for i, s in enumerate(sentences)}
    cosines = [float(vectors[position[a]] @ vectors[position[b]]) for a, b, _, _ in rows]
    correlation = spearmanr(cosines, [score for _, _, score, _ in rows]).statistic
    return {"spearman": round(100 * float(correlation), 2), "pairs": len(rows)}
