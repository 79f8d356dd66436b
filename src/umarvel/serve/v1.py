"""OpenAI-compatible routes: `POST /v1/embeddings`, `GET /v1/models`, and `POST /v1/rerank` in the
Cohere / Jina shape.

`/v1/embeddings` takes the OpenAI embeddings body:

    {"model": "<a served model id>",
     "input": "text" | ["text", ...] | [ITEM, ...],
     "encoding_format": "float" | "base64",       # base64: little-endian float32 bytes
     "dimensions": 256,                           # Matryoshka: the first 256 dims, renormalised
     "input_type": "query" | "document",          # umarvel: queries carry an instruction (default document)
     "instruction": "..."}                        # umarvel: the instruction of query inputs

An ITEM is a string, an object `{"text": ..., "image": "data:image/png;base64,...", "instruction": ...}`
(text, image or both), or a list of OpenAI chat content parts, `{"type": "text", "text": ...}` and
`{"type": "image_url", "image_url": {"url": "data:image/...;base64,..."}}`, which make one item. Images
come inline, as a data URL or bare base64. The server never fetches a URL. Token-id inputs are refused.
The answer is OpenAI's: `{"object": "list", "data": [{"object": "embedding", "index": i, "embedding":
...}], "model": ..., "usage": {"prompt_tokens": n, "total_tokens": n}}`. The token counts include the
visual tokens and the chat template.

`/v1/rerank` takes `{"model", "query", "documents", "top_n", "return_documents"}`. The query and each
document is a string or an ITEM object. It answers `{"model", "results": [{"index", "relevance_score",
"document"}], "usage": {"total_tokens"}}`, best first. The relevance score is the MLLM re-ranker's
P(Yes).

Errors on these routes use OpenAI's shape: `{"error": {"message", "type", "param", "code"}}`.
"""

from __future__ import annotations

import base64
import binascii
from collections.abc import Callable
from typing import Any, Literal

import numpy as np
from fastapi import FastAPI
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import JSONResponse
from PIL import Image
from pydantic import BaseModel, ConfigDict, Field

from umarvel.data.records import Candidate, Query

V1_PREFIX = "/v1/"
ERROR_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    404: "not_found_error",
    408: "invalid_request_error",
    413: "invalid_request_error",
    422: "invalid_request_error",
    429: "rate_limit_error",
}


class V1Error(Exception):
    """An error answered in OpenAI's shape."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code


def error_body(status: int, message: str, param: str | None = None, code: str | None = None) -> dict:
    kind = ERROR_TYPES.get(status, "server_error" if status >= 500 else "invalid_request_error")
    return {"error": {"message": message, "type": kind, "param": param, "code": code}}


class ItemObject(BaseModel):
    model_config = ConfigDict(extra="forbid")

    text: str | None = None
    image: str | None = Field(default=None, description="a data URL or bare base64 of an encoded image")
    instruction: str | None = None


class EmbeddingsRequest(BaseModel):
    model: str
    input: str | list[str | ItemObject | list[dict[str, Any]]] | list[int] | list[list[int]]
    encoding_format: Literal["float", "base64"] = "float"
    dimensions: int | None = None
    input_type: Literal["query", "document"] = "document"
    instruction: str | None = None
    user: str | None = None


class RerankRequest(BaseModel):
    model: str
    query: str | ItemObject
    documents: list[str | ItemObject]
    top_n: int | None = None
    return_documents: bool = False


def _data_url_bytes(value: str, param: str) -> bytes:
    """The bytes of a data URL (`data:image/png;base64,...`) or of bare base64."""
    if value.startswith(("http://", "https://")):
        raise V1Error(400, "images must come inline (a data URL or base64); the server fetches no URL", param)
    if value.startswith("data:"):
        header, _, value = value.partition(",")
        if ";base64" not in header:
            raise V1Error(400, "a data URL must be base64-encoded (data:image/...;base64,...)", param)
    try:
        return base64.b64decode(value, validate=True)
    except (binascii.Error, ValueError):
        raise V1Error(400, "the image is not valid base64", param) from None


class ItemReader:
    """Request items -> (text, image, instruction), with the server's limits.

    Args:
        image_from_bytes: decodes an uploaded image under the server's size and pixel limits.
        check_text: the server's text-length check (returns the stripped text or None).
    """

    def __init__(
        self,
        image_from_bytes: Callable[[bytes], Image.Image],
        check_text: Callable[[str | None, str], str | None],
    ) -> None:
        self.image_from_bytes = image_from_bytes
        self.check_text = check_text

    def read(self, item: Any, param: str) -> tuple[str | None, Image.Image | None, str | None]:
        text: str | None = None
        image: str | None = None
        instruction: str | None = None
        if isinstance(item, str):
            text = item
        elif isinstance(item, ItemObject):
            text, image, instruction = item.text, item.image, item.instruction
        elif isinstance(item, list):
            texts = []
            for number, part in enumerate(item):
                kind = part.get("type") if isinstance(part, dict) else None
                if kind == "text" and isinstance(part.get("text"), str):
                    texts.append(part["text"])
                elif kind == "image_url" and isinstance(part.get("image_url"), dict):
                    if image is not None:
                        raise V1Error(400, "one image per input item", f"{param}[{number}]")
                    url = part["image_url"].get("url")
                    if not isinstance(url, str):
                        raise V1Error(400, "image_url.url must be a string", f"{param}[{number}]")
                    image = url
                else:
                    raise V1Error(
                        400,
                        "a content part is {type: text, text} or {type: image_url, image_url: {url}}",
                        f"{param}[{number}]",
                    )
            text = " ".join(texts) if texts else None
        else:
            raise V1Error(400, "token-id inputs are not supported; send text or images", param)
        try:
            text = self.check_text(text, f"{param}.text")
            instruction = self.check_text(instruction, f"{param}.instruction")
        except Exception as error:  # the server's HTTPException for an over-long text
            raise V1Error(400, getattr(error, "detail", str(error)), param) from None
        picture = None
        if image is not None:
            try:
                picture = self.image_from_bytes(_data_url_bytes(image, f"{param}.image"))
            except V1Error:
                raise
            except Exception as error:  # oversized, empty or undecodable image
                raise V1Error(
                    getattr(error, "status_code", 400), getattr(error, "detail", str(error)), param
                ) from None
        if text is None and picture is None:
            raise V1Error(400, "an input item needs a text, an image, or both", param)
        return text, picture, instruction


def _inputs(request: EmbeddingsRequest) -> list[Any]:
    value = request.input
    if isinstance(value, str):
        return [value]
    if value and all(isinstance(v, int) for v in value):
        raise V1Error(400, "token-id inputs are not supported; send text or images", "input")
    return list(value)


def matryoshka(vectors: np.ndarray, dimensions: int | None) -> np.ndarray:
    """The first `dimensions` columns of each row, L2-normalised again (all of them when None)."""
    if dimensions is None or dimensions == vectors.shape[1]:
        return vectors
    head = vectors[:, :dimensions]
    norms = np.linalg.norm(head, axis=1, keepdims=True)
    return (head / np.maximum(norms, 1e-12)).astype(np.float32)


def _encoded(vector: np.ndarray, encoding: str) -> list[float] | str:
    if encoding == "base64":
        return base64.b64encode(vector.astype("<f4").tobytes()).decode("ascii")
    return [round(float(v), 7) for v in vector]


def add_v1_routes(app: FastAPI, service: Any, reader: ItemReader) -> None:
    """The OpenAI-compatible routes of `service` (see the module docstring)."""
    limits = service.limits

    def check_model(name: str, served: str | None, what: str) -> str:
        if served is None:
            raise V1Error(404, f"this server has no {what}", "model", "model_not_found")
        if name != served:
            raise V1Error(
                404, f"the model {name!r} is not served here (GET /v1/models)", "model", "model_not_found"
            )
        return served

    @app.get("/v1/models")
    async def models() -> dict[str, Any]:
        served = [("embedding", service.model_id), ("rerank", service.reranker_id)]
        data = [
            {"id": name, "object": "model", "created": service.started, "owned_by": "umarvel", "task": task}
            for task, name in served
            if name is not None
        ]
        return {"object": "list", "data": data}

    @app.post("/v1/embeddings")
    async def embeddings(request: EmbeddingsRequest) -> JSONResponse:
        model = check_model(request.model, service.model_id, "embedding model")
        inputs = _inputs(request)
        if not inputs or len(inputs) > limits.max_embed_items:
            raise V1Error(400, f"give 1 to {limits.max_embed_items} inputs", "input")
        dim = service.embedder.dim
        if request.dimensions is not None and not 1 <= request.dimensions <= dim:
            raise V1Error(400, f"dimensions must be between 1 and {dim}", "dimensions")
        instruction = reader.check_text(request.instruction, "instruction")
        records: list[Query | Candidate] = []
        for number, item in enumerate(inputs):
            text, picture, own = reader.read(item, f"input[{number}]")
            if request.input_type == "query":
                records.append(
                    Query(qid=str(number), text=text, image=picture, instruction=own or instruction)
                )  # type: ignore[arg-type]
            else:
                records.append(Candidate(did=str(number), text=text, image=picture))  # type: ignore[arg-type]
        vectors, tokens = await service.encode(records)
        vectors = matryoshka(vectors, request.dimensions)
        data = [
            {"object": "embedding", "index": i, "embedding": _encoded(v, request.encoding_format)}
            for i, v in enumerate(vectors)
        ]
        usage = {"prompt_tokens": tokens, "total_tokens": tokens}
        return JSONResponse({"object": "list", "data": data, "model": model, "usage": usage})

    @app.post("/v1/rerank")
    async def rerank(request: RerankRequest) -> dict[str, Any]:
        model = check_model(request.model, service.reranker_id, "re-ranker (start it with --reranker)")
        if not request.documents or len(request.documents) > limits.max_rerank_top:
            raise V1Error(400, f"give 1 to {limits.max_rerank_top} documents", "documents")
        if request.top_n is not None and request.top_n < 1:
            raise V1Error(400, "top_n must be at least 1", "top_n")
        text, picture, instruction = reader.read(request.query, "query")
        query = Query(qid="query", text=text, image=picture, instruction=instruction)  # type: ignore[arg-type]
        documents = []
        for number, item in enumerate(request.documents):
            text, picture, _ = reader.read(item, f"documents[{number}]")
            documents.append(Candidate(did=str(number), text=text, image=picture))  # type: ignore[arg-type]
        scores, tokens = await run_in_threadpool(service.rerank_with_usage, query, documents)
        order = sorted(range(len(documents)), key=lambda i: (-float(scores[i]), i))
        results = []
        for i in order[: request.top_n or len(order)]:
            result: dict[str, Any] = {"index": i, "relevance_score": round(float(scores[i]), 7)}
            if request.return_documents:
                result["document"] = {"text": documents[i].text}
            results.append(result)
        return {"model": model, "results": results, "usage": {"total_tokens": tokens}}
