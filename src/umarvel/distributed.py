"""The one place that decides rank and world size, and the collective steps multi-process commands use.

Under `torchrun` or `accelerate launch` (the launcher sets RANK, WORLD_SIZE, MASTER_ADDR, ...), the first
call to `world()` joins the launcher's process group (NCCL on GPUs, gloo on CPU), unless accelerate or
the Trainer joined it already; a plain single process is rank 0 of 1 and every collective here is a
no-op. Nothing waits by polling the file system: ranks meet at barriers and exchange small objects
through torch.distributed.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any, TypeVar

import torch.distributed as dist

T = TypeVar("T")


@dataclass(frozen=True)
class World:
    """This process's rank among `size` processes."""

    rank: int
    size: int

    @property
    def main(self) -> bool:
        return self.rank == 0


def _launched() -> bool:
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def world() -> World:
    """This process's rank and the world size, joining the launcher's process group on first use."""
    if dist.is_available() and dist.is_initialized():
        return World(dist.get_rank(), dist.get_world_size())
    if _launched():
        import torch

        # The launcher's env:// rendezvous (MASTER_ADDR / MASTER_PORT / RANK / WORLD_SIZE); accelerate's
        # `PartialState` joins an existing group, so the Trainer and this module share one.
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        if backend == "nccl" and "LOCAL_RANK" in os.environ:
            torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))
        dist.init_process_group(backend=backend)
        return World(dist.get_rank(), dist.get_world_size())
    return World(0, 1)


def barrier() -> None:
    """Wait until every rank gets here (nothing to wait for in a single process)."""
    if world().size > 1:
        dist.barrier()


def broadcast(value: T, src: int = 0) -> T:
    """`value` of rank `src`, on every rank (a picklable object)."""
    if world().size == 1:
        return value
    box: list[Any] = [value]
    dist.broadcast_object_list(box, src=src)
    return box[0]


def gather(value: T) -> list[T]:
    """Every rank's `value`, in rank order, on every rank."""
    size = world().size
    if size == 1:
        return [value]
    out: list[Any] = [None] * size
    dist.all_gather_object(out, value)
    return out


def run_on_main(function: Any, *args: Any, **kwargs: Any) -> Any:
    """Call `function` on rank 0 only; every rank gets its result (errors too: raised on every rank,
    so no rank waits forever for one that failed)."""
    current = world()
    outcome: tuple[bool, Any] = (True, None)
    if current.main:
        try:
            outcome = (True, function(*args, **kwargs))
        except Exception as error:  # re-raised below on every rank
            outcome = (False, error)
    ok, value = broadcast(outcome) if current.size > 1 else outcome
    if not ok:
        raise value
    return value
