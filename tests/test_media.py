"""Image loading: clear errors for missing/corrupt/odd images, big images fit the pixel budget."""

from __future__ import annotations

from pathlib import Path

import pytest
from PIL import Image

from umarvel.data.io import InputError
from umarvel.data.media import load_image


def test_a_missing_image_names_the_record(tmp_path: Path) -> None:
    with pytest.raises(InputError, match=r"items\.jsonl:3: image not found"):
        load_image(tmp_path / "nope.jpg", where="items.jsonl:3")


def test_a_corrupt_image_names_the_file(tmp_path: Path) -> None:
    path = tmp_path / "broken.jpg"
    path.write_bytes(b"\xff\xd8\xff\xe0 definitely not a jpeg")
    with pytest.raises(InputError, match=r"cannot read image .*broken\.jpg"):
        load_image(path)


def test_a_truncated_jpeg_is_reported(tmp_path: Path) -> None:
    path = tmp_path / "cut.jpg"
    Image.new("RGB", (200, 200), (10, 200, 30)).save(path, quality=90)
    path.write_bytes(path.read_bytes()[:300])
    with pytest.raises(InputError, match="cannot read image"):
        load_image(path)


def test_a_giant_image_is_downscaled_to_the_budget_keeping_its_aspect(tmp_path: Path) -> None:
    path = tmp_path / "big.jpg"
    Image.new("RGB", (4000, 3000), (200, 30, 30)).save(path)
    image = load_image(path, max_pixels=300 * 28 * 28)
    assert image.width * image.height <= 300 * 28 * 28
    assert abs(image.width / image.height - 4 / 3) < 0.02


def test_small_images_are_not_upscaled() -> None:
    image = load_image(Image.new("RGB", (20, 10)), max_pixels=10_000)
    assert image.size == (20, 10)


def test_an_extreme_aspect_ratio_is_refused() -> None:
    with pytest.raises(InputError, match="aspect ratio"):
        load_image(Image.new("RGB", (2010, 10)))
