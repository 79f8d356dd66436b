"""Media files for tests and demos."""

from __future__ import annotations

from pathlib import Path

import numpy as np


def write_test_video(
    path: str | Path, colours: list[tuple[int, int, int]], fps: int = 4, size: int = 64
) -> Path:
    """Write a small MPEG-4 clip whose frames cycle through `colours` with a moving white square
    (for tests and demos)."""
    import av  # the optional video extra

    path = Path(path)
    with av.open(str(path), mode="w") as container:
        stream = container.add_stream("mpeg4", rate=fps)
        stream.width = stream.height = size
        stream.pix_fmt = "yuv420p"
        for number, colour in enumerate(colours):
            pixels = np.zeros((size, size, 3), dtype=np.uint8)
            pixels[:] = colour
            corner = (number * 7) % (size - 12)
            pixels[corner : corner + 12, corner : corner + 12] = 255
            frame = av.VideoFrame.from_ndarray(pixels, format="rgb24")
            for packet in stream.encode(frame):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return path
