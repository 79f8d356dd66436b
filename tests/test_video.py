"""Video inputs: frame sampling as the protocol says, PyAV decoding, and text->video search."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

pytest.importorskip("av")

from umarvel.data.video import frame_count, frame_indices, frame_pixel_budget, load_video
from umarvel.testing.media import write_test_video

RED, BLUE = (220, 20, 20), (20, 40, 230)


def test_msrvtt_sampling_is_two_frames_a_second_clamped_and_even() -> None:
    assert frame_count(total=300, duration=10.0) == 20  # 2 fps
    assert frame_count(total=300, duration=1.0) == 4  # at least 4
    assert frame_count(total=30, duration=600.0) == 30  # never more than the clip has
    assert frame_count(total=9000, duration=600.0) == 768  # at most 768
    assert frame_count(total=300, duration=5.3) % 2 == 0


def test_msvd_sampling_takes_a_fixed_twelve_frames_spread_over_the_clip() -> None:
    assert frame_count(total=200, duration=8.0, nframes=12) == 12
    indices = frame_indices(200, 12)
    assert indices[0] == 0 and indices[-1] == 199 and len(set(indices)) == 12


def test_the_per_frame_pixel_budget_shrinks_with_more_frames_down_to_a_floor() -> None:
    assert frame_pixel_budget(4) == 768 * 28 * 28
    assert frame_pixel_budget(768) == int(1.05 * 128 * 28 * 28)
    assert frame_pixel_budget(4, max_pixels=10_000) == 10_000


def test_a_generated_video_decodes_to_the_sampled_frames(tmp_path: Path) -> None:
    path = write_test_video(tmp_path / "clip.mp4", [RED] * 6 + [BLUE] * 6, fps=4)
    frames = load_video(path, nframes=4)
    assert len(frames) == 4
    first, last = frames[0].getpixel((40, 5)), frames[-1].getpixel((40, 5))
    assert first[0] > 150 and first[2] < 100 and last[2] > 150 and last[0] < 100


def test_a_missing_or_corrupt_video_is_an_error_naming_it(tmp_path: Path) -> None:
    from umarvel.data.io import InputError

    with pytest.raises(InputError, match="video not found"):
        load_video(tmp_path / "none.mp4")
    (tmp_path / "bad.mp4").write_bytes(b"not a video")
    with pytest.raises(InputError, match="cannot read video"):
        load_video(tmp_path / "bad.mp4")


@pytest.mark.parametrize("family", ["qwen2_vl", "composed"])
def test_a_generated_video_round_trips_through_text_to_video_search(tmp_path: Path, family: str) -> None:
    from umarvel.config.schema import EmbedderConfig
    from umarvel.pipeline.index import build_index, search_index

    write_test_video(tmp_path / "red.mp4", [RED] * 8, fps=4)
    write_test_video(tmp_path / "blue.mp4", [BLUE] * 8, fps=4)
    rows = [
        {"did": "red", "txt": None, "video_path": "red.mp4", "modality": "video"},
        {"did": "blue", "txt": None, "video_path": "blue.mp4", "modality": "video"},
        {"did": "note", "txt": "a note about the weather"},
    ]
    (tmp_path / "pool.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    config = EmbedderConfig(model=f"tiny:{family}", video_frames=4)
    build_index(config, tmp_path / "pool.jsonl", tmp_path / "idx", progress=False)
    assert (tmp_path / "idx" / "media").is_dir()
    found = search_index(tmp_path / "idx", text="a red video", k=3)
    assert sorted(found.ids[0]) == ["blue", "note", "red"]
    # The two videos differ only in their frames: their embeddings must differ too.
    embeddings = __import__("numpy").load(tmp_path / "idx" / "embeddings.npy")
    assert abs(float(embeddings[0] @ embeddings[1])) < 0.99999
