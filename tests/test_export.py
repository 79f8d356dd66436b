"""ONNX export of the embedder: the text and image graphs, run with onnxruntime, give PyTorch's
embeddings for new batch sizes, lengths and image counts."""

from __future__ import annotations

from pathlib import Path

import pytest
from PIL import Image

from umarvel.config.io import ConfigError
from umarvel.data.collator import EncodeItem
from umarvel.data.io import InputError


@pytest.fixture(scope="module")
def exported(tmp_path_factory: pytest.TempPathFactory) -> Path:
    pytest.importorskip("onnxruntime")
    pytest.importorskip("onnxscript")
    from umarvel.modeling.export import export_onnx

    out = tmp_path_factory.mktemp("onnx") / "tiny"
    export_onnx("tiny:composed", out)
    return out


@pytest.mark.slow  # two torch.export traces, about 20 s
def test_the_exported_graphs_give_pytorchs_embeddings(exported: Path) -> None:
    from umarvel.modeling.embedder import Embedder
    from umarvel.modeling.export import OnnxEmbedder

    runtime, reference = OnnxEmbedder(exported), Embedder.from_pretrained("tiny:composed", dtype="float32")
    red, blue = Image.new("RGB", (70, 30), (210, 40, 40)), Image.new("RGB", (32, 64), (30, 40, 200))
    batches = [
        [
            EncodeItem(text=t, instruction="Find the image.")
            for t in ("kites", "a long sentence about the sea", "x")
        ],
        [
            EncodeItem(image=blue, text="blue"),
            EncodeItem(image=red),
            EncodeItem(image=red, text="a red square"),
        ],
    ]
    for items in batches:
        ours, theirs = runtime(items), reference.encode_batch(items)[0]
        assert ours.shape == theirs.shape
        assert float((ours * theirs).sum(axis=1).min()) > 0.9999


def test_export_refuses_a_family_other_than_composed(tmp_path: Path) -> None:
    from umarvel.modeling.export import export_onnx

    with pytest.raises(ConfigError, match="composed"):
        export_onnx("tiny:qwen2_vl", tmp_path / "out")


def test_a_folder_without_an_export_record_is_an_input_error(tmp_path: Path) -> None:
    pytest.importorskip("onnxruntime")
    from umarvel.modeling.export import OnnxEmbedder

    with pytest.raises(InputError, match="umarvel_onnx"):
        OnnxEmbedder(tmp_path)
