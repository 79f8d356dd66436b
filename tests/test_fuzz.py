"""Fuzzing (hypothesis): the JSONL item reader and the server's /embed body never fail with anything but
a clear answer, whatever the bytes. Marked `fuzz`; each property runs a fixed, seeded budget."""

from __future__ import annotations

import json
import string
from pathlib import Path

import pytest

hypothesis = pytest.importorskip("hypothesis")
from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from umarvel.data.io import InputError  # noqa: E402
from umarvel.pipeline.embed import read_items  # noqa: E402

pytestmark = pytest.mark.fuzz

BUDGET = settings(
    max_examples=300,
    database=None,  # derandomised and nothing written to .hypothesis/
    deadline=None,
    derandomize=True,
    suppress_health_check=[HealthCheck.function_scoped_fixture],
)

# JSON values as users get them wrong: any type in any field, surrogates and control characters in text.
texts = st.text(alphabet=st.characters(codec=None, categories=None), max_size=40) | st.sampled_from(
    ["", " ", "\ud800", "a\udfffb", "\x00", "[red]x[/red]", "ok.png", "../../etc/passwd"]
)
scalars = st.none() | st.booleans() | st.integers() | st.floats(allow_nan=True) | texts
values = st.recursive(
    scalars,
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(texts, inner, max_size=3),
    max_leaves=6,
)
FIELDS = [
    "txt",
    "img_path",
    "video_path",
    "instruction",
    "modality",
    "did",
    "qid",
    "query_txt",
    "query_img_path",
]
records = st.dictionaries(st.sampled_from(FIELDS) | texts, values, max_size=5)
lines = st.one_of(
    records.map(lambda r: json.dumps(r).encode("utf-8", "surrogatepass")),
    st.binary(max_size=60),
    st.just(b""),
    st.text(alphabet=string.printable, max_size=40).map(str.encode),
)


@BUDGET
@given(body=st.lists(lines, max_size=6), role=st.sampled_from(["query", "candidate"]))
def test_the_item_reader_answers_any_bytes_with_items_or_an_input_error(
    body: list[bytes], role: str, tmp_path: Path
) -> None:
    path = tmp_path / "items.jsonl"
    path.write_bytes(b"\n".join(body))
    try:
        items = read_items(path, role)  # type: ignore[arg-type]
    except InputError as error:
        assert str(error).startswith(str(path)), error  # it names the file (and the line where one is wrong)
        return
    for item in items:
        assert item.text is None or isinstance(item.text, str)
        item.text is not None and item.text.encode("utf-8")  # valid Unicode throughout


@pytest.fixture(scope="module")
def client(tmp_path_factory: pytest.TempPathFactory):
    pytest.importorskip("httpx")
    from fastapi.testclient import TestClient

    from umarvel.config.schema import EmbedderConfig
    from umarvel.pipeline.index import build_index
    from umarvel.serve.app import Service, create_app

    folder = tmp_path_factory.mktemp("fuzz")
    (folder / "pool.jsonl").write_text(
        "".join(json.dumps({"did": f"d{i}", "txt": f"note {i}"}) + "\n" for i in range(4))
    )
    build_index(EmbedderConfig(model="tiny:composed"), folder / "pool.jsonl", folder / "idx", progress=False)
    return TestClient(create_app(Service(folder / "idx")), raise_server_exceptions=False)


item_bodies = st.dictionaries(
    st.sampled_from(["text", "image_base64", "instruction"]) | texts,
    values | st.sampled_from(["aGVsbG8=", "not base64!", "iVBORw0KGgo="]),
    max_size=3,
)
embed_bodies = st.one_of(
    st.fixed_dictionaries({"items": st.lists(item_bodies, max_size=3)}, optional={"role": values}),
    st.dictionaries(texts, values, max_size=3),
    values,
)


@BUDGET
@given(body=embed_bodies)
def test_the_embed_endpoint_answers_any_body_without_a_server_error(body, client) -> None:
    content = json.dumps(body).encode("utf-8", "surrogatepass")
    response = client.post("/embed", content=content, headers={"content-type": "application/json"})
    assert response.status_code in (200, 400, 413, 422), (response.status_code, response.text)
    if response.status_code == 200:
        assert len(response.json()["embeddings"]) == len(body["items"])


v1_items = (
    texts
    | st.fixed_dictionaries(
        {},
        optional={
            "text": values,
            "image": values | st.sampled_from(["data:image/png;base64,aGVsbG8=", "%%"]),
        },
    )
    | st.lists(
        st.fixed_dictionaries(
            {"type": st.sampled_from(["text", "image_url", "audio"]) | values},
            optional={"text": values, "image_url": values | st.fixed_dictionaries({"url": values})},
        ),
        max_size=2,
    )
)
v1_embedding_bodies = st.one_of(
    st.fixed_dictionaries(
        {
            "model": st.sampled_from(["tiny:composed", "gpt-4"]) | values,
            "input": v1_items | st.lists(v1_items, max_size=3),
        },
        optional={
            "dimensions": values | st.integers(-2, 70_000),
            "encoding_format": st.sampled_from(["float", "base64", "int8"]) | values,
            "input_type": st.sampled_from(["query", "document"]) | values,
            "instruction": values,
        },
    ),
    st.dictionaries(texts, values, max_size=3),
    values,
)


@BUDGET
@given(body=v1_embedding_bodies)
def test_the_openai_embeddings_route_answers_any_body_with_embeddings_or_an_openai_error(
    body, client
) -> None:
    content = json.dumps(body).encode("utf-8", "surrogatepass")
    response = client.post("/v1/embeddings", content=content, headers={"content-type": "application/json"})
    assert response.status_code in (200, 400, 404, 413), (response.status_code, response.text)
    answer = response.json()
    if response.status_code == 200:
        assert answer["object"] == "list" and answer["data"]
    else:
        assert set(answer["error"]) == {"message", "type", "param", "code"}
