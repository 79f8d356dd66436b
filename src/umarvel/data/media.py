"""Image loading with clear errors and a pixel budget (aspect ratio kept)."""

from __future__ import annotations

import io
import math
import warnings
from pathlib import Path

from PIL import Image, UnidentifiedImageError

from umarvel.data.io import InputError

# The paper's budget: at most 300 x 28 x 28 pixels per image (about 300 visual tokens for Qwen2-VL).
DEFAULT_MAX_PIXELS = 300 * 28 * 28
MAX_ASPECT_RATIO = 200.0


def fit_pixel_budget(image: Image.Image, max_pixels: int) -> Image.Image:
    """Downscale `image` (keeping its aspect ratio) so width x height <= max_pixels; never upscale."""
    width, height = image.size
    if width * height <= max_pixels:
        return image
    scale = math.sqrt(max_pixels / (width * height))
    size = (max(1, int(width * scale)), max(1, int(height * scale)))
    return image.resize(size, Image.BICUBIC)


def load_image(
    source: str | Path | Image.Image, max_pixels: int = DEFAULT_MAX_PIXELS, where: str | None = None
) -> Image.Image:
    """An RGB PIL image within the pixel budget.

    Args:
        source: a path or an already opened image.
        max_pixels: pixel budget; larger images are downscaled, aspect ratio kept.
        where: "file:line" of the record that named the image, for error messages.

    Raises:
        InputError: the file is missing, not an image, truncated, or has an extreme aspect ratio.
    """
    label = where or str(source)
    if isinstance(source, Image.Image):
        image = source
    else:
        path = Path(source)
        if not path.is_file():
            raise InputError(label, f"image not found: {path}")
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("error", Image.DecompressionBombWarning)
                image = Image.open(path)
                # JPEG decoders can decode at 1/2, 1/4, 1/8 scale: far cheaper for giant photos.
                image.draft("RGB", _draft_size(image.size, max_pixels))
                image.load()
        except (Image.DecompressionBombError, Image.DecompressionBombWarning):
            raise InputError(label, f"image {path} is too large to decode safely") from None
        except (UnidentifiedImageError, OSError, SyntaxError) as error:
            raise InputError(label, f"cannot read image {path}: {error}") from None
    width, height = image.size
    if width == 0 or height == 0:
        raise InputError(label, "image has zero size")
    if max(width, height) / min(width, height) > MAX_ASPECT_RATIO:
        raise InputError(label, f"image aspect ratio {width}x{height} exceeds {MAX_ASPECT_RATIO:.0f}:1")
    return fit_pixel_budget(image.convert("RGB"), max_pixels)


def decode_image_bytes(
    data: bytes,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    max_source_pixels: int = 50_000_000,
    where: str = "upload",
) -> Image.Image:
    """An RGB image within `max_pixels` from encoded bytes (an upload).

    The header is read first: an image declaring more than `max_source_pixels` is refused before any
    pixel is decoded.

    Raises:
        InputError: not an image, truncated, too large, or an extreme aspect ratio.
    """
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            image = Image.open(io.BytesIO(data))
            width, height = image.size
            if width * height > max_source_pixels:
                raise InputError(
                    where, f"image of {width}x{height} pixels exceeds {max_source_pixels} pixels"
                )
            image.draft("RGB", _draft_size(image.size, max_pixels))
            image.load()
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):
        raise InputError(where, "image is too large to decode safely") from None
    except (UnidentifiedImageError, OSError, SyntaxError) as error:
        raise InputError(where, f"cannot read the image: {error}") from None
    return load_image(image, max_pixels, where)


def _draft_size(size: tuple[int, int], max_pixels: int) -> tuple[int, int]:
    width, height = size
    scale = min(1.0, math.sqrt(max_pixels / max(1, width * height)))
    return max(1, int(width * scale)), max(1, int(height * scale))
