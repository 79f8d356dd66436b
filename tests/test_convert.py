"""The M-BEIR-format benchmark built from ../shared/data."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.conftest import shared_data_or_skip
from umarvel.data.convert import benchmark_rows, build_benchmark
from umarvel.data.mbeir import MBeir, read_queries


@pytest.fixture(scope="module")
def benchmark(tmp_path_factory: pytest.TempPathFactory) -> Path:
    shared = shared_data_or_skip("")
    return build_benchmark(shared, tmp_path_factory.mktemp("bench") / "M-BEIR", max_queries=40)


def test_the_benchmark_covers_seven_of_the_eight_task_types(benchmark: Path) -> None:
    assert {row.task_id for row in benchmark_rows(benchmark)} == {0, 1, 2, 3, 4, 6, 7}


def test_every_row_reads_back_with_resolvable_positives_and_existing_images(benchmark: Path) -> None:
    mbeir = MBeir(benchmark)
    for row in benchmark_rows(benchmark):
        for split in ("val", "test"):
            queries, pool = mbeir.queries(row, split), {c.did: c for c in mbeir.pool(row, split)}
            assert queries and all(any(p in pool for p in q.positives) for q in queries)
            assert all(Path(q.image).is_file() for q in queries if q.image is not None)
            assert all(Path(c.image).is_file() for c in list(pool.values())[:10] if c.image is not None)


def test_global_pools_hold_unique_dids(benchmark: Path) -> None:
    mbeir = MBeir(benchmark)
    for split in ("train", "val", "test"):
        dids = [c.did for c in mbeir.global_pool(split)]
        assert len(dids) == len(set(dids))


def test_no_photo_or_claim_is_in_two_splits(benchmark: Path) -> None:
    mbeir = MBeir(benchmark)
    seen: dict[str, str] = {}
    files = {
        "train": [mbeir.union_train_file()],
        **{s: [mbeir.query_file(r, s) for r in benchmark_rows(benchmark)] for s in ("val", "test")},
    }
    for split, paths in files.items():
        for path in paths:
            for query in read_queries(path):
                key = str(query.image) if query.image is not None else query.text
                assert seen.setdefault(f"{query.qid[0]}|{key}", split) == split


def test_each_global_pool_is_the_union_of_the_local_pools_of_its_split(benchmark: Path) -> None:
    mbeir = MBeir(benchmark)
    for split in ("val", "test"):
        local = {c.did for row in benchmark_rows(benchmark) for c in mbeir.pool(row, split)}
        assert {c.did for c in mbeir.global_pool(split)} == local
