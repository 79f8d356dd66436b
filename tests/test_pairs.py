"""Warm-up pair readers: NLI triples, image-caption pairs, BEIR folders."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.conftest import shared_data_or_skip
from umarvel.data.io import InputError
from umarvel.data.pairs import read_beir, read_image_captions, read_nli_triples


def test_nli_rows_become_query_positive_and_hard_negative(tmp_path: Path) -> None:
    path = tmp_path / "nli.csv"
    path.write_text("sent0,sent1,hard_neg\nA man sleeps.,A person rests.,A man runs.\nA cat.,An animal.,\n")
    groups = read_nli_triples(path)
    assert [g.query.text for g in groups] == ["A man sleeps.", "A cat."]
    assert groups[0].negatives[0].text == "A man runs." and groups[1].negatives == ()
    assert read_nli_triples(path, with_hard_negatives=False)[0].negatives == ()


def test_an_empty_nli_sentence_names_its_line(tmp_path: Path) -> None:
    path = tmp_path / "nli.csv"
    path.write_text("sent0,sent1\nA man sleeps.,A person rests.\n ,An animal.\n")
    with pytest.raises(InputError, match=r"nli\.csv:3: empty sent0"):
        read_nli_triples(path)


def test_caption_files_in_csv_and_jsonl_give_the_same_pairs(tmp_path: Path) -> None:
    (tmp_path / "c.csv").write_text("image,caption\na.jpg,A dog.\nb.jpg,A cat.\n")
    (tmp_path / "c.jsonl").write_text(
        '{"image": "a.jpg", "caption": "A dog."}\n{"image": "b.jpg", "caption": "A cat."}\n'
    )
    from_csv = read_image_captions(tmp_path / "c.csv", image_root=tmp_path)
    from_jsonl = read_image_captions(tmp_path / "c.jsonl", image_root=tmp_path)
    assert [(g.query.text, g.positive.image) for g in from_csv] == [
        (g.query.text, g.positive.image) for g in from_jsonl
    ]


def test_the_real_flickr_captions_read_as_five_pairs_per_photo() -> None:
    folder = shared_data_or_skip("flickr8k-800")
    groups = read_image_captions(folder / "captions.csv")
    photos = {g.positive.did for g in groups}
    assert len(groups) == 5 * len(photos) and all(Path(g.positive.image).is_file() for g in groups[:20])


def test_the_real_scifact_test_split_has_300_queries_and_339_qrels() -> None:
    beir = read_beir(shared_data_or_skip("scifact"), "test")
    assert len(beir.queries) == 300
    assert sum(len(v) for v in beir.qrels.values()) == 339
    assert len(beir.corpus) == 5183
