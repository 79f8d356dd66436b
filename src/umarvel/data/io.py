"""Reading JSONL/TSV inputs with errors that name the file and line, and atomic writes."""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import IO, Any


class InputError(ValueError):
    """Bad user input; the message names the file and line (`path:line: what is wrong`)."""

    def __init__(self, where: str | Path | None, message: str) -> None:
        self.where = str(where) if where is not None else None
        super().__init__(f"{where}: {message}" if where is not None else message)


def read_jsonl(path: str | Path) -> Iterator[tuple[int, dict[str, Any]]]:
    """Yield (line number, object) for each non-blank line; a malformed line raises InputError."""
    path = Path(path)
    if not path.is_file():
        raise InputError(path, "file not found")
    with path.open(encoding="utf-8") as handle:
        for number, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            try:
                value = json.loads(line)
            except json.JSONDecodeError as error:
                raise InputError(
                    f"{path}:{number}", f"malformed JSON ({error.msg} at column {error.colno})"
                ) from None
            if not isinstance(value, dict):
                raise InputError(f"{path}:{number}", f"expected a JSON object, got {type(value).__name__}")
            yield number, value


@contextlib.contextmanager
def atomic_write(path: str | Path, mode: str = "w") -> Iterator[IO[Any]]:
    """Write to a temporary file beside `path` and rename it into place only if the block succeeds."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, mode, **({} if "b" in mode else {"encoding": "utf-8"})) as handle:
            yield handle
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def write_jsonl(path: str | Path, records: Iterable[dict[str, Any]]) -> None:
    """Write one JSON object per line, atomically."""
    with atomic_write(path) as handle:
        for record in records:
            handle.write(json.dumps(record) + "\n")


def write_json(path: str | Path, value: Any) -> None:
    with atomic_write(path) as handle:
        json.dump(value, handle, indent=2, sort_keys=False, default=str)
        handle.write("\n")
