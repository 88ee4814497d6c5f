"""The HTTP API over a retrieval index: search by text or image, images and thumbnails, embeddings,
health, metrics and a search page.

Clients name images only by integer id; the file behind an id comes from the index the operator
built, so no client string ever becomes a filesystem path.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import io
import logging
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from importlib import resources
from typing import Annotated

import numpy as np
from fastapi import FastAPI, File, Form, HTTPException, Path, Query, UploadFile
from fastapi.concurrency import run_in_threadpool
from fastapi.exception_handlers import http_exception_handler
from fastapi.responses import JSONResponse, Response
from PIL import Image, ImageOps
from pydantic import BaseModel, ConfigDict, Field, field_validator
from starlette.exceptions import HTTPException as StarletteHTTPException

from clipkit.retrieval import Encoder, ImageRecord, RetrievalIndex, read_item_bytes
from clipkit.serve.batching import MicroBatcher
from clipkit.serve.guards import ApiKeyGuard, BodySizeLimit, UploadError, decode_upload
from clipkit.serve.metrics import CONTENT_TYPE_LATEST, MetricsMiddleware, ServerMetrics

log = logging.getLogger(__name__)

MAX_QUERY_CHARS = 1000
MAX_K = 1000
MAX_EMBED_TEXTS = 64
THUMBNAIL_SIZES = (16, 1024)  # ?size= bounds, pixels
MAX_IMAGE_ID = 2**63 - 1  # SQLite's INTEGER range
PAGE_FILES = {"/": ("page.html", "text/html; charset=utf-8"), "/page.js": ("page.js", "text/javascript"),
              "/page.css": ("page.css", "text/css")}  # fmt: skip
PAGE_HEADERS = {
    "Content-Security-Policy": "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' blob: data:; "
    "connect-src 'self'; form-action 'none'; frame-ancestors 'none'; base-uri 'none'",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
}


@dataclass(kw_only=True)
class ServeConfig:
    api_key: str | None = None  # when set, every /v1 route needs `Authorization: Bearer <api_key>`
    max_batch: int = 64  # text queries encoded together at most
    batch_wait_ms: float = 2.0  # how long a query waits for others to join its batch
    max_upload_bytes: int = 10 * 2**20
    max_image_pixels: int = 40_000_000  # uploads with more pixels are refused (413) before decoding
    thumbnail_cache: int = 2048  # thumbnails kept in memory


class SearchRequest(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)
    query: str = Field(min_length=1, max_length=MAX_QUERY_CHARS, description="words describing the images")
    k: int = Field(10, ge=1, le=MAX_K, description="how many results")

    @field_validator("query")
    @classmethod
    def not_blank(cls, value: str) -> str:
        if not value.strip():
            raise ValueError("the query is blank; type some words")
        return value


class SearchResult(BaseModel):
    id: int
    score: float = Field(description="cosine similarity of the query and the image, -1..1")
    uri: str = Field(description="how the collection names the image (relative path, SHARD#KEY, table value)")
    caption: str | None


class SearchResponse(BaseModel):
    results: list[SearchResult]
    took_ms: float


class EmbedTextRequest(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)
    texts: list[Annotated[str, Field(min_length=1, max_length=MAX_QUERY_CHARS)]] = Field(
        min_length=1, max_length=MAX_EMBED_TEXTS
    )


class EmbedResponse(BaseModel):
    embeddings: list[list[float]] = Field(description="one L2-normalised vector per input")
    dim: int
    model: str = Field(description="fingerprint of the model (SHA-256 of its configs and weights)")


class Health(BaseModel):
    status: str
    images: int
    model: str


def create_app(index: RetrievalIndex, encoder: Encoder, config: ServeConfig | None = None) -> FastAPI:
    """The FastAPI app for `index`, whose queries `encoder` embeds (it must be the index's model)."""
    config = config or ServeConfig()
    metrics = ServerMetrics()
    metrics.index_images.set(index.count)
    # One thread runs the model, one batch at a time: torch already spreads one forward pass over the cores.
    model_thread = ThreadPoolExecutor(max_workers=1, thread_name_prefix="clipkit-model")
    fingerprint = index.model["fingerprint"]

    def search_texts(requests: list[tuple[str, int]]) -> list[list[SearchResult]]:
        vectors = encoder.encode_texts([query for query, _ in requests])  # (B, D)
        return _search_vectors(index, vectors, [k for _, k in requests])

    def embed_texts(requests: list[list[str]]) -> list[np.ndarray]:
        texts = [text for request in requests for text in request]
        # Requests carry up to MAX_EMBED_TEXTS texts each: encode at most max_batch texts per forward pass.
        chunks = range(0, len(texts), config.max_batch)
        vectors = np.concatenate(
            [encoder.encode_texts(texts[i : i + config.max_batch]) for i in chunks]
        )  # (T, D)
        bounds = np.cumsum([0, *map(len, requests)])
        return [vectors[start:end] for start, end in zip(bounds[:-1], bounds[1:], strict=True)]

    batch_wait_s = config.batch_wait_ms / 1000
    search_batcher = MicroBatcher(
        search_texts, executor=model_thread, max_batch=config.max_batch, max_wait_s=batch_wait_s,
        on_batch=metrics.batch_size.labels("search").observe,
    )  # fmt: skip
    embed_batcher = MicroBatcher(
        embed_texts, executor=model_thread, max_batch=config.max_batch, max_wait_s=batch_wait_s,
        on_batch=metrics.batch_size.labels("embed_text").observe,
    )  # fmt: skip

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI):
        search_batcher.start()
        embed_batcher.start()
        try:
            yield
        finally:
            await search_batcher.stop()
            await embed_batcher.stop()
            model_thread.shutdown(wait=True)

    app = FastAPI(
        title="clipkit retrieval",
        summary=f"Text-to-image search over {index.count} images",
        description="Every /v1 route needs `Authorization: Bearer <key>`." if config.api_key else "",
        version="1",
        lifespan=lifespan,
    )

    async def encode_upload(image: UploadFile) -> np.ndarray:
        data = await image.read()
        try:
            picture = await run_in_threadpool(decode_upload, data, max_pixels=config.max_image_pixels)
        except UploadError as e:
            raise HTTPException(e.status, str(e)) from None
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(model_thread, encoder.encode_images, [picture])  # (1, D)

    @app.post(
        "/v1/search",
        response_model=SearchResponse,
        summary="Images that match a text query",
    )
    async def search(request: SearchRequest) -> SearchResponse:
        start = time.perf_counter()
        results = await search_batcher.submit((request.query, request.k))
        return SearchResponse(results=results, took_ms=_ms_since(start))

    @app.post(
        "/v1/search/image",
        response_model=SearchResponse,
        summary="Images similar to an uploaded image",
    )
    async def search_image(
        image: Annotated[UploadFile, File(description="an image file")],
        k: Annotated[int, Form(ge=1, le=MAX_K)] = 10,
    ) -> SearchResponse:
        start = time.perf_counter()
        vector = await encode_upload(image)
        loop = asyncio.get_running_loop()
        results = await loop.run_in_executor(model_thread, _search_vectors, index, vector, [k])
        return SearchResponse(results=results[0], took_ms=_ms_since(start))

    @app.get(
        "/v1/images/{image_id}",
        summary="An indexed image's bytes, or a thumbnail with ?size=N",
        responses={200: {"content": {"image/*": {}}}, 404: {"description": "no image with this id"}},
    )
    async def get_image(
        image_id: Annotated[int, Path(ge=0, le=MAX_IMAGE_ID)],
        size: Annotated[int | None, Query(ge=THUMBNAIL_SIZES[0], le=THUMBNAIL_SIZES[1])] = None,
    ) -> Response:
        if size is None:
            data, media_type = await run_in_threadpool(_original, index, image_id)
        else:
            data, media_type = await run_in_threadpool(thumbnail, image_id, size)
        return Response(data, media_type=media_type, headers={"X-Content-Type-Options": "nosniff",
                                                              "Cache-Control": "private, max-age=300"})  # fmt: skip

    @functools.lru_cache(maxsize=config.thumbnail_cache)
    def thumbnail(image_id: int, size: int) -> tuple[bytes, str]:
        data, media_type = _original(index, image_id)
        with Image.open(io.BytesIO(data)) as image:
            small = ImageOps.exif_transpose(image)
            small.thumbnail((size, size))
            out = io.BytesIO()
            if small.mode in ("RGBA", "LA", "P") or media_type == "image/png":
                small.save(out, format="PNG")
                return out.getvalue(), "image/png"
            small.convert("RGB").save(out, format="JPEG", quality=85)
            return out.getvalue(), "image/jpeg"

    @app.post(
        "/v1/embed/text",
        response_model=EmbedResponse,
        summary="Normalised text embeddings",
    )
    async def embed_text(request: EmbedTextRequest) -> EmbedResponse:
        vectors = await embed_batcher.submit(request.texts)
        return EmbedResponse(embeddings=vectors.tolist(), dim=index.dim, model=fingerprint)

    @app.post(
        "/v1/embed/image",
        response_model=EmbedResponse,
        summary="Normalised embedding of an uploaded image",
    )
    async def embed_image(image: Annotated[UploadFile, File(description="an image file")]) -> EmbedResponse:
        vector = await encode_upload(image)
        return EmbedResponse(embeddings=vector.tolist(), dim=index.dim, model=fingerprint)

    @app.get("/healthz", response_model=Health, summary="Liveness: answers while the server runs")
    async def healthz() -> Health:
        return Health(status="ok", images=index.count, model=fingerprint)

    @app.get("/metrics", summary="Prometheus metrics", response_class=Response)
    async def prometheus_metrics() -> Response:
        return Response(metrics.render(), media_type=CONTENT_TYPE_LATEST)

    for route_path, (file_name, media_type) in PAGE_FILES.items():
        app.add_api_route(
            route_path, _static_endpoint(file_name, media_type), methods=["GET"], include_in_schema=False
        )

    @app.exception_handler(StarletteHTTPException)
    async def unparseable_body_is_unprocessable(request, exc: StarletteHTTPException) -> Response:
        # FastAPI answers 400 to a body it cannot parse at all (e.g. not UTF-8); that is malformed JSON too,
        # which it otherwise answers with 422. clipkit's own handlers never raise 400.
        if exc.status_code == 400:
            return JSONResponse(
                {"detail": f"the request body cannot be parsed ({exc.detail})"}, status_code=422
            )
        return await http_exception_handler(request, exc)

    known_paths = {route.path for route in app.routes}
    # The last added runs first: metrics see every answer; the key is checked before any body is read.
    app.add_middleware(BodySizeLimit, max_bytes=config.max_upload_bytes + 64 * 1024)  # + multipart framing
    if config.api_key:
        app.add_middleware(ApiKeyGuard, api_key=config.api_key, prefix="/v1/")
    app.add_middleware(MetricsMiddleware, metrics=metrics, known_paths=known_paths)
    return app


def _search_vectors(index: RetrievalIndex, vectors: np.ndarray, ks: list[int]) -> list[list[SearchResult]]:
    """Search all rows of `vectors` (B, D) at once with the largest k, then cut each row to its own k."""
    scores, ids = index.search(vectors, max(ks))  # (B, k)
    records = index.records(np.unique(ids[ids >= 0]).tolist())
    answers = []
    for row_scores, row_ids, k in zip(scores, ids, ks, strict=True):
        answers.append(
            [
                SearchResult(id=int(i), score=float(s), uri=records[i].uri, caption=records[i].caption)
                for s, i in zip(row_scores[:k], row_ids[:k], strict=True)
                if i >= 0
            ]
        )
    return answers


def _original(index: RetrievalIndex, image_id: int) -> tuple[bytes, str]:
    record: ImageRecord | None = index.record(image_id)
    if record is None:
        raise HTTPException(404, f"no image with id {image_id}; ids run from 0 to {index.count - 1}")
    try:
        return read_item_bytes(record.path, record.offset, record.length), record.media_type
    except OSError as e:
        log.warning("image %d: cannot read %s: %s", image_id, record.path, e)
        raise HTTPException(404, f"image {image_id} is no longer readable on the server") from None


def _static_endpoint(file_name: str, media_type: str):
    content = resources.files("clipkit.serve").joinpath("static", file_name).read_bytes()

    async def endpoint() -> Response:
        return Response(content, media_type=media_type, headers=PAGE_HEADERS)

    return endpoint


def _ms_since(start: float) -> float:
    return round((time.perf_counter() - start) * 1000, 3)
