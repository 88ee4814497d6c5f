"""The HTTP API over a retrieval index: search by text or image, images and thumbnails, embeddings,
health, metrics and a search page.

Clients name images only by integer id; the file behind an id comes from the index the operator
built, so no client string ever becomes a filesystem path.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import time
from concurrent.futures import ThreadPoolExecutor
from importlib import resources
from typing import Annotated

import numpy as np
import torch
from fastapi import FastAPI, File, Form, HTTPException, Path, Query, UploadFile
from fastapi.concurrency import run_in_threadpool
from fastapi.exception_handlers import http_exception_handler
from fastapi.responses import JSONResponse, Response
from pydantic import BaseModel, ConfigDict, Field, field_validator
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.middleware.trustedhost import TrustedHostMiddleware

from clipkit.retrieval import Encoder, ImageRecord, ImageUnavailable, RetrievalIndex, read_record_bytes
from clipkit.serve.batching import MicroBatcher
from clipkit.serve.config import ServeConfig
from clipkit.serve.generations import ServedIndex, reload_now, watch_manifest
from clipkit.serve.guards import (
    ApiKeyGuard,
    BodySizeLimit,
    CrossSiteGuard,
    DecodeSlots,
    UploadError,
    decode_upload,
    key_cookie,
)
from clipkit.serve.knn_service import add_knn_service
from clipkit.serve.limits import InFlightLimit, RequestDeadline, add_overload_handlers
from clipkit.serve.metrics import CONTENT_TYPE_LATEST, MetricsMiddleware, ServerMetrics
from clipkit.serve.thumbnails import THUMBNAIL_SIZES, ByteBoundedCache, render_thumbnail

log = logging.getLogger(__name__)

MAX_QUERY_CHARS = 1000
MAX_K = 1000
MAX_EMBED_TEXTS = 64
MAX_IMAGE_ID = 2**63 - 1  # SQLite's INTEGER range
PAGE_FILES = {"/": ("page.html", "text/html; charset=utf-8"), "/page.js": ("page.js", "text/javascript"),
              "/page.css": ("page.css", "text/css")}  # fmt: skip
# What an index row's media_type may be served as: the formats the data layer indexes. A row saying text/html
# (an index is not trusted) would otherwise make a file a page on this origin.
SERVED_MEDIA_TYPES = {"image/jpeg": "image/jpeg", "image/mpo": "image/jpeg", "image/png": "image/png",
                      "image/webp": "image/webp", "image/gif": "image/gif", "image/bmp": "image/bmp",
                      "image/tiff": "image/tiff"}  # fmt: skip
# What answers without the key: probes, scraping, the page (it asks for the key) and the API docs.
OPEN_PATHS = frozenset({*PAGE_FILES, "/healthz", "/readyz", "/metrics", "/docs", "/docs/oauth2-redirect",
                        "/openapi.json", "/favicon.ico"})  # fmt: skip
# Routes that change what the server does (not only what it answers): never from another site's page.
STATE_CHANGING_PATHS = ("/v1/index/reload", "/v1/session")
PAGE_HEADERS = {
    "Content-Security-Policy": "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' blob: data:; "
    "connect-src 'self'; form-action 'none'; frame-ancestors 'none'; base-uri 'none'",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
}


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
    status: str = Field(description='"ok", or "failing" with the reasons in `problems`')
    images: int
    model: str
    generation: int = Field(description="the index generation being served (index.json's)")
    problems: list[str]


class Reloaded(BaseModel):
    reloaded: bool = Field(description="whether a new generation replaced the one being served")
    generation: int
    images: int


def create_app(index: RetrievalIndex, encoder: Encoder, config: ServeConfig | None = None) -> FastAPI:
    """The FastAPI app for `index`, whose queries `encoder` embeds (it must be the index's model).

    The app serves newer generations of the index as they are committed; `app.state.served.close()`
    closes whichever generations it has open (the caller owns `index` until then)."""
    config = config or ServeConfig()
    metrics = ServerMetrics()
    served = ServedIndex(index)
    note_generation(metrics, index)
    # One thread runs the model, one batch at a time: torch already spreads one forward pass over the cores.
    model_thread = ThreadPoolExecutor(max_workers=1, thread_name_prefix="clipkit-model")
    fingerprint = served.fingerprint
    thumbnails = ByteBoundedCache(config.thumbnail_cache_bytes)
    decoders = DecodeSlots(config.max_decodes, wait_s=config.decode_wait_s)
    if config.image_roots is None and index.image_roots is None:
        log.warning("%s records no image folders (written before clipkit recorded them): its images are not "
                    "served; rebuild the index or pass the folders as image_roots", index.index_dir)  # fmt: skip

    def search_texts(requests: list[tuple[str, int]]) -> list[list[SearchResult]]:
        vectors = encoder.encode_texts([query for query, _ in requests])  # (B, D)
        with served.reading() as current:
            return _search_vectors(current, vectors, [k for _, k in requests])

    def embed_texts(requests: list[list[str]]) -> list[np.ndarray]:
        texts = [text for request in requests for text in request]
        # Requests carry up to MAX_EMBED_TEXTS texts each: encode at most max_batch texts per forward pass.
        chunks = range(0, len(texts), config.max_batch)
        vectors = np.concatenate(
            [encoder.encode_texts(texts[i : i + config.max_batch]) for i in chunks]
        )  # (T, D)
        bounds = np.cumsum([0, *map(len, requests)])
        return [vectors[start:end] for start, end in zip(bounds[:-1], bounds[1:], strict=True)]

    def encode_images(
        requests: list[tuple[torch.Tensor, int | None]],
    ) -> list[tuple[np.ndarray, list | None]]:
        """Uploads already transformed for the model; k None: the embedding only, else also the search."""
        vectors = encoder.encode_pixels(torch.stack([pixels for pixels, _ in requests]))  # (B, D)
        searched = [i for i, (_, k) in enumerate(requests) if k is not None]
        found: dict[int, list[SearchResult]] = {}
        if searched:
            with served.reading() as current:
                answers = _search_vectors(current, vectors[searched], [requests[i][1] for i in searched])
            found = dict(zip(searched, answers, strict=True))
        return [(vectors[i : i + 1], found.get(i)) for i in range(len(requests))]

    batch_wait_s = config.batch_wait_ms / 1000
    batchers = {
        name: MicroBatcher(
            compute,
            executor=model_thread,
            max_batch=max_batch,
            max_wait_s=batch_wait_s,
            max_queue=config.max_queue,
            on_batch=metrics.batch_size.labels(name).observe,
            name=name,
        )
        for name, compute, max_batch in (
            ("search", search_texts, config.max_batch),
            ("embed_text", embed_texts, config.max_batch),
            ("image", encode_images, config.max_image_batch),
        )
    }

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI):
        for batcher in batchers.values():
            batcher.start()
        watcher = None
        if config.reload_interval_s > 0:
            watcher = asyncio.create_task(
                watch_manifest(
                    served, config.reload_interval_s, lambda fresh: note_generation(metrics, fresh)
                )
            )
        try:
            yield
        finally:
            if watcher is not None:
                watcher.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await watcher
            for batcher in batchers.values():
                await batcher.stop()
            model_thread.shutdown(wait=True)
            decoders.close()

    app = FastAPI(
        title="clipkit retrieval",
        summary=f"Text-to-image search over {index.count} images",
        description="Every route but the page, probes, metrics and docs needs `Authorization: Bearer <key>`."
        if config.api_key
        else "",
        version="1",
        lifespan=lifespan,
    )
    app.state.served = served
    app.state.batchers = batchers
    app.state.model_thread = model_thread
    app.state.decoders = decoders  # every upload decode (here and /knn-service) takes one of the same slots

    async def encode_upload(image: UploadFile, k: int | None) -> tuple[np.ndarray, list | None]:
        data = await image.read()
        try:
            pixels = await decoders.run(_upload_pixels, encoder, data, config.max_image_pixels)
        except UploadError as e:
            retry = {"Retry-After": str(config.retry_after_s)} if e.status == 503 else None
            raise HTTPException(e.status, str(e), headers=retry) from None
        return await batchers["image"].submit((pixels, k))  # ((1, D), results or None)

    @app.post(
        "/v1/search",
        response_model=SearchResponse,
        summary="Images that match a text query",
    )
    async def search(request: SearchRequest) -> SearchResponse:
        start = time.perf_counter()
        results = await batchers["search"].submit((request.query, request.k))
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
        _, results = await encode_upload(image, k)
        return SearchResponse(results=results, took_ms=_ms_since(start))

    @app.get(
        "/v1/images/{image_id}",
        summary=f"An indexed image's bytes, or a thumbnail with ?size= one of {', '.join(map(str, THUMBNAIL_SIZES))}",
        responses={200: {"content": {"image/*": {}}}, 404: {"description": "no image with this id"}},
    )
    async def get_image(
        image_id: Annotated[int, Path(ge=0, le=MAX_IMAGE_ID)],
        size: Annotated[int | None, Query(description=f"one of {THUMBNAIL_SIZES}")] = None,
    ) -> Response:
        if size is not None and size not in THUMBNAIL_SIZES:
            raise HTTPException(
                422, f"size={size} is not a thumbnail size; use one of {', '.join(map(str, THUMBNAIL_SIZES))}"
            )
        data, media_type = await run_in_threadpool(image_bytes, image_id, size)
        return Response(data, media_type=media_type, headers={"X-Content-Type-Options": "nosniff",
                                                              "Cache-Control": "private, max-age=300"})  # fmt: skip

    def image_bytes(image_id: int, size: int | None) -> tuple[bytes, str]:
        with served.reading() as current:
            # Each generation records the folders of its own images (an add may bring new ones).
            image_roots = config.image_roots or current.image_roots
            if size is None:
                return _original(current, image_id, image_roots)
            # Ids keep their image across appends; a rebuild is a new model-checked generation, hence the key.
            key = (current.generation, image_id, size)
            cached = thumbnails.get(key)
            if cached is None:
                cached = render_thumbnail(*_original(current, image_id, image_roots), size)
                thumbnails.put(key, cached)
            return cached

    @app.post(
        "/v1/embed/text",
        response_model=EmbedResponse,
        summary="Normalised text embeddings",
    )
    async def embed_text(request: EmbedTextRequest) -> EmbedResponse:
        vectors = await batchers["embed_text"].submit(request.texts)
        return EmbedResponse(embeddings=vectors.tolist(), dim=index.dim, model=fingerprint)

    @app.post(
        "/v1/embed/image",
        response_model=EmbedResponse,
        summary="Normalised embedding of an uploaded image",
    )
    async def embed_image(image: Annotated[UploadFile, File(description="an image file")]) -> EmbedResponse:
        vector, _ = await encode_upload(image, None)
        return EmbedResponse(embeddings=vector.tolist(), dim=index.dim, model=fingerprint)

    @app.post(
        "/v1/session",
        status_code=204,
        summary="Sign the search page in: sets an HttpOnly cookie holding the key (send the key as Bearer)",
    )
    async def sign_in() -> Response:
        # The key guard has checked the Bearer key already; without a key configured there is nothing to keep.
        headers = {"Set-Cookie": key_cookie(config.api_key)} if config.api_key else {}
        return Response(status_code=204, headers={**headers, "Cache-Control": "no-store"})

    @app.post(
        "/v1/index/reload",
        response_model=Reloaded,
        summary="Serve the generation index.json names now (the server also notices by itself)",
        responses={409: {"description": "the index now holds another model's embeddings, or cannot be read"}},
    )
    async def reload_index() -> Reloaded:
        try:
            switched = await reload_now(served, lambda fresh: note_generation(metrics, fresh))
        except Exception as e:  # noqa: BLE001 (reported; the current generation stays)
            raise HTTPException(409, served.reload_error or str(e)) from None
        return Reloaded(reloaded=switched, generation=served.current.generation, images=served.current.count)

    def problems() -> list[str]:
        found = [
            f"the {name} batcher is not running ({b.failure})" for name, b in batchers.items() if not b.alive
        ]
        if served.reload_error:
            found.append(f"the last reload failed: {served.reload_error}")
        return found

    @app.get("/healthz", response_model=Health, summary="Liveness, and what is wrong if anything is")
    async def healthz() -> Health:
        current, found = served.current, problems()
        return Health(status="failing" if found else "ok", images=current.count, model=fingerprint,
                      generation=current.generation, problems=found)  # fmt: skip

    @app.get(
        "/readyz",
        summary="Readiness: 200 while searches can be answered, else 503",
        responses={503: {"description": "a batcher is not running"}},
    )
    async def readyz() -> JSONResponse:
        stopped = [
            f"the {name} batcher is not running ({b.failure})" for name, b in batchers.items() if not b.alive
        ]
        if stopped:
            return JSONResponse({"detail": "; ".join(stopped)}, status_code=503)
        return JSONResponse({"status": "ready"})

    @app.get("/metrics", summary="Prometheus metrics", response_class=Response)
    async def prometheus_metrics() -> Response:
        return Response(metrics.render(), media_type=CONTENT_TYPE_LATEST)

    add_knn_service(app, encoder, config, index_name=index.index_dir.name)  # clip-retrieval's API
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

    add_overload_handlers(app, retry_after_s=config.retry_after_s)
    known_paths = {route.path for route in app.routes}
    # The last added runs first: metrics see every answer; a foreign Host is refused before anything else
    # (DNS rebinding); the in-flight bound and the deadline cover reading the body too; the key and the
    # site are checked before any body is read.
    max_body_bytes = config.max_upload_bytes + 64 * 1024  # + multipart framing
    app.add_middleware(BodySizeLimit, max_bytes=max_body_bytes)
    if config.api_key:
        app.add_middleware(ApiKeyGuard, api_key=config.api_key, open_paths=OPEN_PATHS)
    app.add_middleware(CrossSiteGuard, paths=STATE_CHANGING_PATHS)
    app.add_middleware(
        RequestDeadline, timeout_s=config.request_timeout_s, retry_after_s=config.retry_after_s
    )
    app.add_middleware(InFlightLimit, max_requests=config.max_requests, retry_after_s=config.retry_after_s,
                       max_body_bytes=max_body_bytes)  # fmt: skip
    app.add_middleware(TrustedHostMiddleware, allowed_hosts=list(config.allowed_hosts), www_redirect=False)
    app.add_middleware(MetricsMiddleware, metrics=metrics, known_paths=known_paths)
    return app


def note_generation(metrics: ServerMetrics, index: RetrievalIndex) -> None:
    metrics.index_images.set(index.count)
    metrics.index_generation.set(index.generation)


def _upload_pixels(encoder: Encoder, data: bytes, max_pixels: int) -> torch.Tensor:
    """An upload decoded and transformed for the model (3, H, W): what waits in the queue is small."""
    return encoder.bundle.eval_transform(decode_upload(data, max_pixels=max_pixels))


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


def _original(index: RetrievalIndex, image_id: int, roots: list[str] | None) -> tuple[bytes, str]:
    record: ImageRecord | None = index.record(image_id)
    if record is None:
        raise HTTPException(404, f"no image with id {image_id}; ids run from 0 to {index.count - 1}")
    media_type = SERVED_MEDIA_TYPES.get(record.media_type)
    if media_type is None or roots is None:
        log.warning("image %d: not served (%s)", image_id,
                    f"media type {record.media_type!r}" if roots else "no image folders recorded")  # fmt: skip
        raise HTTPException(404, f"image {image_id} is not served")
    try:
        data = read_record_bytes(record, roots)
    except ImageUnavailable as e:
        log.warning("image %d: %s", image_id, e)
        raise HTTPException(404, f"image {image_id} is no longer readable on the server") from None
    # A shard replaced or damaged since indexing can still hold enough bytes at the offset: other bytes.
    if hashlib.sha256(data).hexdigest() != record.sha256:
        log.warning("image %d: %s changed since it was indexed (other bytes at offset %s); re-index it",
                    image_id, record.path, record.offset)  # fmt: skip
        raise HTTPException(404, f"image {image_id} is no longer readable on the server")
    return data, media_type


def _static_endpoint(file_name: str, media_type: str):
    content = resources.files("clipkit.serve").joinpath("static", file_name).read_bytes()

    async def endpoint() -> Response:
        return Response(content, media_type=media_type, headers=PAGE_HEADERS)

    return endpoint


def _ms_since(start: float) -> float:
    return round((time.perf_counter() - start) * 1000, 3)
