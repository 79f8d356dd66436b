"""Backbone registry: one entry per multimodal LLM family, and loading of any model name we accept.

A model name is `offline` (the composed EfficientNet-Lite0 + SmolLM2 backbone), `tiny:<family>`
(random weights, for tests), a checkpoint folder written by umarvel, or a hub id / local folder of a
registered family.
"""

from __future__ import annotations

import dataclasses
import hashlib
import importlib
import json
import logging
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import transformers
from packaging.version import Version
from torch import nn

from umarvel.config.digest import folder_digest
from umarvel.config.schema import fields_with_role
from umarvel.errors import UserError

logger = logging.getLogger(__name__)

CHECKPOINT_FILE = "umarvel_backbone.json"


@dataclass(frozen=True)
class BackboneSpec:
    """What umarvel needs to know about one family.

    Attributes:
        family: registry key, also accepted as `tiny:<family>`.
        model_types: transformers `model_type` values that map to this family.
        model_class: import path of the base model (no LM head) used for embedding.
        processor_class: import path of the processor.
        hub_ids: known checkpoints, largest last.
        vision_module / projector_module / language_module: submodule names inside the base model;
            they drive freezing and LoRA targets.
        min_transformers: oldest transformers release whose classes we tested.
        bidirectional_validated: whether `set_attention_mode` is covered by tests for this family.
        nested_images: the processor wants one image list per sample rather than a flat list.
        native_video: the processor and model take video input (else a video is fed as its frames).
        tiny: import path of a builder returning (model, processor) with random tiny weights.
        fp32_modules: submodules kept in float32 whatever the model dtype (small, precision-sensitive).
        lora_targets: names of the language model's linear layers that get LoRA adapters.
    """

    family: str
    model_types: tuple[str, ...]
    model_class: str
    processor_class: str
    hub_ids: tuple[str, ...]
    vision_module: str
    projector_module: str
    language_module: str
    min_transformers: str
    bidirectional_validated: bool
    nested_images: bool
    tiny: str
    fp32_modules: tuple[str, ...] = ()
    native_video: bool = False
    lora_targets: tuple[str, ...] = (
        "q_proj",
        "k_proj",
        "v_proj",
        "o_proj",
        "gate_proj",
        "up_proj",
        "down_proj",
    )

    def lora_target_regex(self) -> str:
        """A regex (PEFT full match) for the LoRA layers: only inside the language model, never the
        vision tower (the official Qwen3-VL runs put LoRA on ViT layers by a substring rule)."""
        names = "|".join(self.lora_targets)
        language = re.escape(self.language_module)
        return rf"(.*\.)?{language}\..*\.({names})"


REGISTRY: dict[str, BackboneSpec] = {
    spec.family: spec
    for spec in (
        BackboneSpec(
            family="qwen2_vl",
            model_types=("qwen2_vl",),
            model_class="transformers.Qwen2VLModel",
            processor_class="transformers.Qwen2VLProcessor",
            hub_ids=("Qwen/Qwen2-VL-2B-Instruct", "Qwen/Qwen2-VL-7B-Instruct"),
            vision_module="visual",
            projector_module="visual.merger",
            language_module="language_model",
            min_transformers="5.0",
            bidirectional_validated=True,
            nested_images=False,
            tiny="umarvel.modeling.tiny:build_tiny_qwen2_vl",
            native_video=True,
        ),
        BackboneSpec(
            family="qwen2_5_vl",
            model_types=("qwen2_5_vl",),
            model_class="transformers.Qwen2_5_VLModel",
            processor_class="transformers.Qwen2_5_VLProcessor",
            hub_ids=("Qwen/Qwen2.5-VL-3B-Instruct", "Qwen/Qwen2.5-VL-7B-Instruct"),
            vision_module="visual",
            projector_module="visual.merger",
            language_module="language_model",
            min_transformers="5.0",
            bidirectional_validated=True,
            nested_images=False,
            tiny="umarvel.modeling.tiny:build_tiny_qwen2_5_vl",
            native_video=True,
        ),
        BackboneSpec(
            family="qwen3_vl",
            model_types=("qwen3_vl",),
            model_class="transformers.Qwen3VLModel",
            processor_class="transformers.Qwen3VLProcessor",
            hub_ids=("Qwen/Qwen3-VL-2B-Instruct", "Qwen/Qwen3-VL-4B-Instruct", "Qwen/Qwen3-VL-8B-Instruct"),
            vision_module="visual",
            projector_module="visual.merger",
            language_module="language_model",
            min_transformers="5.0",
            bidirectional_validated=True,
            nested_images=False,
            tiny="umarvel.modeling.tiny:build_tiny_qwen3_vl",
            native_video=True,
        ),
        BackboneSpec(
            family="smolvlm",
            model_types=("idefics3",),
            model_class="transformers.Idefics3Model",
            processor_class="transformers.Idefics3Processor",
            hub_ids=(
                "HuggingFaceTB/SmolVLM-256M-Instruct",
                "HuggingFaceTB/SmolVLM-500M-Instruct",
                "HuggingFaceTB/SmolVLM-Instruct",
            ),
            vision_module="vision_model",
            projector_module="connector",
            language_module="text_model",
            min_transformers="5.0",
            bidirectional_validated=True,
            nested_images=True,
            tiny="umarvel.modeling.tiny:build_tiny_smolvlm",
        ),
        BackboneSpec(
            family="composed",
            model_types=("umarvel_composed",),
            model_class="umarvel.modeling.composed.ComposedModel",
            processor_class="umarvel.modeling.composed.ComposedProcessor",
            hub_ids=(),
            vision_module="vision_tower",
            projector_module="projector",
            language_module="language_model",
            min_transformers="5.0",
            bidirectional_validated=True,
            nested_images=False,
            tiny="umarvel.modeling.composed:build_tiny_composed",
            # EfficientNet's BatchNorm and the projector are 4.5 M parameters: bf16 buys nothing there
            # and costs agreement with fp32 embeddings.
            fp32_modules=("vision_tower", "projector"),
        ),
    )
}


def _import(path: str) -> Any:
    module, _, name = path.replace(":", ".").rpartition(".")
    return getattr(importlib.import_module(module), name)


def spec_for_model_type(model_type: str) -> BackboneSpec:
    for spec in REGISTRY.values():
        if model_type in spec.model_types:
            return spec
    known = sorted(t for s in REGISTRY.values() for t in s.model_types)
    raise UserError(f"model_type {model_type!r} is not a registered backbone family (known: {known})")


def get_spec(family: str) -> BackboneSpec:
    if family not in REGISTRY:
        raise UserError(f"unknown backbone family {family!r}; registered: {sorted(REGISTRY)}")
    spec = REGISTRY[family]
    if Version(transformers.__version__) < Version(spec.min_transformers):
        raise UserError(
            f"family {family} needs transformers>={spec.min_transformers}, found {transformers.__version__}"
        )
    return spec


@dataclass
class Backbone:
    """A loaded base model, its processor and its registry entry."""

    model: nn.Module
    processor: Any
    spec: BackboneSpec
    source: str
    # What the weights are: the content digest of a checkpoint folder, else of the weights as built;
    # emptied when training starts (then computed again from the state when asked).
    digest: str = ""
    # The digest of the weights as loaded, kept through training: what a saved checkpoint came from.
    source_digest: str = ""

    @property
    def base_model(self) -> nn.Module:
        """The backbone without a PEFT wrapper, if one was applied for training."""
        unwrap = getattr(self.model, "get_base_model", None)
        return unwrap() if callable(unwrap) else self.model

    @property
    def language_model(self) -> nn.Module:
        return self.base_model.get_submodule(self.spec.language_module)

    def submodule(self, role: str) -> nn.Module:
        """The vision tower, projector or language model by role name."""
        names = {
            "vision": self.spec.vision_module,
            "projector": self.spec.projector_module,
            "language": self.spec.language_module,
        }
        return self.base_model.get_submodule(names[role])

    @property
    def hidden_size(self) -> int:
        config = self.language_model.config
        return int(config.hidden_size)

    def weights_digest(self) -> str:
        """The content digest of the weights: the checkpoint folder's, or (after training in memory,
        before a save) the digest of the current state dict."""
        if not self.digest:
            self.digest = state_digest(self.model)
        return self.digest

    def identity(self, settings: Any) -> dict[str, Any]:
        """What decides this backbone's outputs under `settings` (an embedder's or a re-ranker's
        config): the weights digest, the settings of role `definition`, and the numbers' dtype and
        attention kernel (config/schema.py)."""
        values = dataclasses.asdict(settings)
        dtype = next(self.language_model.parameters()).dtype
        return {
            "weights": self.weights_digest(),
            "definition": {k: values[k] for k in fields_with_role(type(settings), "definition")},
            "numeric": {"dtype": str(dtype).removeprefix("torch."), "attn": self.attention_kernel},
        }

    @property
    def attention_kernel(self) -> str:
        """The attention kernel the model runs (`auto` resolved)."""
        return str(getattr(self.model.config, "_attn_implementation", None) or "sdpa")

    def forward(self, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
        """Last-layer hidden states (B, L, H) for processor outputs `inputs`."""
        return self.model(**inputs, use_cache=False).last_hidden_state

    def save(self, directory: str | Path) -> None:
        """Write the model, its processor and `umarvel_backbone.json` (family, and the source: a model
        name, or the content digest of the checkpoint it was loaded from); the caller records the
        folder's digest once everything it saves is in place."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        self.model.save_pretrained(directory)
        _drop_load_paths(directory / "config.json")
        self.processor.save_pretrained(directory)
        # The source by content, not by path: the same weights saved from two copies of a folder are
        # the same checkpoint.
        source = f"checkpoint sha256:{self.source_digest}" if Path(self.source).is_dir() else self.source
        (directory / CHECKPOINT_FILE).write_text(
            json.dumps({"family": self.spec.family, "source": source}, indent=2)
        )


def _drop_load_paths(config_file: Path) -> None:
    """Remove `_name_or_path` (where each config was loaded from) at every level of a saved config.json:
    the same weights loaded from the GGUF package or from its converted copy in the cache are the same
    checkpoint, so their folders must digest alike."""
    if not config_file.is_file():
        return

    def strip(value: Any) -> Any:
        if isinstance(value, dict):
            return {k: strip(v) for k, v in value.items() if k != "_name_or_path"}
        if isinstance(value, list):
            return [strip(v) for v in value]
        return value

    config = json.loads(config_file.read_text())
    cleaned = strip(config)
    if cleaned != config:
        config_file.write_text(json.dumps(cleaned, indent=2, sort_keys=True) + "\n")


def state_digest(module: nn.Module) -> str:
    """sha256 over a module's state dict: every tensor's name, dtype, shape and bytes, in name order."""
    digest = hashlib.sha256()
    for key, tensor in sorted(module.state_dict().items()):
        tensor = tensor.detach().cpu().contiguous().reshape(-1)
        digest.update(f"{key}\0{tensor.dtype}\0{tuple(tensor.shape)}\n".encode())
        digest.update(tensor.view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def weights_digest(name: str, model: nn.Module) -> str:
    """The digest of the weights `name` refers to: a folder's content digest (cached, so cheap when
    unchanged), a cached hub snapshot's, else the digest of the weights as built (offline, tiny)."""
    path = Path(name)
    if path.is_dir():
        return folder_digest(path)
    if name != "offline" and not name.startswith("tiny:"):
        try:
            from huggingface_hub import snapshot_download

            return folder_digest(snapshot_download(name, local_files_only=True))
        except Exception as error:  # not a cached hub snapshot: fall back to the loaded weights
            logger.debug("no local snapshot for %s (%s); digesting the loaded weights", name, error)
    return state_digest(model)


def _tiny(family: str) -> tuple[nn.Module, Any]:
    builder = _import(get_spec(family).tiny)
    with torch.random.fork_rng():
        torch.manual_seed(0)
        return builder()


def resolve_attention(kernel: str, training: bool = False) -> str:
    """The attention kernel for setting `kernel`: `auto` is eager for training on a CPU (PyTorch's
    fused CPU attention has a slow backward at these short sequences: eager trains the offline
    backbone about 1.35x faster, `benchmarks/train_throughput.py`) and sdpa everywhere else."""
    if kernel != "auto":
        return kernel
    return "eager" if training and not torch.cuda.is_available() else "sdpa"


def load_backbone(
    name: str,
    dtype: torch.dtype = torch.float32,
    attn_implementation: str = "auto",
    visual_tokens: int = 16,
) -> Backbone:
    """Load a backbone by name (see module docstring); weights in `dtype`, the attention kernel as
    `resolve_attention` picks it for inference (training stages resolve `auto` before loading)."""
    attn_implementation = resolve_attention(attn_implementation)
    if name == "offline":
        from umarvel.modeling.composed import build_offline

        model, processor = build_offline(visual_tokens=visual_tokens, attn_implementation=attn_implementation)
        spec = get_spec("composed")
    elif name.startswith("tiny:"):
        spec = get_spec(name.removeprefix("tiny:"))
        model, processor = _tiny(spec.family)
        model.set_attn_implementation(attn_implementation)
    else:
        model, processor, spec = _load_pretrained(name, dtype, attn_implementation)
    # Built weights are digested before the cast, so the digest does not depend on the dtype.
    digest = weights_digest(name, model)
    model = model.to(dtype).eval()
    for module in spec.fp32_modules:
        model.get_submodule(module).float()
    return Backbone(
        model=model, processor=processor, spec=spec, source=name, digest=digest, source_digest=digest
    )


def _load_pretrained(
    name: str, dtype: torch.dtype, attn_implementation: str
) -> tuple[nn.Module, Any, BackboneSpec]:
    from transformers import AutoConfig, AutoProcessor

    path = Path(name)
    if (path / CHECKPOINT_FILE).is_file():
        spec = get_spec(json.loads((path / CHECKPOINT_FILE).read_text())["family"])
    else:
        if path.is_dir() and not (path / "config.json").is_file():
            raise UserError(f"{name}: not a model folder (no config.json or {CHECKPOINT_FILE})")
        if path.exists() and not path.is_dir():
            raise UserError(f"{name}: is a file; give a model folder, a hub id, 'offline' or 'tiny:<family>'")
        if not path.exists() and (name.startswith(("/", "./", "../", "~")) or name.count("/") != 1):
            raise UserError(
                f"model {name!r} is neither 'offline', 'tiny:<family>', an existing folder, nor a hub id "
                "('owner/name')"
            )
        try:
            model_type = AutoConfig.from_pretrained(name).model_type
        except OSError as error:
            raise UserError(
                f"model {name!r}: not a folder here and not found on the hub or in its local cache "
                f"(HF_HUB_OFFLINE={os.environ.get('HF_HUB_OFFLINE', '0')}); download it first "
                f"(`hf download {name}`) or give a checkpoint folder ({str(error).splitlines()[0]})"
            ) from None
        spec = spec_for_model_type(model_type)
    model_class = _import(spec.model_class)
    logger.info("loading %s (%s) in %s with %s attention", name, spec.family, dtype, attn_implementation)
    model = model_class.from_pretrained(name, dtype=dtype, attn_implementation=attn_implementation)
    if spec.family == "composed":
        processor = _import(spec.processor_class).from_pretrained(name)
    else:
        processor = AutoProcessor.from_pretrained(name)
        processor.tokenizer.padding_side = "right"
    return model, processor, spec
