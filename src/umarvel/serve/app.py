"""`umarvel serve`: a FastAPI app over one index folder (and optionally a re-ranker).

Endpoints: GET / (a search page), POST /search (multipart: text, image upload, or both; top k;
optional re-rank), POST /embed (JSON, base64 images), GET /media/{did} (a candidate's image),
GET /health, GET /metrics (Prometheus), the OpenAI-compatible POST /v1/embeddings, GET /v1/models and
POST /v1/rerank (`serve/v1.py`), and the OpenAPI schema at /openapi.json.

Access: bound to 127.0.0.1 unless told otherwise; with API keys, every request but /health and the page
needs one; no CORS headers unless origins are given.

Safety: the request body is capped while it streams in (413 past `max_request_bytes`); an upload is
refused past `max_image_bytes`, and its header is checked against `max_source_pixels` before any pixel
is decoded; k, texts and /embed batches have limits (422 past them). The server reads only files inside
its index folder: media are looked up by candidate id, never by a path from the request. Model calls are
gathered into batches across concurrent requests (`serve/batching.py`) and run off the event
loop; the re-ranker's calls are serialised by a lock.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import hmac
import json
import logging
import os
import threading
import time
from collections.abc import Collection, Sequence
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Annotated, Any

import numpy as np
from fastapi import FastAPI, File, Form, HTTPException, Request, UploadFile
from fastapi.concurrency import run_in_threadpool
from fastapi.encoders import jsonable_encoder
from fastapi.exceptions import RequestValidationError
from fastapi.middleware.cors import CORSMiddleware
from fastapi.responses import FileResponse, HTMLResponse, JSONResponse, Response
from PIL import Image
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Histogram, generate_latest
from pydantic import BaseModel, Field
from starlette.exceptions import HTTPException as StarletteHTTPException

from umarvel.data.collator import EncodeItem
from umarvel.data.io import InputError, read_jsonl
from umarvel.data.media import decode_image_bytes
from umarvel.data.records import Candidate, Query
from umarvel.pipeline.index import CANDIDATES_FILE, load_index_embedder, media_path
from umarvel.reranker.model import Reranker
from umarvel.reranker.scoring import DEFAULT_WEIGHT, rerank_hits
from umarvel.serve.batching import Batching, DynamicBatcher, describe
from umarvel.serve.v1 import V1_PREFIX, ItemReader, V1Error, add_v1_routes, error_body

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class ServeLimits:
    """Request limits. Sizes in bytes, pixels as width x height."""

    max_request_bytes: int = 12 * 1024 * 1024
    max_image_bytes: int = 8 * 1024 * 1024
    max_source_pixels: int = 40_000_000
    max_k: int = 100
    max_text_chars: int = 2000
    max_embed_items: int = 32
    max_rerank_top: int = 100
    body_timeout_s: float = 30.0  # an upload that sends nothing for this long gets 408


class _BodyLimit:
    """ASGI middleware: 413 once a request body exceeds `limit` bytes, 408 when the body stalls for
    `timeout` seconds. A declared length over the limit is refused before reading; a body without one
    (chunked) is counted as it streams in. Either way the app sees the client go away, and its own
    answer is replaced by ours."""

    def __init__(self, app: Any, limit: int, timeout: float) -> None:
        self.app = app
        self.limit = limit
        self.timeout = timeout

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = dict(scope.get("headers") or []).get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.limit:
            await self._refuse(scope, receive, send, 413, f"request body exceeds {self.limit} bytes")
            return
        received = 0
        refusal: tuple[int, str] | None = None
        answered = False

        async def capped() -> dict:
            nonlocal received, refusal
            if refusal is not None:
                return {"type": "http.disconnect"}
            try:
                message = await asyncio.wait_for(receive(), timeout=self.timeout)
            except asyncio.TimeoutError:
                refusal = (408, f"the request body stalled for {self.timeout:g} s")
                return {"type": "http.disconnect"}
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.limit:
                    refusal = (413, f"request body exceeds {self.limit} bytes")
                    return {"type": "http.disconnect"}
            return message

        async def guarded(message: dict) -> None:
            nonlocal answered
            if refusal is None:
                answered = True
                await send(message)

        try:
            await self.app(scope, capped, guarded)
        except Exception:
            if refusal is None:
                raise
        if refusal is not None and not answered:
            await self._refuse(scope, receive, send, *refusal)

    @staticmethod
    async def _refuse(scope: dict, receive: Any, send: Any, status: int, detail: str) -> None:
        v1 = str(scope.get("path", "")).startswith(V1_PREFIX)
        body = error_body(status, detail) if v1 else {"detail": detail}
        await JSONResponse(body, status_code=status)(scope, receive, send)


class _AsciiJSON(JSONResponse):
    """JSON with every non-ASCII character escaped, so any Python string (a lone surrogate included) can
    be sent back."""

    def render(self, content: Any) -> bytes:
        return json.dumps(content, ensure_ascii=True, allow_nan=False, separators=(",", ":")).encode("ascii")


def _route(request: Request) -> str:
    """The metrics label of a request: its route's template (`/media/{did}`), one label for every path
    no route matched, so unknown URLs cannot grow the number of series."""
    route = request.scope.get("route")
    return getattr(route, "path", None) or "unmatched"


class EmbedItem(BaseModel):
    text: str | None = None
    image_base64: str | None = Field(default=None, description="an encoded image (JPEG, PNG, ...)")
    instruction: str | None = None


class EmbedRequest(BaseModel):
    items: list[EmbedItem]
    role: str = Field(default="query", pattern="^(query|candidate)$")


class Hit(BaseModel):
    rank: int
    did: str
    score: float
    text: str | None
    image_url: str | None


class SearchResponse(BaseModel):
    results: list[Hit]
    reranked: bool
    fusion_weight: float | None
    latency_ms: float


DEFAULT_BATCHING = Batching()


class Service:
    """What the app serves: the index, its embedder, the candidates, an optional re-ranker."""

    def __init__(
        self,
        index_dir: str | Path,
        reranker: str | None = None,
        overrides: dict | None = None,
        limits: ServeLimits | None = None,
        served_model_name: str | None = None,
        batching: Batching | None = DEFAULT_BATCHING,
    ) -> None:
        self.folder = Path(index_dir).resolve()
        self.limits = limits or ServeLimits()
        self.index, self.embedder = load_index_embedder(self.folder, overrides)
        path = self.folder / CANDIDATES_FILE
        if not path.is_file():
            raise InputError(path, "the index folder has no candidates.jsonl; rebuild it with umarvel index")
        self.candidates: dict[str, Candidate] = {}
        for number, record in read_jsonl(path):
            where = f"{path}:{number}"
            self.candidates[record["did"]] = Candidate(
                did=record["did"],
                text=record.get("txt"),
                image=media_path(self.folder, record.get("img_path"), where),
                video=media_path(self.folder, record.get("video_path"), where),
            )
        self.reranker = None
        self.fusion_weight: float | None = None
        if reranker is not None:
            self.reranker = Reranker.from_pretrained(reranker)
            self.fusion_weight = float(self.reranker.fusion.get("weight", DEFAULT_WEIGHT))
        # The ids /v1/models lists and /v1 requests name.
        self.model_id = served_model_name or str(self.embedder.settings.model)
        self.reranker_id = None if self.reranker is None else str(self.reranker.settings.model)
        self.started = int(time.time())
        self.lock = threading.Lock()
        # Without batching every request makes its own model call, one at a time (the lock).
        self.batcher = (
            None
            if batching is None
            else DynamicBatcher(self._encode_items, batching.max_items, batching.max_wait_ms)
        )

    def _encode_items(self, items: list[EncodeItem]) -> tuple[np.ndarray, np.ndarray]:
        with self.lock:
            return self.embedder.encode_batch(items)

    async def encode(self, records: Sequence[Query | Candidate]) -> tuple[np.ndarray, int]:
        """Embeddings of `records` (queries with their instructions, or candidates) and the tokens they
        took: through the dynamic batcher (awaited, so a waiting request holds no thread), or alone
        under the lock. Media are loaded off the event loop."""
        items = await run_in_threadpool(lambda: [self.embedder.to_item(r, None) for r in records])
        if self.batcher is not None:
            vectors, tokens = await self.batcher(items)
        else:
            vectors, tokens = await run_in_threadpool(self._encode_items, items)
        return vectors, int(np.sum(tokens))

    async def search(
        self, query: Query, k: int, rerank: bool, rerank_top: int
    ) -> tuple[list[tuple[str, float]], bool]:
        vectors, _ = await self.encode([query])
        depth = max(k, rerank_top) if rerank and self.reranker is not None else k
        found = await run_in_threadpool(self.index.search, vectors, depth)
        ranked = [(d, float(s)) for d, s in zip(found.ids[0], found.scores[0], strict=True) if d]
        if not (rerank and self.reranker is not None):
            return ranked[:k], False
        return (await run_in_threadpool(self._rerank_hits, query, ranked, rerank_top))[:k], True

    def _rerank_hits(
        self, query: Query, ranked: list[tuple[str, float]], top: int
    ) -> list[tuple[str, float]]:
        with self.lock:
            weight = float(self.fusion_weight or 0.0)
            return rerank_hits(self.reranker, query, ranked, self.candidates, top, weight)

    def rerank_with_usage(self, query: Query, documents: list[Candidate]) -> tuple[np.ndarray, int]:
        """P(Yes) of (query, document) for each document, and the tokens the pairs took."""
        assert self.reranker is not None
        pairs = [self.reranker.pair(query, document) for document in documents]
        with self.lock:
            return self.reranker.score_with_tokens(pairs)


def _authorised(request: Request, keys: Collection[str]) -> bool:
    """Whether the request carries one of `keys` (`Authorization: Bearer KEY` or `X-API-Key: KEY`),
    compared in constant time against every key."""
    given = request.headers.get("x-api-key") or ""
    scheme, _, token = request.headers.get("authorization", "").partition(" ")
    if scheme.lower() == "bearer" and token:
        given = token.strip()
    matched = False
    for key in keys:
        matched |= hmac.compare_digest(key.encode(), given.encode())
    return matched and bool(given)


def read_api_keys(path: str | Path | None = None) -> frozenset[str]:
    """API keys from `path` (one per line; blank lines and `#` comments skipped) and from
    $UMARVEL_API_KEYS (comma-separated)."""
    keys = {k.strip() for k in os.environ.get("UMARVEL_API_KEYS", "").split(",") if k.strip()}
    if path is not None:
        try:
            lines = Path(path).read_text(encoding="utf-8").splitlines()
        except (OSError, UnicodeDecodeError) as error:
            raise InputError(path, f"cannot read the API key file: {error}") from None
        keys.update(line.split("#", 1)[0].strip() for line in lines)
        keys.discard("")
    return frozenset(keys)


# Open without a key: liveness probes and the page itself (its searches still need the key).
OPEN_PATHS = frozenset({"/health", "/"})


def create_app(service: Service, api_keys: Collection[str] = (), cors_origins: Sequence[str] = ()) -> FastAPI:
    """The FastAPI app for `service` (see module docstring).

    api_keys: when given, every request but /health and the page must carry one (`Authorization:
        Bearer KEY`, as OpenAI clients send it, or `X-API-Key`); 401 otherwise.
    cors_origins: origins allowed to call the API from a browser; none (no CORS headers) by default.
    """
    limits = service.limits
    keys = frozenset(k for k in api_keys if k)
    registry = CollectorRegistry()
    requests = Counter(
        "umarvel_requests", "requests by endpoint and status", ["endpoint", "status"], registry=registry
    )
    latency = Histogram(
        "umarvel_request_seconds", "request latency by endpoint", ["endpoint"], registry=registry
    )
    app = FastAPI(
        title="umarvel search",
        description="Universal multimodal retrieval over one index (U-MARVEL).",
        version="1",
    )
    app.state.service = service

    @app.middleware("http")
    async def measure(request: Request, call_next: Any) -> Response:
        started = time.perf_counter()
        try:
            response = await call_next(request)
        except Exception:
            requests.labels(_route(request), "500").inc()
            raise
        endpoint = _route(request)
        latency.labels(endpoint).observe(time.perf_counter() - started)
        requests.labels(endpoint, str(response.status_code)).inc()
        return response

    @app.middleware("http")
    async def authorise(request: Request, call_next: Any) -> Response:
        if keys and request.url.path not in OPEN_PATHS and not _authorised(request, keys):
            message = "a valid API key is required (Authorization: Bearer KEY)"
            body = error_body(401, message, code="invalid_api_key") if _v1(request) else {"detail": message}
            return JSONResponse(body, status_code=401, headers={"WWW-Authenticate": "Bearer"})
        return await call_next(request)

    def _v1(request: Request) -> bool:
        return request.url.path.startswith(V1_PREFIX)

    def answer(request: Request, status: int, message: str, param: str | None = None) -> JSONResponse:
        body = error_body(status, message, param) if _v1(request) else {"detail": message}
        return _AsciiJSON(body, status_code=status)

    @app.exception_handler(V1Error)
    async def v1_error(request: Request, error: V1Error) -> JSONResponse:
        return _AsciiJSON(
            error_body(error.status, error.message, error.param, error.code), status_code=error.status
        )

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, error: StarletteHTTPException) -> JSONResponse:
        if not _v1(request):
            return _AsciiJSON({"detail": error.detail}, status_code=error.status_code, headers=error.headers)
        return answer(request, error.status_code, str(error.detail))

    @app.exception_handler(InputError)
    async def bad_input(request: Request, error: InputError) -> JSONResponse:
        return answer(request, 400, str(error))

    @app.exception_handler(RequestValidationError)
    async def invalid_body(request: Request, error: RequestValidationError) -> JSONResponse:
        # FastAPI's own answer echoes the input, which may hold a lone surrogate that UTF-8 cannot encode
        # or an Infinity that JSON cannot spell (both a 500). Where and what is wrong, without the
        # input, in escaped ASCII JSON; on /v1, OpenAI's 400 with the first problem's place as `param`.
        problems = [{k: v for k, v in problem.items() if k != "input"} for problem in error.errors()]
        if _v1(request):
            first = problems[0] if problems else {}
            place = ".".join(str(part) for part in first.get("loc", ())[1:]) or None
            return answer(request, 400, f"invalid request body: {first.get('msg', 'malformed')}", place)
        return _AsciiJSON({"detail": jsonable_encoder(problems)}, status_code=422)

    def image_from_bytes(data: bytes) -> Image.Image:
        if len(data) > limits.max_image_bytes:
            raise HTTPException(413, f"image exceeds {limits.max_image_bytes} bytes")
        if not data:
            raise HTTPException(400, "the uploaded image is empty")
        pixels = service.embedder.settings.max_image_pixels
        return decode_image_bytes(data, pixels, limits.max_source_pixels)

    def check_text(text: str | None, name: str) -> str | None:
        if text is not None and len(text) > limits.max_text_chars:
            raise HTTPException(422, f"{name} exceeds {limits.max_text_chars} characters")
        return text.strip() if text and text.strip() else None

    @app.get("/", response_class=HTMLResponse, include_in_schema=False)
    async def page() -> HTMLResponse:
        html = resources.files("umarvel.serve").joinpath("page.html").read_text(encoding="utf-8")
        return HTMLResponse(html)

    @app.get("/health")
    async def health() -> dict[str, Any]:
        return {
            "status": "ok",
            "index_size": service.index.size,
            "model": service.embedder.settings.model,
            "reranker": None if service.reranker is None else service.reranker.settings.model,
            "fusion_weight": service.fusion_weight,
            "limits": vars(limits),
            "batching": describe(service.batcher),
        }

    @app.get("/metrics", include_in_schema=False)
    async def metrics() -> Response:
        return Response(generate_latest(registry), media_type=CONTENT_TYPE_LATEST)

    @app.post("/search", response_model=SearchResponse)
    async def search(
        text: Annotated[str | None, Form(description="query text")] = None,
        instruction: Annotated[str | None, Form(description="task instruction")] = None,
        k: Annotated[int, Form(ge=1)] = 10,
        rerank: Annotated[bool, Form(description="re-rank with the server's re-ranker")] = False,
        rerank_top: Annotated[int, Form(ge=1)] = 20,
        image: Annotated[UploadFile | None, File(description="query image")] = None,
    ) -> SearchResponse:
        started = time.perf_counter()
        if k > limits.max_k or rerank_top > limits.max_rerank_top:
            raise HTTPException(
                422, f"k must be at most {limits.max_k}, rerank_top at most {limits.max_rerank_top}"
            )
        text = check_text(text, "text")
        instruction = check_text(instruction, "instruction")
        picture = None
        if image is not None and image.filename:
            picture = image_from_bytes(await image.read())
        if text is None and picture is None:
            raise HTTPException(422, "give a text, an image, or both")
        if rerank and service.reranker is None:
            raise HTTPException(422, "this server has no re-ranker (start it with --reranker)")
        query = Query(qid="query", text=text, image=picture, instruction=instruction)  # type: ignore[arg-type]
        hits, reranked = await service.search(query, k, rerank, rerank_top)
        results = []
        for rank, (did, score) in enumerate(hits, start=1):
            candidate = service.candidates.get(did)
            results.append(
                Hit(
                    rank=rank,
                    did=did,
                    score=round(score, 6),
                    text=candidate.text if candidate else None,
                    image_url=f"/media/{did}" if candidate is not None and candidate.image else None,
                )
            )
        return SearchResponse(
            results=results,
            reranked=reranked,
            fusion_weight=service.fusion_weight if reranked else None,
            latency_ms=round(1000 * (time.perf_counter() - started), 2),
        )

    @app.post("/embed")
    async def embed(request: EmbedRequest) -> dict[str, Any]:
        if not request.items or len(request.items) > limits.max_embed_items:
            raise HTTPException(422, f"give 1 to {limits.max_embed_items} items")
        records = []
        for number, item in enumerate(request.items):
            text = check_text(item.text, f"items[{number}].text")
            picture = None
            if item.image_base64:
                try:
                    data = base64.b64decode(item.image_base64, validate=True)
                except (binascii.Error, ValueError):
                    raise HTTPException(400, f"items[{number}].image_base64 is not base64") from None
                picture = image_from_bytes(data)
            if text is None and picture is None:
                raise HTTPException(422, f"items[{number}] has no text and no image")
            instruction = check_text(item.instruction, f"items[{number}].instruction")
            if request.role == "query":
                records.append(Query(qid=str(number), text=text, image=picture, instruction=instruction))  # type: ignore[arg-type]
            else:
                records.append(Candidate(did=str(number), text=text, image=picture))  # type: ignore[arg-type]
        vectors, _ = await service.encode(records)
        return {"dim": int(vectors.shape[1]), "embeddings": vectors.round(6).tolist()}

    @app.get("/media/{did}", include_in_schema=False)
    async def media(did: str) -> FileResponse:
        candidate = service.candidates.get(did)
        if candidate is None or candidate.image is None:
            raise HTTPException(404, "no image for this candidate")
        path = Path(candidate.image)
        if not path.resolve().is_relative_to(service.folder) or not path.is_file():
            raise HTTPException(404, "no image for this candidate")
        return FileResponse(path)

    add_v1_routes(app, service, ItemReader(image_from_bytes, check_text))
    if cors_origins:
        app.add_middleware(
            CORSMiddleware,
            allow_origins=list(cors_origins),
            allow_methods=["GET", "POST"],
            allow_headers=["Authorization", "Content-Type", "X-API-Key"],
        )
    app.add_middleware(_BodyLimit, limit=limits.max_request_bytes, timeout=limits.body_timeout_s)
    return app
