"""The collator's pooling mask: padding and the instruction span are off, everything else is on."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from umarvel.data.collator import Collator, EncodeItem
from umarvel.data.io import InputError
from umarvel.modeling.backbones import load_backbone

INSTRUCTION = "Find me an everyday image that matches the given caption."


def _collator(family: str, **kwargs: object) -> Collator:
    backbone = load_backbone(f"tiny:{family}")
    return Collator(backbone.processor, nested_images=backbone.spec.nested_images, **kwargs)  # type: ignore[arg-type]


def _image() -> Image.Image:
    return Image.fromarray((np.random.default_rng(0).random((40, 56, 3)) * 255).astype("uint8"))


@pytest.mark.parametrize("with_image", [False, True], ids=["text", "image+text"])
def test_instruction_tokens_are_exactly_the_masked_ones(family: str, with_image: bool) -> None:
    collator = _collator(family)
    item = EncodeItem(
        text="a photo of a cat", image=_image() if with_image else None, instruction=INSTRUCTION
    )
    batch = collator([item, EncodeItem(text="a much longer neighbour text that forces some padding here")])
    ids, attention = batch.inputs["input_ids"][0], batch.inputs["attention_mask"][0].bool()
    masked = attention & ~batch.pooling_mask[0]
    decoded = collator.tokenizer.decode(ids[masked]).strip()
    assert decoded == INSTRUCTION
    assert "a photo of a cat" in collator.tokenizer.decode(ids[batch.pooling_mask[0]])


def test_padding_is_never_pooled(family: str) -> None:
    collator = _collator(family)
    batch = collator(
        [EncodeItem(text="short"), EncodeItem(text="a much longer text with many more tokens in it")]
    )
    attention = batch.inputs["attention_mask"].bool()
    assert not bool(attention[0].all())
    assert not bool((batch.pooling_mask & ~attention).any())


def test_candidates_without_instruction_pool_every_real_token() -> None:
    collator = _collator("qwen2_vl")
    batch = collator([EncodeItem(text="a red car"), EncodeItem(image=_image())])
    assert bool((batch.pooling_mask == batch.inputs["attention_mask"].bool()).all())


def test_instruction_is_pooled_when_masking_is_off() -> None:
    collator = _collator("qwen2_vl", mask_instruction=False)
    batch = collator([EncodeItem(text="a red car", instruction=INSTRUCTION)])
    assert bool((batch.pooling_mask == batch.inputs["attention_mask"].bool()).all())


def test_image_only_query_masks_the_whole_instruction_text_and_keeps_the_image() -> None:
    collator = _collator("qwen2_vl")
    batch = collator([EncodeItem(image=_image(), instruction=INSTRUCTION)])
    image_id = collator.processor.image_token_id
    image_positions = batch.inputs["input_ids"][0] == image_id
    assert bool(batch.pooling_mask[0][image_positions].all())
    masked = batch.inputs["attention_mask"][0].bool() & ~batch.pooling_mask[0]
    assert collator.tokenizer.decode(batch.inputs["input_ids"][0][masked]).strip() == INSTRUCTION


def test_an_item_with_neither_text_nor_image_is_an_error_naming_its_source() -> None:
    collator = _collator("qwen2_vl")
    with pytest.raises(InputError, match=r"items\.jsonl:7: empty item"):
        collator([EncodeItem(text="   ", instruction=INSTRUCTION, where="items.jsonl:7")])


def test_long_texts_are_cut_to_the_token_limit() -> None:
    collator = _collator("qwen2_vl", max_text_tokens=8)
    short = collator([EncodeItem(text="cat " * 5)])
    long = collator([EncodeItem(text="cat " * 500)])
    assert long.inputs["input_ids"].shape[1] - short.inputs["input_ids"].shape[1] <= 8


@pytest.mark.parametrize("family_name", ["qwen2_vl", "composed"])
def test_without_the_system_prompt_an_item_renders_as_its_user_turn_alone(family_name: str) -> None:
    item = EncodeItem(text="a red car", instruction=INSTRUCTION)
    kept, _ = _collator(family_name).render(item)
    alone, _ = _collator(family_name, system_prompt=False).render(item)
    assert "system" in kept and "system" not in alone
    assert kept.endswith(alone)


def test_without_the_system_prompt_the_instruction_is_still_exactly_the_masked_span() -> None:
    collator = _collator("composed", system_prompt=False)
    batch = collator([EncodeItem(text="a photo of a cat", image=_image(), instruction=INSTRUCTION)])
    ids, attention = batch.inputs["input_ids"][0], batch.inputs["attention_mask"][0].bool()
    assert collator.tokenizer.decode(ids[attention & ~batch.pooling_mask[0]]).strip() == INSTRUCTION


def test_system_prompt_auto_leaves_it_out_for_the_composed_backbone_only() -> None:
    from umarvel.data.collator import resolve_system_prompt

    assert resolve_system_prompt("auto", "composed") is False
    assert resolve_system_prompt("auto", "qwen2_vl") is True
    assert resolve_system_prompt("default", "composed") is True
    assert resolve_system_prompt("none", "qwen2_vl") is False
