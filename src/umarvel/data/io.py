"""Reading JSONL inputs with errors that name the file and line, output checks and locks; the atomic
writes of `umarvel.files`, re-exported."""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any

from umarvel.errors import UserError
from umarvel.files import atomic_write, write_json, write_jsonl  # noqa: F401  (re-exported)


class InputError(UserError):
    """Bad user input; the message names the file and line (`path:line: what is wrong`)."""

    def __init__(self, where: str | Path | None, message: str) -> None:
        self.where = str(where) if where is not None else None
        super().__init__(f"{where}: {message}" if where is not None else message)


def read_jsonl(path: str | Path) -> Iterator[tuple[int, dict[str, Any]]]:
    """Yield (line number, object) for each line: one JSON object a line, UTF-8. A malformed line, a
    line that is not UTF-8 or a blank line between items raises InputError naming the line (blank lines
    at the end of the file are ignored: every other line is one row of the output)."""
    path = Path(path)
    if not path.is_file():
        raise InputError(path, "file not found")
    blank: int | None = None  # the first blank line since the last item
    with path.open("rb") as handle:
        for number, raw in enumerate(handle, start=1):
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as error:
                raise InputError(
                    f"{path}:{number}",
                    f"not UTF-8 (byte 0x{raw[error.start]:02x} at column {error.start + 1}); "
                    "save the file as UTF-8",
                ) from None
            if not line.strip():
                blank = number if blank is None else blank
                continue
            if blank is not None:
                raise InputError(f"{path}:{blank}", "blank line: every line must hold one JSON object")
            try:
                value = json.loads(line)
            except json.JSONDecodeError as error:
                raise InputError(
                    f"{path}:{number}", f"malformed JSON ({error.msg} at column {error.colno})"
                ) from None
            if not isinstance(value, dict):
                raise InputError(f"{path}:{number}", f"expected a JSON object, got {type(value).__name__}")
            yield number, value


def check_writable(path: str | Path, folder: bool = False) -> None:
    """Raise InputError unless `path` can be written (a file, or with `folder` a folder), before any work
    is done: it must not be a folder where a file is asked for (or a file where a folder is), the
    nearest existing folder above it must be a folder, and this process must be able to create files
    there."""
    path = Path(path)
    if path.exists():
        if folder and not path.is_dir():
            raise InputError(path, "is a file; give a folder to write into")
        if not folder and path.is_dir():
            raise InputError(path, "is a folder; give a file path to write")
    target = path if folder and path.is_dir() else path.parent
    ancestor = target
    while not ancestor.exists():
        if ancestor.parent == ancestor:
            break
        ancestor = ancestor.parent
    if not ancestor.is_dir():
        raise InputError(path, f"cannot be written: {ancestor} is a file, not a folder")
    if not os.access(ancestor, os.W_OK | os.X_OK):
        raise InputError(path, f"cannot be written: no permission to create files in {ancestor}")


class OutputLock:
    """An advisory lock on `.<output>.lock` (fcntl.flock), so two processes never write one output: a
    second writer fails at once instead of waiting on shards the first one deletes. The lock file
    stays (like the `.key` beside an embeddings file); the operating system drops the lock when the
    holder exits, however it exits. Where fcntl is missing (Windows) it locks nothing."""

    def __init__(self, output: str | Path) -> None:
        self.output = Path(output)
        self.path = self.output.with_name(f".{self.output.name}.lock")  # hidden: not content
        self._handle: IO[Any] | None = None

    def acquire(self) -> bool:
        """Take the lock; False when another process holds it."""
        try:
            import fcntl
        except ImportError:
            return True
        self.path.parent.mkdir(parents=True, exist_ok=True)
        handle = self.path.open("a")
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            handle.close()
            return False
        self._handle = handle
        return True

    def refusal(self) -> InputError:
        return InputError(
            self.output,
            f"another process is writing this output (it holds {self.path}); wait for it to finish or "
            "write somewhere else",
        )

    def release(self) -> None:
        if self._handle is not None:
            self._handle.close()  # closing the file drops the flock
            self._handle = None
