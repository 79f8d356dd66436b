"""Shared fixtures: tiny random backbones of every family, built offline, and the mini M-BEIR tree."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# Digest caches of the test run stay out of the user's ~/.cache.
os.environ.setdefault("UMARVEL_CACHE_DIR", tempfile.mkdtemp(prefix="umarvel-test-cache-"))

FAMILIES = ["qwen2_vl", "qwen2_5_vl", "qwen3_vl", "smolvlm", "composed"]
SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"


@pytest.fixture(params=FAMILIES)
def family(request: pytest.FixtureRequest) -> str:
    return request.param


@pytest.fixture(scope="session")
def mini_mbeir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from umarvel.data.mini_mbeir import build_mini_mbeir

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
