"""The `embed` stage: a JSONL of items -> an .npy of L2-normalised float32 rows, in input order.

Inputs are validated before the model loads (errors name file and line). Rows are written in shards
under `<output>.parts/` (see `retrieval/encode.py`), so a killed run resumes where it stopped; the
final file is written atomically, with `<output>.manifest.json` beside it.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Literal

import numpy as np

from umarvel.config.manifest import write_manifest
from umarvel.config.schema import EmbedderConfig
from umarvel.data.io import InputError, read_jsonl
from umarvel.data.records import Candidate, Query, check_text
from umarvel.distributed import run_on_main
from umarvel.retrieval.encode import encode_corpus

logger = logging.getLogger(__name__)

Role = Literal["query", "candidate"]


def read_items(path: str | Path, role: Role, image_root: str | Path | None = None) -> list[Query | Candidate]:
    """Items with M-BEIR field names (`txt`/`img_path`, or `query_txt`/`query_img_path`); either may be null.

    Image paths are relative to `image_root` (default: the file's folder). Missing images and empty
    items are reported here, before any model work.
    """
    path = Path(path)
    root = Path(image_root) if image_root is not None else path.parent
    items: list[Query | Candidate] = []
    for number, record in read_jsonl(path):
        where = f"{path}:{number}"
        text = record.get("txt", record.get("query_txt"))
        image = record.get("img_path", record.get("query_img_path"))
        video = record.get("video_path")
        modality = record.get("modality", record.get("query_modality"))
        if modality is not None and modality not in ("text", "image", "image,text", "text,image", "video"):
            raise InputError(where, f"unsupported modality {modality!r} (text, image, image,text or video)")
        check_text(text, "txt", where)
        if image is not None and not isinstance(image, str):
            raise InputError(where, f"img_path must be a string or null, got {type(image).__name__}")
        if (text is None or not text.strip()) and image is None and video is None:
            raise InputError(where, "empty item: txt is empty and img_path and video_path are null")
        video_path = None
        if video is not None:
            if not isinstance(video, str):
                raise InputError(where, f"video_path must be a string or null, got {type(video).__name__}")
            video_path = Path(video) if Path(video).is_absolute() else root / video
            if not video_path.is_file():
                raise InputError(where, f"video not found: {video_path}")
        image_path = None
        if image is not None:
            image_path = Path(image) if Path(image).is_absolute() else root / image
            if not image_path.is_file():
                raise InputError(where, f"image not found: {image_path}")
        identifier = str(record.get("qid", record.get("did", number)))
        instruction = record.get("instruction")
        if role == "query":
            items.append(
                Query(
                    qid=identifier,
                    text=text,
                    image=image_path,
                    video=video_path,
                    instruction=instruction,
                    source=where,
                )
            )
        else:
            items.append(
                Candidate(did=identifier, text=text, image=image_path, video=video_path, source=where)
            )
    if not items:
        raise InputError(path, "no items in file")
    return items


def embed_file(
    input_path: str | Path,
    output_path: str | Path,
    config: EmbedderConfig,
    role: Role = "candidate",
    instruction: str | None = None,
    image_root: str | Path | None = None,
    chunk_size: int | None = None,
    cache_dir: str | Path | None = None,
    progress: bool = True,
) -> Path:
    """Embed every item of `input_path` into `output_path` (.npy); resumable; returns the output path."""
    from umarvel.modeling.embedder import Embedder

    input_path, output_path = Path(input_path), Path(output_path)
    items = read_items(input_path, role, image_root)
    embedder = Embedder.from_config(config)
    encode_corpus(
        embedder,
        items,
        output_path,
        role,
        instruction,
        shard_size=chunk_size,
        cache_dir=cache_dir,
        progress=progress,
    )
    matrix = np.load(output_path, mmap_mode="r")
    run_on_main(
        write_manifest,
        output_path.parent,
        "embed",
        config,
        inputs={"items": input_path},
        extra={
            "role": role,
            "instruction": instruction,
            "rows": int(matrix.shape[0]),
            "dim": int(matrix.shape[1]),
            "output": str(output_path),
        },
        filename=output_path.name + ".manifest.json",
    )
    return output_path
