"""Corpus encoding: the cache makes a rerun embed nothing, shards split across ranks, index and search CLI."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from umarvel.cli import app
from umarvel.data.records import Candidate
from umarvel.modeling.embedder import Embedder
from umarvel.retrieval.encode import encode_corpus

ITEMS = [
    Candidate(did=f"d{i}", text=f"candidate number {i} about {w}")
    for i, w in enumerate(["cats", "dogs", "cars", "boats", "trees", "lamps", "hats"])
]


@pytest.fixture(scope="module")
def embedder() -> Embedder:
    return Embedder.from_pretrained("tiny:qwen2_vl")


def test_a_rerun_with_the_cache_embeds_nothing_and_gives_the_same_vectors(
    embedder: Embedder, tmp_path: Path, candidate_encodes: list[int]
) -> None:
    first = np.load(
        encode_corpus(embedder, ITEMS, tmp_path / "a.npy", cache_dir=tmp_path / "cache", progress=False)
    )
    candidate_encodes.clear()
    again = np.load(
        encode_corpus(
            embedder,
            ITEMS[::-1],
            tmp_path / "b.npy",
            cache_dir=tmp_path / "cache",
            shard_size=3,
            progress=False,
        )
    )
    assert candidate_encodes == []
    np.testing.assert_allclose(again, first[::-1])


def test_index_then_search_finds_the_indexed_candidate(tmp_path: Path) -> None:
    pool = tmp_path / "pool.jsonl"
    pool.write_text("".join(json.dumps({"did": c.did, "txt": c.text}) + "\n" for c in ITEMS))
    runner = CliRunner()
    built = runner.invoke(
        app, ["index", "--model", "tiny:qwen2_vl", "--pool", str(pool), "--out", str(tmp_path / "idx")]
    )
    assert built.exit_code == 0, built.output
    found = runner.invoke(app, ["search", str(tmp_path / "idx"), "--text", ITEMS[3].text, "-k", "3"])
    assert found.exit_code == 0, found.output
    assert (
        found.output.index("d3") < found.output.index("d", found.output.index("d3") + 2)
        or "│ 1    │ d3" in found.output
    )
    mismatched = runner.invoke(
        app, ["search", str(tmp_path / "idx"), "--text", "x", "--set", "pooling=last_token"]
    )
    assert mismatched.exit_code == 2 and "another embedding definition" in mismatched.output
    manifest = json.loads((tmp_path / "idx" / "index.json").read_text())
    assert manifest["embedder"]["model"] == "tiny:qwen2_vl" and manifest["size"] == len(ITEMS)


def test_a_finished_output_is_reused_only_for_the_same_items_and_embedder(
    embedder: Embedder, tmp_path: Path, candidate_encodes: list[int]
) -> None:
    output = tmp_path / "out.npy"
    encode_corpus(embedder, ITEMS, output, progress=False)
    candidate_encodes.clear()
    encode_corpus(embedder, ITEMS, output, progress=False)
    assert candidate_encodes == []
    changed = [*ITEMS[:-1], Candidate(did="new", text="something else entirely")]
    np.testing.assert_allclose(
        np.load(encode_corpus(embedder, changed, output, progress=False))[:-1],
        np.load(encode_corpus(embedder, ITEMS[:-1], tmp_path / "x.npy", progress=False)),
        atol=1e-5,
    )
    assert candidate_encodes[0] == len(ITEMS)  # the one shard holding the changed item was redone


@pytest.mark.slow  # torch.compile
def test_compiled_encoding_matches_eager_and_adds_nothing_to_the_state_dict() -> None:
    eager = Embedder.from_pretrained("tiny:qwen2_vl")
    compiled = eager.with_settings(compile=True)
    texts = ["a red bus", "two dogs play in the snow near a fence", "a cat"]
    expected = eager.encode_candidates(texts, progress=False)
    np.testing.assert_allclose(compiled.encode_candidates(texts, progress=False), expected, atol=1e-4)
    assert compiled.state_dict().keys() == eager.state_dict().keys()
    compiled.train()
    assert not compiled._graphs  # training drops the graph that froze the old weights
