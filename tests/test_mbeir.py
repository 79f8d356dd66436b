"""The M-BEIR reader on the mini fixture, and its errors on bad files."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import pytest

from umarvel.data.io import InputError
from umarvel.data.mbeir import (
    DATASET_IDS,
    ROWS,
    Instructions,
    MBeir,
    dataset_id_of,
    instruction_digest,
    local_positives,
    read_pool,
    read_qrels,
    read_queries,
)
from umarvel.data.records import Modality
from umarvel.data.text import format_string


def test_the_mini_fixture_has_all_16_rows_over_all_10_datasets(mini_mbeir: Path) -> None:
    mbeir = MBeir(mini_mbeir)
    assert len(ROWS) == 16
    seen = set()
    for row in ROWS:
        queries, pool = mbeir.queries(row), mbeir.pool(row)
        assert len(pool) >= (12 if row.k == 10 else 6) and queries
        assert {q.modality for q in queries} == {row.query_modality}
        assert {c.modality for c in pool} == {row.candidate_modality}
        seen.add(row.dataset_id)
    assert seen == set(DATASET_IDS.values())
    assert {r.task_id for r in ROWS} == {0, 1, 2, 3, 4, 6, 7, 8}


def test_mscoco_has_split_specific_pools(mini_mbeir: Path) -> None:
    mbeir = MBeir(mini_mbeir)
    row = next(r for r in ROWS if r.name == "mscoco_task0")
    assert mbeir.local_pool_file(row, "val") != mbeir.local_pool_file(row, "test")
    assert {c.did for c in mbeir.pool(row, "val")}.isdisjoint({c.did for c in mbeir.pool(row, "test")})


def test_global_test_pool_is_the_concatenation_of_disjoint_local_pools(mini_mbeir: Path) -> None:
    mbeir = MBeir(mini_mbeir)
    local = [c.did for row in ROWS for c in mbeir.pool(row)]
    assert len(local) == len(set(local))
    assert sorted(c.did for c in mbeir.global_pool()) == sorted(local)


def test_instruction_choice_is_deterministic_and_resolves_for_every_query(mini_mbeir: Path) -> None:
    mbeir = MBeir(mini_mbeir)
    first = [q for row in ROWS for q in mbeir.queries(row)]
    again = [q for row in ROWS for q in MBeir(mini_mbeir).queries(row)]
    assert all(q.instruction for q in first)
    assert instruction_digest(first) == instruction_digest(again)
    chosen = Counter(q.instruction for q in first)
    assert len(chosen) > 16  # the hash spreads queries over the variants, not always prompt_1


def test_first_mode_always_takes_prompt_1(mini_mbeir: Path) -> None:
    instructions = MBeir(mini_mbeir, instruction_choice="first").instructions()
    for qid in ("9:1", "9:2", "9:3"):
        assert (
            instructions.choose(qid, Modality.TEXT, Modality.IMAGE)
            == instructions.prompts[(9, Modality.TEXT, Modality.IMAGE)][0]
        )


def test_empty_prompt_cells_are_dropped(mini_mbeir: Path) -> None:
    instructions = MBeir(mini_mbeir).instructions()
    assert len(instructions.prompts[(2, Modality.TEXT, Modality.TEXT)]) == 3
    assert all(all(p for p in prompts) for prompts in instructions.prompts.values())


def test_qrels_keep_only_positive_relevance(mini_mbeir: Path) -> None:
    mbeir = MBeir(mini_mbeir)
    row = next(r for r in ROWS if r.name == "webqa_task1")
    lines = mbeir.qrels_file(row).read_text().splitlines()
    assert any(line.split()[3] == "0" for line in lines)
    qrels = mbeir.qrels(row)
    assert sum(len(v) for v in qrels.values()) == sum(1 for line in lines if line.split()[3] != "0")


def test_oven_cross_prefix_positive_counts_globally_but_not_locally(mini_mbeir: Path) -> None:
    mbeir = MBeir(mini_mbeir)
    row = next(r for r in ROWS if r.name == "oven_task6")
    query = mbeir.queries(row)[0]
    prefixes = {dataset_id_of(d) for d in query.positives}
    assert prefixes == {DATASET_IDS["oven"], DATASET_IDS["infoseek"]}
    assert {dataset_id_of(d) for d in local_positives(query)} == {DATASET_IDS["oven"]}
    assert set(query.positives) == mbeir.qrels(row)[query.qid]


def test_image_only_queries_have_no_text_and_multi_positive_queries_keep_all(mini_mbeir: Path) -> None:
    mbeir = MBeir(mini_mbeir)
    image_query = mbeir.queries(next(r for r in ROWS if r.name == "nights_task4"))[0]
    assert image_query.text is None and Path(image_query.image).is_file()
    coco = mbeir.queries(next(r for r in ROWS if r.name == "mscoco_task3"))[0]
    assert len(coco.positives) == 5


def test_train_side_has_upsampled_duplicates_and_aligned_mined_negatives(mini_mbeir: Path) -> None:
    mbeir = MBeir(mini_mbeir)
    union = read_queries(mbeir.union_train_file())
    assert len({q.qid for q in union}) < len(union)
    mined = [
        json.loads(line)
        for line in (mini_mbeir / "mined" / "mbeir_union_up_train_negatives.jsonl").read_text().splitlines()
    ]
    assert [m["qid"] for m in mined] == [q.qid for q in union]
    assert len(set(mined[0]["top100_docs"]) - set(mined[0]["gt_docs"])) < 5
    pool = {c.did for c in read_pool(mbeir.global_pool_file("train"))}
    assert all(d in pool for q in union for d in q.positives)


def test_format_string_follows_the_protocol() -> None:
    assert format_string('"show the red bird\r') == "Show the red bird."
    assert format_string("is it red?") == "Is it red?"
    assert format_string("  ") == ""


def _write(path: Path, lines: list[str]) -> Path:
    path.write_text("".join(line + "\n" for line in lines))
    return path


@pytest.mark.parametrize(
    "line,message",
    [
        ('{"qid": "9:1", "query_txt": "x"', r"q\.jsonl:2: malformed JSON"),
        (
            '{"query_txt": "x", "query_modality": "text", "pos_cand_list": ["9:1"]}',
            r"q\.jsonl:2: missing field 'qid'",
        ),
        (
            '{"qid": "9:1", "query_txt": "x", "query_img_path": null, "query_modality": "audio", "pos_cand_list": ["9:1"]}',
            r"q\.jsonl:2: unsupported modality 'audio'",
        ),
        (
            '{"qid": "9:1", "query_txt": " ", "query_img_path": null, "query_modality": "text", "pos_cand_list": ["9:1"]}',
            r"q\.jsonl:2: .*empty text",
        ),
        (
            '{"qid": "nine", "query_txt": "x", "query_modality": "text", "pos_cand_list": ["9:1"]}',
            r"q\.jsonl:2: id 'nine'",
        ),
        (
            '{"qid": "9:1", "query_txt": "x", "query_modality": "text", "pos_cand_list": []}',
            r"q\.jsonl:2: query 9:1 has no positive",
        ),
    ],
)
def test_bad_query_lines_name_file_and_line(tmp_path: Path, line: str, message: str) -> None:
    good = '{"qid": "9:2", "query_txt": "x", "query_img_path": null, "query_modality": "text", "pos_cand_list": ["9:1"]}'
    with pytest.raises(InputError, match=message):
        read_queries(_write(tmp_path / "q.jsonl", [good, line]))


def test_duplicate_dids_in_a_pool_are_an_error(tmp_path: Path) -> None:
    record = '{"did": "9:1", "txt": "x", "img_path": null, "modality": "text"}'
    with pytest.raises(InputError, match=r"p\.jsonl:2: duplicate did 9:1"):
        read_pool(_write(tmp_path / "p.jsonl", [record, record]))


def test_bad_qrels_and_instructions_lines_are_named(tmp_path: Path) -> None:
    with pytest.raises(InputError, match=r"r\.txt:1: expected"):
        read_qrels(_write(tmp_path / "r.txt", ["9:1 0 9:2 1"]))
    with pytest.raises(InputError, match=r"i\.tsv:2: unsupported modality"):
        Instructions.from_tsv(_write(tmp_path / "i.tsv", ["h\th\th\th\th", "sound\timage\tx\t9\tFind."]))
