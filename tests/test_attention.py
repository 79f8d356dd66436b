"""The attention switch: bidirectional lets early tokens see later ones, under every kernel, padded or not."""

from __future__ import annotations

import pytest
import torch

from umarvel.data.collator import EncodeItem
from umarvel.modeling.attention import attention_mode, set_attention_mode
from umarvel.modeling.embedder import Embedder

KERNELS = ["eager", "sdpa"]


def _first_token_states(embedder: Embedder, last_word: str, padded: bool) -> torch.Tensor:
    items = [EncodeItem(text=f"a photo of a {last_word}")]
    if padded:
        # A longer neighbour forces padding after the item under test.
        items.append(EncodeItem(text="two dogs run across the green grass in the park at sunset today"))
    batch = embedder.collator(items)
    if padded:
        assert not bool(batch.inputs["attention_mask"][0].all()), "the item under test must be padded"
    with torch.no_grad():
        hidden = embedder.backbone.forward(batch.inputs)  # (B, L, H)
    return hidden[0, 0]


@pytest.mark.parametrize("kernel", KERNELS)
@pytest.mark.parametrize("padded", [False, True], ids=["unpadded", "padded"])
def test_bidirectional_mode_lets_the_first_token_see_the_last(family: str, kernel: str, padded: bool) -> None:
    embedder = Embedder.from_pretrained(
        f"tiny:{family}", attn_implementation=kernel, attention="bidirectional"
    )
    assert attention_mode(embedder.backbone.language_model) == "bidirectional"
    a = _first_token_states(embedder, "cat", padded)
    b = _first_token_states(embedder, "dog", padded)
    assert not torch.allclose(a, b, atol=1e-6)


@pytest.mark.parametrize("kernel", KERNELS)
@pytest.mark.parametrize("padded", [False, True], ids=["unpadded", "padded"])
def test_causal_mode_hides_later_tokens_from_the_first(family: str, kernel: str, padded: bool) -> None:
    embedder = Embedder.from_pretrained(f"tiny:{family}", attn_implementation=kernel, attention="causal")
    a = _first_token_states(embedder, "cat", padded)
    b = _first_token_states(embedder, "dog", padded)
    torch.testing.assert_close(a, b)


def test_switching_back_to_causal_restores_the_original_outputs() -> None:
    embedder = Embedder.from_pretrained("tiny:qwen2_vl", attention="causal")
    before = _first_token_states(embedder, "cat", padded=True)
    language_model = embedder.backbone.language_model
    set_attention_mode(language_model, "bidirectional")
    set_attention_mode(language_model, "bidirectional")  # idempotent
    set_attention_mode(language_model, "causal")
    torch.testing.assert_close(_first_token_states(embedder, "cat", padded=True), before)


def test_unknown_attention_mode_is_rejected() -> None:
    embedder = Embedder.from_pretrained("tiny:qwen2_vl")
    with pytest.raises(ValueError, match="attention mode"):
        set_attention_mode(embedder.backbone.language_model, "sideways")  # type: ignore[arg-type]


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("kernel", ["sdpa", "flash_attention_2"])
@pytest.mark.parametrize("padded", [False, True], ids=["unpadded", "padded"])
def test_bidirectional_mode_holds_on_cuda(family: str, kernel: str, padded: bool) -> None:
    if kernel == "flash_attention_2":
        pytest.importorskip("flash_attn")
    embedder = Embedder.from_pretrained(f"tiny:{family}", attn_implementation=kernel, dtype="bfloat16")
    embedder.to("cuda")

    def first(word: str) -> torch.Tensor:
        items = [EncodeItem(text=f"a photo of a {word}")]
        if padded:
            items.append(EncodeItem(text="two dogs run across the green grass in the park at sunset today"))
        batch = embedder.collator(items).to("cuda")
        with torch.no_grad():
            return embedder.backbone.forward(batch.inputs)[0, 0].float()

    assert not torch.allclose(first("cat"), first("dog"), atol=1e-3)
