"""Switch a loaded backbone's language model between causal and bidirectional attention, in place.

No modeling file is copied. Two things must change together (see ARCHITECTURE.md):
1. the mask the language model builds: in bidirectional mode a forward pre-hook turns the 2-D padding
   mask into an explicit 4-D key-padding mask (every token sees every non-pad token), which the model's
   own mask builder passes through unchanged, so eager and sdpa never fall back to a causal mask, with or
   without padding in the batch;
2. `is_causal` on every attention module, which flash-attention and sdpa consult when no mask is given.
"""

from __future__ import annotations

import inspect
from typing import Any, Literal

import torch
from torch import nn
from transformers.masking_utils import create_bidirectional_mask

AttentionMode = Literal["causal", "bidirectional"]

_HOOK_ATTR = "_umarvel_bidirectional_hook"
_MODE_ATTR = "_umarvel_attention_mode"
_ORIGINAL_CAUSAL_ATTR = "_umarvel_original_is_causal"
# Kernels whose mask is a tensor we can build explicitly; flash-attention takes the 2-D padding mask
# and relies on `is_causal=False` alone.
_EXPLICIT_MASK_KERNELS = {"eager", "sdpa", "flex_attention"}


def _bidirectional_pre_hook(
    module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]
) -> tuple[tuple[Any, ...], dict[str, Any]]:
    if args:
        # Bind positional arguments to their names so the mask is found however the model is called.
        names = list(inspect.signature(module.forward).parameters)[: len(args)]
        kwargs = {**dict(zip(names, args, strict=True)), **kwargs}
        args = ()
    mask = kwargs.get("attention_mask")
    if isinstance(mask, dict) or (isinstance(mask, torch.Tensor) and mask.dim() == 4):
        return args, kwargs  # already prepared by the caller
    kernel = module.config._attn_implementation
    if kernel not in _EXPLICIT_MASK_KERNELS:
        return args, kwargs
    embeds = kwargs.get("inputs_embeds")
    if embeds is None:
        embeds = module.get_input_embeddings()(kwargs["input_ids"])
        kwargs = {**kwargs, "inputs_embeds": embeds, "input_ids": None}
    if mask is None:
        mask = torch.ones(embeds.shape[:2], dtype=torch.bool, device=embeds.device)
    full = create_bidirectional_mask(
        config=module.config,
        inputs_embeds=embeds,
        attention_mask=mask,
        allow_is_bidirectional_skip=False,
    )
    return args, {**kwargs, "attention_mask": full}


def _attention_modules(language_model: nn.Module) -> list[nn.Module]:
    return [m for m in language_model.modules() if hasattr(m, "is_causal") and m is not language_model]


def set_attention_mode(language_model: nn.Module, mode: AttentionMode) -> nn.Module:
    """Make `language_model` attend causally or bidirectionally; idempotent, reversible, in place.

    Args:
        language_model: the decoder stack of a backbone (e.g. `Qwen2VLModel.language_model`,
            a `LlamaModel`); use `Backbone.language_model` to find it.
        mode: "causal" restores the model's own behaviour; "bidirectional" lets every token attend to
            every non-padding token of its sequence.

    Returns:
        The same module.
    """
    if mode not in ("causal", "bidirectional"):
        raise ValueError(f"attention mode must be 'causal' or 'bidirectional', got {mode!r}")
    current = getattr(language_model, _MODE_ATTR, "causal")
    if mode == current:
        return language_model
    attention_modules = _attention_modules(language_model)
    if not attention_modules:
        raise ValueError(f"{type(language_model).__name__} has no attention modules with `is_causal`")
    if mode == "bidirectional":
        for module in attention_modules:
            setattr(module, _ORIGINAL_CAUSAL_ATTR, module.is_causal)
            module.is_causal = False
        handle = language_model.register_forward_pre_hook(_bidirectional_pre_hook, with_kwargs=True)
        setattr(language_model, _HOOK_ATTR, handle)
    else:
        for module in attention_modules:
            module.is_causal = getattr(module, _ORIGINAL_CAUSAL_ATTR, True)
        getattr(language_model, _HOOK_ATTR).remove()
        delattr(language_model, _HOOK_ATTR)
    setattr(language_model, _MODE_ATTR, mode)
    return language_model


def attention_mode(language_model: nn.Module) -> AttentionMode:
    """The mode last set by `set_attention_mode` ("causal" for an untouched model)."""
    return getattr(language_model, _MODE_ATTR, "causal")
