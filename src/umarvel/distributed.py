"""The one place that decides rank and world size, and the collective steps multi-process commands use.

Under `torchrun` or `accelerate launch` (the launcher sets RANK, WORLD_SIZE, MASTER_ADDR, ...), the first
call to `world()` joins the launcher's process group (NCCL on GPUs, gloo on CPU), unless accelerate or
the Trainer joined it already; a plain single process is rank 0 of 1 and every collective here is a
no-op. Nothing waits by polling the file system: ranks meet at barriers and exchange small objects
through torch.distributed.

Work that only one process should do (writing an output, moving a folder aside, saving a model) runs in
`run_on_main` / `@main_only`: rank 0 does it while the others wait, and every rank gets its result.
Inside such a section rank 0 is a world of one, so code it calls (an encode, a nested main-only step)
runs as in a single process instead of waiting for ranks that are not there.
"""

from __future__ import annotations

import atexit
import functools
import os
import sys
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, TypeVar

if TYPE_CHECKING:
    from types import ModuleType

T = TypeVar("T")
_alone = False  # inside a main-only section (see module docstring)


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


def _dist() -> ModuleType:
    # Imported on use: a single-process command that never touches torch (`umarvel eval runs`, ...)
    # does not pay torch's import at start-up for asking its rank.
    import torch.distributed as dist

    return dist


def world() -> World:
    """This process's rank and the world size, joining the launcher's process group on first use."""
    if _alone:
        return World(0, 1)
    # No process group can exist before torch.distributed is imported.
    if "torch.distributed" in sys.modules:
        dist = _dist()
        if dist.is_available() and dist.is_initialized():
            return World(dist.get_rank(), dist.get_world_size())
    if _launched():
        import torch

        dist = _dist()

        # The launcher's env:// rendezvous (MASTER_ADDR / MASTER_PORT / RANK / WORLD_SIZE); accelerate's
        # `PartialState` joins an existing group, so the Trainer and this module share one.
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        if backend == "nccl" and "LOCAL_RANK" in os.environ:
            torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))
        dist.init_process_group(backend=backend)
        return World(dist.get_rank(), dist.get_world_size())
    return World(0, 1)


def _destroy_at_exit() -> None:
    """Tear the process group down while the interpreter is still whole. A gloo group left for
    finalisation can abort the process (SIGABRT, "terminate called without an active exception") when
    its worker threads release tensors after Python is gone; seen intermittently on 2-core CI."""
    dist = sys.modules.get("torch.distributed")
    if dist is not None and dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


atexit.register(_destroy_at_exit)


def leave(code: object) -> None:
    """End the process with `code` (a `SystemExit` code: None, an int, or a message for stderr).

    A process in a process group runs its exit hooks (this module's teardown of the group among
    them), flushes, and leaves with `os._exit`, skipping the interpreter's finalisation: DDP's and
    gloo's C++ threads released there can still abort a process whose work is done and written
    ("terminate called without an active exception", SIGABRT; seen on 2-core CI for `umarvel train`
    under a SLURM-style launch), and a launcher reports that as a failed rank. A single process exits
    as usual."""
    dist = sys.modules.get("torch.distributed")
    if dist is None or not (dist.is_available() and dist.is_initialized()):
        sys.exit(code)
    import gc

    if code is None:
        status = 0
    elif isinstance(code, int):
        status = code
    else:
        print(code, file=sys.stderr)
        status = 1
    gc.collect()  # the command's models and DDP wrappers, before the group they use goes
    atexit._run_exitfuncs()  # every library's exit hooks, as a normal exit would run them
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(status)


def barrier() -> None:
    """Wait until every rank gets here (nothing to wait for in a single process)."""
    if world().size > 1:
        _dist().barrier()


def broadcast(value: T, src: int = 0) -> T:
    """`value` of rank `src`, on every rank (a picklable object)."""
    if world().size == 1:
        return value
    box: list[Any] = [value]
    _dist().broadcast_object_list(box, src=src)
    return box[0]


def gather(value: T) -> list[T]:
    """Every rank's `value`, in rank order, on every rank."""
    size = world().size
    if size == 1:
        return [value]
    out: list[Any] = [None] * size
    _dist().all_gather_object(out, value)
    return out


@contextmanager
def _main_section() -> Iterator[None]:
    global _alone
    before, _alone = _alone, True
    try:
        yield
    finally:
        _alone = before


def run_on_main(function: Callable[..., T], *args: Any, **kwargs: Any) -> T:
    """Call `function` on rank 0 only; every rank gets its result (errors too: raised on every rank,
    so no rank waits forever for one that failed). The call is also a barrier."""
    current = world()
    if current.size == 1:
        return function(*args, **kwargs)
    outcome: tuple[bool, Any] = (True, None)
    if current.main:
        try:
            with _main_section():
                outcome = (True, function(*args, **kwargs))
        except Exception as error:  # re-raised below on every rank
            outcome = (False, error)
    ok, value = broadcast(outcome)
    if not ok:
        raise value
    return value


def main_only(function: Callable[..., T]) -> Callable[..., T]:
    """`function` as a main-only step: see `run_on_main`."""

    @functools.wraps(function)
    def wrapper(*args: Any, **kwargs: Any) -> T:
        return run_on_main(function, *args, **kwargs)

    return wrapper


def my_share(items: Sequence[T]) -> list[tuple[int, T]]:
    """This rank's (position, item) pairs of `items`: every world-size-th one, starting at its rank."""
    current = world()
    return [(i, item) for i, item in enumerate(items) if i % current.size == current.rank]


def each_rank_does(function: Callable[[], T], what: str) -> list[T]:
    """Run this rank's part of a shared job (`function`) and return every rank's result, in rank
    order, once all have finished; an error on any rank is raised on all of them (naming `what`), so
    none waits forever for one that failed."""
    result: Any = None
    try:
        result = function()
        failure: Exception | None = None
    except Exception as error:  # every rank learns of it below
        failure = error
    shared = gather((result, None if failure is None else repr(failure)))
    if failure is not None:
        raise failure
    others = [f for _, f in shared if f is not None]
    if others:
        raise RuntimeError(f"another rank failed while {what}: {others[0]}")
    return [r for r, _ in shared]
