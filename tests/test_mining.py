"""Hard-negative selection: positives never come back, each rule drops exactly what it should, seeded."""

from __future__ import annotations

import json

from umarvel.mining.filters import NegativeRules, select_negatives

SHORTLIST = [
    ("pos", 0.92),
    ("copy", 0.90),
    ("a", 0.85),
    ("b", 0.72),
    ("c", 0.69),
    ("d", 0.60),
    ("e", 0.55),
    ("f", 0.50),
    ("g", 0.45),
    ("h", 0.40),
]


def test_mined_negatives_never_contain_a_positive() -> None:
    selection = select_negatives(SHORTLIST, {"pos", "d"}, NegativeRules(k=9, max_score=None), row=0)
    assert not {did for did, _ in selection.negatives} & {"pos", "d"}
    assert [d for d, _ in selection.dropped["positive"]] == ["pos", "d"]


def test_the_threshold_rule_drops_exactly_the_scores_above_it() -> None:
    selection = select_negatives(
        SHORTLIST, {"pos"}, NegativeRules(k=3, max_score=0.7, drop_duplicates=False), row=0
    )
    assert [d for d, _ in selection.dropped["threshold"]] == ["copy", "a", "b"]
    assert [d for d, _ in selection.negatives] == ["c", "d", "e"]


def test_the_margin_rule_is_relative_to_the_positive_score() -> None:
    rules = NegativeRules(k=2, max_score=None, margin=0.3, drop_duplicates=False)
    selection = select_negatives(SHORTLIST, {"pos"}, rules, row=0, positive_score=0.92)
    # anything above 0.92 - 0.3 = 0.62 goes
    assert [d for d, _ in selection.dropped["margin"]] == ["copy", "a", "b", "c"]
    assert [d for d, _ in selection.negatives] == ["d", "e"]


def test_duplicates_of_a_positive_are_dropped_before_scoring_rules() -> None:
    selection = select_negatives(
        SHORTLIST, {"pos"}, NegativeRules(k=1, max_score=None), row=0, duplicates={"copy"}
    )
    assert [d for d, _ in selection.dropped["duplicate"]] == ["copy"]
    assert selection.negatives == [("a", 0.85)]


def test_the_rank_window_and_sampling_are_seeded() -> None:
    rules = NegativeRules(
        k=3, max_score=None, drop_duplicates=False, rank_start=2, rank_end=8, selection="sample"
    )
    first = select_negatives(SHORTLIST, {"pos"}, rules, row=7)
    assert first.negatives == select_negatives(SHORTLIST, {"pos"}, rules, row=7).negatives
    window = {d for d, _ in SHORTLIST[1:][2:8]}
    assert {d for d, _ in first.negatives} <= window and len(first.negatives) == 3
    others = {tuple(select_negatives(SHORTLIST, {"pos"}, rules, row=r).negatives) for r in range(20)}
    assert len(others) > 1


def test_mining_the_mini_fixture_writes_aligned_negatives_and_an_audit(mini_mbeir, tmp_path) -> None:
    import json

    from umarvel.mining.mine import mine_negatives
    from umarvel.modeling.embedder import Embedder

    embedder = Embedder.from_pretrained("tiny:qwen2_vl")
    rules = NegativeRules(k=3, max_score=0.99)
    path = mine_negatives(
        embedder,
        mini_mbeir,
        "query/union_train/mbeir_union_up_train.jsonl",
        "cand_pool/global/mbeir_union_train_cand_pool.jsonl",
        tmp_path,
        rules,
        shortlist_size=20,
        progress=False,
    )
    lines = [json.loads(line) for line in path.read_text().splitlines()]
    union = [
        json.loads(line)["qid"]
        for line in (mini_mbeir / "query/union_train/mbeir_union_up_train.jsonl").read_text().splitlines()
    ]
    assert [line["qid"] for line in lines] == union
    assert all(not set(line["negatives"]) & set(line["positives"]) for line in lines)
    assert all(len(line["negatives"]) == 3 for line in lines)
    audit = json.loads((tmp_path / "audit.json").read_text())
    assert sum(t["queries"] for t in audit["tasks"].values()) == len(lines)
    assert (tmp_path / "audit_scores.png").is_file()
    assert audit["with_mined_fraction"] == 1.0  # every query kept mined negatives (3 each, above)


def test_stage_b_trains_on_mined_negatives_and_refuses_a_misaligned_file(mini_mbeir, tmp_path) -> None:
    import pytest

    from umarvel.config.io import load_config
    from umarvel.data.io import InputError
    from umarvel.data.training import load_rows
    from umarvel.mining.mine import mine_negatives
    from umarvel.modeling.embedder import Embedder
    from umarvel.pipeline.train import train_stage

    mined = mine_negatives(
        Embedder.from_pretrained("tiny:qwen2_vl"),
        mini_mbeir,
        "query/union_train/mbeir_union_up_train.jsonl",
        "cand_pool/global/mbeir_union_train_cand_pool.jsonl",
        tmp_path / "mined",
        NegativeRules(k=2, max_score=None),
        shortlist_size=10,
        progress=False,
    )
    config = load_config(
        None,
        [
            "embedder.model=tiny:qwen2_vl",
            f"data.train=[{{kind: mbeir, path: {mini_mbeir}, negatives: {mined}}}]",
            "train.hard_negatives=2",
            "train.max_steps=1",
            "train.per_device_batch_size=4",
            f"output_dir={tmp_path / 'b'}",
        ],
    )
    rows = load_rows(config.data.train[0])
    first = json.loads(mined.read_text().splitlines()[0])
    assert [c.did for c in rows[0].negatives] == first["negatives"]
    assert (train_stage(config, progress=False) / "model.safetensors").is_file()
    mined.write_text("\n".join(mined.read_text().splitlines()[1:]) + "\n")
    with pytest.raises(InputError, match="must align with the query file"):
        load_rows(config.data.train[0])


def test_a_query_left_without_mined_negatives_gets_seeded_random_pool_candidates(
    mini_mbeir, tmp_path
) -> None:
    from umarvel.config.schema import DataSource
    from umarvel.data.training import load_rows

    queries = (mini_mbeir / "query/union_train/mbeir_union_up_train.jsonl").read_text().splitlines()
    path = tmp_path / "negatives.jsonl"
    path.write_text(
        "".join(json.dumps({"qid": json.loads(q)["qid"], "negatives": []}) + "\n" for q in queries)
    )
    source = DataSource(kind="mbeir", path=str(mini_mbeir), negatives=str(path))
    rows, again = load_rows(source), load_rows(source)
    assert all(row.negatives for row in rows)
    assert all(not {c.did for c in row.negatives} & set(row.query.positives) for row in rows)
    assert [[c.did for c in r.negatives] for r in rows] == [[c.did for c in r.negatives] for r in again]


def test_the_relative_rule_drops_what_scores_above_a_fraction_of_the_positive() -> None:
    rules = NegativeRules(k=2, max_score=None, relative=0.8, drop_duplicates=False)
    selection = select_negatives(SHORTLIST, {"pos"}, rules, row=0, positive_score=0.9)
    # anything above 0.8 * 0.9 = 0.72 goes
    assert [d for d, _ in selection.dropped["relative"]] == ["copy", "a"]
    assert [d for d, _ in selection.negatives] == ["b", "c"]


def test_the_negatives_digest_ignores_scores_but_not_the_chosen_negatives(tmp_path) -> None:
    from umarvel.mining.mine import selection_digest

    def write(name: str, negatives: list[str], scores: list[float]) -> str:
        path = tmp_path / name
        line = {"qid": "q1", "positives": ["p"], "negatives": negatives, "scores": scores, "dropped": {}}
        path.write_text(json.dumps(line) + "\n")
        return selection_digest(path)

    base = write("a.jsonl", ["n1", "n2"], [0.51234, 0.41])
    assert write("b.jsonl", ["n1", "n2"], [0.51235, 0.41]) == base
    assert write("c.jsonl", ["n2", "n1"], [0.51234, 0.41]) != base
