"""Loopback load test of `umarvel serve`: lock-per-request vs dynamic batching, side by side.

Builds an index of --photos Flickr8k photos with the embedder (offline backbone by default), then
serves it twice on free loopback ports: once with every request making its own model call under the
lock (the server before dynamic batching), once with dynamic batching (--max-batch, --max-wait-ms).
Each sends --clients x --requests text searches, and the two alternate --repeats times on the same
machine in the same run. Writes serve_load.json / serve_load.md: throughput and p50 / p99 / max
latency per path (the median over repeats), and the ratios. With --screenshot and Debian's chromium +
chromedriver installed, it also saves a screenshot of the search page with results.

    python benchmarks/serve_load.py --clients 50 --requests 4 --repeats 2 --screenshot
"""

from __future__ import annotations

import argparse
import asyncio
import csv
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def _screenshot(url: str, path: Path, query: str) -> str:
    from selenium.webdriver import Chrome, ChromeOptions
    from selenium.webdriver.chrome.service import Service as DriverService
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    options = ChromeOptions()
    options.binary_location = shutil.which("chromium") or ""
    for flag in ("--headless=new", "--no-sandbox", "--disable-gpu", "--window-size=1280,900"):
        options.add_argument(flag)
    chrome = Chrome(service=DriverService(shutil.which("chromedriver")), options=options)
    try:
        chrome.get(url + "/")
        chrome.find_element(By.ID, "text").send_keys(query)
        chrome.find_element(By.ID, "go").click()
        wait = WebDriverWait(chrome, 60)
        wait.until(lambda d: d.find_element(By.TAG_NAME, "body").get_attribute("data-state") == "done")
        loaded = "return arguments[0].complete && arguments[0].naturalWidth > 0"
        wait.until(
            lambda d: all(d.execute_script(loaded, i) for i in d.find_elements(By.CSS_SELECTOR, ".hit img"))
        )
        chrome.save_screenshot(str(path))
        return chrome.find_element(By.ID, "status").text
    finally:
        chrome.quit()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="offline")
    parser.add_argument("--dtype", default="auto")
    parser.add_argument("--photos", type=int, default=200)
    parser.add_argument("--clients", type=int, default=50)
    parser.add_argument("--requests", type=int, default=4, help="requests per client")
    parser.add_argument("--repeats", type=int, default=2, help="runs of each path, alternating")
    parser.add_argument("--max-batch", type=int, default=32)
    parser.add_argument("--max-wait-ms", type=float, default=5.0)
    parser.add_argument("--screenshot", action="store_true")
    parser.add_argument(
        "--shared-data", type=Path, default=Path(os.environ.get("UMARVEL_SHARED_DATA", "../shared/data"))
    )
    parser.add_argument("--output-dir", type=Path, default=Path("benchmarks/results"))
    args = parser.parse_args()

    import statistics

    import torch
    from benchmarks.digest_cost import _cpu_flags, _cpu_name

    from umarvel.config.schema import EmbedderConfig
    from umarvel.pipeline.index import build_index
    from umarvel.serve.app import Service, create_app
    from umarvel.serve.batching import Batching
    from umarvel.testing.load import run_load, serve_in_thread

    flickr = args.shared_data / "flickr8k-800"
    rows = list(csv.DictReader((flickr / "captions.csv").open(encoding="utf-8")))
    photos = sorted({r["image"] for r in rows})[: args.photos]
    work = Path(tempfile.mkdtemp(prefix="serve-load-"))
    pool = work / "pool.jsonl"
    pool.write_text(
        "".join(
            json.dumps({"did": p, "img_path": str((flickr / "images" / p).resolve())}) + "\n" for p in photos
        )
    )
    started = time.perf_counter()
    build_index(EmbedderConfig(model=args.model, dtype=args.dtype), pool, work / "index", progress=False)
    index_seconds = time.perf_counter() - started
    paths = {
        "lock per request": None,
        f"dynamic batching ({args.max_batch} items, {args.max_wait_ms:g} ms)": Batching(
            args.max_batch, args.max_wait_ms
        ),
    }
    services = {name: Service(work / "index", batching=batching) for name, batching in paths.items()}
    runs: dict[str, list[dict]] = {name: [] for name in paths}
    screenshot: str | None = None
    for _ in range(args.repeats):
        for name, service in services.items():
            with serve_in_thread(create_app(service), timeout=600) as url:
                asyncio.run(run_load(url, clients=4, requests_per_client=1, timeout=600))  # warm-up
                runs[name].append(asyncio.run(run_load(url, args.clients, args.requests, timeout=600)))
                browser = shutil.which("chromium") and shutil.which("chromedriver")
                if args.screenshot and browser and screenshot is None:
                    args.output_dir.mkdir(parents=True, exist_ok=True)
                    shot = args.output_dir / "serve_page.png"
                    screenshot = _screenshot(url, shot, "a dog running through the snow")
    fields = ("requests_per_second", "p50_ms", "p99_ms", "max_ms")
    summary = {
        name: {
            "errors": sum(r["errors"] for r in reports),
            "requests": sum(r["requests"] for r in reports),
            **{f: round(statistics.median(r[f] for r in reports), 1) for f in fields},
        }
        for name, reports in runs.items()
    }
    lock, dynamic = (summary[name] for name in paths)
    report = {
        "machine": {"cpu": _cpu_name(), "flags": _cpu_flags(), "threads": torch.get_num_threads()},
        "model": args.model,
        "dtype": args.dtype,
        "index_size": len(photos),
        "index_build_seconds": round(index_seconds, 1),
        "clients": args.clients,
        "requests_per_client": args.requests,
        "repeats": args.repeats,
        "paths": summary,
        "runs": runs,
        "throughput_ratio": round(dynamic["requests_per_second"] / lock["requests_per_second"], 2),
        "p99_ratio": round(dynamic["p99_ms"] / lock["p99_ms"], 2),
    }
    if screenshot is not None:
        report["screenshot_status_line"] = screenshot
    shutil.rmtree(work, ignore_errors=True)
    args.output_dir.mkdir(parents=True, exist_ok=True)
    (args.output_dir / "serve_load.json").write_text(json.dumps(report, indent=2) + "\n")
    lines = [
        f"# Loopback load test: `umarvel serve`, {report['index_size']} Flickr8k photos, "
        f"`{args.model}` ({args.dtype})",
        "",
        f"{args.clients} concurrent clients x {args.requests} text searches, each path run "
        f"{args.repeats} times, alternating (medians). {report['machine']['cpu']}, "
        f"flags {report['machine']['flags']}, {report['machine']['threads']} torch threads.",
        "",
        "| path | requests | errors | requests/s | p50 ms | p99 ms | max ms |",
        "|---|---|---|---|---|---|---|",
        *(
            f"| {name} | {row['requests']} | {row['errors']} | {row['requests_per_second']} | "
            f"{row['p50_ms']} | {row['p99_ms']} | {row['max_ms']} |"
            for name, row in summary.items()
        ),
        "",
        f"Dynamic batching: {report['throughput_ratio']}x the throughput, p99 x {report['p99_ratio']}. Each "
        "request embeds one text query and searches an exact inner-product index.",
    ]
    (args.output_dir / "serve_load.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
