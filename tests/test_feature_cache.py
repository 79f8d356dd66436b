"""The composed backbone computes a frozen image encoder's features once per distinct image."""

from __future__ import annotations

import pytest
import torch

from umarvel.modeling.composed import build_tiny_composed, clear_feature_cache


def _counting(model):
    """`model.calls`: the number of images of each call of the encoder."""
    calls: list[int] = []
    forward = model.vision_tower.forward_features
    model.vision_tower.forward_features = lambda pixels: calls.append(len(pixels)) or forward(pixels)
    model.calls = calls
    return model


@pytest.fixture
def model():
    clear_feature_cache()
    torch.manual_seed(0)
    model, _ = build_tiny_composed()
    model.eval()
    for parameter in model.vision_tower.parameters():
        parameter.requires_grad_(False)
    return _counting(model)


def _pixels(n: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(n, 3, 64, 64, generator=torch.Generator().manual_seed(seed))


def test_a_frozen_encoder_sees_each_distinct_image_once_and_features_match_uncached(
    model, monkeypatch: pytest.MonkeyPatch
) -> None:
    pixels = _pixels(3)
    repeated = torch.cat([pixels, pixels[:1]])  # the first image twice in one batch
    first = model.image_features(repeated)
    second = model.image_features(pixels)
    assert sum(model.calls) == 3
    monkeypatch.setattr(type(model), "feature_cache_bytes", 0)
    uncached = model.image_features(repeated)
    torch.testing.assert_close(first, uncached)
    torch.testing.assert_close(second, uncached[:3])


def test_an_encoder_in_training_is_never_served_from_the_cache(model) -> None:
    for parameter in model.vision_tower.parameters():
        parameter.requires_grad_(True)
    pixels = _pixels(2)
    model.image_features(pixels)
    model.image_features(pixels)
    assert sum(model.calls) == 4


def test_new_encoder_weights_invalidate_cached_features(model) -> None:
    pixels = _pixels(2)
    before = model.image_features(pixels)
    with torch.no_grad():
        for parameter in model.vision_tower.parameters():
            parameter.mul_(0.5)
    after = model.image_features(pixels)
    assert sum(model.calls) == 4
    assert not torch.allclose(before, after)


def test_features_cached_while_encoding_still_train_the_projector(model) -> None:
    pixels = _pixels(2)
    with torch.inference_mode():
        model.image_features(pixels)  # an evaluation before training fills the cache
    model.image_features(pixels).sum().backward()
    assert sum(model.calls) == 2
    assert model.projector[0].weight.grad is not None and bool(model.projector[0].weight.grad.abs().sum() > 0)


def test_a_trainable_encoder_is_served_from_the_cache_while_no_gradient_is_recorded(model) -> None:
    for parameter in model.vision_tower.parameters():
        parameter.requires_grad_(True)  # as loaded from a checkpoint: every parameter trainable
    pixels = _pixels(2)
    with torch.inference_mode():  # a re-ranking or encoding run
        model.image_features(torch.cat([pixels, pixels]))
        model.image_features(pixels)
    assert sum(model.calls) == 2


def test_a_second_model_with_the_same_frozen_encoder_reuses_the_first_ones_features(model) -> None:
    torch.manual_seed(0)
    twin, _ = build_tiny_composed()  # the same encoder weights, another language model and projector
    twin = _counting(twin.eval())
    pixels = _pixels(2)
    model.image_features(pixels)
    with torch.no_grad():
        twin.image_features(pixels)
    assert sum(model.calls) == 2 and twin.calls == []


def test_a_model_with_other_encoder_weights_does_not_see_the_first_ones_features(model) -> None:
    torch.manual_seed(1)
    other, _ = build_tiny_composed()
    other = _counting(other.eval())
    pixels = _pixels(2)
    model.image_features(pixels)
    with torch.no_grad():
        other.image_features(pixels)
    assert sum(other.calls) == 2


def test_features_computed_under_autocast_are_not_served_outside_it(model, monkeypatch) -> None:
    pixels = _pixels(2)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        model.image_features(pixels)  # a bf16 training step fills the cache with bf16 numbers
    cached = model.image_features(pixels)
    assert sum(model.calls) == 4
    monkeypatch.setattr(type(model), "feature_cache_bytes", 0)
    torch.testing.assert_close(cached, model.image_features(pixels))


def test_an_images_features_do_not_depend_on_the_batch_it_first_came_in(model) -> None:
    pixels = _pixels(4)
    alone = model.pooled_features(pixels[:1])
    clear_feature_cache()
    in_a_batch = model.pooled_features(torch.cat([pixels[2:], pixels[:1]]))
    assert torch.equal(alone[0], in_a_batch[-1])
