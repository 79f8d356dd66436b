"""Projector pre-alignment (LLaVA stage 1): cached feature maps, the captioning loss, and its training."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from umarvel.modeling.composed import build_tiny_composed
from umarvel.training.alignment import (
    AlignmentConfig,
    CaptionSequences,
    caption_log_likelihoods,
    feature_maps,
    matched_vs_shuffled,
    train_projector,
    visual_tokens,
)


@pytest.fixture
def tiny(tmp_path):
    torch.manual_seed(0)
    model, processor = build_tiny_composed()
    model.config.text_config.tie_word_embeddings = True
    rng = np.random.default_rng(0)
    paths = []
    for i in range(4):
        path = tmp_path / f"{i}.png"
        Image.fromarray((rng.random((48, 48, 3)) * 255).astype("uint8")).save(path)
        paths.append(path)
    return model.eval(), processor, paths


def test_visual_tokens_from_cached_feature_maps_equal_the_models_own_from_pixels(tiny) -> None:
    model, processor, paths = tiny
    maps = feature_maps(model, processor, paths).float()
    images = [Image.open(p).convert("RGB") for p in paths]
    with torch.no_grad():
        direct = model.image_features(processor.pixel_values(images))
        cached = visual_tokens(model, maps)
    torch.testing.assert_close(cached, direct, atol=2e-3, rtol=2e-3)  # the cache holds float16


def test_only_caption_tokens_are_scored_so_longer_captions_have_lower_log_likelihood(tiny) -> None:
    model, processor, paths = tiny
    sequences = CaptionSequences(processor, max_caption_tokens=40)
    tokens = visual_tokens(model, feature_maps(model, processor, paths[:1]).repeat(2, 1, 1, 1))
    with torch.no_grad():
        short, long = caption_log_likelihoods(model, sequences, tokens, ["a dog", "a dog " * 8])
    assert long < short < 0


def test_training_changes_only_the_projector_and_lowers_the_caption_loss(tiny) -> None:
    model, processor, paths = tiny
    sequences = CaptionSequences(processor, max_caption_tokens=40)
    maps = feature_maps(model, processor, paths)
    captions = [["a red square"], ["a blue circle"], ["a green line"], ["a small dot"]]
    before = {k: v.clone() for k, v in model.state_dict().items()}
    config = AlignmentConfig(steps=30, batch_size=4, learning_rate=3e-3)
    losses = train_projector(model, sequences, maps, captions, config)
    assert np.mean(losses[-5:]) < np.mean(losses[:5])
    changed = {k for k, v in model.state_dict().items() if not torch.equal(v, before[k])}
    assert changed and all(k.startswith("projector.") for k in changed)


def test_with_identical_photos_a_caption_is_as_likely_with_its_own_photo_as_with_another(tiny) -> None:
    model, processor, paths = tiny
    sequences = CaptionSequences(processor, max_caption_tokens=40)
    maps = feature_maps(model, processor, paths)
    same = maps[:1].repeat(4, 1, 1, 1)  # four copies of one photo: own and other condition alike
    own, other = matched_vs_shuffled(model, sequences, same, ["a", "b c", "d e f", "g"])
    torch.testing.assert_close(own, other)
    assert own.shape == (4,)


def test_a_one_word_embedding_does_not_depend_on_its_batch_neighbours(tiny) -> None:
    from umarvel.training.alignment import one_word_embeddings

    model, processor, _ = tiny
    alone = one_word_embeddings(model, processor, texts=["a dog"])
    padded = one_word_embeddings(
        model, processor, texts=["a dog", "a much longer caption of a dog in a park"]
    )
    torch.testing.assert_close(padded[:1], alone, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(padded.norm(dim=-1), torch.ones(2))


def test_the_likelihood_matrix_with_reused_photo_prefixes_equals_scoring_each_pair_in_full(tiny) -> None:
    from umarvel.training.alignment import caption_likelihood_matrix

    model, processor, paths = tiny
    sequences = CaptionSequences(processor, max_caption_tokens=40)
    maps = feature_maps(model, processor, paths[:3])
    captions = ["a dog", "a much longer caption of a dog in a park", "red"]
    matrix = caption_likelihood_matrix(model, sequences, maps, captions, batch_size=2)
    tokens = visual_tokens(model, maps)
    with torch.no_grad():
        full = torch.stack(
            [caption_log_likelihoods(model, sequences, tokens[[i] * 3], captions) for i in range(3)]
        )
    assert matrix.shape == (3, 3)
    torch.testing.assert_close(matrix, full, atol=1e-4, rtol=1e-4)
