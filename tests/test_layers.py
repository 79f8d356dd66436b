"""The package's layers hold (import-linter, the contract in pyproject.toml): a lower layer never
imports a higher one, so the library stays apart from the apps."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

importlinter_cli = pytest.importorskip("importlinter.cli")

ROOT = Path(__file__).resolve().parent.parent


def test_no_module_imports_a_layer_above_its_own() -> None:
    cwd = Path.cwd()
    os.chdir(ROOT)  # import-linter reads pyproject.toml from the working folder
    try:
        code = importlinter_cli.lint_imports(no_cache=True, no_logo=True)
    finally:
        os.chdir(cwd)
    assert code == 0, "a layer contract is broken: run `lint-imports` to see which import"
