"""BEIR and caption harnesses: an embedder that copies the answer scores perfectly; real data runs."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

from tests.conftest import shared_data_or_skip
from umarvel.evaluation.suites import evaluate_beir, evaluate_captions


class _LookupEmbedder:
    """Maps every text/image to a fixed vector by a key function: a perfect or a useless retriever."""

    def __init__(self, key: object, dim: int = 8) -> None:
        self.key, self.dim = key, dim

    def _vector(self, item: object) -> np.ndarray:
        seed = abs(hash(self.key(item))) % 2**32  # type: ignore[operator]
        v = np.random.default_rng(seed).standard_normal(self.dim).astype(np.float32)
        return v / np.linalg.norm(v)

    def encode_queries(self, items: list, **_: object) -> np.ndarray:
        return np.stack([self._vector(i) for i in items])

    encode_candidates = encode_queries


def _beir(tmp_path: Path) -> Path:
    (tmp_path / "qrels").mkdir(parents=True)
    (tmp_path / "corpus.jsonl").write_text(
        "".join(f'{{"_id": "d{i}", "title": "", "text": "topic {i}"}}\n' for i in range(20))
    )
    (tmp_path / "queries_test.jsonl").write_text(
        "".join(f'{{"_id": "q{i}", "text": "topic {i}"}}\n' for i in range(5))
    )
    (tmp_path / "qrels" / "test.tsv").write_text(
        "query-id\tcorpus-id\tscore\n" + "".join(f"q{i}\td{i}\t1\n" for i in range(5))
    )
    return tmp_path


def test_a_retriever_that_matches_texts_exactly_scores_100_on_beir(tmp_path: Path) -> None:
    perfect = _LookupEmbedder(lambda item: item.text.removesuffix(".").lower())
    result = evaluate_beir(perfect, _beir(tmp_path), progress=False)
    assert result["ndcg@10"] == 100.0 and result["mrr@10"] == 100.0 and result["queries"] == 5


def test_caption_retrieval_scores_both_directions_from_one_matrix(tmp_path: Path) -> None:
    (tmp_path / "images").mkdir()
    rows = []
    for i in range(6):
        Image.new("RGB", (8, 8), (i * 40, 0, 0)).save(tmp_path / "images" / f"{i}.jpg")
        rows += [f"{i}.jpg,picture {i} one", f"{i}.jpg,picture {i} two"]
    (tmp_path / "c.csv").write_text("image,caption\n" + "\n".join(rows) + "\n")

    def key(item: object) -> str:  # an image and its captions share a key: a perfect retriever
        return Path(str(item.image)).stem if item.image is not None else item.text.split()[1]

    result = evaluate_captions(_LookupEmbedder(key), tmp_path / "c.csv", split="all", progress=False)
    assert result["text_to_image_recall@1"] == 100.0 and result["image_to_text_recall@1"] == 100.0
    assert (result["captions"], result["images"]) == (12, 6)


def test_the_real_scifact_test_set_runs_through_the_beir_harness() -> None:
    folder = shared_data_or_skip("scifact")
    title_words = _LookupEmbedder(lambda item: (item.text or "")[:12].lower(), dim=16)
    result = evaluate_beir(title_words, folder, progress=False)
    assert result["queries"] == 300 and result["corpus"] == 5183
    assert 0 <= result["ndcg@10"] <= 100
