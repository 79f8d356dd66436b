"""The exit hook tears a process group down before the interpreter finalises (gloo can abort a process
that leaves its group to finalisation)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch.distributed as dist

from umarvel.distributed import _destroy_at_exit


def test_the_exit_hook_destroys_an_initialised_group_and_is_harmless_without_one(tmp_path: Path) -> None:
    _destroy_at_exit()  # nothing to destroy: no error
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    assert dist.is_initialized()
    _destroy_at_exit()
    assert not dist.is_initialized()


def test_a_process_in_a_group_leaves_with_its_status_after_the_exit_hooks(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import atexit
    import os

    from umarvel.distributed import leave

    calls: list[str] = []

    class LeftError(Exception):
        pass

    def fake_exit(status: int) -> None:
        calls.append(f"exit {status}")
        raise LeftError

    monkeypatch.setattr(os, "_exit", fake_exit)
    monkeypatch.setattr(atexit, "_run_exitfuncs", lambda: (calls.append("hooks"), _destroy_at_exit()))
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    with pytest.raises(LeftError):
        leave(2)
    assert calls == ["hooks", "exit 2"] and not dist.is_initialized()


def test_a_single_process_leaves_by_systemexit() -> None:
    from umarvel.distributed import leave

    with pytest.raises(SystemExit) as stop:
        leave(2)
    assert stop.value.code == 2
