"""What the server accepts: request body size, and uploads that must be images of bounded size."""

from __future__ import annotations

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
            await self._refuse(send)
            return
        body = bytearray()
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return
            body += message.get("body", b"")
            if len(body) > self.max_bytes:
                await self._drain(receive, None)
                await self._refuse(send)
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

    async def _refuse(self, send) -> None:
        detail = json.dumps({"detail": f"request body over {self.max_bytes} bytes"}).encode()
        await send(
            {
                "type": "http.response.start",
                "status": 413,
                "headers": [(b"content-type", b"application/json"), (b"connection", b"close")],
            }
        )
        await send({"type": "http.response.body", "body": detail})
