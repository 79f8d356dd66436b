"""Dynamic batching: concurrent requests' items gathered into one model call.

A worker thread takes the first waiting request, then keeps gathering until the batch holds
`max_items` items or `max_wait_ms` have passed since that first request. It runs the batch, and hands
each request its own rows. A request never waits for more than one batch ahead of it plus
`max_wait_ms`. If a batch fails, each of its requests is run alone, so a request with a bad item gets
its own error and the others in the batch still get their answers.
"""

from __future__ import annotations

import asyncio
import logging
import queue
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any, Generic, TypeVar

import numpy as np

logger = logging.getLogger(__name__)

Item = TypeVar("Item")


@dataclass(frozen=True)
class Batching:
    """Dynamic batching settings: the most items in one model call, and how long a batch's first
    request waits for others (ms)."""

    max_items: int = 32
    max_wait_ms: float = 5.0


@dataclass
class _Request(Generic[Item]):
    items: Sequence[Item]
    future: Future = field(default_factory=Future)


class DynamicBatcher(Generic[Item]):
    """Runs `run(items) -> (rows, tokens)` over the items of concurrent requests, batched.

    Args:
        run: one model call; returns an (N, D) array of rows and an (N,) array of token counts for N
            items, in order.
        max_items: the most items in one call (a request larger than this runs as its own batch).
        max_wait_ms: how long the first request of a batch waits for others to join.
    """

    def __init__(
        self,
        run: Callable[[list[Item]], tuple[np.ndarray, np.ndarray]],
        max_items: int = 32,
        max_wait_ms: float = 5.0,
    ) -> None:
        if max_items < 1 or max_wait_ms < 0:
            raise ValueError(f"need max_items >= 1 and max_wait_ms >= 0, got {max_items}, {max_wait_ms}")
        self.run = run
        self.max_items = max_items
        self.max_wait = max_wait_ms / 1000
        self.batches = 0  # model calls made, for /health and tests
        self._pending: _Request | None = None  # a request that did not fit the last batch
        self._queue: queue.Queue[_Request | None] = queue.Queue()
        self._worker = threading.Thread(target=self._loop, name="umarvel-batcher", daemon=True)
        self._worker.start()

    def submit(self, items: Sequence[Item]) -> Future:
        """A future of (rows, tokens) for `items`."""
        request: _Request = _Request(list(items))
        self._queue.put(request)
        return request.future

    async def __call__(self, items: Sequence[Item]) -> tuple[np.ndarray, np.ndarray]:
        return await asyncio.wrap_future(self.submit(items))

    def close(self) -> None:
        self._queue.put(None)
        self._worker.join(timeout=10)

    def _gather(self, first: _Request) -> list[_Request]:
        batch, size = [first], len(first.items)
        deadline = time.monotonic() + self.max_wait
        while size < self.max_items:
            left = deadline - time.monotonic()
            try:
                request = self._queue.get(timeout=left) if left > 0 else self._queue.get_nowait()
            except queue.Empty:
                break
            if request is None:  # closing: finish this batch first
                self._queue.put(None)
                break
            if size + len(request.items) > self.max_items:
                self._pending = request  # starts the next batch
                break
            batch.append(request)
            size += len(request.items)
        return batch

    def _loop(self) -> None:
        while True:
            first = self._pending if self._pending is not None else self._queue.get()
            self._pending = None
            if first is None:
                return
            self._run(self._gather(first))

    def _run(self, batch: list[_Request]) -> None:
        items = [item for request in batch for item in request.items]
        try:
            rows, tokens = self.run(items)
            self.batches += 1
        except Exception as error:
            if len(batch) == 1:
                batch[0].future.set_exception(error)
                return
            logger.info("a batch of %d requests failed; running each alone", len(batch))
            for request in batch:
                self._settle_alone(request)
            return
        start = 0
        for request in batch:
            stop = start + len(request.items)
            request.future.set_result((rows[start:stop], tokens[start:stop]))
            start = stop

    def _settle_alone(self, request: _Request) -> None:
        try:
            result = self.run(list(request.items))
            self.batches += 1
        except Exception as error:
            request.future.set_exception(error)
        else:
            request.future.set_result(result)


def describe(batcher: Any) -> dict[str, Any]:
    """The batching settings and counters /health reports."""
    if batcher is None:
        return {"dynamic": False}
    return {
        "dynamic": True,
        "max_items": batcher.max_items,
        "max_wait_ms": batcher.max_wait * 1000,
        "batches": batcher.batches,
    }
