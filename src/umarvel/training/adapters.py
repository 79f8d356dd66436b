"""What a stage trains: LoRA on the language model, whole modules by role, the temperature."""

from __future__ import annotations

import logging
from typing import Any

import torch

from umarvel.config.schema import LoraSettings, TrainableModule

logger = logging.getLogger(__name__)


def prepare_for_training(
    embedder: Any, lora: LoraSettings, trainable_modules: tuple[TrainableModule, ...], seed: int = 0
) -> None:
    """Freeze the backbone, then open LoRA adapters (or the whole language model when LoRA is off),
    the modules named in `trainable_modules`, and the temperature when it is learnable.

    `embedder` is an `Embedder` or a `Reranker` (anything with `.backbone` and `.model`).

    The adapters are initialised from `seed`, so a run and its resumption start from the same weights.
    """
    backbone = embedder.backbone
    for parameter in backbone.model.parameters():
        parameter.requires_grad = False
    if lora.enabled:
        from peft import LoraConfig, get_peft_model

        config = LoraConfig(
            r=lora.rank,
            lora_alpha=lora.alpha,
            lora_dropout=lora.dropout,
            bias="none",
            target_modules=backbone.spec.lora_target_regex(),
        )
        with torch.random.fork_rng():
            torch.manual_seed(seed)
            backbone.model = get_peft_model(backbone.model, config)
        embedder.model = backbone.model
    else:
        for parameter in backbone.submodule("language").parameters():
            parameter.requires_grad = True
    for role in trainable_modules:
        for parameter in backbone.submodule(role).parameters():
            parameter.requires_grad = True
    if hasattr(embedder, "log_temperature"):
        embedder.log_temperature.requires_grad = embedder.settings.learnable_temperature
    trainable = sum(p.numel() for p in embedder.parameters() if p.requires_grad)
    total = sum(p.numel() for p in embedder.parameters())
    logger.info("trainable parameters: %d of %d (%.2f%%)", trainable, total, 100 * trainable / total)


def merge_adapters(embedder: Any) -> None:
    """Fold LoRA weights into the base weights and drop the PEFT wrapper (no-op without LoRA)."""
    backbone = embedder.backbone
    if hasattr(backbone.model, "merge_and_unload"):
        backbone.model = backbone.model.merge_and_unload()
        embedder.model = backbone.model
