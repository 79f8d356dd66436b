"""The search server: endpoints, limits, the index-folder boundary, a loopback load test, and the page
in headless Chromium."""

from __future__ import annotations

import asyncio
import base64
import io
import json
import shutil
from pathlib import Path

import pytest
from PIL import Image

pytest.importorskip("fastapi")
pytest.importorskip("httpx")
from fastapi.testclient import TestClient

from umarvel.serve.app import ServeLimits, Service, create_app

COLOURS = {"red": (210, 30, 30), "green": (30, 190, 40), "blue": (30, 60, 220)}


def _jpeg(colour: tuple[int, int, int], size: tuple[int, int] = (48, 36)) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", size, colour).save(buffer, format="JPEG")
    return buffer.getvalue()


@pytest.fixture(scope="module")
def index_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from umarvel.config.schema import EmbedderConfig
    from umarvel.pipeline.index import build_index

    folder = tmp_path_factory.mktemp("serve")
    rows = [{"did": f"t{i}", "txt": f"a short note number {i} about the weather"} for i in range(6)]
    for name, colour in COLOURS.items():
        (folder / f"{name}.jpg").write_bytes(_jpeg(colour))
        rows.append({"did": name, "txt": f"a {name} square", "img_path": f"{name}.jpg"})
    (folder / "pool.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    build_index(EmbedderConfig(model="tiny:qwen2_vl"), folder / "pool.jsonl", folder / "idx", progress=False)
    return folder / "idx"


@pytest.fixture(scope="module")
def service(index_dir: Path) -> Service:
    return Service(index_dir, reranker="tiny:qwen2_vl", limits=ServeLimits(max_k=20, max_image_bytes=20_000))


@pytest.fixture(scope="module")
def client(service: Service) -> TestClient:
    return TestClient(create_app(service))


def test_health_and_the_openapi_schema_describe_the_service(client: TestClient) -> None:
    health = client.get("/health").json()
    assert health["status"] == "ok" and health["index_size"] == 9 and health["reranker"] == "tiny:qwen2_vl"
    paths = client.get("/openapi.json").json()["paths"]
    assert {"/search", "/embed", "/health"} <= set(paths)


def test_a_text_search_returns_k_ranked_hits_with_texts_and_image_urls(client: TestClient) -> None:
    response = client.post("/search", data={"text": "a red square", "k": "5"})
    assert response.status_code == 200, response.text
    hits = response.json()["results"]
    assert [h["rank"] for h in hits] == [1, 2, 3, 4, 5]
    assert [h["score"] for h in hits] == sorted((h["score"] for h in hits), reverse=True)
    for hit in hits:
        assert hit["text"]
        assert (hit["image_url"] is not None) == (hit["did"] in COLOURS)


def test_an_image_upload_and_a_composed_query_search(client: TestClient) -> None:
    image = {"image": ("q.jpg", _jpeg(COLOURS["green"]), "image/jpeg")}
    alone = client.post("/search", data={"k": "3"}, files=image)
    composed = client.post(
        "/search", data={"text": "the same colour", "k": "3", "rerank": "true"}, files=image
    )
    assert alone.status_code == 200 and composed.status_code == 200, composed.text
    assert composed.json()["reranked"] is True and composed.json()["fusion_weight"] == pytest.approx(0.1)


def test_embed_returns_normalised_vectors_for_texts_and_images(client: TestClient) -> None:
    items = [{"text": "hello"}, {"image_base64": base64.b64encode(_jpeg(COLOURS["blue"])).decode()}]
    payload = client.post("/embed", json={"items": items, "role": "candidate"}).json()
    assert len(payload["embeddings"]) == 2 and len(payload["embeddings"][0]) == payload["dim"]
    for vector in payload["embeddings"]:
        assert sum(v * v for v in vector) == pytest.approx(1.0, abs=1e-3)


@pytest.mark.parametrize(
    ("data", "files", "status"),
    [
        ({"k": "3"}, None, 422),  # nothing to search with
        ({"text": "x", "k": "500"}, None, 422),  # k over the limit
        ({"text": "x" * 5000}, None, 422),  # text over the limit
        ({"k": "3"}, {"image": ("a.jpg", b"not an image at all", "image/jpeg")}, 400),  # corrupt
        ({"k": "3"}, {"image": ("a.jpg", b"\xff" * 30_000, "image/jpeg")}, 413),  # over max_image_bytes
    ],
    ids=["empty", "k", "long-text", "corrupt-image", "big-image"],
)
def test_malformed_search_requests_get_a_4xx_with_a_message(
    client: TestClient, data: dict, files: dict | None, status: int
) -> None:
    response = client.post("/search", data=data, files=files)
    assert response.status_code == status
    assert response.json()["detail"]


def test_an_image_declaring_too_many_pixels_is_refused_before_decoding(index_dir: Path) -> None:
    strict = TestClient(create_app(Service(index_dir, limits=ServeLimits(max_source_pixels=10_000))))
    buffer = io.BytesIO()
    Image.new("RGB", (400, 400), (0, 0, 0)).save(buffer, format="PNG")  # small file, 160k pixels
    response = strict.post("/search", files={"image": ("big.png", buffer.getvalue(), "image/png")})
    assert response.status_code == 400 and "exceeds 10000 pixels" in response.json()["detail"]


def test_an_oversized_body_is_refused_with_413(index_dir: Path) -> None:
    small = TestClient(create_app(Service(index_dir, limits=ServeLimits(max_request_bytes=2_000))))
    response = small.post("/search", data={"text": "y" * 5_000})
    assert response.status_code == 413


def test_media_is_served_by_candidate_id_only(client: TestClient) -> None:
    assert client.get("/media/red").headers["content-type"].startswith("image/")
    for probe in ("/media/t1", "/media/..%2F..%2Fpool.jsonl", "/media/../../etc/passwd", "/media/nope"):
        assert client.get(probe).status_code == 404


def test_an_index_whose_candidates_file_points_outside_is_refused(index_dir: Path, tmp_path: Path) -> None:
    from umarvel.data.io import InputError

    copy = tmp_path / "idx"
    shutil.copytree(index_dir, copy)
    lines = (copy / "candidates.jsonl").read_text().splitlines()
    record = json.loads(lines[-1])
    record["img_path"] = "../../../../etc/hostname"
    (copy / "candidates.jsonl").write_text("\n".join([*lines[:-1], json.dumps(record)]) + "\n")
    with pytest.raises(InputError, match="leaves the index folder"):
        Service(copy)


def test_metrics_count_requests_by_endpoint_and_status(client: TestClient) -> None:
    client.get("/health")
    client.post("/search", data={"k": "3"})
    text = client.get("/metrics").text
    assert 'umarvel_requests_total{endpoint="/health",status="200"}' in text
    assert 'umarvel_requests_total{endpoint="/search",status="422"}' in text


def test_unknown_paths_share_one_metrics_series_and_routes_are_labelled_by_template(
    client: TestClient,
) -> None:
    def unmatched(text: str) -> float:
        line = next(
            (x for x in text.splitlines() if 'requests_total{endpoint="unmatched",status="404"}' in x), ""
        )
        return float(line.split()[-1]) if line else 0.0

    before = client.get("/metrics").text
    for number in range(40):
        client.get(f"/no/such/path/{number}")
    client.get("/media/red")
    text = client.get("/metrics").text
    assert unmatched(text) - unmatched(before) == 40
    assert "/no/such/path" not in text
    assert 'endpoint="/media/{did}"' in text


def test_a_chunked_body_over_the_limit_is_refused_with_413(index_dir: Path) -> None:
    small = TestClient(create_app(Service(index_dir, limits=ServeLimits(max_request_bytes=2_000))))

    def chunks():  # no content-length: the body streams in chunks
        for _ in range(10):
            yield b"text=" + b"y" * 500

    response = small.post(
        "/search", content=chunks(), headers={"content-type": "application/x-www-form-urlencoded"}
    )
    assert response.status_code == 413 and "exceeds 2000 bytes" in response.json()["detail"]


def test_a_stalled_upload_times_out_with_408() -> None:
    import asyncio

    from umarvel.serve.app import _BodyLimit

    async def app(scope, receive, send):  # reads the whole body, then answers 200
        while (await receive()).get("more_body"):
            pass
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"ok"})

    async def stalled_receive():
        await asyncio.sleep(5)
        return {"type": "http.request", "body": b"", "more_body": False}

    sent: list[dict] = []

    async def send(message):
        sent.append(message)

    scope = {"type": "http", "method": "POST", "path": "/search", "headers": []}
    asyncio.run(_BodyLimit(app, limit=1_000, timeout=0.05)(scope, stalled_receive, send))
    assert sent[0]["status"] == 408
    assert b"stalled" in sent[1]["body"]


@pytest.fixture(scope="module")
def live_server(service: Service) -> str:
    from umarvel.testing.load import serve_in_thread

    with serve_in_thread(create_app(service)) as url:
        yield url


def test_fifty_concurrent_clients_get_answers_and_no_errors(live_server: str) -> None:
    from umarvel.testing.load import run_load

    report = asyncio.run(run_load(live_server, clients=50, requests_per_client=2, timeout=60))
    assert report["errors"] == 0 and report["requests"] == 100
    assert 0 < report["p50_ms"] <= report["p99_ms"]


def _chromium() -> tuple[str, str] | None:
    browser = shutil.which("chromium") or shutil.which("chromium-browser")
    driver = shutil.which("chromedriver")
    return (browser, driver) if browser and driver else None


@pytest.mark.slow
@pytest.mark.skipif(_chromium() is None, reason="needs Debian's chromium and chromium-driver (apt)")
def test_the_page_searches_by_text_and_by_image_in_headless_chromium(
    live_server: str, tmp_path: Path
) -> None:
    selenium = pytest.importorskip("selenium")
    from selenium.webdriver import Chrome, ChromeOptions
    from selenium.webdriver.chrome.service import Service as DriverService
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    assert selenium
    browser, driver = _chromium()  # type: ignore[misc]
    options = ChromeOptions()
    options.binary_location = browser
    for flag in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage"):
        options.add_argument(flag)
    chrome = Chrome(service=DriverService(driver), options=options)
    try:
        chrome.get(live_server + "/")
        wait = WebDriverWait(chrome, 30)
        chrome.find_element(By.ID, "text").send_keys("a blue square")
        chrome.find_element(By.ID, "go").click()
        wait.until(lambda d: d.find_element(By.TAG_NAME, "body").get_attribute("data-state") == "done")
        cards = chrome.find_elements(By.CSS_SELECTOR, ".hit")
        assert len(cards) == 9
        assert "results in" in chrome.find_element(By.ID, "status").text
        picture = tmp_path / "query.jpg"
        picture.write_bytes(_jpeg(COLOURS["red"]))
        chrome.find_element(By.ID, "text").clear()
        chrome.execute_script("document.body.dataset.state = ''")
        chrome.find_element(By.ID, "image").send_keys(str(picture))
        chrome.find_element(By.ID, "go").click()
        wait.until(lambda d: d.find_element(By.TAG_NAME, "body").get_attribute("data-state") == "done")
        assert len(chrome.find_elements(By.CSS_SELECTOR, ".hit img")) == 3
        loaded = "return arguments[0].complete && arguments[0].naturalWidth > 0"
        wait.until(
            lambda d: all(d.execute_script(loaded, im) for im in d.find_elements(By.CSS_SELECTOR, ".hit img"))
        )
        chrome.save_screenshot(str(tmp_path / "page.png"))
    finally:
        chrome.quit()
