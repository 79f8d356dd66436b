"""The embedder: backbone + bidirectional attention + pooling over the pooling mask + L2 norm + temperature.

One class serves every backbone family. `encode_queries` / `encode_candidates` take records, plain
strings (text), `pathlib.Path`s (images), PIL images, or M-BEIR-style dicts.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    ProgressColumn,
    Task,
    TextColumn,
    TimeRemainingColumn,
)
from rich.text import Text
from safetensors.torch import load_file, save_file
from torch import nn
from torch.nn import functional

from umarvel.config.digest import json_digest, record_digests
from umarvel.config.io import apply_override, from_dict
from umarvel.config.manifest import machine
from umarvel.config.schema import EmbedderConfig, fields_with_role
from umarvel.data.collator import Collator, EncodedBatch, EncodeItem, resolve_system_prompt
from umarvel.data.inputs import Encodable, MediaSettings, to_item
from umarvel.modeling.attention import set_attention_mode
from umarvel.modeling.backbones import CHECKPOINT_FILE, Backbone, load_backbone
from umarvel.modeling.pooling import pool

logger = logging.getLogger(__name__)

EMBEDDER_FILE = "umarvel_embedder.json"
TEMPERATURE_FILE = "temperature.safetensors"
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
# What a checkpoint folder keeps of its settings: what its embeddings mean and its learned state.
SAVED_FIELDS = fields_with_role(EmbedderConfig, "definition", "state")


def saved_settings(folder: str | Path) -> dict[str, Any]:
    """The embedding definition and learned state saved in a checkpoint folder ({} for other models)."""
    path = Path(folder) / EMBEDDER_FILE
    if not path.is_file():
        return {}
    return {k: v for k, v in json.loads(path.read_text()).items() if k in SAVED_FIELDS}


def native_bf16() -> bool:
    """Whether this machine computes bf16 natively: a bf16-capable GPU, or a CPU with AMX / AVX512-BF16
    (`config.manifest.machine`, which manifests record)."""
    return machine()["dtype_auto"] == "bfloat16"


def resolve_config(model: str, overrides: Sequence[str] = ()) -> EmbedderConfig:
    """The settings to load `model` with: defaults, then a checkpoint folder's embedding definition and
    learned state (roles `definition` and `state`: pooling, attention, instruction masking, text and
    image budgets, video sampling, temperature), then the `key=value` overrides. Numeric and runtime
    settings (dtype, batch size, ...) are the defaults unless overridden. The Python API
    (`Embedder.from_pretrained`) resolves a folder the same way."""
    values: dict[str, Any] = {}
    for override in overrides:
        apply_override(values, override)
    return from_dict(EmbedderConfig, {**saved_settings(model), **values, "model": model})


def resolve_dtype(name: str) -> torch.dtype:
    if name == "auto":
        return torch.bfloat16 if native_bf16() else torch.float32
    return DTYPES[name]


class Embedder(nn.Module):
    """Maps queries and candidates to L2-normalised vectors; holds the (learnable) temperature.

    Args:
        backbone: a loaded backbone.
        config: embedding settings; the attention mode is applied to the backbone here, in place.
    """

    def __init__(self, backbone: Backbone, config: EmbedderConfig) -> None:
        super().__init__()
        self.settings = config
        self.backbone = backbone
        self.model = backbone.model  # registered so .to(), .parameters() and saving see it
        set_attention_mode(backbone.language_model, config.attention)
        # Shape (1,), not a scalar: DeepSpeed broadcasts parameters as bytes, which a 0-d tensor cannot be.
        self.log_temperature = nn.Parameter(
            torch.tensor([math.log(config.temperature)], dtype=torch.float32),
            requires_grad=config.learnable_temperature,
        )
        # Compiled forwards for inference (`settings.compile`), kept out of the module tree (state dict).
        self._graphs: dict[str, Any] = {}
        self.collator = Collator(
            backbone.processor,
            nested_images=backbone.spec.nested_images,
            native_video=backbone.spec.native_video,
            mask_instruction=config.mask_instruction,
            max_text_tokens=config.max_text_tokens,
            format_text=config.format_text,
            system_prompt=resolve_system_prompt(config.system_prompt, backbone.spec.family),
        )

    @classmethod
    def from_pretrained(cls, model: str, **overrides: Any) -> Embedder:
        """Load `model` (`offline`, `tiny:<family>`, hub id or folder) with config `overrides`.

        A folder saved by `save_pretrained` restores its embedding definition and temperature (the
        settings of roles `definition` and `state`); explicit overrides win. Numeric and runtime settings
        (dtype, batch size, ...) are the defaults unless given.
        """
        path = Path(model)
        config = from_dict(EmbedderConfig, {**saved_settings(path), **overrides, "model": model})
        backbone = load_backbone(
            model,
            dtype=resolve_dtype(config.dtype),
            attn_implementation=config.attn_implementation,
            visual_tokens=config.visual_tokens,
        )
        embedder = cls(backbone, config)
        if (path / TEMPERATURE_FILE).is_file():
            with torch.no_grad():
                saved = load_file(path / TEMPERATURE_FILE)["log_temperature"]
                embedder.log_temperature.copy_(saved.reshape(1))  # checkpoints before 0.1.1 hold a 0-d one
        return embedder

    @classmethod
    def from_config(cls, config: EmbedderConfig) -> Embedder:
        """Load `config.model` with every other setting of `config`."""
        return cls.from_pretrained(
            config.model, **{k: v for k, v in dataclasses.asdict(config).items() if k != "model"}
        )

    def with_settings(self, **changes: Any) -> Embedder:
        """Another embedder over the same backbone with other runtime settings (e.g. `video_frames`);
        this one is left as it is."""
        return Embedder(self.backbone, dataclasses.replace(self.settings, **changes))

    def save_pretrained(self, directory: str | Path) -> None:
        """Write a folder `from_pretrained` restores exactly, and record its content digest
        (`umarvel_digest.json`), which becomes this embedder's weights digest."""
        directory = Path(directory)
        self.backbone.save(directory)
        settings = {k: v for k, v in dataclasses.asdict(self.settings).items() if k in SAVED_FIELDS}
        settings["temperature"] = float(self.temperature.detach())
        (directory / EMBEDDER_FILE).write_text(json.dumps(settings, indent=2))
        save_file({"log_temperature": self.log_temperature.detach().cpu()}, directory / TEMPERATURE_FILE)
        assert (directory / CHECKPOINT_FILE).is_file()
        self.backbone.digest = record_digests(directory)

    # ---- identity --------------------------------------------------------------------------------

    @property
    def weights_digest(self) -> str:
        """The content digest of the weights (`Backbone.weights_digest`)."""
        return self.backbone.weights_digest()

    def identity(self) -> dict[str, Any]:
        """What decides this embedder's vectors: the weights digest, the embedding definition and the
        numbers' dtype and kernel (see the roles in config/schema.py)."""
        return self.backbone.identity(self.settings)

    @property
    def fingerprint(self) -> str:
        """sha256 of `identity()`: the key of every encode output and cache entry of this embedder."""
        return json_digest(self.identity())

    def activation_checkpointing_enable(
        self,
        activation_checkpointing_kwargs: dict | None = None,
        every_n_layers: int = 1,
        offload: bool = False,
    ) -> None:
        """Recompute the backbone's activations in backward (the Trainer calls this)."""
        base = self.backbone.base_model
        base.activation_checkpointing_enable(
            activation_checkpointing_kwargs=activation_checkpointing_kwargs,
            every_n_layers=every_n_layers,
            offload=offload,
        )
        # With frozen embeddings (LoRA), checkpointed blocks need an input that requires grad.
        base.enable_input_require_grads()

    def train(self, mode: bool = True) -> Embedder:
        """Train mode, except a frozen vision tower, which stays in eval mode: its BatchNorm statistics
        must not drift and its dropout must not fire while nothing in it learns."""
        super().train(mode)
        if mode:
            self._graphs.clear()  # a compiled graph holds the weights as constants; training changes them
            self.backbone.digest = ""  # the weights may change: digest them again when asked
        vision = self.backbone.submodule("vision")
        if mode and not any(p.requires_grad for p in vision.parameters()):
            vision.eval()
        return self

    @property
    def config(self) -> Any:
        """The backbone's transformers config, which `Trainer`, accelerate and DeepSpeed read; our
        embedding settings are `settings`."""
        return self.backbone.base_model.config

    @property
    def temperature(self) -> torch.Tensor:
        """exp(log_temperature), clamped to [temperature_min, temperature_max]."""
        low, high = math.log(self.settings.temperature_min), math.log(self.settings.temperature_max)
        return self.log_temperature.clamp(low, high).exp().squeeze(0)

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def dim(self) -> int:
        return self.backbone.hidden_size

    def forward(self, batch: EncodedBatch) -> torch.Tensor:
        """Embeddings (B, H), float32, L2-normalised when `normalize`."""
        hidden = self.backbone.forward(batch.inputs)  # (B, L, H)
        return self._pool(hidden, batch)

    def _pool(self, hidden: torch.Tensor, batch: EncodedBatch) -> torch.Tensor:
        pooled = pool(hidden.float(), batch.pooling_mask, self.settings.pooling)  # (B, H)
        return functional.normalize(pooled, dim=-1) if self.settings.normalize else pooled

    # ---- inference -------------------------------------------------------------------------------

    def to_item(
        self,
        value: Encodable,
        instruction: str | None,
        root: str | Path | None = None,
        where: str | None = None,
    ) -> EncodeItem:
        """Any accepted input as an `EncodeItem` with its media loaded under this embedder's budget
        (`data.inputs.to_item`)."""
        return to_item(value, MediaSettings.of(self.settings), instruction, root=root, where=where)

    @torch.no_grad()
    def encode_items(
        self,
        items: Sequence[Callable[[], EncodeItem]] | Sequence[EncodeItem],
        batch_size: int | None = None,
        progress: bool = True,
        description: str = "encoding",
    ) -> np.ndarray:
        """Embed items in batches (sorted by length to save padding); rows come back in input order."""
        return np.concatenate(
            list(self.iter_encode(items, batch_size, progress, description))
            or [np.zeros((0, self.dim), np.float32)]
        )

    def _batches(self, window: list[EncodeItem], batch_size: int) -> Iterator[list[int]]:
        """Positions of `window` grouped into batches: sorted by estimated tokens, at most `batch_size`
        items and, with a token budget, at most `token_budget` padded tokens per batch."""
        order = sorted(range(len(window)), key=lambda i: _token_estimate(window[i]))
        budget = self.settings.token_budget
        batch: list[int] = []
        for position in order:
            longest = _token_estimate(window[position])  # sorted: the newcomer is the longest
            if batch and (len(batch) >= batch_size or (budget and (len(batch) + 1) * longest > budget)):
                yield batch
                batch = []
            batch.append(position)
        if batch:
            yield batch

    @torch.inference_mode()
    def iter_encode(
        self,
        items: Sequence[Callable[[], EncodeItem]] | Sequence[EncodeItem],
        batch_size: int | None = None,
        progress: bool = True,
        description: str = "encoding",
    ) -> Iterator[np.ndarray]:
        """Yield embeddings (float32, input order) window by window, so callers can checkpoint.

        Items (and their images) are prepared in `loader_workers` DataLoader workers when set.
        """
        batch_size = batch_size or self.settings.batch_size
        window_size = batch_size * 8
        self.eval()
        prepared = _prepare(items, self.settings.loader_workers)
        with _progress(progress) as bar:
            task = bar.add_task(description, total=len(items))
            for start in range(0, len(items), window_size):
                # Within a window of 8 batches, group by length and restore the input order after.
                window = [next(prepared) for _ in range(min(window_size, len(items) - start))]
                out = np.zeros((len(window), self.dim), dtype=np.float32)
                for chosen in self._batches(window, batch_size):
                    batch = self.collator([window[i] for i in chosen]).to(self.device)
                    out[chosen] = self._infer(batch).float().cpu().numpy()
                    bar.advance(task, len(chosen))
                yield out

    @torch.inference_mode()
    def encode_batch(self, items: Sequence[EncodeItem]) -> tuple[np.ndarray, np.ndarray]:
        """One forward pass over `items` as one batch: (N, H) float32 embeddings, and each item's token
        count (the chat template and visual tokens included), as a server answering a request needs."""
        self.eval()
        batch = self.collator(list(items)).to(self.device)
        vectors = self._infer(batch).float().cpu().numpy()
        return vectors, batch.inputs["attention_mask"].sum(dim=1).cpu().numpy()

    def _infer(self, batch: EncodedBatch) -> torch.Tensor:
        """`forward` for encoding; through a compiled graph when `settings.compile`."""
        if not self.settings.compile:
            return self(batch)
        import torch._inductor.config as inductor

        if "encode" not in self._graphs:
            logger.info("compiling the backbone for encoding (one-off, dynamic shapes)")
            self._graphs["encode"] = torch.compile(self.backbone.model, dynamic=True)
        # Freezing folds the (inference-only) weights into the graph, so inductor can pre-pack them for
        # the CPU's matmul kernels; it is read when a graph is compiled, i.e. inside this call.
        with inductor.patch(freezing=True):
            hidden = self._graphs["encode"](**batch.inputs, use_cache=False).last_hidden_state
        return self._pool(hidden, batch)

    def encode_queries(
        self,
        queries: Sequence[Encodable],
        instruction: str | None = None,
        batch_size: int | None = None,
        root: str | Path | None = None,
        progress: bool = True,
        label: str = "queries",
    ) -> np.ndarray:
        """Embed queries; `instruction` applies to those without their own; `label` names the progress
        bar. Returns (N, H) float32."""
        items = [self._lazy(q, instruction, root) for q in queries]
        return self.encode_items(items, batch_size, progress, label)

    def encode_candidates(
        self,
        candidates: Sequence[Encodable],
        batch_size: int | None = None,
        root: str | Path | None = None,
        progress: bool = True,
    ) -> np.ndarray:
        """Embed candidates (never with an instruction). Returns (N, H) float32."""
        items = [self._lazy(c, None, root) for c in candidates]
        return self.encode_items(items, batch_size, progress, "candidates")

    def _lazy(
        self, value: Encodable, instruction: str | None, root: str | Path | None
    ) -> Callable[[], EncodeItem]:
        return lambda: self.to_item(value, instruction, root)


def _token_estimate(item: EncodeItem) -> int:
    """Rough token count: about 3.5 characters a token, plus about one token per 28 x 28 pixels."""
    text = len(item.text or "") + len(item.instruction or "")
    image = item.image.width * item.image.height // 784 if item.image is not None else 0
    video = sum(f.width * f.height // 784 for f in (*(item.video or ()), *item.images))
    return 16 + text * 2 // 7 + image + video


class _Prepared(torch.utils.data.Dataset):
    def __init__(self, items: Sequence[Callable[[], EncodeItem]] | Sequence[EncodeItem]) -> None:
        self.items = items

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index: int) -> EncodeItem:
        item = self.items[index]
        return item() if callable(item) else item


def _prepare(
    items: Sequence[Callable[[], EncodeItem]] | Sequence[EncodeItem], workers: int
) -> Iterator[EncodeItem]:
    """Items in input order, images decoded in `workers` processes (or here, with 0)."""
    dataset = _Prepared(items)
    if workers <= 0:
        return (dataset[i] for i in range(len(dataset)))
    loader = torch.utils.data.DataLoader(dataset, batch_size=None, num_workers=workers, prefetch_factor=8)
    return iter(loader)


class _RateColumn(ProgressColumn):
    def render(self, task: Task) -> Text:
        return Text(f"{task.speed or 0:.1f} items/s")


def _progress(enabled: bool) -> Progress:
    return Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        _RateColumn(),
        TimeRemainingColumn(),
        disable=not enabled,
        transient=False,
    )
