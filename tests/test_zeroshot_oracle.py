"""An oracle embedder (hand-made vectors keyed by what each item holds) runs every zero-shot suite on its
native-layout fixture from tests/test_zeroshot.py, and every metric equals the value worked out by hand.

Designs use one-hot candidates: candidate j is e_j and query i is row i of a hand-written score matrix, so
query i . candidate j is exactly that matrix's entry.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from tests.test_zeroshot import (
    _ccneg,
    _circo,
    _coco,
    _flickr,
    _genecis,
    _msrvtt,
    _msvd,
    _mtfiq,
    _sharegpt4v,
    _sugarcrepe,
    _urban,
    _visdial,
)
from umarvel.config.schema import EmbedderConfig
from umarvel.data.records import Candidate, Query
from umarvel.evaluation.zeroshot import I2T, SUITES, Matched, evaluate_task, evaluate_zeroshot

Item = Query | Candidate | str
Key = tuple[str | None, tuple[str, ...], str | None]
VIDEO_SUITES = ("msrvtt", "msvd")


def key(item: Item) -> Key:
    """What the oracle sees of an item: its text, its media files in order, and its instruction."""
    if isinstance(item, str):
        return item, (), None
    media = (*getattr(item, "images", ()), item.image, item.video)
    return item.text, tuple(str(p) for p in media if p is not None), getattr(item, "instruction", None)


class Oracle:
    """The encode interface the zero-shot harness calls, answering `vectors[key(item)]`.

    `with_settings` gives a view sharing the vectors and the logs. `log` records (method, item key,
    video_frames of the encoding view) per item; `assigned` records every reassignment of `settings`.
    """

    def __init__(
        self,
        vectors: dict[Key, np.ndarray],
        settings: EmbedderConfig,
        log: list[tuple[str, Key, int]] | None = None,
    ) -> None:
        self.vectors = vectors
        self._settings = settings
        self.log: list[tuple[str, Key, int]] = [] if log is None else log
        self.assigned: list[EmbedderConfig] = []

    @property
    def settings(self) -> EmbedderConfig:
        return self._settings

    @settings.setter
    def settings(self, value: EmbedderConfig) -> None:
        self.assigned.append(value)
        self._settings = value

    def with_settings(self, **changes: Any) -> Oracle:
        return Oracle(self.vectors, dataclasses.replace(self._settings, **changes), self.log)

    def encode_queries(self, items: Sequence[Item], progress: bool = True) -> np.ndarray:
        return self._encode("queries", items)

    def encode_candidates(self, items: Sequence[Item], progress: bool = True) -> np.ndarray:
        return self._encode("candidates", items)

    def _encode(self, method: str, items: Sequence[Item]) -> np.ndarray:
        rows = []
        for item in items:
            if key(item) not in self.vectors:
                raise KeyError(f"the oracle has no vector for {key(item)}")
            self.log.append((method, key(item), self._settings.video_frames))
            rows.append(self.vectors[key(item)])
        return np.stack(rows)


def oracle(vectors: dict[Key, np.ndarray]) -> Oracle:
    return Oracle(vectors, EmbedderConfig(model="tiny:oracle", video_frames=4))


def design(
    queries: Sequence[Item],
    candidates: Sequence[Item],
    scores: Sequence[Sequence[float]] | np.ndarray,
    vectors: dict[Key, np.ndarray] | None = None,
) -> dict[Key, np.ndarray]:
    """Add to `vectors` the vectors whose dot products are `scores`: candidate j is the one-hot e_j,
    query i is row i. An item met twice (same key) must get the same vector."""
    vectors = {} if vectors is None else vectors
    table = np.asarray(scores, dtype=np.float32)
    assert table.shape == (len(queries), len(candidates)) and len({key(c) for c in candidates}) == len(
        candidates
    )
    rows = [*np.eye(len(candidates), dtype=np.float32), *table]
    for item, row in zip([*candidates, *queries], rows, strict=True):
        known = vectors.setdefault(key(item), row)
        assert np.array_equal(known, row), f"two designs for {key(item)}"
    return vectors


def ranked(relevant: Sequence[Sequence[int]], columns: int, ranks: dict[int, int]) -> np.ndarray:
    """Scores where row i puts its first relevant column at rank `ranks.get(i, 1)`: that column scores 1
    at rank 1, else 0.5 under the first rank - 1 other columns at 0.9; the rest score 0."""
    scores = np.zeros((len(relevant), columns))
    for row, rel in enumerate(relevant):
        target, rank = rel[0], ranks.get(row, 1)
        above = [c for c in range(columns) if c != target][: rank - 1]
        assert len(above) == rank - 1
        scores[row, target] = 1.0 if rank == 1 else 0.5
        scores[row, above] = 0.9
    return scores


def instructed(task: Matched) -> list[Query]:
    """The candidates as the harness must encode them: queries carrying the task's candidate instruction."""
    return [
        Query(qid=c.did, text=c.text, image=c.image, video=c.video, instruction=task.candidate_instruction)
        for c in task.candidates
    ]


# ---- one design per suite, with the metrics it must give -------------------------------------------------


def _flickr_vectors(tasks: list[Any]) -> dict[Key, np.ndarray]:
    (task,) = tasks  # 12 images, caption j -> image j // 5
    # T2I: caption 0 ranks its image 2nd, caption 10 6th, caption 5 11th, every other caption 1st.
    scores = ranked(task.relevant, 12, {0: 2, 5: 11, 10: 6})
    # I2T: image 11's captions score it only 0.8 (still their first) and caption 1 scores it 0.85 (under
    # its own image's 1.0), so image 11 ranks caption 1 first and its own 2nd; every other image has a
    # caption at 1.0 above any foreign 0.9.
    scores[55:60, 11] = 0.8
    scores[1, 11] = 0.85
    return design(task.queries, task.candidates, scores)


def _coco_vectors(tasks: list[Any]) -> dict[Key, np.ndarray]:
    (task,) = tasks  # 2 images, 10 captions: only the 5K task (the 1K one needs > 1,000 images)
    scores = ranked(task.relevant, 2, {3: 2})  # caption 3 ranks image 1 (0.9) above its image 0 (0.5)
    scores[5:10, 1] = 0.8  # image 1's captions score it 0.8 < caption 3's 0.9: image 1 ranks caption 3 first
    return design(task.queries, task.candidates, scores)


def _sharegpt4v_vectors(tasks: list[Any]) -> dict[Key, np.ndarray]:
    (task,) = tasks
    # T2I: caption 0 ranks its image 2nd (0.9 > 0.5). I2T: image 1 ranks caption 0 (0.9) above its own (0.8).
    return design(task.queries, task.candidates, [[0.5, 0.9, 0], [0, 0.8, 0], [0, 0, 1]])


def _urban1k_vectors(tasks: list[Any]) -> dict[Key, np.ndarray]:
    (task,) = tasks
    # T2I: caption 1 ranks its image 2nd (0.9 > 0.5). I2T: image 1 ranks caption 2 (0.7) above its own (0.5).
    return design(task.queries, instructed(task), [[1, 0, 0], [0.9, 0.5, 0], [0, 0.7, 1]])


def _circo_vectors(tasks: list[Any]) -> dict[Key, np.ndarray]:
    (task,) = tasks  # relevant [[1, 2], [4]] among 5 gallery images
    # Query 0 ranks [1, 0, 2, 3, 4]: hits at 1 and 3, AP (1 + 2/3) / 2 = 5/6. Query 1 ranks [0, 4, ...]:
    # AP 1/2. mAP 2/3 at every k (5 candidates, so k >= 5 sees the whole ranking).
    return design(task.queries, task.candidates, [[0.9, 1.0, 0.8, 0.1, 0], [0.9, 0, 0, 0, 0.5]])


def _genecis_vectors(tasks: list[Any]) -> dict[Key, np.ndarray]:
    # The target (gallery item 0) at rank 1 in both object tasks (their fixtures hold the same inputs),
    # rank 3 in change_attribute and rank 2 in focus_attribute.
    ranks = {
        "genecis_change_object": 1,
        "genecis_focus_object": 1,
        "genecis_change_attribute": 3,
        "genecis_focus_attribute": 2,
    }
    vectors: dict[Key, np.ndarray] = {}
    for task in tasks:
        (gallery,) = task.galleries
        design(task.queries, gallery, ranked([[0]], len(gallery), {0: ranks[task.name]}), vectors)
    return vectors


def _ranked_vectors(ranks: dict[int, int]) -> Callable[[list[Any]], dict[Key, np.ndarray]]:
    """A design for a single Matched task whose rows rank their target as `ranks` says (1st elsewhere)."""

    def vectors(tasks: list[Any]) -> dict[Key, np.ndarray]:
        (task,) = tasks
        return design(task.queries, task.candidates, ranked(task.relevant, len(task.candidates), ranks))

    return vectors


def _ccneg_vectors(tasks: list[Any]) -> dict[Key, np.ndarray]:
    (task,) = tasks
    # Image i matches caption column i (positives) except image 1, which matches its negative (column 4).
    scores = np.zeros((3, 6))
    scores[[0, 1, 2], [0, 4, 2]] = 1
    return design(task.images, [*task.positives, *task.negatives], scores)


def _sugarcrepe_vectors(tasks: list[Any]) -> dict[Key, np.ndarray]:
    (task,) = tasks
    # One image in every subset: with the instruction (add_*, replace_att, replace_obj) it matches the
    # true caption, without it the negative one.
    scores = [[1, 0] if image.instruction else [0, 1] for image in task.images]
    return design(task.images, ["a red square", "a blue circle"], scores)


CASES: dict[str, tuple[Callable[[Path], None], Callable[[list[Any]], dict], dict[str, dict[str, float]]]] = {
    "flickr30k": (
        partial(_flickr, images=12),
        _flickr_vectors,
        {
            "flickr30k": {
                "T2I R@1": 95.0,  # 57 / 60
                "T2I R@5": 96.67,  # 58 / 60
                "T2I R@10": 98.33,  # 59 / 60
                "I2T R@1": 91.67,  # 11 / 12
                "I2T R@5": 100.0,
                "I2T R@10": 100.0,
            }
        },
    ),
    "coco": (
        _coco,
        _coco_vectors,
        {
            "coco_5k": {
                "T2I R@1": 90.0,
                "T2I R@5": 100.0,
                "T2I R@10": 100.0,
                "I2T R@1": 50.0,
                "I2T R@5": 100.0,
                "I2T R@10": 100.0,
            }
        },
    ),
    "sharegpt4v": (
        _sharegpt4v,
        _sharegpt4v_vectors,
        {
            "sharegpt4v_1k": {
                "T2I R@1": 66.67,
                "T2I R@5": 100.0,
                "T2I R@10": 100.0,
                "I2T R@1": 66.67,
                "I2T R@5": 100.0,
                "I2T R@10": 100.0,
            }
        },
    ),
    "urban1k": (
        _urban,
        _urban1k_vectors,
        {
            "urban1k": {
                "T2I R@1": 66.67,
                "T2I R@5": 100.0,
                "T2I R@10": 100.0,
                "I2T R@1": 66.67,
                "I2T R@5": 100.0,
                "I2T R@10": 100.0,
            }
        },
    ),
    "circo": (
        _circo,
        _circo_vectors,
        {"circo_val": {"mAP@5": 66.67, "mAP@10": 66.67, "mAP@25": 66.67, "mAP@50": 66.67}},
    ),
    "genecis": (
        _genecis,
        _genecis_vectors,
        {
            "genecis_change_object": {"R@1": 100.0, "R@2": 100.0, "R@3": 100.0},
            "genecis_focus_object": {"R@1": 100.0, "R@2": 100.0, "R@3": 100.0},
            "genecis_change_attribute": {"R@1": 0.0, "R@2": 0.0, "R@3": 100.0},
            "genecis_focus_attribute": {"R@1": 0.0, "R@2": 100.0, "R@3": 100.0},
            "genecis_average": {"R@1": 50.0},
        },
    ),
    "visdial": (
        _visdial,
        _ranked_vectors({1: 2}),  # dialog 1 ranks its image 2nd
        {"visdial": {"T2I R@1": 50.0, "T2I R@5": 100.0, "T2I R@10": 100.0}},
    ),
    "mtfiq": (
        partial(_mtfiq, gallery=10),
        _ranked_vectors({0: 7}),  # the one query (both turns' images) ranks its target 7th of 10
        {"mtfiq": {"R R@5": 0.0, "R R@8": 100.0, "R R@10": 100.0}},
    ),
    "ccneg": (_ccneg, _ccneg_vectors, {"ccneg": {"accuracy": 66.67, "pairs": 3.0}}),
    "sugarcrepe": (
        _sugarcrepe,
        _sugarcrepe_vectors,
        {
            "sugarcrepe": {
                "accuracy": 57.14,  # 4 / 7
                "pairs": 7.0,
                "accuracy/add_att": 100.0,
                "accuracy/add_obj": 100.0,
                "accuracy/replace_att": 100.0,
                "accuracy/replace_obj": 100.0,
                "accuracy/replace_rel": 0.0,
                "accuracy/swap_att": 0.0,
                "accuracy/swap_obj": 0.0,
                "accuracy (mean of subsets)": 57.14,
            }
        },
    ),
    "msrvtt": (
        _msrvtt,
        _ranked_vectors({1: 2}),  # sentence 1 ranks its video 2nd
        {"msrvtt_1ka": {"T2V R@1": 50.0, "T2V R@5": 100.0, "T2V R@10": 100.0}},
    ),
    "msvd": (
        _msvd,
        _ranked_vectors({1: 2}),  # "someone sings" ranks vidA 2nd
        {"msvd": {"T2V R@1": 66.67, "T2V R@5": 100.0, "T2V R@10": 100.0}},
    ),
}


def test_every_suite_has_an_oracle_case() -> None:
    assert set(CASES) == set(SUITES)


@pytest.mark.parametrize("suite", sorted(CASES))
def test_the_oracle_gives_each_suite_exactly_the_hand_computed_metrics(suite: str, tmp_path: Path) -> None:
    if suite in VIDEO_SUITES:
        pytest.importorskip("av")
    build, vectors, expected = CASES[suite]
    build(tmp_path)
    embedder = oracle(vectors(SUITES[suite](tmp_path)))
    assert evaluate_zeroshot(embedder, suite, tmp_path, progress=False) == expected


def test_urban1k_encodes_its_images_with_the_candidate_instruction(tmp_path: Path) -> None:
    _urban(tmp_path)
    (task,) = SUITES["urban1k"](tmp_path)
    assert task.candidate_instruction == I2T
    # With the instruction each image is its caption's own one-hot; without it, the next caption's.
    vectors = design(task.queries, instructed(task), np.eye(3))
    for column, candidate in enumerate(task.candidates):
        vectors[key(candidate)] = np.eye(3, dtype=np.float32)[(column + 1) % 3]
    result = evaluate_task(oracle(vectors), task, progress=False)
    assert result == {f"{d} R@{k}": 100.0 for d in ("T2I", "I2T") for k in (1, 5, 10)}


def test_a_fixed_frame_count_leaves_the_callers_embedder_settings_untouched(tmp_path: Path) -> None:
    pytest.importorskip("av")
    _msvd(tmp_path)
    (task,) = SUITES["msvd"](tmp_path)
    embedder = oracle(_ranked_vectors({})([task]))
    before = embedder.settings
    evaluate_task(embedder, task, progress=False)
    assert embedder.assigned == [] and embedder.settings is before and before.video_frames == 4


@pytest.mark.parametrize(("suite", "frames"), [("msvd", 12), ("msrvtt", 4)])
def test_videos_are_encoded_at_the_tasks_frame_count_or_else_the_embedders(
    suite: str, frames: int, tmp_path: Path
) -> None:
    pytest.importorskip("av")
    build, vectors, _ = CASES[suite]
    build(tmp_path)
    (task,) = SUITES[suite](tmp_path)
    embedder = oracle(vectors([task]))
    evaluate_task(embedder, task, progress=False)
    videos = [frames_seen for method, _, frames_seen in embedder.log if method == "candidates"]
    assert videos == [frames] * len(task.candidates)
