"""The quickstart: its shipped data and benchmark, and a smoke run of every stage on a tiny model."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from umarvel.quickstart.benchmark import build_quickstart_benchmark, shipped_data


def test_the_shipped_data_is_small_and_attributed() -> None:
    data = shipped_data()
    photos = list((data / "clothing").rglob("*.jpg"))
    assert len(photos) == 593
    assert sum(p.stat().st_size for p in data.rglob("*") if p.is_file()) < 20 * 1024 * 1024
    assert (
        "CC0" in (data / "ATTRIBUTION.md").read_text()
        and "CC BY 4.0" in (data / "ATTRIBUTION.md").read_text()
    )


def test_the_benchmark_has_three_rows_with_positives_in_their_pools(tmp_path: Path) -> None:
    root = build_quickstart_benchmark(tmp_path / "M-BEIR")
    for name in ("mscoco_task0", "nights_task4", "fashioniq_task7"):
        queries = [json.loads(line) for line in (root / "query" / "test" / f"mbeir_{name}_test.jsonl").open()]
        pool_file = (
            next((root / "cand_pool" / "local").glob(f"mbeir_{name}*test*"))
            if name.startswith("mscoco")
            else (root / "cand_pool" / "local" / f"mbeir_{name}_cand_pool.jsonl")
        )
        pool = {json.loads(line)["did"] for line in pool_file.open()}
        assert queries and all(set(q["pos_cand_list"]) <= pool for q in queries)


@pytest.mark.slow
def test_a_smoke_quickstart_runs_every_stage_and_leaves_a_searchable_index(tmp_path: Path) -> None:
    from umarvel.pipeline.index import search_index
    from umarvel.quickstart.run import run_quickstart

    table = run_quickstart(tmp_path / "qs", "smoke")
    stages = list(table["average"])
    assert stages[:6] == [
        "untrained",
        "A1_text",
        "A2_image_text",
        "A3_mbeir",
        "B_hard_negatives",
        "C_distill",
    ]
    assert stages[6].startswith("C + rerank")
    assert {"R1", "teacher", "mine", "total"} <= set(table["seconds"])
    assert (tmp_path / "qs" / "stages.md").is_file() and (tmp_path / "qs" / "stages.png").is_file()
    found = search_index(tmp_path / "qs" / "index", text="a red dress", k=3)
    assert len(found.ids[0]) == 3
