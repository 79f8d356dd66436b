"""Bootstrap confidence intervals for the M-BEIR table: what they cover and how they are written."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from umarvel.evaluation.metrics import bootstrap_interval, hits_at_k


def test_the_interval_contains_the_observed_average_and_is_reproducible() -> None:
    rng = np.random.default_rng(1)
    rows = [rng.integers(0, 2, size=n).tolist() for n in (30, 50, 80)]
    average = 100 * np.mean([np.mean(r) for r in rows])
    low, high = bootstrap_interval(rows)
    assert low < average < high
    assert bootstrap_interval(rows) == (low, high)


def test_the_interval_narrows_as_the_test_set_grows() -> None:
    small, large = [1, 0] * 20, [1, 0] * 2000
    width = [(lambda lo_hi: lo_hi[1] - lo_hi[0])(bootstrap_interval([v])) for v in (small, large)]
    assert width[1] < width[0] / 5


def test_a_40_query_row_at_50_percent_spans_about_thirty_points() -> None:
    low, high = bootstrap_interval([[1, 0] * 20])
    assert 25 < high - low < 36  # the binomial 95% interval: +-1.96 * sqrt(.25 / 40) = +-15.5 points


def test_hits_are_one_per_judged_query_in_order() -> None:
    ranking = {"q1": ["a", "b"], "q2": ["c"], "q3": ["x", "y", "z"]}
    assert hits_at_k(ranking, {"q2": {"c"}, "q1": {"b"}, "q3": {"z"}}, k=2) == [1, 1, 0]


def test_results_json_carries_an_interval_per_row_and_for_the_averages(
    mini_mbeir: Path, tmp_path: Path
) -> None:
    from umarvel.evaluation.mbeir import evaluate_mbeir
    from umarvel.modeling.embedder import Embedder

    evaluate_mbeir(Embedder.from_pretrained("tiny:qwen2_vl"), mini_mbeir, tmp_path, progress=False)
    results = json.loads((tmp_path / "results.json").read_text())
    for row in results["rows"]:
        low, high = row["interval"]["local"]
        assert low <= row["local"] <= high and row["queries"] > 0
    low, high = results["interval"]["global"]
    assert low <= results["average"]["global"] <= high
    assert "95% CI" in (tmp_path / "results.md").read_text()


def test_an_empty_group_list_is_an_error() -> None:
    with pytest.raises(ValueError, match="no values"):
        bootstrap_interval([[]])


def _result(hits: dict[str, list[int]]) -> dict:
    rows = []
    for name, values in hits.items():
        dataset, task = name.split("_task")
        rows.append({"dataset": dataset, "task_id": int(task), "hits": {"local": values, "global": None}})
    return {"rows": rows}


def test_pairing_makes_a_small_consistent_gain_significant_where_two_separate_intervals_overlap() -> None:
    # B hits the same queries as A plus 8 more of 100: A's and B's own intervals overlap, the paired
    # difference (+8 on every resample that keeps any of those queries) excludes 0.
    from umarvel.evaluation.mbeir import paired_difference

    rng = np.random.default_rng(0)
    base = (rng.random(100) < 0.5).astype(int)
    better = base.copy()
    better[np.flatnonzero(base == 0)[:8]] = 1
    a, b = _result({"mscoco_task0": better.tolist()}), _result({"mscoco_task0": base.tolist()})
    step = paired_difference(a, b, "local")
    assert step["difference"] == pytest.approx(8.0)
    assert step["interval"][0] > 0
    assert bootstrap_interval([base.tolist()])[1] > bootstrap_interval([better.tolist()])[0]
    assert paired_difference(a, b, "global") is None


def test_a_difference_over_two_settings_is_the_mean_of_their_averages() -> None:
    from umarvel.evaluation.mbeir import paired_difference

    a = {
        "rows": [{"dataset": "mscoco", "task_id": 0, "hits": {"local": [1, 1, 0, 0], "global": [1, 0, 0, 0]}}]
    }
    b = {
        "rows": [{"dataset": "mscoco", "task_id": 0, "hits": {"local": [1, 0, 0, 0], "global": [1, 0, 0, 0]}}]
    }
    both = paired_difference(a, b, ("local", "global"))
    assert both["difference"] == pytest.approx((25.0 + 0.0) / 2)
    assert set(both["rows"]) == {"mscoco_task0 local", "mscoco_task0 global"}
