"""Tiny random-weight versions of every backbone family, built offline in a second or two.

They exist so tests, dry runs and `--model tiny:<family>` exercise the real transformers classes
(processor, vision tower, M-RoPE, masks) without downloading a checkpoint.
"""

from __future__ import annotations

import functools
from typing import Any

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

# A small English corpus for the tiny BPE; enough merges that words are not all single bytes.
_CORPUS = [
    "a photo of a cat sitting on a red sofa next to a window",
    "two dogs run across the green grass in the park",
    "find me an everyday image that matches the given caption.",
    "retrieve a wikipedia paragraph that answers this question about the image",
    "a man in a blue shirt rides a bicycle down the street",
    "the woman wears a black dress with long sleeves and a white collar",
    "children play football on the beach at sunset",
    "what is the name of the building shown in the picture?",
    "you are a helpful assistant. summarize the sentence in one word.",
    "instruction query candidate positive negative pool shortlist embedding score",
    "0 1 2 3 4 5 6 7 8 9 , . ! ? ; : ' \" ( ) - _ / \n",
]

QWEN_SPECIAL_TOKENS = (
    "<|endoftext|>",
    "<|im_start|>",
    "<|im_end|>",
    "<|vision_start|>",
    "<|vision_end|>",
    "<|image_pad|>",
    "<|video_pad|>",
)
IDEFICS3_SPECIAL_TOKENS = (
    "<|endoftext|>",
    "<|im_start|>",
    "<end_of_utterance>",
    "<fake_token_around_image>",
    "<image>",
    "<global-img>",
    *(f"<row_{i}_col_{j}>" for i in range(1, 7) for j in range(1, 7)),
)

# Chat templates written for the tiny tokenizers; they render the same structure as the hub
# templates of each family (system turn, role markers, image placeholders before the text).
QWEN_CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if loop.first and message['role'] != 'system' %}"
    "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n{% endif %}"
    "<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}{% for item in message['content'] %}"
    "{% if item['type'] == 'image' %}<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif item['type'] == 'video' %}<|vision_start|><|video_pad|><|vision_end|>"
    "{% elif item['type'] == 'text' %}{{ item['text'] }}{% endif %}"
    "{% endfor %}{% endif %}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
IDEFICS3_CHAT_TEMPLATE = (
    "<|im_start|>{% for message in messages %}"
    "{{ message['role'] | capitalize }}"
    "{% if message['content'][0]['type'] == 'image' %}:{% else %}: {% endif %}"
    "{% for item in message['content'] %}"
    "{% if item['type'] == 'text' %}{{ item['text'] }}{% elif item['type'] == 'image' %}<image>{% endif %}"
    "{% endfor %}<end_of_utterance>\n{% endfor %}"
    "{% if add_generation_prompt %}Assistant:{% endif %}"
)


@functools.lru_cache(maxsize=4)
def _train_bpe(special_tokens: tuple[str, ...], vocab_size: int) -> str:
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=list(special_tokens),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(_CORPUS * 4, trainer=trainer)
    return tokenizer.to_str()


def tiny_tokenizer(
    special_tokens: tuple[str, ...], chat_template: str, pad_token: str, eos_token: str
) -> PreTrainedTokenizerFast:
    """A byte-level BPE tokenizer trained offline on a few sentences, with the family's special tokens."""
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=Tokenizer.from_str(_train_bpe(special_tokens, 400)),
        pad_token=pad_token,
        eos_token=eos_token,
        padding_side="right",
    )
    tokenizer.chat_template = chat_template
    return tokenizer


def _text_config(tokenizer: PreTrainedTokenizerFast, **extra: Any) -> dict[str, Any]:
    return {
        "vocab_size": len(tokenizer),
        "bos_token_id": None,
        "eos_token_id": tokenizer.eos_token_id,
        "pad_token_id": tokenizer.pad_token_id,
        "hidden_size": 64,
        "intermediate_size": 128,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "head_dim": 16,
        "max_position_embeddings": 2048,
        **extra,
    }


def _qwen_tokenizer() -> PreTrainedTokenizerFast:
    return tiny_tokenizer(QWEN_SPECIAL_TOKENS, QWEN_CHAT_TEMPLATE, "<|endoftext|>", "<|im_end|>")


def _qwen_ids(tokenizer: PreTrainedTokenizerFast) -> dict[str, int]:
    ids = tokenizer.convert_tokens_to_ids
    return {
        "image_token_id": ids("<|image_pad|>"),
        "video_token_id": ids("<|video_pad|>"),
        "vision_start_token_id": ids("<|vision_start|>"),
        "vision_end_token_id": ids("<|vision_end|>"),
    }


# Images are capped at 16 merged visual tokens in the tiny Qwen processors: cheap but real.
def _qwen_image_processor_kwargs(patch_size: int, max_visual_tokens: int = 16) -> dict[str, Any]:
    unit = patch_size * 2
    return {
        "patch_size": patch_size,
        "merge_size": 2,
        "temporal_patch_size": 2,
        "size": {"shortest_edge": 4 * unit * unit, "longest_edge": max_visual_tokens * unit * unit},
    }


# transformers class names of each Qwen-VL family: config, model, processor, video processor.
QWEN_CLASSES = {
    "qwen2_vl": ("Qwen2VLConfig", "Qwen2VLModel", "Qwen2VLProcessor", "Qwen2VLVideoProcessor"),
    "qwen2_5_vl": ("Qwen2_5_VLConfig", "Qwen2_5_VLModel", "Qwen2_5_VLProcessor", "Qwen2VLVideoProcessor"),
    "qwen3_vl": ("Qwen3VLConfig", "Qwen3VLModel", "Qwen3VLProcessor", "Qwen3VLVideoProcessor"),
}


def build_qwen_family(
    family: str,
    vision_config: dict[str, Any],
    rope_extra: dict[str, Any] | None = None,
    text_extra: dict[str, Any] | None = None,
    max_visual_tokens: int = 16,
    device: str | torch.device = "cpu",
) -> tuple[torch.nn.Module, Any]:
    """A member of a Qwen-VL `family` (a `QWEN_CLASSES` key) with random weights.

    Tiny by default; `text_extra` / `vision_config` can give it any shape. Weights are random.
    """
    import transformers
    from transformers import Qwen2VLImageProcessor

    config_class, model_class, processor_class, video_class = (
        getattr(transformers, n) for n in QWEN_CLASSES[family]
    )
    tokenizer = _qwen_tokenizer()
    rope = {"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [2, 3, 3], **(rope_extra or {})}
    common_vision = {"spatial_merge_size": 2, "temporal_patch_size": 2, "num_heads": 2}
    config = config_class(
        text_config=_text_config(tokenizer, rope_parameters=rope, **(text_extra or {})),
        vision_config={**common_vision, **vision_config},
        **_qwen_ids(tokenizer),
    )
    kw = _qwen_image_processor_kwargs(vision_config["patch_size"], max_visual_tokens)
    processor = processor_class(
        image_processor=Qwen2VLImageProcessor(**kw),
        video_processor=video_class(**kw),
        tokenizer=tokenizer,
        chat_template=QWEN_CHAT_TEMPLATE,
    )
    with torch.device(device):
        model = model_class(config)
    return model, processor


def build_tiny_qwen2_vl() -> tuple[torch.nn.Module, Any]:
    return build_qwen_family(
        "qwen2_vl",
        {"depth": 1, "embed_dim": 32, "hidden_size": 64, "mlp_ratio": 2, "patch_size": 14},
    )


def build_tiny_qwen2_5_vl() -> tuple[torch.nn.Module, Any]:
    return build_qwen_family(
        "qwen2_5_vl",
        {
            "depth": 2,
            "hidden_size": 32,
            "intermediate_size": 64,
            "out_hidden_size": 64,
            "patch_size": 14,
            "window_size": 56,
            "fullatt_block_indexes": [1],
        },
    )


def build_tiny_qwen3_vl() -> tuple[torch.nn.Module, Any]:
    return build_qwen_family(
        "qwen3_vl",
        {
            "depth": 2,
            "hidden_size": 32,
            "intermediate_size": 64,
            "out_hidden_size": 64,
            "patch_size": 16,
            "num_position_embeddings": 64,
            "deepstack_visual_indexes": [0],
        },
        rope_extra={"mrope_interleaved": True},
    )


def build_tiny_smolvlm() -> tuple[torch.nn.Module, Any]:
    from transformers import Idefics3Config, Idefics3ImageProcessor, Idefics3Model, Idefics3Processor

    tokenizer = tiny_tokenizer(
        IDEFICS3_SPECIAL_TOKENS, IDEFICS3_CHAT_TEMPLATE, "<|endoftext|>", "<end_of_utterance>"
    )
    image_size, patch_size, scale_factor = 64, 16, 2
    config = Idefics3Config(
        text_config={"model_type": "llama", **_text_config(tokenizer)},
        vision_config={
            "hidden_size": 32,
            "intermediate_size": 64,
            "num_hidden_layers": 1,
            "num_attention_heads": 2,
            "image_size": image_size,
            "patch_size": patch_size,
        },
        scale_factor=scale_factor,
        image_token_id=tokenizer.convert_tokens_to_ids("<image>"),
        pad_token_id=tokenizer.pad_token_id,
    )
    processor = Idefics3Processor(
        image_processor=Idefics3ImageProcessor(
            do_image_splitting=False,
            size={"longest_edge": image_size},
            max_image_size={"longest_edge": image_size},
        ),
        tokenizer=tokenizer,
        image_seq_len=(image_size // patch_size) ** 2 // scale_factor**2,
        chat_template=IDEFICS3_CHAT_TEMPLATE,
    )
    return Idefics3Model(config), processor
