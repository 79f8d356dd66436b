"""Dynamic batching: concurrent requests share model calls, each gets the rows it would get alone, and
a bad request fails alone."""

from __future__ import annotations

import threading

import numpy as np
import pytest
from PIL import Image

from umarvel.data.collator import EncodeItem
from umarvel.data.io import InputError
from umarvel.modeling.embedder import Embedder
from umarvel.serve.batching import DynamicBatcher


@pytest.fixture(scope="module")
def embedder() -> Embedder:
    return Embedder.from_pretrained("tiny:qwen2_vl")


def _requests() -> list[list[EncodeItem]]:
    image = Image.new("RGB", (40, 30), (200, 40, 40))
    texts = ["a kite", "two dogs running along a long empty beach at dawn", "soup", "a red square"]
    requests = [[EncodeItem(text=t, instruction="Find the image.")] for t in texts]
    requests.append([EncodeItem(image=image)])
    requests.append([EncodeItem(text="a red square", image=image), EncodeItem(text="tax forms")])
    return requests * 2


def _submit_together(batcher: DynamicBatcher, requests: list) -> list:
    """Submit every request from its own thread at once; the futures, in request order."""
    futures: list = [None] * len(requests)
    start = threading.Barrier(len(requests))

    def send(i: int) -> None:
        start.wait()
        futures[i] = batcher.submit(requests[i])

    threads = [threading.Thread(target=send, args=(i,)) for i in range(len(requests))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return futures


def test_every_request_gets_the_rows_it_would_get_alone(embedder: Embedder) -> None:
    batcher = DynamicBatcher(embedder.encode_batch, max_items=32, max_wait_ms=300)
    requests = _requests()
    results = [future.result(timeout=60) for future in _submit_together(batcher, requests)]
    assert batcher.batches < len(requests)  # requests really shared model calls
    for items, (rows, tokens) in zip(requests, results, strict=True):
        alone_rows, alone_tokens = embedder.encode_batch(items)
        np.testing.assert_allclose(rows, alone_rows, atol=1e-5)
        assert tokens.tolist() == alone_tokens.tolist()
    batcher.close()


def test_a_batch_never_holds_more_than_max_items_unless_one_request_does(embedder: Embedder) -> None:
    sizes: list[int] = []

    def run(items: list[EncodeItem]):
        sizes.append(len(items))
        return embedder.encode_batch(items)

    batcher = DynamicBatcher(run, max_items=3, max_wait_ms=200)
    requests = [[EncodeItem(text=f"note {i}")] for i in range(7)] + [[EncodeItem(text="x")] * 5]
    for future in _submit_together(batcher, requests):
        future.result(timeout=60)
    assert sum(sizes) == 12
    assert all(size <= 3 for size in sizes if size != 5) and 5 in sizes
    batcher.close()


def test_a_request_with_a_bad_item_fails_alone_and_the_rest_of_its_batch_succeeds(embedder: Embedder) -> None:
    batcher = DynamicBatcher(embedder.encode_batch, max_items=32, max_wait_ms=300)
    good = [[EncodeItem(text=f"a note about {word}")] for word in ("kites", "soup", "rain")]
    bad = [EncodeItem(text="fine"), EncodeItem(where="request.json:1")]  # the second has nothing to embed
    futures = _submit_together(batcher, [*good, bad])
    for items, future in zip(good, futures[:3], strict=True):
        rows, _ = future.result(timeout=60)
        np.testing.assert_allclose(rows, embedder.encode_batch(items)[0], atol=1e-5)
    with pytest.raises(InputError, match=r"request\.json:1"):
        futures[3].result(timeout=60)
    batcher.close()


def test_settings_out_of_range_are_refused() -> None:
    with pytest.raises(ValueError, match="max_items"):
        DynamicBatcher(lambda items: (np.zeros((0, 1)), np.zeros(0)), max_items=0)
