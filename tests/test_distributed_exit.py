"""The exit hook tears a process group down before the interpreter finalises (gloo can abort a process
that leaves its group to finalisation)."""

from __future__ import annotations

from pathlib import Path

import torch.distributed as dist

from umarvel.distributed import _destroy_at_exit


def test_the_exit_hook_destroys_an_initialised_group_and_is_harmless_without_one(tmp_path: Path) -> None:
    _destroy_at_exit()  # nothing to destroy: no error
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    assert dist.is_initialized()
    _destroy_at_exit()
    assert not dist.is_initialized()
