"""Loopback load test of `umarvel serve`: an index of real Flickr8k photos, N concurrent clients.

Builds an index of --photos Flickr8k photos with the embedder (offline backbone by default), starts the
server on a free loopback port, sends --clients x --requests text searches, and writes
serve_load.json / serve_load.md (p50 / p99 / max latency, throughput, errors). With --screenshot and
Debian's chromium + chromedriver installed, also saves a screenshot of the search page with results.

    python benchmarks/serve_load.py --clients 50 --requests 4 --screenshot
"""

from __future__ import annotations

import argparse
import asyncio
import csv
import json
import os
import shutil
import tempfile
import time
from pathlib import Path


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
    parser.add_argument("--screenshot", action="store_true")
    parser.add_argument(
        "--shared-data", type=Path, default=Path(os.environ.get("UMARVEL_SHARED_DATA", "../shared/data"))
    )
    parser.add_argument("--output-dir", type=Path, default=Path("benchmarks/results"))
    args = parser.parse_args()

    from umarvel.config.schema import EmbedderConfig
    from umarvel.pipeline.index import build_index
    from umarvel.serve.app import Service, create_app
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
    service = Service(work / "index")
    server = serve_in_thread(create_app(service), timeout=600)
    url = server.__enter__()
    report = asyncio.run(run_load(url, args.clients, args.requests, timeout=600))
    report.update(
        {
            "model": args.model,
            "dtype": args.dtype,
            "index_size": len(photos),
            "index_build_seconds": round(index_seconds, 1),
            "threads": __import__("torch").get_num_threads(),
        }
    )
    if args.screenshot and shutil.which("chromium") and shutil.which("chromedriver"):
        shot = args.output_dir / "serve_page.png"
        args.output_dir.mkdir(parents=True, exist_ok=True)
        report["screenshot"] = str(shot)
        report["screenshot_status_line"] = _screenshot(url, shot, "a dog running through the snow")
    server.__exit__(None, None, None)
    shutil.rmtree(work, ignore_errors=True)
    args.output_dir.mkdir(parents=True, exist_ok=True)
    (args.output_dir / "serve_load.json").write_text(json.dumps(report, indent=2) + "\n")
    lines = [
        f"# Loopback load test: `umarvel serve`, {report['index_size']} Flickr8k photos, "
        f"`{args.model}` ({args.dtype})",
        "",
        "| clients | requests | errors | p50 ms | p99 ms | max ms | requests/s |",
        "|---|---|---|---|---|---|---|",
        f"| {report['clients']} | {report['requests']} | {report['errors']} | {report['p50_ms']} | "
        f"{report['p99_ms']} | {report['max_ms']} | {report['requests_per_second']} |",
        "",
        "Each request embeds one text query (model calls are serialised by the server) and searches an exact",
        f"inner-product index; {report['threads']} torch threads.",
    ]
    (args.output_dir / "serve_load.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
