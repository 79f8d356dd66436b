"""Records -> backbone inputs plus an explicit boolean `pooling_mask`.

Every item is rendered with the backbone's own chat template as a single user turn: images first, then
the text, where a query's text is `format_string(f"{instruction} {text}")` (M-BEIR protocol). No
generation prompt and no assistant turn are added, in training and at inference alike.

Pooling mask: every non-padding token, template tokens (and the system prompt, where kept) included
(as in the paper's code), except the instruction span when instruction masking is on. The instruction
still shapes the other tokens through attention; it is only left out of the average.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from PIL import Image

from umarvel.data.io import InputError
from umarvel.data.text import format_string


def resolve_system_prompt(setting: str, family: str) -> bool:
    """Whether items keep the chat template's default system turn (the `system_prompt` setting): `auto`
    leaves it out for the composed (offline) backbone only."""
    if setting == "auto":
        return family != "composed"
    return setting == "default"


def apply_template(
    processor: Any,
    messages: list[dict[str, Any]],
    system_prompt: bool = True,
    add_generation_prompt: bool = False,
) -> str:
    """The chat template's rendering of `messages`, without its default system turn unless kept.

    Without: the conversation is rendered after an empty system turn, and that turn's own rendering is
    cut off the front, which works for any template that renders the system turn first.
    """

    def render(conversation: list[dict[str, Any]], generation: bool) -> str:
        return processor.apply_chat_template(conversation, tokenize=False, add_generation_prompt=generation)

    if system_prompt:
        return render(messages, add_generation_prompt)
    empty = [{"role": "system", "content": ""}]
    turn = render(empty, False)
    rendered = render(empty + messages, add_generation_prompt)
    if not rendered.startswith(turn):
        raise ValueError(
            "this chat template does not render the system turn first; use system_prompt: default"
        )
    return rendered[len(turn) :]


@dataclass(frozen=True)
class EncodeItem:
    """One thing to embed, with its image already loaded."""

    text: str | None = None
    image: Image.Image | None = None
    instruction: str | None = None
    where: str | None = None  # "file:line" for error messages
    video: tuple[Image.Image, ...] | None = None  # sampled frames, in time order
    images: tuple[Image.Image, ...] = ()  # earlier images of a multi-image query, before `image`

    @property
    def has_media(self) -> bool:
        return self.image is not None or bool(self.video) or bool(self.images)


@dataclass
class EncodedBatch:
    """Backbone inputs (everything the processor returned) and the pooling mask (B, L)."""

    inputs: dict[str, torch.Tensor]
    pooling_mask: torch.Tensor

    def to(self, device: torch.device | str) -> EncodedBatch:
        return EncodedBatch(
            {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in self.inputs.items()},
            self.pooling_mask.to(device),
        )


class ChatCollator:
    """What the embedder's and the re-ranker's collators share: texts composed and cut the same way,
    media in the same placeholder order, one chat turn rendered with the backbone's template, and the
    processor's image and video arguments.

    Args:
        processor: the backbone's processor (a transformers processor or `ComposedProcessor`).
        nested_images: the processor wants one image list per sample (Idefics3 / SmolVLM).
        max_text_tokens: an item's text (instruction included) is cut to this many tokens.
        format_text: apply M-BEIR's `format_string` to texts.
        native_video: the processor takes videos (Qwen-VL); otherwise a video enters as its frames,
            one image placeholder each.
        system_prompt: keep the chat template's default system turn; False renders the item's turn alone.
    """

    def __init__(
        self,
        processor: Any,
        nested_images: bool = False,
        max_text_tokens: int = 480,
        format_text: bool = True,
        native_video: bool = False,
        system_prompt: bool = True,
    ) -> None:
        self.processor = processor
        self.tokenizer = processor.tokenizer
        self.nested_images = nested_images
        self.native_video = native_video
        self.max_text_tokens = max_text_tokens
        self.format_text = format_text
        self.system_prompt = system_prompt

    def joined_text(self, item: EncodeItem, with_instruction: bool = True) -> tuple[str, int]:
        """`format_string(f"{instruction} {text}")`, cut to `max_text_tokens`, and the number of leading
        characters that belong to the instruction."""
        text = (item.text or "").strip()
        instruction = (item.instruction or "").strip() if with_instruction else ""
        joined = f"{instruction} {text}".strip() if instruction else text
        if self.format_text and joined:
            joined = format_string(joined)
        joined = self._truncate(joined)
        return joined, min(len(instruction), len(joined)) if instruction else 0

    def _truncate(self, text: str) -> str:
        ids = self.tokenizer(text, add_special_tokens=False)["input_ids"]
        if len(ids) <= self.max_text_tokens:
            return text
        return self.tokenizer.decode(ids[: self.max_text_tokens])

    def media_content(self, item: EncodeItem) -> list[dict[str, str]]:
        """The item's media placeholders in order: the video (or its frames), earlier images, the image."""
        content: list[dict[str, str]] = []
        if item.video:
            content.extend(
                [{"type": "video"}] if self.native_video else [{"type": "image"}] * len(item.video)
            )
        content.extend([{"type": "image"}] * (len(item.images) + (item.image is not None)))
        return content

    def _images(self, item: EncodeItem) -> list[Image.Image]:
        """The item's images in placeholder order: video frames (when not native) come first."""
        frames = list(item.video) if item.video and not self.native_video else []
        return frames + list(item.images) + ([item.image] if item.image is not None else [])

    def _apply_template(self, messages: list[dict[str, Any]], add_generation_prompt: bool = False) -> str:
        return apply_template(
            self.processor,
            messages,
            system_prompt=self.system_prompt,
            add_generation_prompt=add_generation_prompt,
        )

    def media_arguments(self, groups: Sequence[Sequence[EncodeItem]]) -> dict[str, Any]:
        """The processor's `images` / `videos` arguments for rows made of these items (one group per row)."""
        kwargs: dict[str, Any] = {}
        per_row = [[image for item in group for image in self._images(item)] for group in groups]
        if any(per_row):
            kwargs["images"] = per_row if self.nested_images else [im for ims in per_row for im in ims]
        videos = [list(i.video) for group in groups for i in group if i.video and self.native_video]
        if videos:
            kwargs["videos"] = videos
            kwargs["do_sample_frames"] = False  # frames are already sampled (data/video.py)
        return kwargs


class Collator(ChatCollator):
    """Builds the embedder's backbone inputs for a list of `EncodeItem`s (see `ChatCollator` for the
    shared arguments).

    Args:
        mask_instruction: leave the instruction span out of the pooling mask.
    """

    def __init__(
        self, processor: Any, nested_images: bool = False, mask_instruction: bool = True, **shared: Any
    ) -> None:
        super().__init__(processor, nested_images, **shared)
        self.mask_instruction = mask_instruction

    def compose_text(self, item: EncodeItem) -> tuple[str, int]:
        """The item's text and the number of leading characters that belong to the instruction."""
        if not (item.text or "").strip() and not item.has_media:
            raise InputError(
                item.where,
                "empty item: no text and no image (an instruction alone is not something to retrieve with)",
            )
        return self.joined_text(item)

    def render(self, item: EncodeItem) -> tuple[str, tuple[int, int] | None]:
        """Chat-template text for one item, and the instruction span counted from the string's end."""
        text, instruction_chars = self.compose_text(item)
        content = self.media_content(item)
        if text:
            content.append({"type": "text", "text": text})
        rendered = self._apply_template([{"role": "user", "content": content}])
        if not instruction_chars:
            return rendered, None
        start = rendered.rfind(text)
        if start < 0:
            raise RuntimeError("the chat template altered the item text; cannot locate the instruction")
        # Distances from the end survive the processor's expansion of image placeholders, which all
        # come before the text.
        return rendered, (len(rendered) - start, len(rendered) - start - instruction_chars)

    def __call__(self, items: Sequence[EncodeItem]) -> EncodedBatch:
        rendered, spans = zip(*(self.render(item) for item in items), strict=True)
        kwargs = self.media_arguments([[item] for item in items])
        encoding = self.processor(
            text=list(rendered), padding=True, return_tensors="pt", return_offsets_mapping=True, **kwargs
        )
        offsets = encoding.pop("offset_mapping")  # (B, L, 2)
        attention = encoding["attention_mask"].bool()  # (B, L)
        pooling_mask = attention.clone()
        if self.mask_instruction:
            pooling_mask &= ~self._instruction_mask(offsets, attention, spans)
        return EncodedBatch(dict(encoding), pooling_mask)

    @staticmethod
    def _instruction_mask(
        offsets: torch.Tensor, attention: torch.Tensor, spans: Sequence[tuple[int, int] | None]
    ) -> torch.Tensor:
        mask = torch.zeros_like(attention)
        for row, span in enumerate(spans):
            if span is None:
                continue
            starts, ends = offsets[row, :, 0], offsets[row, :, 1]  # (L,)
            length = int(ends[attention[row]].max())  # characters in the expanded text
            lo, hi = length - span[0], length - span[1]
            mask[row] = attention[row] & (ends > starts) & (starts < hi) & (ends > lo)
        return mask
