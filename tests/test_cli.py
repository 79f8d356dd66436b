"""`umarvel embed`: rows in input order, clear errors, and resumption after a failure."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

from umarvel.cli import app
from umarvel.config.schema import EmbedderConfig
from umarvel.data.io import InputError
from umarvel.pipeline.embed import embed_file

runner = CliRunner()


def _items(tmp_path: Path, n: int = 5) -> Path:
    Image.new("RGB", (30, 20), (200, 10, 10)).save(tmp_path / "red.png")
    lines = [{"txt": f"item number {i}", "img_path": "red.png" if i % 2 else None} for i in range(n)]
    path = tmp_path / "items.jsonl"
    path.write_text("".join(json.dumps(line) + "\n" for line in lines))
    return path


def test_embed_writes_normalised_rows_in_input_order_and_a_manifest(tmp_path: Path) -> None:
    items = _items(tmp_path)
    result = runner.invoke(
        app,
        [
            "embed",
            "--model",
            "tiny:qwen2_vl",
            "--input",
            str(items),
            "--output",
            str(tmp_path / "out.npy"),
            "--as",
            "query",
            "--instruction",
            "Find it.",
            "--no-progress",
        ],
    )
    assert result.exit_code == 0, result.output
    matrix = np.load(tmp_path / "out.npy")
    assert matrix.shape == (5, 64) and matrix.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(matrix, axis=1), 1.0, atol=1e-5)
    manifest = json.loads((tmp_path / "out.npy.manifest.json").read_text())
    assert manifest["rows"] == 5 and manifest["instruction"] == "Find it."
    assert not (tmp_path / "out.npy.parts").exists()


def test_bad_input_exits_with_an_error_naming_file_and_line(tmp_path: Path) -> None:
    path = tmp_path / "items.jsonl"
    path.write_text('{"txt": "fine"}\n{"txt": null, "img_path": "missing.jpg"}\n')
    result = runner.invoke(
        app,
        ["embed", "--model", "tiny:qwen2_vl", "--input", str(path), "--output", str(tmp_path / "out.npy")],
    )
    assert result.exit_code == 2
    assert "items.jsonl:2: image not found" in " ".join(result.output.split())
    assert not (tmp_path / "out.npy").exists()


def test_an_interrupted_embed_resumes_without_redoing_finished_chunks(
    tmp_path: Path, candidate_encodes: list[int]
) -> None:
    items = tmp_path / "items.jsonl"
    lines = [{"txt": f"item number {i}"} for i in range(4)] + [{"txt": "x", "img_path": "red.png"}] * 2
    items.write_text("".join(json.dumps(line) + "\n" for line in lines))
    (tmp_path / "red.png").write_bytes(b"not an image")  # passes the existence check, fails to decode
    config = EmbedderConfig(model="tiny:qwen2_vl")
    output = tmp_path / "out.npy"
    with pytest.raises(InputError, match="cannot read image"):
        embed_file(items, output, config, chunk_size=4, progress=False)
    assert list((tmp_path / "out.npy.parts").glob("shard-00000-*.npy")) and not output.exists()

    Image.new("RGB", (30, 20), (200, 10, 10)).save(tmp_path / "red.png", format="PNG")
    candidate_encodes.clear()
    embed_file(items, output, config, chunk_size=4, progress=False)
    assert candidate_encodes == [2]  # only the unfinished chunk
    fresh = embed_file(items, tmp_path / "fresh.npy", config, chunk_size=6, progress=False)
    np.testing.assert_allclose(np.load(output), np.load(fresh), atol=1e-5)


def test_backbones_lists_every_family() -> None:
    result = runner.invoke(app, ["backbones"])
    assert result.exit_code == 0
    for family in ("qwen2_vl", "qwen2_5_vl", "qwen3_vl", "smolvlm", "composed"):
        assert family in result.output


def test_make_mini_mbeir_writes_the_tree_and_a_manifest(tmp_path: Path) -> None:
    result = runner.invoke(app, ["make-mini-mbeir", str(tmp_path / "M-BEIR")])
    assert result.exit_code == 0, result.output
    manifest = json.loads((tmp_path / "M-BEIR" / "manifest.json").read_text())
    assert manifest["command"] == "make-mini-mbeir"
    assert (tmp_path / "M-BEIR" / "instructions" / "query_instructions.tsv").is_file()


def test_a_checkpoint_keeps_its_embedding_definition_unless_overridden(tmp_path: Path) -> None:
    from umarvel.cli import _embedder_config
    from umarvel.modeling.embedder import Embedder

    Embedder.from_pretrained("tiny:qwen2_vl", pooling="last_token", dtype="bfloat16").save_pretrained(
        tmp_path / "m"
    )
    config = _embedder_config(str(tmp_path / "m"), None)
    assert config.pooling == "last_token"  # the definition is kept
    assert config.dtype == "float32"  # runtime knobs take the command's defaults
    assert _embedder_config(str(tmp_path / "m"), ["pooling=mean"]).pooling == "mean"
