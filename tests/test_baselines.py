"""Baselines: a sentence encoder's embeddings do not depend on the batch; a LiT-style dual encoder's
trained heads learn its training pairs; both refuse what they cannot encode."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from umarvel.data.io import InputError
from umarvel.data.records import Candidate, Query
from umarvel.evaluation.baselines import DualEncoder, ImageFeatures, SentenceEncoder

WORDS = ["a", "dog", "cat", "runs", "sits", "on", "the", "red", "blue", "mat", "grass", "ball"]


@pytest.fixture(scope="module")
def sentence_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny random BERT with a word-level vocabulary, saved like a sentence-transformers folder."""
    from transformers import BertConfig, BertModel, BertTokenizerFast

    folder = tmp_path_factory.mktemp("bert")
    vocabulary = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *WORDS]
    BertTokenizerFast(vocab={w: i for i, w in enumerate(vocabulary)}).save_pretrained(folder)
    torch.manual_seed(0)
    config = BertConfig(
        vocab_size=len(WORDS) + 5,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
    )
    BertModel(config).save_pretrained(folder)
    return folder


def test_a_sentence_embedding_is_normalised_and_independent_of_its_batch(sentence_folder: Path) -> None:
    encoder = SentenceEncoder(sentence_folder, batch_size=4)
    alone = encoder.encode_texts(["a dog runs"])
    mixed = encoder.encode_texts(["the red ball on the blue mat on the grass", "a dog runs", "cat"])
    np.testing.assert_allclose(mixed[1], alone[0], atol=1e-5)
    np.testing.assert_allclose(np.linalg.norm(mixed, axis=1), 1.0, atol=1e-5)
    assert float(mixed[0] @ mixed[1]) < 0.99  # not a constant embedding


def test_the_sentence_encoder_refuses_an_image(sentence_folder: Path) -> None:
    with pytest.raises(InputError, match="text only"):
        SentenceEncoder(sentence_folder).encode_queries([Query(qid="q", image="x.jpg")])


def test_training_the_dual_encoders_heads_lets_each_caption_find_its_own_photo(
    sentence_folder: Path, tmp_path: Path
) -> None:
    import timm

    torch.manual_seed(0)
    rng = np.random.default_rng(0)
    pairs = []
    for i in range(8):
        path = tmp_path / f"{i}.jpg"
        picture = np.zeros((40, 40, 3), dtype="uint8")
        picture[: 5 * (i + 1), :, i % 3] = 255  # distinct bands: random noise looks alike after resizing
        Image.fromarray(picture).save(path)
        pairs.append((" ".join(rng.choice(WORDS, size=4)), path))
    images = ImageFeatures(timm.create_model("resnet10t", pretrained=False, num_classes=0), batch_size=4)
    model = DualEncoder(SentenceEncoder(sentence_folder), images, dim=16)
    report = model.fit(pairs, steps=150, batch_size=8, learning_rate=1e-2)
    texts = model.encode_queries([Query(qid=str(i), text=c) for i, (c, _) in enumerate(pairs)])
    photos = model.encode_candidates([Candidate(did=str(i), image=p) for i, (_, p) in enumerate(pairs)])
    assert report.losses[-1] < report.losses[0] / 2
    assert (np.argmax(texts @ photos.T, axis=1) == np.arange(8)).all()
