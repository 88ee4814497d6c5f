"""What the server lets through: the API key, request body size, and uploads that must be images of bounded size.

The key and the body size are checked by ASGI middleware, before FastAPI reads or parses anything.
"""

from __future__ import annotations

import hmac
import io
import json
import warnings

from PIL import Image

# Past this, a request body is read and dropped rather than buffered, then the connection is closed.
_DRAIN_LIMIT_FACTOR = 4


class UploadError(Exception):
    """An upload the server refuses; `status` is the HTTP status to answer with."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status


def decode_upload(data: bytes, *, max_pixels: int) -> Image.Image:
    """An RGB image from uploaded bytes; UploadError 415 for anything PIL cannot decode, 413 when too big."""
    if not data:
        raise UploadError(415, "the upload is empty; send an image file (JPEG, PNG, WebP, ...)")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(io.BytesIO(data)) as image:
                width, height = image.size  # from the header: checked before decoding any pixels
                if width * height > max_pixels:
                    raise UploadError(
                        413, f"the image is {width}x{height} pixels; the limit is {max_pixels} pixels"
                    )
                image.load()
                return image.convert("RGB")
    except UploadError:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        raise UploadError(413, f"the image is too large to decode ({e})") from None
    except Exception as e:  # noqa: BLE001 (PIL raises many types for data it cannot decode)
        raise UploadError(
            415, f"the upload is not an image this server can decode ({type(e).__name__})"
        ) from None


class BodySizeLimit:
    """ASGI middleware: request bodies over `max_bytes` get 413 before the app parses anything.

    The body is buffered (at most `max_bytes`) and replayed to the app, so chunked uploads without a
    Content-Length are bounded too.
    """

    def __init__(self, app, *, max_bytes: int):
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http" or scope["method"] in ("GET", "HEAD", "OPTIONS"):
            await self.app(scope, receive, send)
            return
        declared = dict(scope["headers"]).get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.max_bytes:
            await self._drain(receive, int(declared))
            await refuse(send, 413, f"request body over {self.max_bytes} bytes")
            return
        body = bytearray()
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return
            body += message.get("body", b"")
            if len(body) > self.max_bytes:
                await self._drain(receive, None)
                await refuse(send, 413, f"request body over {self.max_bytes} bytes")
                return
            if not message.get("more_body", False):
                break

        replayed = False

        async def replay():
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": bytes(body), "more_body": False}
            return await receive()  # after the body: wait for the disconnect, as the server would

        await self.app(scope, replay, send)

    async def _drain(self, receive, declared: int | None) -> None:
        """Read and drop the rest of a refused body (up to a bound), so the client sees our answer
        instead of a reset connection while it is still sending."""
        if declared is not None and declared > _DRAIN_LIMIT_FACTOR * self.max_bytes:
            return
        seen = 0
        while seen <= _DRAIN_LIMIT_FACTOR * self.max_bytes:
            message = await receive()
            if message["type"] != "http.request":
                return
            seen += len(message.get("body", b""))
            if not message.get("more_body", False):
                return


class ApiKeyGuard:
    """ASGI middleware: requests under `prefix` need `Authorization: Bearer <key>`, else 401 at once."""

    def __init__(self, app, *, api_key: str, prefix: str = "/v1/"):
        self.app = app
        self.expected = f"Bearer {api_key}".encode()
        self.prefix = prefix

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] == "http" and scope["path"].startswith(self.prefix):
            given = dict(scope["headers"]).get(b"authorization", b"")
            if not hmac.compare_digest(given, self.expected):  # constant time: no prefix of the key leaks
                await refuse(
                    send, 401, "missing or wrong API key: send Authorization: Bearer <key>",
                    extra_headers=[(b"www-authenticate", b"Bearer")],
                )  # fmt: skip
                return
        await self.app(scope, receive, send)


async def refuse(send, status: int, detail: str, *, extra_headers: list[tuple[bytes, bytes]] = ()) -> None:
    """Answer with a JSON `detail`, as FastAPI's errors look, and close the connection (the body is unread)."""
    body = json.dumps({"detail": detail}).encode()
    headers = [(b"content-type", b"application/json"), (b"connection", b"close"), *extra_headers]
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body})
