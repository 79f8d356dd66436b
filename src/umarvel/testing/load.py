"""A bounded loopback load test for `umarvel serve`: N concurrent clients, each sending M searches.

python -m umarvel.testing.load http://127.0.0.1:8000 --clients 50 --requests 4
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import time
from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np

QUERIES = (
    "a dog running on the grass",
    "two children playing in the water",
    "a man riding a bicycle down the street",
    "a red dress with long sleeves",
    "people sitting at a table outside",
)


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on now."""
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@contextlib.contextmanager
def serve_in_thread(app: Any, timeout: float = 30.0) -> Iterator[str]:
    """Run `app` under uvicorn on a free loopback port in a daemon thread; yields its base URL and
    stops it on exit."""
    import threading

    import uvicorn

    port = free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.time() + timeout
    while not server.started and time.time() < deadline and thread.is_alive():
        time.sleep(0.05)
    if not server.started:
        raise RuntimeError("the server did not start")
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(timeout=10)


async def run_load(
    url: str,
    clients: int = 50,
    requests_per_client: int = 4,
    timeout: float = 120.0,
    queries: Sequence[str] = QUERIES,
    k: int = 10,
) -> dict:
    """Send `clients` x `requests_per_client` POST /search requests, `clients` at a time; returns the
    count, errors (non-200 or exceptions), p50 / p99 / max latency in ms, and requests per second. The
    whole run is bounded by `timeout` seconds."""
    import httpx

    latencies: list[float] = []
    errors: list[str] = []

    async def client(number: int, session: httpx.AsyncClient) -> None:
        for turn in range(requests_per_client):
            text = queries[(number + turn) % len(queries)]
            started = time.perf_counter()
            try:
                response = await session.post(f"{url}/search", data={"text": text, "k": str(k)})
                if response.status_code != 200:
                    errors.append(f"{response.status_code}: {response.text[:200]}")
            except httpx.HTTPError as error:
                errors.append(repr(error))
            latencies.append(1000 * (time.perf_counter() - started))

    limits = httpx.Limits(max_connections=clients, max_keepalive_connections=clients)
    started = time.perf_counter()
    async with httpx.AsyncClient(timeout=timeout, limits=limits) as session:
        await asyncio.wait_for(asyncio.gather(*(client(i, session) for i in range(clients))), timeout)
    wall = time.perf_counter() - started
    values = np.array(latencies)
    return {
        "clients": clients,
        "requests": len(latencies),
        "errors": len(errors),
        "error_examples": errors[:3],
        "p50_ms": round(float(np.percentile(values, 50)), 1),
        "p99_ms": round(float(np.percentile(values, 99)), 1),
        "max_ms": round(float(values.max()), 1),
        "requests_per_second": round(len(latencies) / wall, 2),
        "wall_seconds": round(wall, 2),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("url")
    parser.add_argument("--clients", type=int, default=50)
    parser.add_argument("--requests", type=int, default=4, help="requests per client")
    parser.add_argument("--timeout", type=float, default=300.0)
    args = parser.parse_args()
    print(json.dumps(asyncio.run(run_load(args.url, args.clients, args.requests, args.timeout)), indent=2))


if __name__ == "__main__":
    main()
