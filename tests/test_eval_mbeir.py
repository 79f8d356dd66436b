"""M-BEIR scoring: an oracle run gives the hand-computed recall per row and pool; bad runs are named."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from umarvel.data.io import InputError
from umarvel.data.mbeir import ROWS, MBeir, read_qrels
from umarvel.evaluation.mbeir import evaluate_mbeir, run_file_name, score_runs, write_results

# Rows whose global run gets two wrong-modality candidates above everything: a modality confusion.
CONFUSED = {"mscoco_task0", "webqa_task1"}


def _oracle_runs(root: Path, out: Path) -> None:
    """Query i of each row has its positive at rank 3i+1 locally (1, 4, 7), two places lower globally
    in the confused rows (3, 6, 9); fillers are the row's other candidates."""
    mbeir = MBeir(root)
    out.mkdir(parents=True, exist_ok=True)
    global_pool = [c.did for c in mbeir.global_pool()]
    for row in ROWS:
        qrels, _ = read_qrels(mbeir.qrels_file(row))
        pool = [c.did for c in mbeir.pool(row)]
        for setting in ("local", "global"):
            lines = []
            for i, qid in enumerate(sorted(qrels, key=lambda q: int(q.split(":")[1]))):
                positive = sorted(qrels[qid])[0]
                fillers = [d for d in pool if d not in qrels[qid]]
                rank = 3 * i + (2 if setting == "global" and row.name in CONFUSED else 0)
                if setting == "global" and row.name in CONFUSED:
                    wrong = [d for d in global_pool if d not in pool][:2]
                    ranked = wrong + fillers[: rank - 2] + [positive] + fillers[rank - 2 :]
                else:
                    ranked = [*fillers[:rank], positive, *fillers[rank:]]
                lines += [
                    f"{qid} Q0 {d} {r} {1 - r / 100:.3f} oracle {row.task_id}\n"
                    for r, d in enumerate(ranked, 1)
                ]
            (out / run_file_name(row, setting, "test")).write_text("".join(lines))


def test_an_oracle_run_gives_the_hand_computed_recall_for_every_row_and_pool(
    mini_mbeir: Path, tmp_path: Path
) -> None:
    _oracle_runs(mini_mbeir, tmp_path / "runs")
    scores = score_runs(mini_mbeir, tmp_path / "runs")
    for s in scores.rows:
        # local ranks 1, 4, 7: two of three within 5, all within 10
        assert s.local[f"recall@{s.row.k}"] == (100.0 if s.row.k == 10 else 66.67), s.row.name
        # confused global ranks 3, 6, 9: one of three within 5
        expected_global = 33.33 if s.row.name in CONFUSED else s.local[f"recall@{s.row.k}"]
        assert s.global_[f"recall@{s.row.k}"] == expected_global, s.row.name
        assert s.local["recall@1"] == 33.33
    assert scores.average("local") == round((13 * 66.67 + 3 * 100.0) / 16, 2)
    assert scores.average("global") == round((11 * 66.67 + 2 * 33.33 + 3 * 100.0) / 16, 2)
    result = json.loads(write_results(scores, tmp_path / "out", "test").read_text())
    assert len(result["rows"]) == 16 and result["rows"][2]["metric"] == "Recall@10"
    assert any("oven_task6" in w and "not in the local pool" in w for w in result["warnings"])


def test_judged_queries_missing_from_a_run_count_as_misses_and_are_reported(
    mini_mbeir: Path, tmp_path: Path
) -> None:
    _oracle_runs(mini_mbeir, tmp_path / "runs")
    row = next(r for r in ROWS if r.name == "nights_task4")
    path = tmp_path / "runs" / run_file_name(row, "local", "test")
    first_qid = path.read_text().split()[0]
    path.write_text(
        "".join(line + "\n" for line in path.read_text().splitlines() if not line.startswith(first_qid + " "))
    )
    scores = score_runs(mini_mbeir, tmp_path / "runs", rows=[row], settings=("local",))
    assert scores.rows[0].local["recall@1"] == 0.0
    assert any("absent from the run and count as misses" in w for w in scores.warnings)


def test_a_did_listed_twice_for_a_query_is_an_error_naming_the_line(mini_mbeir: Path, tmp_path: Path) -> None:
    _oracle_runs(mini_mbeir, tmp_path / "runs")
    row = ROWS[0]
    path = tmp_path / "runs" / run_file_name(row, "local", "test")
    first = path.read_text().splitlines()[0]
    path.write_text(first + "\n" + first + "\n")
    with pytest.raises(InputError, match=r"_run\.txt:2: did .* appears twice"):
        score_runs(mini_mbeir, tmp_path / "runs", rows=[row], settings=("local",))


def test_a_missing_run_file_is_an_error(mini_mbeir: Path, tmp_path: Path) -> None:
    with pytest.raises(InputError, match="run file not found"):
        score_runs(mini_mbeir, tmp_path)


def test_eval_mbeir_runs_end_to_end_on_the_mini_fixture(mini_mbeir: Path, tmp_path: Path) -> None:
    from umarvel.modeling.embedder import Embedder

    embedder = Embedder.from_pretrained("tiny:qwen2_vl")
    scores = evaluate_mbeir(embedder, mini_mbeir, tmp_path / "eval", progress=False)
    assert len(scores.rows) == 16
    assert all(0 <= v <= 100 for v in scores.headline("local") + scores.headline("global"))
    runs = sorted(p.name for p in (tmp_path / "eval" / "runs").iterdir())
    assert len(runs) == 32 and "mbeir_mscoco_task0_union_pool_test_k50_run.txt" in runs
    assert (tmp_path / "eval" / "mbeir_results.tsv").read_text().startswith("TaskID\tTask\tDataset")


def test_the_stage_table_puts_runs_side_by_side_with_their_averages(tmp_path: Path) -> None:
    from umarvel.evaluation.mbeir import compare_results, plot_comparison

    for name, value in (("a", 10.0), ("b", 30.0)):
        row = {"dataset": "mscoco", "task_id": 0, "metric": "Recall@5", "local": value, "global": value / 2}
        (tmp_path / name).mkdir()
        (tmp_path / name / "results.json").write_text(
            json.dumps({"rows": [row], "average": {"local": value, "global": value / 2}})
        )
    markdown, table = compare_results([("A", tmp_path / "a"), ("B", tmp_path / "b")])
    assert "| mscoco_task0 | R@5 | 10.00 | 5.00 | 30.00 | 15.00 |" in markdown
    assert table["average"]["B"] == {"local": 30.0, "global": 15.0}
    assert plot_comparison(table, tmp_path / "t.png").is_file()


def test_an_average_of_zero_is_written_as_zero_and_only_a_missing_one_is_blank(tmp_path: Path) -> None:
    from umarvel.evaluation.mbeir import RowScore, Scores, render_table

    row = ROWS[0]
    scores = Scores([RowScore(row, local={f"recall@{row.k}": 0.0})], warnings=[])
    assert (scores.average("local"), scores.average("global")) == (0.0, None)
    write_results(scores, tmp_path, "test")
    average = (tmp_path / "mbeir_results.tsv").read_text().splitlines()[-1].split("\t")
    assert (average[1], average[6], average[8]) == ("average", "0.0", "")
    assert render_table(scores).splitlines()[-1] == "| **average** | | | **0.00** | - |"
