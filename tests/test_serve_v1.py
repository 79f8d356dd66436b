"""The OpenAI-compatible routes, driven by the official `openai` client against a live server, and
their errors in OpenAI's shape; API keys; CORS off by default."""

from __future__ import annotations

import base64
import io
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

pytest.importorskip("fastapi")
pytest.importorskip("openai")
import openai
from fastapi.testclient import TestClient

from umarvel.serve.app import ServeLimits, Service, create_app, read_api_keys
from umarvel.serve.v1 import matryoshka
from umarvel.testing.load import serve_in_thread

MODEL = "tiny:qwen2_vl"
KEY = "sk-umarvel-test-key"


def _png(colour: tuple[int, int, int]) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (40, 30), colour).save(buffer, format="PNG")
    return buffer.getvalue()


def _data_url(colour: tuple[int, int, int]) -> str:
    return "data:image/png;base64," + base64.b64encode(_png(colour)).decode()


@pytest.fixture(scope="module")
def service(tmp_path_factory: pytest.TempPathFactory) -> Service:
    from umarvel.config.schema import EmbedderConfig
    from umarvel.pipeline.index import build_index

    folder = tmp_path_factory.mktemp("v1")
    rows = [{"did": f"t{i}", "txt": f"note {i} about the sea"} for i in range(4)]
    (folder / "pool.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    build_index(EmbedderConfig(model=MODEL), folder / "pool.jsonl", folder / "idx", progress=False)
    return Service(folder / "idx", reranker=MODEL, limits=ServeLimits(max_embed_items=8, max_rerank_top=6))


@pytest.fixture(scope="module")
def client(service: Service) -> TestClient:
    return TestClient(create_app(service))


@pytest.fixture(scope="module")
def live(service: Service) -> openai.OpenAI:
    with serve_in_thread(create_app(service, api_keys=[KEY])) as url:
        yield openai.OpenAI(base_url=f"{url}/v1", api_key=KEY, max_retries=0, timeout=60)


def test_the_openai_client_embeds_strings_as_the_service_embeds_candidates(
    live: openai.OpenAI, service: Service
) -> None:
    texts = ["a calm sea at dawn", "a crowded market"]
    response = live.embeddings.create(model=MODEL, input=texts)
    vectors = np.array([d.embedding for d in response.data], dtype=np.float32)
    assert [d.index for d in response.data] == [0, 1] and response.model == MODEL
    expected = service.embedder.encode_candidates(texts, progress=False)
    np.testing.assert_allclose(vectors, expected, atol=1e-4)
    assert response.usage.prompt_tokens == response.usage.total_tokens > 0


def test_base64_encoding_carries_the_same_floats(live: openai.OpenAI, client: TestClient) -> None:
    body = {"model": MODEL, "input": ["a calm sea at dawn"]}
    floats = client.post("/v1/embeddings", json=body).json()["data"][0]["embedding"]
    packed = client.post("/v1/embeddings", json={**body, "encoding_format": "base64"}).json()
    decoded = np.frombuffer(base64.b64decode(packed["data"][0]["embedding"]), dtype="<f4")
    np.testing.assert_allclose(decoded, floats, atol=1e-6)
    # The official client asks for base64 by default and decodes it itself.
    assert np.allclose(
        live.embeddings.create(model=MODEL, input="a calm sea at dawn").data[0].embedding, floats, atol=1e-6
    )


def test_dimensions_keep_the_first_coordinates_renormalised(live: openai.OpenAI) -> None:
    full = np.array(live.embeddings.create(model=MODEL, input="a red kite").data[0].embedding)
    short = np.array(live.embeddings.create(model=MODEL, input="a red kite", dimensions=8).data[0].embedding)
    assert short.shape == (8,)
    np.testing.assert_allclose(short, full[:8] / np.linalg.norm(full[:8]), atol=1e-5)
    assert abs(np.linalg.norm(short) - 1) < 1e-5


def test_matryoshka_truncation_is_the_identity_at_full_width() -> None:
    vectors = np.eye(3, dtype=np.float32)
    assert matryoshka(vectors, None) is vectors and matryoshka(vectors, 3) is vectors
    np.testing.assert_allclose(matryoshka(np.array([[3.0, 4.0, 1.0]], dtype=np.float32), 2), [[0.6, 0.8]])


def test_images_come_as_data_urls_objects_or_chat_content_parts(client: TestClient) -> None:
    red = _data_url((220, 30, 30))
    inputs = [
        {"image": red},
        [{"type": "image_url", "image_url": {"url": red}}],
        {"image": red, "text": "a red square"},
        [{"type": "text", "text": "a red square"}, {"type": "image_url", "image_url": {"url": red}}],
    ]
    data = client.post("/v1/embeddings", json={"model": MODEL, "input": inputs}).json()["data"]
    vectors = np.array([d["embedding"] for d in data])
    np.testing.assert_allclose(vectors[0], vectors[1], atol=1e-5)  # the same image, two shapes
    np.testing.assert_allclose(vectors[2], vectors[3], atol=1e-5)  # the same image + text, two shapes
    assert not np.allclose(vectors[0], vectors[2], atol=1e-3)


def test_query_inputs_carry_their_instruction(client: TestClient) -> None:
    body = {"model": MODEL, "input": ["a red kite"]}
    plain = client.post("/v1/embeddings", json=body).json()["data"][0]["embedding"]
    query = client.post(
        "/v1/embeddings", json={**body, "input_type": "query", "instruction": "Find an image of the item."}
    ).json()["data"][0]["embedding"]
    assert not np.allclose(plain, query, atol=1e-4)


def test_models_lists_the_embedder_and_the_reranker(live: openai.OpenAI) -> None:
    listed = {m.id for m in live.models.list().data}
    assert listed == {MODEL}  # here both are the same tiny model


@pytest.mark.parametrize(
    ("body", "status", "param"),
    [
        ({"model": "gpt-4", "input": "x"}, 404, "model"),
        ({"model": MODEL, "input": "x", "dimensions": 0}, 400, "dimensions"),
        ({"model": MODEL, "input": "x", "dimensions": 10_000}, 400, "dimensions"),
        ({"model": MODEL, "input": ["x"] * 9}, 400, "input"),
        ({"model": MODEL, "input": []}, 400, "input"),
        ({"model": MODEL, "input": [1, 2, 3]}, 400, "input"),
        ({"model": MODEL, "input": [{"image": "data:image/png;base64,%%%"}]}, 400, "input[0].image"),
        ({"model": MODEL, "input": [{"image": "https://example.com/a.png"}]}, 400, "input[0].image"),
        ({"model": MODEL, "input": [{"image": base64.b64encode(b"not an image").decode()}]}, 400, "input[0]"),
        ({"model": MODEL, "input": [{"text": "  "}]}, 400, "input[0]"),
        ({"model": MODEL, "input": [[{"type": "audio"}]]}, 400, "input[0][0]"),
        ({"model": MODEL, "input": "x", "encoding_format": "int8"}, 400, "encoding_format"),
        ({"input": "x"}, 400, "model"),
    ],
    ids=[
        "unknown-model",
        "dimensions-0",
        "dimensions-too-large",
        "too-many-inputs",
        "no-inputs",
        "token-ids",
        "bad-base64",
        "remote-url",
        "not-an-image",
        "empty-text",
        "unknown-part",
        "bad-encoding",
        "no-model",
    ],
)
def test_bad_embedding_requests_get_openai_errors(
    client: TestClient, body: dict, status: int, param: str
) -> None:
    response = client.post("/v1/embeddings", json=body)
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert error["param"] == param and error["message"] and error["type"]


def test_a_malformed_body_and_an_unknown_route_answer_in_openai_shape(client: TestClient) -> None:
    response = client.post(
        "/v1/embeddings", content=b"{not json", headers={"content-type": "application/json"}
    )
    assert response.status_code == 400 and "error" in response.json()
    assert client.get("/v1/nothing").json()["error"]["type"] == "not_found_error"


def test_the_client_raises_typed_errors(live: openai.OpenAI) -> None:
    with pytest.raises(openai.NotFoundError):
        live.embeddings.create(model="text-embedding-3-small", input="x")
    with pytest.raises(openai.BadRequestError):
        live.embeddings.create(model=MODEL, input="x", dimensions=100_000)


def test_rerank_orders_documents_by_the_rerankers_p_yes(client: TestClient, service: Service) -> None:
    from umarvel.data.records import Candidate, Query

    documents = ["a red kite in the sky", "a bowl of soup", "a kite festival", "tax forms"]
    body = {"model": MODEL, "query": "kites", "documents": documents, "top_n": 3, "return_documents": True}
    answer = client.post("/v1/rerank", json=body).json()
    expected = service.reranker.score(  # type: ignore[union-attr]
        [
            service.reranker.pair(Query("query", text="kites"), Candidate(str(i), text=d))
            for i, d in enumerate(documents)
        ]  # type: ignore[union-attr]
    )
    order = sorted(range(4), key=lambda i: -expected[i])[:3]
    assert [r["index"] for r in answer["results"]] == order
    np.testing.assert_allclose([r["relevance_score"] for r in answer["results"]], expected[order], atol=1e-5)
    assert [r["document"]["text"] for r in answer["results"]] == [documents[i] for i in order]
    assert answer["usage"]["total_tokens"] > 0


def test_rerank_refuses_too_many_documents_and_an_unknown_model(client: TestClient) -> None:
    many = client.post("/v1/rerank", json={"model": MODEL, "query": "q", "documents": ["d"] * 7})
    assert many.status_code == 400 and many.json()["error"]["param"] == "documents"
    unknown = client.post("/v1/rerank", json={"model": "rerank-v3", "query": "q", "documents": ["d"]})
    assert unknown.status_code == 404 and unknown.json()["error"]["code"] == "model_not_found"


def test_with_keys_a_wrong_or_missing_key_gets_401_and_health_stays_open(service: Service) -> None:
    keyed = TestClient(create_app(service, api_keys=[KEY]))
    body = {"model": MODEL, "input": "x"}
    assert keyed.post("/v1/embeddings", json=body).status_code == 401
    wrong = keyed.post("/v1/embeddings", json=body, headers={"Authorization": "Bearer sk-wrong"})
    assert wrong.status_code == 401 and wrong.json()["error"]["code"] == "invalid_api_key"
    assert (
        keyed.post(
            "/search", data={"text": "x", "rerank_top": "5"}, headers={"X-API-Key": "nope"}
        ).status_code
        == 401
    )
    assert (
        keyed.post("/v1/embeddings", json=body, headers={"Authorization": f"Bearer {KEY}"}).status_code == 200
    )
    assert (
        keyed.post("/search", data={"text": "x", "rerank_top": "5"}, headers={"X-API-Key": KEY}).status_code
        == 200
    )
    assert keyed.get("/health").status_code == 200


def test_the_client_with_a_wrong_key_raises_an_authentication_error(live: openai.OpenAI) -> None:
    wrong = openai.OpenAI(base_url=str(live.base_url), api_key="sk-wrong", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        wrong.embeddings.create(model=MODEL, input="x")


def test_api_keys_come_from_a_file_and_the_environment(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    keys = tmp_path / "keys"
    keys.write_text("# team keys\nsk-one\n\nsk-two  # ci\n")
    monkeypatch.setenv("UMARVEL_API_KEYS", "sk-three, ,sk-four")
    assert read_api_keys(keys) == {"sk-one", "sk-two", "sk-three", "sk-four"}


def test_cors_headers_appear_only_for_configured_origins(service: Service) -> None:
    preflight = {"Origin": "https://app.example", "Access-Control-Request-Method": "POST"}
    closed = TestClient(create_app(service)).options("/v1/embeddings", headers=preflight)
    assert "access-control-allow-origin" not in closed.headers
    opened = TestClient(create_app(service, cors_origins=["https://app.example"]))
    answer = opened.options("/v1/embeddings", headers=preflight)
    assert answer.headers["access-control-allow-origin"] == "https://app.example"


def test_a_missing_api_key_file_is_an_input_error_naming_it(tmp_path: Path) -> None:
    from umarvel.data.io import InputError

    with pytest.raises(InputError, match=r"keys\.txt"):
        read_api_keys(tmp_path / "keys.txt")
