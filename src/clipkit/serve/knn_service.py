"""clip-retrieval's back-end API on `clipkit serve`, so its `ClipClient`, its front end and scripts written for
LAION's back ends query a clipkit index: POST /knn-service, POST /metadata, GET /indices-list.

Requests and answers carry clip-retrieval's fields (its clip_back.py): a query by `text`, `image` (base64) or
`embedding_input`; results `id`, `similarity` (cosine), `caption`, `url` (the collection's, e.g. img2dataset's
KEY.json) and `image` (the indexed bytes, base64: by default only for results without a url, or as
`return_images` says). What clipkit does not have is accepted and ignored, and the `X-Clipkit-Ignored` header
names it (the answer itself stays the bare list ClipClient expects): the safety model, the violence
detector, aesthetic scoring, multilingual CLIP, unknown fields. `image_url` is refused: the server makes no
outbound request on a client's behalf. Searches use the index's image vectors only (modality "image").
"""

from __future__ import annotations

import base64
import binascii
import hmac
import json
from typing import Any

import numpy as np
from fastapi import FastAPI, HTTPException, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from clipkit.retrieval import Encoder, RetrievalIndex, read_item_bytes
from clipkit.serve.guards import UploadError, decode_upload

MAX_RESULTS = 1000  # num_images and num_result_ids at most
MAX_TEXT_CHARS = 1000
DEDUP_SIMILARITY = 0.94  # clip-retrieval's: results this close to a better one are dropped by `deduplicate`
IGNORED_HEADER = "X-Clipkit-Ignored"


class KnnRequest(BaseModel):
    """clip-retrieval's /knn-service body (ClipClient sends every field, unset ones as null)."""

    model_config = ConfigDict(extra="allow")
    text: str | None = Field(None, max_length=MAX_TEXT_CHARS)
    image: str | None = Field(None, description="the query image, base64")
    image_url: str | None = Field(None, description="refused: the server fetches nothing")
    embedding_input: list[float] | None = None
    modality: str = "image"
    num_images: int = Field(40, ge=1, le=MAX_RESULTS)
    num_result_ids: int | None = Field(None, ge=1, le=MAX_RESULTS)
    indice_name: str | None = None
    deduplicate: bool = False
    return_images: bool | None = Field(
        None, description="clipkit's: image bytes in results (default: no url)"
    )
    # Accepted for ClipClient, which always sends them; clipkit has none of these.
    use_mclip: bool = False
    use_safety_model: bool = False
    use_violence_detector: bool = False
    aesthetic_score: int | str | None = None
    aesthetic_weight: float | str | None = None


class MetadataRequest(BaseModel):
    model_config = ConfigDict(extra="allow")
    ids: list[int] = Field(max_length=MAX_RESULTS)
    indice_name: str | None = None


_UNSUPPORTED = (
    "use_mclip",
    "use_safety_model",
    "use_violence_detector",
    "aesthetic_score",
    "aesthetic_weight",
)


def add_knn_service(app: FastAPI, encoder: Encoder, config, *, index_name: str) -> None:
    """Add the routes to `app`, under `config`'s API key and upload limits (a `ServeConfig`); they read the
    served index and the batchers from `app.state` (see `clipkit.serve.app`)."""
    router = app
    api_key, max_upload_bytes, max_image_pixels = (
        config.api_key,
        config.max_upload_bytes,
        config.max_image_pixels,
    )

    def check_key(request: Request) -> None:
        # With an API key the server has no open door: these routes need it too (ClipClient cannot send it).
        if api_key is None:
            return
        given = request.headers.get("authorization", "").encode()
        if not hmac.compare_digest(given, f"Bearer {api_key}".encode()):
            raise HTTPException(
                401,
                "missing or wrong API key: send Authorization: Bearer <key>",
                headers={"WWW-Authenticate": "Bearer"},
            )

    def check_index(name: str | None) -> None:
        if name is not None and name != index_name:
            raise HTTPException(
                404, f"no index named {name!r}; this server has {index_name!r} (GET /indices-list)"
            )

    @router.get("/indices-list", summary="clip-retrieval: the index names (one)")
    async def indices_list(request: Request) -> list[str]:
        check_key(request)
        return [index_name]

    @router.post("/knn-service", summary="clip-retrieval: images nearest a text, an image or an embedding")
    async def knn_service(request: Request) -> JSONResponse:
        check_key(request)
        query = _parse(KnnRequest, await request.body())
        check_index(query.indice_name)
        if query.image_url:
            raise HTTPException(
                422, "image_url is not fetched: this server makes no outbound requests; send the image itself, "
                "base64-encoded, in `image`",
            )  # fmt: skip
        if query.modality != "image":
            raise HTTPException(
                422,
                f"modality {query.modality!r}: this index holds image embeddings only; use modality 'image'",
            )
        vector = await _query_vector(request, query)  # (1, D)
        served = request.app.state.served
        k = query.num_result_ids or query.num_images

        def search() -> list[dict[str, Any]]:
            with served.reading() as current:
                return _results(current, vector, k, query)

        results = await run_in_threadpool(search)
        ignored = [name for name in _UNSUPPORTED if getattr(query, name) not in (None, False, "")]
        ignored += sorted(query.model_extra or {})
        headers = {IGNORED_HEADER: ", ".join(ignored)} if ignored else {}
        return JSONResponse(results, headers=headers)

    @router.post("/metadata", summary="clip-retrieval: caption, url (and image) of ids")
    async def metadata(request: Request) -> list[dict[str, Any]]:
        check_key(request)
        body = _parse(MetadataRequest, await request.body())
        check_index(body.indice_name)
        served = request.app.state.served

        def read() -> list[dict[str, Any]]:
            with served.reading() as current:
                records = current.records(body.ids)
                return [{"id": i, "metadata": _fields(records[i], None)} for i in body.ids if i in records]

        return await run_in_threadpool(read)

    async def _query_vector(request: Request, query: KnnRequest) -> np.ndarray:
        batchers = request.app.state.batchers
        if query.text:
            return await batchers["embed_text"].submit([query.text])  # (1, D)
        if query.image:
            data = _base64(query.image, max_upload_bytes)
            try:  # the app's decode slots: a bounded number of decodes at once, 503 past the wait
                pixels = await request.app.state.decoders.run(
                    lambda: encoder.bundle.eval_transform(decode_upload(data, max_pixels=max_image_pixels))
                )
            except UploadError as e:
                retry = {"Retry-After": str(config.retry_after_s)} if e.status == 503 else None
                raise HTTPException(e.status, str(e), headers=retry) from None
            vector, _ = await batchers["image"].submit((pixels, None))
            return vector
        if query.embedding_input is not None:
            vector = np.asarray(query.embedding_input, dtype=np.float32)[None]  # (1, D)
            if vector.shape[1] != encoder.embed_dim or not np.isfinite(vector).all() or not vector.any():
                raise HTTPException(
                    422, f"embedding_input must be {encoder.embed_dim} finite numbers, not all zero "
                    f"(got {vector.shape[1]})",
                )  # fmt: skip
            return vector / np.linalg.norm(vector)  # cosine similarity, as for text and image queries
        raise HTTPException(422, "send one of text, image (base64) or embedding_input")


def _parse(model: type[BaseModel], body: bytes):
    """The body as `model`, whatever its Content-Type (ClipClient sends JSON without one)."""
    try:
        return model.model_validate(json.loads(body))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise HTTPException(422, f"the request body is not JSON ({e})") from None
    except ValidationError as e:
        raise HTTPException(422, e.errors(include_url=False, include_context=False)) from None


def _base64(text: str, max_bytes: int) -> bytes:
    if len(text) > 4 * (max_bytes // 3 + 1) + 4:
        raise HTTPException(413, f"the image is over {max_bytes} bytes")
    try:
        return base64.b64decode(text, validate=False)
    except (binascii.Error, ValueError):
        raise HTTPException(422, "image is not base64; send the image file's bytes base64-encoded") from None


def _results(index: RetrievalIndex, vector: np.ndarray, k: int, query: KnnRequest) -> list[dict[str, Any]]:
    """clip-retrieval's result list: nearest first, near-duplicates dropped when asked, `num_images` kept."""
    scores, ids = index.search(vector, k)  # (1, k')
    found = [(float(s), int(i)) for s, i in zip(scores[0], ids[0], strict=True) if i >= 0]
    if query.deduplicate and found:
        found = _without_near_duplicates(index, found)
    found = found[: query.num_images]
    records = index.records([i for _, i in found])
    return [
        {"id": i, "similarity": s, **_fields(records[i], query.return_images)}
        for s, i in found
        if i in records
    ]


def _without_near_duplicates(
    index: RetrievalIndex, found: list[tuple[float, int]]
) -> list[tuple[float, int]]:
    """Each result that is at least DEDUP_SIMILARITY similar to a better one left out (clip-retrieval's rule)."""
    vectors = np.stack([index.reconstruct(i) for _, i in found]).astype(np.float32)  # (k, D)
    vectors /= np.maximum(np.linalg.norm(vectors, axis=1, keepdims=True), 1e-12)
    similar = vectors @ vectors.T >= DEDUP_SIMILARITY  # (k, k)
    kept: list[int] = []
    for row in range(len(found)):
        if not any(similar[row, j] for j in kept):
            kept.append(row)
    return [found[row] for row in kept]


def _fields(record, return_images: bool | None) -> dict[str, Any]:
    url = record.metadata.get("url") if isinstance(record.metadata.get("url"), str) else None
    fields: dict[str, Any] = {"caption": record.caption, "url": url}
    if return_images if return_images is not None else url is None:
        image = _image_base64(record)
        if image is not None:
            fields["image"] = image
    return fields


def _image_base64(record) -> str | None:
    """The indexed bytes, base64, when they are still the ones indexed (else none, as the image route does)."""
    import hashlib

    if not record.path:
        return None
    try:
        data = read_item_bytes(record.path, record.offset, record.length)
    except OSError:
        return None
    if hashlib.sha256(data).hexdigest() != record.sha256:
        return None
    return base64.b64encode(data).decode("ascii")
