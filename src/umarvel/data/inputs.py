"""Records -> `EncodeItem`s: the one place inputs are read into what a collator renders.

Training, encoding and re-ranking all call `to_item`: a `Query` or `Candidate` record, a bare string
(text), a path or PIL image (an image), or an M-BEIR-style dict (`txt` / `query_txt`, `img_path` /
`query_img_path`). Media are loaded here, under one `MediaSettings` budget: the image downscaled to
`max_image_pixels`, a multi-round query's earlier images in order, and a video's frames sampled by
`video_frames` / `video_fps` / `video_max_frames` (the embedder's and the re-ranker's settings of those
names).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from PIL import Image

from umarvel.config.schema import EmbedderConfig
from umarvel.data.collator import EncodeItem
from umarvel.data.io import InputError
from umarvel.data.media import load_image
from umarvel.data.records import Candidate, Query
from umarvel.data.video import load_video

Encodable = Query | Candidate | str | Path | Image.Image | dict[str, Any]


@dataclass(frozen=True)
class MediaSettings:
    """How media are loaded: the pixel budget per image (and per video frame) and video sampling; the
    defaults are `EmbedderConfig`'s (mbeir-protocol.md 3)."""

    max_image_pixels: int = EmbedderConfig.max_image_pixels
    video_frames: int = EmbedderConfig.video_frames
    video_fps: float = EmbedderConfig.video_fps
    video_max_frames: int = EmbedderConfig.video_max_frames

    @classmethod
    def of(cls, settings: Any) -> MediaSettings:
        """The media fields of an embedder's or a re-ranker's config."""
        return cls(
            settings.max_image_pixels, settings.video_frames, settings.video_fps, settings.video_max_frames
        )


def to_item(
    value: Encodable,
    media: MediaSettings,
    instruction: str | None = None,
    *,
    with_instruction: bool = True,
    root: str | Path | None = None,
    where: str | None = None,
) -> EncodeItem:
    """`value` as an `EncodeItem` with its media loaded.

    instruction: used where a query record carries none, and for anything else (the embedder passes
        None for candidates, which never carry one).
    with_instruction: False drops any instruction.
    root: relative media paths of strings-as-paths and dicts are read under it.
    where: "file:line" for errors, where the record names no source.
    """
    base = Path(root) if root is not None else None

    def resolve(path: Any) -> Any:
        """A relative file path is relative to `root`; anything else is used as it is."""
        if isinstance(path, (str, Path)) and base is not None and not Path(path).is_absolute():
            return base / path
        return path

    text: str | None = None
    image: Any = None
    video: Any = None
    earlier: tuple = ()
    if isinstance(value, Query):
        text, image, video, where = value.text, value.image, value.video, value.source or where
        earlier = value.images
        instruction = value.instruction if value.instruction is not None else instruction
    elif isinstance(value, Candidate):
        text, image, video, where = value.text, value.image, value.video, value.source or where
    elif isinstance(value, str):
        text = value
    elif isinstance(value, (Path, Image.Image)):
        image = value
    elif isinstance(value, dict):
        text = value.get("txt", value.get("query_txt"))
        image = value.get("img_path", value.get("query_img_path"))
    else:
        raise InputError(where, f"cannot encode a {type(value).__name__}")
    if text is not None and not isinstance(text, str):
        raise InputError(where, f"text must be a string, got {type(text).__name__}")
    pixels = media.max_image_pixels
    loaded = load_image(resolve(image), pixels, where=where) if image is not None else None
    frames = None
    if video is not None:
        frames = tuple(
            load_video(
                resolve(video),
                nframes=media.video_frames,
                fps=media.video_fps,
                max_frames=media.video_max_frames,
                max_pixels=pixels,
                where=where,
            )
        )
    images = tuple(load_image(resolve(path), pixels, where=where) for path in earlier)
    return EncodeItem(
        text=text,
        image=loaded,
        instruction=instruction if with_instruction else None,
        where=where,
        video=frames,
        images=images,
    )
