"""The `embed` stage: a JSONL of items -> an .npy of L2-normalised float32 rows, in input order.

Inputs are validated before the model loads (errors name file and line). Rows are written in chunks
under `<output>.parts/`, so a killed run resumes where it stopped; the final file is written
atomically, with `<output>.manifest.json` beside it.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import shutil
from pathlib import Path
from typing import Literal

import numpy as np

from umarvel.config.manifest import fingerprint, write_manifest
from umarvel.config.schema import EmbedderConfig
from umarvel.data.io import InputError, atomic_write, read_jsonl
from umarvel.data.records import Candidate, Query

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
        modality = record.get("modality", record.get("query_modality"))
        if modality is not None and modality not in ("text", "image", "image,text", "text,image"):
            raise InputError(where, f"unsupported modality {modality!r} (text, image or image,text)")
        if text is not None and not isinstance(text, str):
            raise InputError(where, f"txt must be a string or null, got {type(text).__name__}")
        if image is not None and not isinstance(image, str):
            raise InputError(where, f"img_path must be a string or null, got {type(image).__name__}")
        if (text is None or not text.strip()) and image is None:
            raise InputError(where, "empty item: txt is empty and img_path is null")
        image_path = None
        if image is not None:
            image_path = Path(image) if Path(image).is_absolute() else root / image
            if not image_path.is_file():
                raise InputError(where, f"image not found: {image_path}")
        identifier = str(record.get("qid", record.get("did", number)))
        instruction = record.get("instruction")
        if role == "query":
            items.append(
                Query(qid=identifier, text=text, image=image_path, instruction=instruction, source=where)
            )
        else:
            items.append(Candidate(did=identifier, text=text, image=image_path, source=where))
    if not items:
        raise InputError(path, "no items in file")
    return items


def _run_key(input_path: Path, config: EmbedderConfig, role: Role, instruction: str | None) -> str:
    parts = [
        json.dumps(fingerprint(input_path), sort_keys=True),
        json.dumps(dataclasses.asdict(config)),
        role,
        instruction or "",
    ]
    return hashlib.sha256("\n".join(parts).encode()).hexdigest()


def embed_file(
    input_path: str | Path,
    output_path: str | Path,
    config: EmbedderConfig,
    role: Role = "candidate",
    instruction: str | None = None,
    image_root: str | Path | None = None,
    chunk_size: int = 512,
    progress: bool = True,
) -> Path:
    """Embed every item of `input_path` into `output_path` (.npy); resumable; returns the output path."""
    from umarvel.modeling.embedder import Embedder

    input_path, output_path = Path(input_path), Path(output_path)
    items = read_items(input_path, role, image_root)
    parts = output_path.with_name(output_path.name + ".parts")
    key = _run_key(input_path, config, role, instruction)
    state_file = parts / "state.json"
    if parts.is_dir() and (not state_file.is_file() or json.loads(state_file.read_text()).get("key") != key):
        logger.info("discarding partial results of a different run in %s", parts)
        shutil.rmtree(parts)
    parts.mkdir(parents=True, exist_ok=True)
    state_file.write_text(json.dumps({"key": key, "items": len(items), "chunk_size": chunk_size}))
    chunks = [(start, min(start + chunk_size, len(items))) for start in range(0, len(items), chunk_size)]
    todo = [c for c in chunks if not (parts / f"{c[0]:09d}.npy").is_file()]
    if len(todo) < len(chunks):
        logger.info("resuming: %d of %d chunks already done", len(chunks) - len(todo), len(chunks))
    if todo:
        embedder = Embedder.from_pretrained(
            config.model, **{k: v for k, v in dataclasses.asdict(config).items() if k != "model"}
        )
        for start, end in todo:
            chunk = items[start:end]
            if role == "query":
                vectors = embedder.encode_queries(chunk, instruction=instruction, progress=progress)
            else:
                vectors = embedder.encode_candidates(chunk, progress=progress)
            with atomic_write(parts / f"{start:09d}.npy", "wb") as handle:
                np.save(handle, vectors.astype(np.float32))
            logger.info("embedded items %d-%d of %d", start + 1, end, len(items))
    matrix = np.concatenate([np.load(parts / f"{start:09d}.npy") for start, _ in chunks])
    with atomic_write(output_path, "wb") as handle:
        np.save(handle, matrix)
    write_manifest(
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
    shutil.rmtree(parts)
    return output_path
