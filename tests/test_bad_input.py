"""Bad input through the real CLI, one subprocess per case: exit 2, one line `where: what is wrong`
(verbatim, unwrapped), no traceback, and no output left behind as if it were valid."""

from __future__ import annotations

import errno
import json
import os
import re
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest
from PIL import Image

from umarvel.errors import os_error_message


def _items(tmp: Path, *lines: str | bytes, name: str = "items.jsonl") -> Path:
    path = tmp / name
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"".join((line if isinstance(line, bytes) else line.encode()) + b"\n" for line in lines))
    return path


def _embed(tmp: Path, items: Path, output: Path | None = None, *extra: str) -> list[str]:
    out = output if output is not None else tmp / "out.npy"
    return ["embed", "--model", "tiny:composed", "--input", str(items), "--output", str(out), *extra]


def _index(tmp: Path, dids: tuple[str, ...], *extra: str) -> list[str]:
    pool = str(_pool(tmp, *dids))
    return ["index", "--model", "tiny:composed", "--pool", pool, "--out", str(tmp / "idx"), *extra]


def _pool(tmp: Path, *dids: str) -> Path:
    return _items(
        tmp, *(json.dumps({"did": d, "txt": f"text {n}"}) for n, d in enumerate(dids)), name="pool.jsonl"
    )


@dataclass
class Case:
    """A command line built in a fresh folder, the message it must print, and what must not exist after."""

    name: str
    build: Callable[[Path], list[str]]
    message: str  # a regex, searched in the error line
    leftover: Callable[[Path], Path] = lambda tmp: tmp / "out.npy"


TEXT = json.dumps({"txt": "a red dress"})
CASES = [
    Case(
        "input file not UTF-8",
        lambda t: _embed(t, _items(t, TEXT, b'{"txt": "caf\xe9"}')),
        r"items\.jsonl:2: not UTF-8 \(byte 0xe9 at column 13\)",
    ),
    Case(
        "lone surrogate in a text",
        lambda t: _embed(t, _items(t, '{"txt": "a \\ud800 b"}')),
        r"items\.jsonl:1: txt holds a lone surrogate",
    ),
    Case(
        "instruction not a string",
        lambda t: _embed(t, _items(t, json.dumps({"txt": "x", "instruction": 7})), None, "--as", "query"),
        r"items\.jsonl:1: instruction must be a string or null, got int",
    ),
    Case(
        "blank line between items",
        lambda t: _embed(t, _items(t, TEXT, "", TEXT)),
        r"items\.jsonl:2: blank line",
    ),
    Case(
        "output under a file",
        lambda t: _embed(t, _items(t, TEXT), _items(t, TEXT, name="plain.txt") / "out.npy"),
        r"out\.npy: cannot be written: .*plain\.txt is a file, not a folder",
        lambda t: t / "plain.txt" / "out.npy",
    ),
    Case(
        "output is a folder",
        lambda t: _embed(t, _items(t, TEXT), _mkdir(t / "out.npy")),
        r"out\.npy: is a folder; give a file path",
        lambda t: t / "out.npy" / "never",
    ),
    Case(
        "unknown tiny family",
        lambda t: [
            "embed",
            "--model",
            "tiny:nope",
            "--input",
            str(_items(t, TEXT)),
            "--output",
            str(t / "out.npy"),
        ],
        r"unknown backbone family 'nope'",
    ),
    Case(
        "model folder that does not exist",
        lambda t: [
            "embed",
            "--model",
            str(t / "no" / "model"),
            "--input",
            str(_items(t, TEXT)),
            "--output",
            str(t / "out.npy"),
        ],
        r"neither 'offline', 'tiny:<family>', an existing folder, nor a hub id",
    ),
    Case(
        "hub id not in the local cache",
        lambda t: [
            "embed",
            "--model",
            "nobody/no-such-model",
            "--input",
            str(_items(t, TEXT)),
            "--output",
            str(t / "out.npy"),
        ],
        r"'nobody/no-such-model': not a folder here and not found on the hub or in its local cache",
    ),
    Case(
        "empty recipe",
        lambda t: ["train", str(_items(t, "", name="recipe.yaml"))],
        r"recipe\.yaml: the recipe is empty",
    ),
    Case(
        "negative max_steps",
        lambda t: ["train", str(_items(t, "stage: x", name="recipe.yaml")), "train.max_steps=-5"],
        r"max_steps must be a positive number of steps, or -1",
    ),
    Case(
        "search -k 0",
        lambda t: ["search", str(t / "idx"), "--text", "x", "-k", "0"],
        r"k and rerank_top must be at least 1",
    ),
    Case(
        "search -k -1",
        lambda t: ["search", str(t / "idx"), "--text", "x", "-k", "-1"],
        r"must be at least 1, got -1",
    ),
    Case(
        "serve on port 70000",
        lambda t: ["serve", str(t / "idx"), "--port", "70000"],
        r"need 0 < port < 65536",
    ),
    Case("serve with a negative max-k", lambda t: ["serve", str(t / "idx"), "--max-k", "-3"], r"max_k"),
    Case(
        "mine --k 0",
        lambda t: ["mine", "--model", "tiny:composed", "--root", str(t), "--out", str(t / "neg"), "--k", "0"],
        r"MineConfig: k must be at least 1, got 0",
        lambda t: t / "neg",
    ),
    Case(
        "eval runs with an unknown pool",
        lambda t: [
            "eval",
            "runs",
            "--root",
            str(t),
            "--runs",
            str(t),
            "--out",
            str(t / "ev"),
            "--pool",
            "bogus",
        ],
        r"--pool must be one of local, global, both, got 'bogus'",
        lambda t: t / "ev",
    ),
    Case(
        "square brackets in a path are printed as they are",
        lambda t: _embed(t, t / "br[red]" / "items.jsonl"),
        r"br\[red\][/\\]items\.jsonl: file not found",
    ),
    Case(
        "a closing markup tag in a path does not crash the printer",
        lambda t: _embed(t, t / "x[/b].jsonl"),
        r"x\[/b\]\.jsonl: file not found",
    ),
    Case(
        "duplicate did in an index pool, before any embedding",
        lambda t: _index(t, ("a", "b", "a")),
        r"pool\.jsonl:3: duplicate did 'a' \(first at .*pool\.jsonl:1\)",
        lambda t: t / "idx" / "embeddings.npy",
    ),
    Case(
        "a factory FAISS cannot build",
        lambda t: _index(t, ("a", "b"), "--factory", "NoSuchIndex9"),
        r"factory 'NoSuchIndex9': FAISS cannot build it",
        lambda t: t / "idx" / "embeddings.npy",
    ),
    Case(
        "IVF with more lists than candidates",
        lambda t: _index(t, ("a", "b"), "--factory", "IVF64,Flat"),
        r"has 64 lists but the pool has 2 candidates",
        lambda t: t / "idx" / "embeddings.npy",
    ),
]


def _mkdir(path: Path) -> Path:
    path.mkdir(parents=True)
    return path


def _run(args: list[str]) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "COLUMNS": "60"}
    return subprocess.run(
        [sys.executable, "-m", "umarvel.cli", *args], capture_output=True, text=True, env=env, timeout=300
    )


@pytest.mark.slow  # each case is a CLI subprocess (about 4 s)
@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_bad_input_exits_2_with_one_line_naming_what_is_wrong(case: Case, tmp_path: Path) -> None:
    result = _run(case.build(tmp_path))
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr
    lines = [line for line in result.stderr.splitlines() if line.startswith("error: ")]
    assert len(lines) == 1, result.stderr
    # COLUMNS=60 would wrap a Rich-printed message; the whole message stays on its line.
    assert re.search(case.message, lines[0]), lines[0]
    assert not case.leftover(tmp_path).exists()


@pytest.mark.skipif(os.geteuid() == 0, reason="root may write into a read-only folder")
def test_an_output_in_a_read_only_folder_is_refused_before_any_work(tmp_path: Path) -> None:
    locked = _mkdir(tmp_path / "locked")
    locked.chmod(0o555)
    try:
        result = _run(_embed(tmp_path, _items(tmp_path, TEXT), locked / "out.npy"))
    finally:
        locked.chmod(0o755)
    assert result.returncode == 2 and "no permission to create files in" in result.stderr


def test_a_full_disk_and_other_path_errors_read_as_what_is_wrong() -> None:
    full = OSError(errno.ENOSPC, "No space left on device", "/data/out.npy")
    assert os_error_message(full) == "/data/out.npy: no space left on device"
    short = OSError("131072 requested and 0 written")
    assert "no space left on device" in (os_error_message(short) or "")
    assert os_error_message(OSError(errno.EBADF, "Bad file descriptor")) is None  # a bug, not the user's


def test_an_index_file_changed_after_it_was_written_is_refused(tmp_path: Path) -> None:
    from umarvel.retrieval.index import Index

    index = Index(4, "Flat")
    index.add(__import__("numpy").eye(4, dtype="float32"), ["a", "b", "c", "d"])
    index.save(tmp_path)
    raw = bytearray((tmp_path / "index.faiss").read_bytes())
    raw[-8:] = os.urandom(8)
    (tmp_path / "index.faiss").write_bytes(bytes(raw))
    result = _run(["search", str(tmp_path), "--text", "x"])
    assert result.returncode == 2
    assert "index.faiss: does not match the sha256 recorded in index.json" in result.stderr


@pytest.mark.parametrize(
    ("damage", "message"),
    [
        (
            lambda d: (d / "index.faiss").write_bytes((d / "index.faiss").read_bytes()[:40]),
            "does not match the sha256",
        ),
        (lambda d: (d / "index.json").write_text("{not json"), "index.json: malformed JSON"),
    ],
    ids=["truncated index.faiss", "malformed index.json"],
)
def test_a_damaged_index_folder_names_the_damaged_file(damage, message: str, tmp_path: Path) -> None:
    import numpy as np

    from umarvel.data.io import InputError
    from umarvel.retrieval.index import Index

    index = Index(4, "Flat")
    index.add(np.eye(4, dtype="float32"), ["a", "b", "c", "d"])
    index.save(tmp_path)
    damage(tmp_path)
    with pytest.raises(InputError, match=message):
        Index.load(tmp_path)


def test_ids_that_do_not_cover_the_index_are_refused_even_without_digests(tmp_path: Path) -> None:
    import numpy as np

    from umarvel.data.io import InputError
    from umarvel.retrieval.index import Index

    index = Index(4, "Flat")
    index.add(np.eye(4, dtype="float32"), ["a", "b", "c", "d"])
    index.save(tmp_path)
    meta = json.loads((tmp_path / "index.json").read_text())
    del meta["sha256"]  # as an index written before digests
    (tmp_path / "index.json").write_text(json.dumps(meta))
    (tmp_path / "ids.json").write_text(json.dumps(["a", "b"]))
    with pytest.raises(InputError, match="2 ids for 4 vectors"):
        Index.load(tmp_path)


def test_written_files_get_the_mode_a_plain_open_would(tmp_path: Path) -> None:
    from umarvel.data.io import write_json

    write_json(tmp_path / "x.json", {"a": 1})
    umask = os.umask(0)
    os.umask(umask)
    assert (tmp_path / "x.json").stat().st_mode & 0o777 == 0o666 & ~umask


def test_a_missing_image_in_an_otherwise_valid_file_names_its_line(tmp_path: Path) -> None:
    Image.new("RGB", (8, 8)).save(tmp_path / "ok.png")
    items = _items(tmp_path, json.dumps({"img_path": "ok.png"}), json.dumps({"img_path": "gone.png"}))
    result = _run(_embed(tmp_path, items))
    assert result.returncode == 2 and "items.jsonl:2: image not found" in result.stderr


def test_a_second_writer_of_the_same_output_is_refused_at_once(tmp_path: Path) -> None:
    from umarvel.data.io import InputError, OutputLock
    from umarvel.data.records import Candidate
    from umarvel.modeling.embedder import Embedder
    from umarvel.retrieval.encode import encode_corpus

    output = tmp_path / "out.npy"
    first = OutputLock(output)
    assert first.acquire()
    try:
        with pytest.raises(InputError, match="another process is writing this output"):
            encode_corpus(Embedder.from_pretrained("tiny:composed"), [Candidate("a", text="x")], output)
        assert not output.exists()
    finally:
        first.release()
    second = OutputLock(output)
    assert second.acquire()  # released: the next writer gets it
    second.release()
