"""Each zero-shot loader reads a fixture in its benchmark's native layout; the metrics are hand-checked;
SugarCrepe runs for real on ../shared/data/coco-mini."""

from __future__ import annotations

import csv
import json
import pickle
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from tests.conftest import shared_data_or_skip
from umarvel.evaluation.metrics import hit_rate, mean_average_precision
from umarvel.evaluation.zeroshot import (
    SUITES,
    Galleries,
    Matched,
    Pairs,
    evaluate_task,
    evaluate_zeroshot,
)

SHADES = [(200, 30, 30), (30, 180, 40), (30, 60, 210), (220, 200, 40), (150, 40, 160), (20, 20, 20)]


def _image(path: Path, number: int) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (40, 30), SHADES[number % len(SHADES)]).save(path)
    return path


def _write(path: Path, value: object) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(value))
    return path


def _flickr(root: Path, images: int = 3) -> None:
    for i in range(images):
        _image(root / "flickr" / "images" / f"{i}.png", i)
    captions = [f"photo {i // 5} caption {i % 5}" for i in range(5 * images)]
    _write(root / "flickr" / "flickr_text.json", captions)


def _coco(root: Path) -> None:
    for i in range(2):
        _image(root / "coco_images" / f"{i}.png", i)
    _write(root / "coco_text.json", [f"coco {i // 5} caption {i % 5}" for i in range(10)])


def _sharegpt4v(root: Path) -> None:
    names = [f"sa_{i}.jpg" for i in range(3)]
    for i, name in enumerate(names):
        _image(root / "sharegpt4v" / "val_data" / name, i)
    _write(
        root / "sharegpt4v" / "datas_for_validation.json",
        [{"image_name": n, "caption": f"a long caption {i}"} for i, n in enumerate(names)],
    )


def _urban(root: Path) -> None:
    for i in range(1, 4):
        _image(root / "Urban1k" / "image" / f"{i}.jpg", i)
        (root / "Urban1k" / "caption").mkdir(parents=True, exist_ok=True)
        (root / "Urban1k" / "caption" / f"{i}.txt").write_text(f"an urban scene {i}\nsecond line ignored\n")


def _circo(root: Path) -> None:
    images = [{"id": 100 + i, "file_name": f"{100 + i:012d}.jpg"} for i in range(5)]
    for i, image in enumerate(images):
        _image(root / "circo" / "unlabeled2017" / image["file_name"], i)
    _write(root / "circo" / "image_info_unlabeled2017.json", {"images": images})
    _write(
        root / "circo" / "annotations" / "val.json",
        [
            {
                "id": 0,
                "reference_img_id": 100,
                "relative_caption": "is green",
                "shared_concept": "x",
                "target_img_id": 101,
                "gt_img_ids": [101, 102],
            },
            {
                "id": 1,
                "reference_img_id": 103,
                "relative_caption": "is dark",
                "shared_concept": "y",
                "target_img_id": 104,
                "gt_img_ids": [104],
            },
        ],
    )


def _genecis(root: Path) -> None:
    folder = root / "genecis"
    for task in ("change_object", "focus_object"):
        records = [
            {
                "reference": {"val_image_id": 1},
                "target": {"val_image_id": 2},
                "condition": "a dog",
                "gallery": [{"val_image_id": 3}, {"val_image_id": 4}],
            }
        ]
        _write(folder / "annotations" / f"{task}.json", records)
    for i in range(1, 5):
        _image(folder / "val2017" / f"{i:012d}.jpg", i)
    for task in ("change_attribute", "focus_attribute"):
        records = [
            {
                "reference": {"image_id": 7, "instance_bbox": [0, 0, 5, 5]},
                "target": {"image_id": 8},
                "condition": "red",
                "gallery": [{"image_id": 9}, {"image_id": 10}, {"image_id": 11}],
            }
        ]
        _write(folder / "annotations" / f"{task}.json", records)
        for slot, image_id in enumerate([7, 8, 9, 10, 11]):
            _image(folder / "vg" / task / f"{image_id}_0_{slot}.jpg", slot)


def _visdial(root: Path) -> None:
    data = {
        "questions": ["is it sunny", "how many dogs"],
        "answers": ["yes", "two"],
        "dialogs": [
            {"image_id": 5, "dialog": [{"question": 0, "answer": 0}, {"question": 1, "answer": 1}]},
            {"image_id": 6, "dialog": [{"question": 1, "answer": 1}]},
        ],
    }
    _write(root / "visdial" / "visdial_1.0_val.json", {"data": data})
    for image_id in (5, 6):
        _image(
            root / "visdial" / "VisualDialog_val2018" / f"VisualDialog_val2018_{image_id:012d}.jpg", image_id
        )


def _mtfiq(root: Path, gallery: int = 4) -> None:
    names = [f"B{i:03d}" for i in range(gallery)]
    for i, name in enumerate(names):
        _image(root / "M-BEIR" / "mbeir_images" / "fashioniq_images" / f"{name}.jpg", i)
    _write(root / "multiturnfashion" / "image_splits" / "split.all.val.json", names)
    _write(
        root / "multiturnfashion" / "data" / "all.val.json",
        [
            {
                "reference": [
                    [0, ["is red", "has long sleeves"], "B000"],
                    [1, ["is shorter", "no collar"], "B001"],
                ],
                "target": [2, "B002"],
            }
        ],
    )


def _ccneg(root: Path) -> None:
    import torch

    paths = [f"images/{i}.jpg" for i in range(3)]
    for i, path in enumerate(paths):
        _image(root / "ccneg" / path, i)
    annotations = [
        {"json": {"caption": f"a photo of thing {i}"}, "sop_data": {"negative-prompt": f"not, thing {i}"}}
        for i in range(3)
    ]
    torch.save({"image_paths": paths, "annotations": annotations}, root / "ccneg" / "ccneg_preprocessed.pt")


def _sugarcrepe(root: Path) -> None:
    for subset in ("add_att", "add_obj", "replace_att", "replace_obj", "replace_rel", "swap_att", "swap_obj"):
        _write(
            root / "sugar-crepe" / "data" / f"{subset}.json",
            {
                "0": {
                    "filename": "000000000001.jpg",
                    "caption": "a red square",
                    "negative_caption": "a blue circle",
                }
            },
        )
    _image(root / "val2017" / "000000000001.jpg", 0)


def _msrvtt(root: Path) -> None:
    from umarvel.testing.media import write_test_video

    folder = root / "msrvtt"
    (folder / "annotations").mkdir(parents=True)
    (folder / "videos").mkdir()
    with (folder / "annotations" / "MSRVTT_JSFUSION_test.csv").open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["key", "vid_key", "video_id", "sentence"])
        for i in range(2):
            writer.writerow([f"ret{i}", f"msr{i}", f"video{i}", f"a clip number {i}"])
            write_test_video(folder / "videos" / f"video{i}.mp4", [SHADES[i]] * 6, fps=4)


def _msvd(root: Path) -> None:
    from umarvel.testing.media import write_test_video

    folder = root / "MSVD"
    (folder / "YouTubeClips").mkdir(parents=True)
    (folder / "test_list.txt").write_text("vidA\nvidB\n")
    with (folder / "raw-captions.pkl").open("wb") as handle:
        pickle.dump({"vidA": [["a", "man", "sings"], ["someone", "sings"]], "vidB": [["a", "cat"]]}, handle)
    for i, name in enumerate(("vidA", "vidB")):
        write_test_video(folder / "YouTubeClips" / f"{name}.avi", [SHADES[i]] * 6, fps=4)


FIXTURES = {
    "flickr30k": (_flickr, {"flickr30k": ("T2I R@1", "I2T R@1")}),
    "coco": (_coco, {"coco_5k": ("T2I R@1", "I2T R@10")}),
    "sharegpt4v": (_sharegpt4v, {"sharegpt4v_1k": ("T2I R@1", "I2T R@1")}),
    "urban1k": (_urban, {"urban1k": ("T2I R@1", "I2T R@1")}),
    "circo": (_circo, {"circo_val": ("mAP@5", "mAP@50")}),
    "genecis": (_genecis, {"genecis_change_object": ("R@1",), "genecis_average": ("R@1",)}),
    "visdial": (_visdial, {"visdial": ("T2I R@1",)}),
    "mtfiq": (_mtfiq, {"mtfiq": ("R R@5", "R R@8")}),
    "ccneg": (_ccneg, {"ccneg": ("accuracy",)}),
    "sugarcrepe": (
        _sugarcrepe,
        {"sugarcrepe": ("accuracy", "accuracy/swap_obj", "accuracy (mean of subsets)")},
    ),
    "msrvtt": (_msrvtt, {"msrvtt_1ka": ("T2V R@1", "T2V R@10")}),
    "msvd": (_msvd, {"msvd": ("T2V R@1",)}),
}


def test_every_suite_has_a_fixture() -> None:
    assert set(FIXTURES) == set(SUITES)


@pytest.fixture(scope="module")
def embedder():
    from umarvel.modeling.embedder import Embedder

    return Embedder.from_pretrained("tiny:qwen2_vl", video_frames=4)


@pytest.mark.parametrize("suite", sorted(FIXTURES))
def test_each_suite_loads_its_native_layout_and_reports_its_metrics(
    suite: str, tmp_path: Path, embedder
) -> None:
    if suite in ("msrvtt", "msvd"):
        pytest.importorskip("av")
    build, expected = FIXTURES[suite]
    build(tmp_path)
    results = evaluate_zeroshot(embedder, suite, tmp_path, progress=False)
    for task, metrics in expected.items():
        for metric in metrics:
            assert 0.0 <= results[task][metric] <= 100.0


def test_loaders_map_captions_targets_and_galleries_as_the_protocol_says(tmp_path: Path) -> None:
    _flickr(tmp_path)
    (flickr,) = SUITES["flickr30k"](tmp_path)
    assert isinstance(flickr, Matched) and len(flickr.queries) == 15 and flickr.relevant[7] == [1]
    assert flickr.queries[0].instruction and flickr.candidates[0].image.name == "0.png"
    _urban(tmp_path)
    (urban,) = SUITES["urban1k"](tmp_path)
    assert urban.queries[2].text == "an urban scene 3" and urban.queries[0].instruction is None
    _circo(tmp_path)
    (circo,) = SUITES["circo"](tmp_path)
    assert circo.relevant == [[1, 2], [4]] and circo.queries[0].image.name == "000000000100.jpg"
    _genecis(tmp_path)
    tasks = SUITES["genecis"](tmp_path)
    attribute = next(t for t in tasks if t.name == "genecis_focus_attribute")
    assert isinstance(attribute, Galleries) and [c.image.name for c in attribute.galleries[0]] == [
        "8_0_1.jpg",
        "9_0_2.jpg",
        "10_0_3.jpg",
        "11_0_4.jpg",
    ]
    _visdial(tmp_path)
    (visdial,) = SUITES["visdial"](tmp_path)
    assert visdial.queries[0].text == "Q: is it sunny? A: yes. Q: how many dogs? A: two."
    _mtfiq(tmp_path)
    (mtfiq,) = SUITES["mtfiq"](tmp_path)
    query = mtfiq.queries[0]
    assert [p.name for p in (*query.images, query.image)] == ["B000.jpg", "B001.jpg"] and mtfiq.relevant == [
        [2]
    ]
    _ccneg(tmp_path)
    (ccneg,) = SUITES["ccneg"](tmp_path)
    assert isinstance(ccneg, Pairs) and ccneg.negatives[1] == "not thing 1"
    _msvd(tmp_path)
    (msvd,) = SUITES["msvd"](tmp_path)
    assert [q.text for q in msvd.queries] == ["a man sings", "someone sings", "a cat"]
    assert msvd.relevant == [[0], [0], [1]] and msvd.video_frames == 12


def test_hit_rate_and_map_match_hand_computed_values() -> None:
    scores = np.array([[0.9, 0.8, 0.1], [0.1, 0.2, 0.3]])
    assert hit_rate(scores, [[1], [0]], 1) == 0.0
    assert hit_rate(scores, [[1], [0]], 2) == 50.0
    # Query 0: relevant {0, 2}, ranking [0, 1, 2] -> AP@3 = (1/1 + 2/3) / 2; query 1: {2} at rank 1 -> 1.
    assert mean_average_precision(scores, [[0, 2], [2]], 3) == pytest.approx(
        100 * ((1 + 2 / 3) / 2 + 1) / 2, abs=0.01
    )


def test_a_missing_file_names_the_path(tmp_path: Path) -> None:
    from umarvel.data.io import InputError

    with pytest.raises(InputError, match=r"flickr_text\.json"):
        SUITES["flickr30k"](tmp_path)


@pytest.mark.real_backbone
def test_sugarcrepe_runs_for_real_on_the_shared_coco_mini() -> None:
    from umarvel.modeling.embedder import Embedder

    root = shared_data_or_skip("coco-mini")
    (task,) = SUITES["sugarcrepe"](root)
    # 211 triples; the shared copy holds the photos of only some of them, the rest are counted.
    assert len(task.images) + task.skipped == 211 and len(task.images) >= 50
    result = evaluate_task(Embedder.from_pretrained("offline", dtype="auto"), task, progress=False)
    assert 0 <= result["accuracy"] <= 100 and result["pairs"] == len(task.images)
    assert len([k for k in result if k.startswith("accuracy/")]) >= 5
