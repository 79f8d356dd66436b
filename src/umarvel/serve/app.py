"""`umarvel serve`: a FastAPI app over one index folder (and optionally a re-ranker).

Endpoints: GET / (a search page), POST /search (multipart: text, image upload, or both; top k;
optional re-rank), POST /embed (JSON, base64 images), GET /media/{did} (a candidate's image),
GET /health, GET /metrics (Prometheus), and the OpenAPI schema at /openapi.json.

Safety: the request body is capped while it streams in (413 past `max_request_bytes`); an upload is
refused past `max_image_bytes`, and its header is checked against `max_source_pixels` before any pixel
is decoded; k, texts and /embed batches have limits (422 past them). The server reads only files inside
its index folder: media are looked up by candidate id, never by a path from the request. Model calls are
serialised by a lock and run off the event loop.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import json
import logging
import threading
import time
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Annotated, Any

import numpy as np
from fastapi import FastAPI, File, Form, HTTPException, Request, UploadFile
from fastapi.concurrency import run_in_threadpool
from fastapi.encoders import jsonable_encoder
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, HTMLResponse, JSONResponse, Response
from PIL import Image
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Histogram, generate_latest
from pydantic import BaseModel, Field

from umarvel.data.io import InputError, read_jsonl
from umarvel.data.media import decode_image_bytes
from umarvel.data.records import Candidate, Query
from umarvel.pipeline.index import CANDIDATES_FILE, load_index_embedder, media_path
from umarvel.reranker.model import Reranker
from umarvel.reranker.scoring import DEFAULT_WEIGHT, rerank_hits

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
        await JSONResponse({"detail": detail}, status_code=status)(scope, receive, send)


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


class Service:
    """What the app serves: the index, its embedder, the candidates, an optional re-ranker."""

    def __init__(
        self,
        index_dir: str | Path,
        reranker: str | None = None,
        overrides: dict | None = None,
        limits: ServeLimits | None = None,
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
        self.lock = threading.Lock()

    def search(
        self, query: Query, k: int, rerank: bool, rerank_top: int
    ) -> tuple[list[tuple[str, float]], bool]:
        with self.lock:
            vectors = self.embedder.encode_queries([query], progress=False)
            depth = max(k, rerank_top) if rerank and self.reranker is not None else k
            found = self.index.search(vectors, depth)
            ranked = [(d, float(s)) for d, s in zip(found.ids[0], found.scores[0], strict=True) if d]
            if not (rerank and self.reranker is not None):
                return ranked[:k], False
            fused = rerank_hits(
                self.reranker, query, ranked, self.candidates, rerank_top, float(self.fusion_weight or 0.0)
            )
            return fused[:k], True

    def embed(self, records: list[Query], role: str) -> np.ndarray:
        with self.lock:
            if role == "query":
                return self.embedder.encode_queries(records, progress=False)
            return self.embedder.encode_candidates(records, progress=False)


def create_app(service: Service) -> FastAPI:
    """The FastAPI app for `service` (see module docstring)."""
    limits = service.limits
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

    @app.exception_handler(InputError)
    async def bad_input(request: Request, error: InputError) -> JSONResponse:
        return _AsciiJSON({"detail": str(error)}, status_code=400)

    @app.exception_handler(RequestValidationError)
    async def invalid_body(request: Request, error: RequestValidationError) -> JSONResponse:
        # FastAPI's own answer echoes the input, which may hold a lone surrogate that UTF-8 cannot encode
        # or an Infinity that JSON cannot spell (both a 500). Where and what is wrong, without the
        # input, in escaped ASCII JSON.
        problems = [{k: v for k, v in problem.items() if k != "input"} for problem in error.errors()]
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
        hits, reranked = await run_in_threadpool(service.search, query, k, rerank, rerank_top)
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
        vectors = await run_in_threadpool(service.embed, records, request.role)
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

    app.add_middleware(_BodyLimit, limit=limits.max_request_bytes, timeout=limits.body_timeout_s)
    return app
