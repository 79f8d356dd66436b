"""Shared fixtures: tiny random backbones of every family, built offline, and the mini M-BEIR tree.

Tiers: tests marked `slow` (and every `real_backbone` or `multiprocess` test, marked here) are left out
of the default run (`addopts` in pyproject.toml) and run by `make test-slow`, CI's second step.
"""

from __future__ import annotations

import copy
import functools
import os
import tempfile
from pathlib import Path
from typing import Any

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# Digest caches of the test run stay out of the user's ~/.cache.
os.environ.setdefault("UMARVEL_CACHE_DIR", tempfile.mkdtemp(prefix="umarvel-test-cache-"))

SLOW_MARKERS = ("real_backbone", "multiprocess")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    for item in items:
        if any(item.get_closest_marker(name) for name in SLOW_MARKERS):
            item.add_marker(pytest.mark.slow)


def _session_tiny_models() -> None:
    """Each `tiny:<family>` model is built once per test session; every load gets a fresh deep copy
    (weights, processor and all), so no test sees another's changes."""
    from umarvel.modeling import backbones

    built = functools.cache(backbones._tiny)

    def fresh(family: str) -> tuple[Any, Any]:
        model, processor = built(family)
        return copy.deepcopy(model), copy.deepcopy(processor)

    backbones._tiny = fresh


_session_tiny_models()

FAMILIES = ["qwen2_vl", "qwen2_5_vl", "qwen3_vl", "smolvlm", "composed"]
SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"


@pytest.fixture(params=FAMILIES)
def family(request: pytest.FixtureRequest) -> str:
    return request.param


@pytest.fixture(scope="session")
def mini_mbeir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from umarvel.testing.mbeir import build_mini_mbeir

    return build_mini_mbeir(tmp_path_factory.mktemp("mini") / "M-BEIR")


@pytest.fixture
def candidate_encodes(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """Records the size of every `Embedder.encode_candidates` call made during the test."""
    from umarvel.modeling.embedder import Embedder

    calls: list[int] = []
    original = Embedder.encode_candidates

    def counting(self: Embedder, candidates: list, **kwargs: object) -> object:
        calls.append(len(candidates))
        return original(self, candidates, **kwargs)

    monkeypatch.setattr(Embedder, "encode_candidates", counting)
    return calls


def shared_data_or_skip(name: str) -> Path:
    path = SHARED_DATA / name
    if not path.exists():
        pytest.skip(f"real data folder {path} is absent (it lives in ../shared/data beside the repo)")
    return path
