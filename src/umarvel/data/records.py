"""Typed records that flow between layers: queries, candidates, training groups."""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import Enum
from pathlib import Path
from typing import Any

from umarvel.data.io import InputError


class Modality(str, Enum):
    """Modality of a query or candidate, spelled as M-BEIR spells it."""

    TEXT = "text"
    IMAGE = "image"
    IMAGE_TEXT = "image,text"
    VIDEO = "video"

    @classmethod
    def parse(cls, value: str) -> Modality:
        normalised = ",".join(sorted(part.strip() for part in value.split(","))) if value else value
        for modality in cls:
            if modality.value == normalised:
                return modality
        raise ValueError(f"unsupported modality {value!r}; expected one of {[m.value for m in cls]}")

    @classmethod
    def infer(cls, text: str | None, image: Any | None, video: Any | None = None) -> Modality:
        if video is not None:
            return cls.VIDEO
        if image is not None and text:
            return cls.IMAGE_TEXT
        if image is not None:
            return cls.IMAGE
        if text:
            return cls.TEXT
        raise ValueError("an item needs text, an image or a video; this one has none")


def check_text(value: object, field: str, where: str | None) -> None:
    """A text field must be a string (or null) of valid Unicode: JSON can spell a lone surrogate
    (`"\\ud800"`), which no tokenizer can encode."""
    if value is None:
        return
    if not isinstance(value, str):
        raise InputError(where, f"{field} must be a string or null, got {type(value).__name__}")
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as error:
        raise InputError(
            where,
            f"{field} holds a lone surrogate ({value[error.start]!r}) at character {error.start + 1}: "
            "not valid Unicode",
        ) from None


@dataclass(frozen=True)
class Query:
    """A query: text and/or an image (path relative to `root` or absolute) and an optional instruction."""

    qid: str
    text: str | None = None
    image: str | Path | None = None
    instruction: str | None = None
    video: str | Path | None = None
    positives: tuple[str, ...] = ()
    negatives: tuple[str, ...] = ()
    task_id: int | None = None
    source: str | None = None  # "file:line" the record came from, for error messages
    images: tuple[str | Path, ...] = ()  # earlier images of a multi-image query, before `image`

    def __post_init__(self) -> None:
        check_text(self.text, "txt", self.source)
        check_text(self.instruction, "instruction", self.source)

    @property
    def modality(self) -> Modality:
        return Modality.infer(self.text, self.image, self.video)


@dataclass(frozen=True)
class Candidate:
    """A candidate in a pool: text and/or an image; candidates never carry an instruction."""

    did: str
    text: str | None = None
    image: str | Path | None = None
    video: str | Path | None = None
    source: str | None = None

    def __post_init__(self) -> None:
        check_text(self.text, "txt", self.source)

    @property
    def modality(self) -> Modality:
        return Modality.infer(self.text, self.image, self.video)


@dataclass(frozen=True)
class TrainGroup:
    """One training row: a query, its positive, and k hard negatives (possibly none)."""

    query: Query
    positive: Candidate
    negatives: tuple[Candidate, ...] = field(default_factory=tuple)
