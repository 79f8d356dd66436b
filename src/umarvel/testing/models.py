"""Random-weight models at published sizes, for throughput and FLOP benchmarks on machines that cannot
download the real checkpoints."""

from __future__ import annotations

from typing import Any

import torch

from umarvel.modeling.tiny import build_qwen_family


def build_random_qwen2_vl_2b(
    device: str | torch.device = "cpu", layers: int = 28, max_visual_tokens: int = 300
) -> tuple[torch.nn.Module, Any]:
    """Qwen2-VL-2B's published shape with random weights and umarvel's small test tokenizer.

    For throughput and FLOP benchmarks on machines that cannot download the real checkpoint: the
    transformer, vision tower and attention are the real sizes (1.5B language-model parameters, a
    675M-parameter ViT); only the vocabulary is small, which the embedder never projects onto.
    `layers` shrinks the language model for smoke runs; images keep at most `max_visual_tokens` merged
    tokens (300 matches umarvel's default `max_image_pixels`).
    """
    vision = {"depth": 32, "embed_dim": 1280, "hidden_size": 1536, "mlp_ratio": 4, "num_heads": 16}
    return build_qwen_family(
        "qwen2_vl",
        {**vision, "patch_size": 14},
        rope_extra={"rope_theta": 1000000.0, "mrope_section": [16, 24, 24]},
        text_extra={
            "hidden_size": 1536,
            "intermediate_size": 8960,
            "num_hidden_layers": layers,
            "num_attention_heads": 12,
            "num_key_value_heads": 2,
            "head_dim": 128,
            "max_position_embeddings": 32768,
        },
        max_visual_tokens=max_visual_tokens,
        device=device,
    )
