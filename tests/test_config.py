"""Recipes and overrides: unknown keys and wrong types fail by name; manifests record provenance."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest

from umarvel.config.io import ConfigError, load_config, save_config
from umarvel.config.manifest import write_manifest
from umarvel.config.schema import RunConfig


def test_a_recipe_lists_only_what_differs_and_overrides_win(tmp_path: Path) -> None:
    recipe = tmp_path / "r.yaml"
    recipe.write_text("embedder:\n  pooling: last_token\n  batch_size: 4\nseed: 7\n")
    config = load_config(recipe, ["embedder.batch_size=8", "embedder.dtype=bfloat16"])
    assert (config.embedder.pooling, config.embedder.batch_size, config.embedder.dtype, config.seed) == (
        "last_token",
        8,
        "bfloat16",
        7,
    )
    assert config.embedder.temperature == 0.05


@pytest.mark.parametrize(
    "overrides,message",
    [
        (["embedder.poolng=mean"], "unknown key embedder.poolng"),
        (["embedder.pooling=max"], r"embedder.pooling: 'max' is not one of"),
        (["embedder.batch_size=many"], "embedder.batch_size: expected an integer"),
        (["embedder.normalize=3"], "embedder.normalize: expected true/false"),
        (["embedder.temperature=2.0"], "temperature"),
        (["seed"], "not of the form key=value"),
    ],
)
def test_bad_keys_and_values_fail_naming_the_key(overrides: list[str], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        load_config(None, overrides)


def test_the_resolved_config_round_trips_through_yaml(tmp_path: Path) -> None:
    config = load_config(None, ["embedder.model=tiny:qwen2_vl"])
    save_config(config, tmp_path / "c.yaml")
    assert load_config(tmp_path / "c.yaml") == config


def test_manifest_records_config_commit_and_input_fingerprints(tmp_path: Path) -> None:
    data = tmp_path / "items.jsonl"
    data.write_text('{"txt": "x"}\n')
    path = write_manifest(tmp_path / "out", "embed", RunConfig(), inputs={"items": data})
    manifest = json.loads(path.read_text())
    assert manifest["command"] == "embed" and manifest["config"]["embedder"]["model"] == "offline"
    assert "git_commit" in manifest
    assert manifest["inputs"]["items"]["sha256"] == hashlib.sha256(data.read_bytes()).hexdigest()


def test_scientific_notation_is_a_number_in_overrides_and_recipes(tmp_path: Path) -> None:
    recipe = tmp_path / "r.yaml"
    recipe.write_text("train:\n  learning_rate: 1e-4\n  temperature_lr: 5E-3\n")
    from_recipe = load_config(recipe)
    from_override = load_config(None, ["train.learning_rate=1e-4", "train.temperature_lr=+5e-3"])
    for config in (from_recipe, from_override):
        assert (config.train.learning_rate, config.train.temperature_lr) == (1e-4, 5e-3)
        assert isinstance(config.train.learning_rate, float)


@pytest.mark.parametrize(
    "override,message",
    [
        ("train.max_steps=1e3", "train.max_steps: expected an integer"),
        ("train.max_steps=1e-4", "train.max_steps: expected an integer"),
        ("train.learning_rate=true", "train.learning_rate: expected a number"),
        ("train.learning_rate=fast", "train.learning_rate: expected a number"),
        ("train.learning_rate=1e-4x", "train.learning_rate: expected a number"),
        ("train.learning_rate=nan", "train.learning_rate: expected a number"),
    ],
)
def test_numbers_in_words_are_only_read_as_floats_and_only_where_a_float_is_wanted(
    override: str, message: str
) -> None:
    with pytest.raises(ConfigError, match=message):
        load_config(None, [override])
