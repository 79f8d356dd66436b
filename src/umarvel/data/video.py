"""Video frames with PyAV, sampled as U-MARVEL's zero-shot video evaluation does (mbeir-protocol.md 3).

Frame count: a fixed `nframes` (MSVD: 12), or duration x `fps` (MSR-VTT: 2 fps) clamped to
[4, min(768, total frames)] and rounded to an even number. Indices are linspace(0, T - 1, n) rounded:
uniform over the whole clip. Each frame's pixel budget is
max(min(768 x 28², 24576 x 28² x 2 / n), 1.05 x 128 x 28²), further capped by the caller's own budget.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

from umarvel.data.io import InputError
from umarvel.data.media import fit_pixel_budget

FPS = 2.0
MIN_FRAMES = 4
MAX_FRAMES = 768
UNIT = 28 * 28


def frame_count(
    total: int, duration: float, nframes: int = 0, fps: float = FPS, max_frames: int = MAX_FRAMES
) -> int:
    """How many frames to sample from a clip of `total` frames lasting `duration` seconds."""
    if total < 1:
        raise ValueError("a video needs at least one frame")
    if nframes > 0:
        return min(nframes, total)
    wanted = duration * fps
    count = min(max(wanted, MIN_FRAMES), min(max_frames, total))
    count = int(round(count / 2) * 2)  # even, as the Qwen2-VL video processor wants pairs
    return max(1, min(count, total))


def frame_indices(total: int, count: int) -> list[int]:
    """`count` indices spread uniformly over [0, total - 1], ends included."""
    return [int(i) for i in np.linspace(0, total - 1, count).round()]


def frame_pixel_budget(count: int, max_pixels: int | None = None) -> int:
    """The per-frame pixel budget for `count` frames (qwen-vl-utils defaults), capped at `max_pixels`."""
    budget = max(min(768 * UNIT, 24576 * UNIT * 2 / count), 1.05 * 128 * UNIT)
    return int(min(budget, max_pixels) if max_pixels else budget)


def load_video(
    path: str | Path,
    nframes: int = 0,
    fps: float = FPS,
    max_frames: int = MAX_FRAMES,
    max_pixels: int | None = None,
    where: str | None = None,
) -> list[Image.Image]:
    """Decode `path` with PyAV and return the sampled frames as RGB PIL images (in time order)."""
    import av

    label = where or str(path)
    path = Path(path)
    if not path.is_file():
        raise InputError(label, f"video not found: {path}")
    try:
        with av.open(str(path)) as container:
            stream = container.streams.video[0]
            frames = [frame.to_image() for frame in container.decode(stream)]
            rate = float(stream.average_rate or stream.guessed_rate or 0) or None
    except (av.error.FFmpegError, IndexError, ValueError) as error:
        raise InputError(label, f"cannot read video {path}: {error}") from None
    if not frames:
        raise InputError(label, f"video {path} has no decodable frames")
    duration = len(frames) / rate if rate else float(len(frames))
    count = frame_count(len(frames), duration, nframes, fps, max_frames)
    budget = frame_pixel_budget(count, max_pixels)
    return [fit_pixel_budget(frames[i].convert("RGB"), budget) for i in frame_indices(len(frames), count)]
