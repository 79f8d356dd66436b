"""BEIR, caption, class-folder and STS harnesses: an embedder that copies the answer scores perfectly;
real data runs."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from tests.conftest import shared_data_or_skip
from umarvel.data.io import InputError
from umarvel.data.records import Candidate
from umarvel.evaluation.suites import (
    evaluate_beir,
    evaluate_captions,
    evaluate_image_classes,
    evaluate_sts,
    limit_corpus,
)


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


def _caption_set(tmp_path: Path, second_caption_names) -> Path:
    """Six 8x8 photos with two captions each, `picture <n> one|two`; photo i's second caption names
    photo `second_caption_names(i)`."""
    (tmp_path / "images").mkdir()
    rows = []
    for i in range(6):
        Image.new("RGB", (8, 8), (i * 40, 0, 0)).save(tmp_path / "images" / f"{i}.jpg")
        rows += [f"{i}.jpg,picture {i} one", f"{i}.jpg,picture {second_caption_names(i)} two"]
    (tmp_path / "c.csv").write_text("image,caption\n" + "\n".join(rows) + "\n")
    return tmp_path / "c.csv"


def _named(item: object) -> str:
    """A photo's key is its name, a caption's the number it names: a retriever that follows them."""
    return Path(str(item.image)).stem if item.image is not None else item.text.split()[1]


def test_caption_retrieval_scores_both_directions_from_one_matrix(tmp_path: Path) -> None:
    captions = _caption_set(tmp_path, lambda i: i)  # every caption names its own photo
    result = evaluate_captions(_LookupEmbedder(_named), captions, split="all", progress=False)
    assert result["text_to_image_recall@1"] == 100.0 and result["image_to_text_recall@1"] == 100.0
    assert (result["captions"], result["images"]) == (12, 6)


def test_each_captions_hit_at_k_is_returned_and_their_mean_is_the_recall(tmp_path: Path) -> None:
    captions = _caption_set(tmp_path, lambda i: i + 1 if i < 2 else i)  # photos 0 and 1: the next one
    embedder = _LookupEmbedder(_named)
    result = evaluate_captions(embedder, captions, split="all", progress=False, hits_at=1)
    assert result["text_to_image_hits@1"] == [1, 0, 1, 0, 1, 1, 1, 1, 1, 1, 1, 1]
    assert result["text_to_image_recall@1"] == round(100 * 10 / 12, 2)


def test_the_real_scifact_test_set_runs_through_the_beir_harness() -> None:
    folder = shared_data_or_skip("scifact")
    title_words = _LookupEmbedder(lambda item: (item.text or "")[:12].lower(), dim=16)
    result = evaluate_beir(title_words, folder, progress=False)
    assert result["queries"] == 300 and result["corpus"] == 5183
    assert 0 <= result["ndcg@10"] <= 100


def test_a_limited_corpus_keeps_every_judged_document_and_has_the_asked_size() -> None:
    corpus = [Candidate(did=f"d{i}", text=f"t{i}") for i in range(50)]
    qrels = {"q1": {"d3": 1, "d40": 1}, "q2": {"d7": 1}}
    kept = limit_corpus(corpus, qrels, 10, seed=1)
    assert len(kept) == 10 and {"d3", "d7", "d40"} <= {c.did for c in kept}
    assert kept == limit_corpus(corpus, qrels, 10, seed=1)
    with pytest.raises(InputError, match="below the 3 judged"):
        limit_corpus(corpus, qrels, 2)


def _class_folder(root: Path) -> Path:
    for cls in ("t-shirt", "hat", "dress"):
        (root / "test" / cls).mkdir(parents=True)
        for i in range(3):
            Image.new("RGB", (8, 8), (i * 60, 10, 10)).save(root / "test" / cls / f"{cls}{i}.jpg")
    return root


def test_a_retriever_that_knows_each_photos_class_scores_100_on_class_names(tmp_path: Path) -> None:
    def key(item: object) -> str:  # the class folder of an image, or the class named in the text
        if item.image is not None:
            return Path(str(item.image)).parent.name.replace("-", " ")
        return item.text.removeprefix("a photo of a ")

    result = evaluate_image_classes(_LookupEmbedder(key, dim=32), _class_folder(tmp_path), progress=False)
    assert result["class_to_image_map"] == 100.0 and result["zero_shot_accuracy"] == 100.0
    assert (result["classes"], result["images"]) == (3, 9)


def test_sts_spearman_is_100_when_cosines_follow_the_gold_order(tmp_path: Path) -> None:
    gold = [0.5, 4.0, 2.5, 1.0]
    rows = [f"g\tf\t2012\t{i}\t{score}\tbase sentence\tother {i}" for i, score in enumerate(gold)]
    (tmp_path / "sts.csv").write_text("\n".join(rows) + "\n")

    class Scaled:
        """'base sentence' is e1; 'other i' leans towards e1 in proportion to its gold score."""

        def encode_queries(self, items: list, **_: object) -> np.ndarray:
            out = []
            for item in items:
                w = 0.0 if item.text == "base sentence" else gold[int(item.text.split()[1])] / 5
                out.append([1.0, 0.0] if item.text == "base sentence" else [w, np.sqrt(1 - w * w)])
            return np.array(out, dtype=np.float32)

    result = evaluate_sts(Scaled(), tmp_path / "sts.csv", progress=False)
    assert result == {"spearman": 100.0, "pairs": 4}


def test_a_short_sts_row_is_refused_with_its_line(tmp_path: Path) -> None:
    (tmp_path / "sts.csv").write_text("g\tf\t2012\t0\t1.0\tone sentence\n")
    with pytest.raises(InputError, match=r"sts\.csv:1"):
        evaluate_sts(_LookupEmbedder(lambda item: item.text), tmp_path / "sts.csv", progress=False)
