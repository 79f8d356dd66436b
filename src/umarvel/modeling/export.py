"""ONNX export of the embedder, run with onnxruntime.

`export_onnx` writes two graphs for the composed (offline) backbone. `text.onnx` takes input_ids,
attention_mask and pooling_mask. `image.onnx` also takes pixel_values (n_images, 3, S, S), and covers
images and image + text. Batch, length and image count are dynamic. Each graph maps the collator's
tensors to L2-normalised embeddings: the language model, with the image encoder and projector for
images, then pooling over the pooling mask. The processor is saved beside the graphs, and so is
`umarvel_onnx.json`: the embedder's record and its settings. `OnnxEmbedder` reads such a folder and
embeds `EncodeItem`s with the same collator, so only the network runs in onnxruntime.

The exporter is torch.onnx's dynamo path (`torch.export`, then onnxscript). It needs no second model
definition, and it handles the transformers decoder's masks and rotary embeddings. optimum would need
an export config for our unregistered composed model type. Weights are exported in float32.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch import nn

from umarvel.config.io import ConfigError
from umarvel.data.collator import Collator, EncodedBatch, EncodeItem, resolve_system_prompt
from umarvel.data.io import InputError, write_json
from umarvel.modeling.embedder import Embedder, resolve_config

logger = logging.getLogger(__name__)

TEXT_FILE, IMAGE_FILE, RECORD_FILE = "text.onnx", "image.onnx", "umarvel_onnx.json"
TEXT_INPUTS = ("input_ids", "attention_mask", "pooling_mask")
IMAGE_INPUTS = (*TEXT_INPUTS, "pixel_values")


class _TextGraph(nn.Module):
    """The embedder as a function of the collator's text tensors (what is exported)."""

    def __init__(self, embedder: Embedder) -> None:
        super().__init__()
        self.embedder = embedder

    def forward(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor, pooling_mask: torch.Tensor
    ) -> torch.Tensor:
        return self.embedder(
            EncodedBatch({"input_ids": input_ids, "attention_mask": attention_mask}, pooling_mask)
        )


class _ImageGraph(nn.Module):
    """The same with the images' pixel values (n_images, 3, S, S)."""

    def __init__(self, embedder: Embedder) -> None:
        super().__init__()
        self.embedder = embedder

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        pooling_mask: torch.Tensor,
        pixel_values: torch.Tensor,
    ) -> torch.Tensor:
        inputs = {"input_ids": input_ids, "attention_mask": attention_mask, "pixel_values": pixel_values}
        return self.embedder(EncodedBatch(inputs, pooling_mask))


def _arrays(batch: EncodedBatch, names: Sequence[str]) -> tuple[torch.Tensor, ...]:
    values = {**batch.inputs, "pooling_mask": batch.pooling_mask}
    return tuple(values[name] for name in names)


def _samples(with_images: bool) -> list[EncodeItem]:
    """Two items of different lengths (and images of different shapes), so no size is traced as fixed."""
    if not with_images:
        return [
            EncodeItem(text="a dog on the grass"),
            EncodeItem(text="two children play in the sea at dusk"),
        ]
    red, blue = Image.new("RGB", (60, 40), (200, 30, 30)), Image.new("RGB", (50, 50), (20, 30, 200))
    return [EncodeItem(image=red, text="a red thing"), EncodeItem(image=blue)]


def _export(embedder: Embedder, names: Sequence[str], path: Path, with_images: bool) -> None:
    batch = embedder.collator(_samples(with_images))
    dynamic: dict[str, dict[int, str]] = {name: {0: "batch", 1: "length"} for name in TEXT_INPUTS}
    if with_images:
        dynamic["pixel_values"] = {0: "images"}
    graph = _ImageGraph(embedder) if with_images else _TextGraph(embedder)
    with torch.no_grad():
        program = torch.onnx.export(
            graph,
            _arrays(batch, names),
            input_names=list(names),
            output_names=["vectors"],  # "embedding" would clash with a node name inside the graph
            dynamic_shapes={name: dynamic[name] for name in names},
            dynamo=True,
        )
    program.save(str(path))


def export_onnx(model: str, out: str | Path, overrides: Sequence[str] = ()) -> dict[str, Any]:
    """Export `model` (offline, tiny:composed, or a composed checkpoint) with embedder `overrides`
    (`key=value`) to `out`, in float32; returns the record written to `umarvel_onnx.json`."""
    config = dataclasses.replace(resolve_config(model, overrides), dtype="float32")
    embedder = Embedder.from_config(config)
    family = embedder.backbone.spec.family
    if family != "composed":
        raise ConfigError(
            f"ONNX export covers the composed (offline) backbone; {model!r} is {family}. Hub families keep "
            "their PyTorch path (their vision towers take variable-length patch sequences)."
        )
    embedder.eval()
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    seconds = {}
    for path, names, images in ((TEXT_FILE, TEXT_INPUTS, False), (IMAGE_FILE, IMAGE_INPUTS, True)):
        tick = time.perf_counter()
        _export(embedder, names, out / path, images)
        seconds[path] = round(time.perf_counter() - tick, 1)
    embedder.backbone.processor.save_pretrained(out)
    record = {
        "model": model,
        "family": family,
        "graphs": {TEXT_FILE: list(TEXT_INPUTS), IMAGE_FILE: list(IMAGE_INPUTS)},
        "output": "vectors",
        "dim": embedder.dim,
        "identity": embedder.identity(),
        "settings": {
            "mask_instruction": embedder.settings.mask_instruction,
            "max_text_tokens": embedder.settings.max_text_tokens,
            "format_text": embedder.settings.format_text,
            "system_prompt": embedder.settings.system_prompt,
            "max_image_pixels": embedder.settings.max_image_pixels,
            "visual_tokens": embedder.settings.visual_tokens,
        },
        "export_seconds": seconds,
        "torch": torch.__version__,
    }
    write_json(out / RECORD_FILE, record)
    return record


class OnnxEmbedder:
    """Embeds `EncodeItem`s with an exported folder: umarvel's collator builds the tensors, and
    onnxruntime runs `text.onnx` for text-only batches and `image.onnx` for batches with images."""

    def __init__(self, folder: str | Path, threads: int | None = None) -> None:
        import onnxruntime as ort

        from umarvel.modeling.composed import ComposedProcessor

        folder = Path(folder)
        if not (folder / RECORD_FILE).is_file():
            raise InputError(folder, f"not an ONNX export folder: {RECORD_FILE} is missing")
        self.record = json.loads((folder / RECORD_FILE).read_text())
        settings = self.record["settings"]
        self.collator = Collator(
            ComposedProcessor.from_pretrained(folder),
            mask_instruction=settings["mask_instruction"],
            max_text_tokens=settings["max_text_tokens"],
            format_text=settings["format_text"],
            system_prompt=resolve_system_prompt(settings["system_prompt"], "composed"),
        )
        options = ort.SessionOptions()
        if threads:
            options.intra_op_num_threads = threads
        self.sessions = {
            name: ort.InferenceSession(str(folder / name), options, providers=["CPUExecutionProvider"])
            for name in (TEXT_FILE, IMAGE_FILE)
        }

    def __call__(self, items: Sequence[EncodeItem]) -> np.ndarray:
        """(N, dim) float32 embeddings of `items`, in one batch."""
        batch = self.collator(list(items))
        images = "pixel_values" in batch.inputs
        name, names = (IMAGE_FILE, IMAGE_INPUTS) if images else (TEXT_FILE, TEXT_INPUTS)
        feeds = {n: t.numpy() for n, t in zip(names, _arrays(batch, names), strict=True)}
        return self.sessions[name].run(None, feeds)[0]
