"""The embedder: normalised rows, batch-independent embeddings, temperature, save/load, input kinds."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from umarvel.data.records import Candidate, Query
from umarvel.modeling.embedder import Embedder

TEXTS = ["a photo of a cat", "two dogs run across the green grass in the park", "a red car", "a tall house"]


def _image(seed: int) -> Image.Image:
    return Image.fromarray((np.random.default_rng(seed).random((48, 64, 3)) * 255).astype("uint8"))


def test_embeddings_are_unit_rows_in_input_order(family: str) -> None:
    embedder = Embedder.from_pretrained(f"tiny:{family}")
    vectors = embedder.encode_candidates([*TEXTS, _image(0)], progress=False)
    assert vectors.shape == (5, embedder.dim) and vectors.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(vectors, axis=1), 1.0, atol=1e-5)
    alone = embedder.encode_candidates([TEXTS[2]], progress=False)
    np.testing.assert_allclose(vectors[2], alone[0], atol=1e-5)


@pytest.mark.parametrize("dtype,tolerance", [("float32", 1e-5), ("bfloat16", 3e-2)])
def test_an_items_embedding_does_not_depend_on_its_batch(family: str, dtype: str, tolerance: float) -> None:
    embedder = Embedder.from_pretrained(f"tiny:{family}", dtype=dtype)
    items = [
        Query(qid=str(i), text=t, image=_image(i) if i % 2 else None, instruction="Find it.")
        for i, t in enumerate(TEXTS)
    ]
    together = embedder.encode_queries(items, batch_size=4, progress=False)
    separately = np.concatenate([embedder.encode_queries([item], progress=False) for item in items])
    np.testing.assert_allclose(together, separately, atol=tolerance)


def test_temperature_starts_at_0_05_and_is_trainable_only_when_asked() -> None:
    learnable = Embedder.from_pretrained("tiny:qwen2_vl")
    fixed = Embedder.from_pretrained("tiny:qwen2_vl", learnable_temperature=False)
    assert math.isclose(float(learnable.temperature.detach()), 0.05, rel_tol=1e-6)
    assert learnable.log_temperature.requires_grad and not fixed.log_temperature.requires_grad


def test_temperature_is_clamped_to_its_bounds() -> None:
    embedder = Embedder.from_pretrained("tiny:qwen2_vl", temperature_min=0.01, temperature_max=0.5)
    with torch.no_grad():
        embedder.log_temperature.fill_(-20.0)
    assert math.isclose(float(embedder.temperature.detach()), 0.01, rel_tol=1e-5)
    with torch.no_grad():
        embedder.log_temperature.fill_(5.0)
    assert math.isclose(float(embedder.temperature.detach()), 0.5, rel_tol=1e-5)


def test_a_saved_embedder_reloads_to_the_same_embeddings(tmp_path: Path, family: str) -> None:
    embedder = Embedder.from_pretrained(f"tiny:{family}", pooling="last_token")
    with torch.no_grad():
        embedder.log_temperature.fill_(math.log(0.07))
    inputs = [TEXTS[0], _image(3)]
    before = embedder.encode_candidates(inputs, progress=False)
    embedder.save_pretrained(tmp_path / "ckpt")
    reloaded = Embedder.from_pretrained(str(tmp_path / "ckpt"))
    assert reloaded.settings.pooling == "last_token"
    assert math.isclose(float(reloaded.temperature.detach()), 0.07, rel_tol=1e-5)
    np.testing.assert_allclose(reloaded.encode_candidates(inputs, progress=False), before, atol=1e-5)


def test_strings_paths_images_dicts_and_records_are_all_accepted(tmp_path: Path) -> None:
    embedder = Embedder.from_pretrained("tiny:qwen2_vl")
    path = tmp_path / "x.png"
    _image(1).save(path)
    mixed = embedder.encode_candidates(
        [
            "a red car",
            path,
            _image(1),
            {"txt": "a red car", "img_path": None},
            Candidate(did="1", text="a red car"),
        ],
        progress=False,
    )
    np.testing.assert_allclose(mixed[0], mixed[3], atol=1e-6)
    np.testing.assert_allclose(mixed[0], mixed[4], atol=1e-6)
    np.testing.assert_allclose(mixed[1], mixed[2], atol=1e-5)


def test_a_query_instruction_changes_the_embedding_but_a_candidate_never_gets_one() -> None:
    embedder = Embedder.from_pretrained("tiny:qwen2_vl")
    plain = embedder.encode_queries(["a red car"], progress=False)
    instructed = embedder.encode_queries(["a red car"], instruction="Find an image.", progress=False)
    candidate = embedder.encode_candidates(["a red car"], progress=False)
    assert not np.allclose(plain, instructed, atol=1e-4)
    np.testing.assert_allclose(plain, candidate, atol=1e-6)


def test_the_composed_image_encoder_stays_float32_when_the_model_is_bf16() -> None:
    embedder = Embedder.from_pretrained("tiny:composed", dtype="bfloat16")
    assert embedder.model.vision_tower.conv_stem.weight.dtype == torch.float32
    assert embedder.model.projector[0].weight.dtype == torch.float32
    assert embedder.backbone.language_model.embed_tokens.weight.dtype == torch.bfloat16
    vectors = embedder.encode_candidates([_image(0), "a red car"], progress=False)
    assert np.isfinite(vectors).all()


def test_a_composed_config_drops_the_gguf_marker_of_its_dequantised_language_model() -> None:
    from umarvel.modeling.composed import ComposedConfig

    config = ComposedConfig(
        text_config={
            "model_type": "llama",
            "hidden_size": 64,
            "quantization_config": {"quant_method": "gguf", "gguf_file": "x.gguf"},
        }
    )
    assert getattr(config.text_config, "quantization_config", None) is None
    assert "quantization_config" not in config.to_dict()["text_config"]


def test_a_token_budget_caps_padded_tokens_per_batch_without_changing_embeddings() -> None:
    from umarvel.data.collator import EncodeItem
    from umarvel.modeling.embedder import _token_estimate

    budgeted = Embedder.from_pretrained("tiny:qwen2_vl", token_budget=120, batch_size=16)
    items = [EncodeItem(text="word " * n) for n in (1, 2, 3, 40, 41, 80)]
    batches = list(budgeted._batches(items, 16))
    assert sorted(i for b in batches for i in b) == list(range(6))
    for batch in batches:
        assert len(batch) == 1 or len(batch) * max(_token_estimate(items[i]) for i in batch) <= 120
    plain = Embedder.from_pretrained("tiny:qwen2_vl")
    texts = [item.text for item in items]
    np.testing.assert_allclose(
        budgeted.encode_candidates(texts, progress=False),
        plain.encode_candidates(texts, progress=False),
        atol=1e-5,
    )


def test_images_decoded_in_loader_workers_give_the_same_embeddings(tmp_path: Path) -> None:
    paths = []
    for i in range(5):
        paths.append(tmp_path / f"{i}.png")
        _image(i).save(paths[-1])
    inline = Embedder.from_pretrained("tiny:qwen2_vl").encode_candidates(paths, progress=False)
    workers = Embedder.from_pretrained("tiny:qwen2_vl", loader_workers=2).encode_candidates(
        paths, progress=False
    )
    np.testing.assert_allclose(workers, inline, atol=1e-6)


def test_auto_dtype_picks_bf16_only_where_the_hardware_has_it(monkeypatch: pytest.MonkeyPatch) -> None:
    from umarvel.modeling import embedder as module

    monkeypatch.setattr(module, "native_bf16", lambda: True)
    assert module.resolve_dtype("auto") == torch.bfloat16
    monkeypatch.setattr(module, "native_bf16", lambda: False)
    assert module.resolve_dtype("auto") == torch.float32
    assert module.resolve_dtype("float16") == torch.float16
