"""The Milvus backend on Milvus Lite: the same results as FAISS exact search, index folders that
search and serve like FAISS ones, and clear errors."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("pymilvus")
pytest.importorskip("milvus_lite")

from umarvel.data.io import InputError
from umarvel.retrieval.index import Index, open_index
from umarvel.retrieval.milvus import MilvusIndex


@pytest.fixture(scope="module", autouse=True)
def _stop_milvus_lite():
    """Stop the Milvus Lite servers while pytest's streams are open (their exit hook logs to them)."""
    yield
    from milvus_lite import server_manager_instance

    server_manager_instance.release_all()


def _vectors(n: int, dim: int, seed: int) -> np.ndarray:
    rows = np.random.default_rng(seed).standard_normal((n, dim)).astype(np.float32)
    return rows / np.linalg.norm(rows, axis=1, keepdims=True)


def test_milvus_lite_returns_what_faiss_exact_search_returns(tmp_path: Path) -> None:
    pool, queries = _vectors(300, 16, 0), _vectors(12, 16, 1)
    ids = [f"doc-{i}" for i in range(len(pool))]
    milvus = MilvusIndex(16, str(tmp_path / "v.db"), "pool", fresh=True)
    milvus.add(pool, ids)
    faiss = Index(16)
    faiss.add(pool, ids)
    found, exact = milvus.search(queries, 10), faiss.search(queries, 10)
    assert milvus.size == 300
    assert found.ids == exact.ids
    np.testing.assert_allclose(found.scores, exact.scores, atol=1e-5)


def test_asking_for_more_than_the_collection_holds_returns_what_there_is(tmp_path: Path) -> None:
    milvus = MilvusIndex(4, str(tmp_path / "v.db"), "small", fresh=True)
    milvus.add(_vectors(3, 4, 2), ["a", "b", "c"])
    found = milvus.search(_vectors(1, 4, 3), 10)
    assert sorted(found.ids[0]) == ["a", "b", "c"]


def test_a_repeated_id_is_refused_before_milvus_keeps_two_copies(tmp_path: Path) -> None:
    milvus = MilvusIndex(4, str(tmp_path / "v.db"), "dups", fresh=True)
    milvus.add(_vectors(2, 4, 4), ["a", "b"])
    with pytest.raises(InputError, match="duplicate candidate id b"):
        milvus.add(_vectors(1, 4, 5), ["b"])


@pytest.fixture(scope="module")
def folders(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    from umarvel.config.schema import EmbedderConfig
    from umarvel.pipeline.index import build_index

    root = tmp_path_factory.mktemp("milvus")
    rows = [
        {"did": f"t{i}", "txt": f"a note number {i} about {w}"}
        for i, w in enumerate(["sea", "rain", "kite", "soup", "bird"])
    ]
    (root / "pool.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    config = EmbedderConfig(model="tiny:composed")
    build_index(config, root / "pool.jsonl", root / "faiss", progress=False)
    build_index(config, root / "pool.jsonl", root / "milvus", progress=False, backend="milvus")
    return root / "faiss", root / "milvus"


def test_an_index_folder_on_milvus_searches_like_the_faiss_one(folders: tuple[Path, Path]) -> None:
    from umarvel.pipeline.index import search_index

    faiss_dir, milvus_dir = folders
    assert isinstance(open_index(milvus_dir), MilvusIndex) and isinstance(open_index(faiss_dir), Index)
    assert (milvus_dir / "vectors.db").exists() and not (milvus_dir / "index.faiss").exists()
    for text in ("kite", "a note about soup"):
        a, b = search_index(faiss_dir, text=text, k=5), search_index(milvus_dir, text=text, k=5)
        assert a.ids == b.ids
        np.testing.assert_allclose(a.scores, b.scores, atol=1e-5)


def test_the_server_serves_a_milvus_index(folders: tuple[Path, Path]) -> None:
    pytest.importorskip("fastapi")
    from fastapi.testclient import TestClient

    from umarvel.serve.app import Service, create_app

    client = TestClient(create_app(Service(folders[1])))
    hits = client.post("/search", data={"text": "kite", "k": "3"}).json()["results"]
    assert len(hits) == 3 and hits[0]["text"]
    assert client.get("/health").json()["index_size"] == 5


def test_an_index_record_naming_a_missing_milvus_file_is_an_input_error(
    folders: tuple[Path, Path], tmp_path: Path
) -> None:
    record = json.loads((folders[1] / "index.json").read_text())
    moved = tmp_path / "moved"
    moved.mkdir()
    (moved / "index.json").write_text(json.dumps({**record, "uri": "gone.db"}))
    with pytest.raises(InputError, match=r"gone\.db"):
        open_index(moved)


def test_the_index_command_builds_a_milvus_folder(tmp_path: Path) -> None:
    from typer.testing import CliRunner

    from umarvel.cli import app

    (tmp_path / "pool.jsonl").write_text('{"did": "a", "txt": "hello"}\n{"did": "b", "txt": "world"}\n')
    out = tmp_path / "idx"
    result = CliRunner().invoke(
        app,
        [
            "index",
            "--model",
            "tiny:composed",
            "--pool",
            str(tmp_path / "pool.jsonl"),
            "--out",
            str(out),
            "--backend",
            "milvus",
        ],
    )
    assert result.exit_code == 0, result.output
    assert json.loads((out / "index.json").read_text())["backend"] == "milvus"
    assert open_index(out).size == 2
