"""What the server lets through: the API key, request body size, and uploads that must be images of bounded size.

The key and the body size are checked by ASGI middleware, before FastAPI reads or parses anything.
"""

from __future__ import annotations

import asyncio
import hmac
import io
import json
import warnings
from concurrent.futures import ThreadPoolExecutor

from PIL import Image

# Past this, a request body is read and dropped rather than buffered, then the connection is closed.
_DRAIN_LIMIT_FACTOR = 4


class UploadError(Exception):
    """An upload the server refuses; `status` is the HTTP status to answer with."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status


# The formats the data layer indexes (clipkit.data.images.IMAGE_EXTENSIONS), as PIL names them (its JPEG
# plugin also opens a phone's multi-picture JPEG, MPO). Anything else (EPS runs Ghostscript, ICO decodes
# whole inside Image.open) is refused before PIL's plugin for it sees a byte.
UPLOAD_FORMATS = ("JPEG", "PNG", "WEBP", "GIF", "BMP", "TIFF")


def decode_upload(data: bytes, *, max_pixels: int) -> Image.Image:
    """An RGB image from uploaded bytes; UploadError 415 for anything not an allowed, decodable format, 413
    when it declares more than `max_pixels` pixels (checked from the header, before any pixel is decoded)."""
    if not data:
        raise UploadError(415, "the upload is empty; send an image file (JPEG, PNG, WebP, ...)")
    Image.init()  # registers every plugin: open(formats=) looks up only registered ones
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            # formats=: only these plugins may parse the header; none of them decodes pixels while opening.
            with Image.open(io.BytesIO(data), formats=UPLOAD_FORMATS) as image:
                width, height = image.size  # from the header
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
            415,
            f"the upload is not an image this server decodes ({type(e).__name__}); send JPEG, PNG, WebP, GIF, "
            "BMP or TIFF",
        ) from None


class DecodeSlots:
    """At most `slots` uploads decoded at once, on their own threads; a request waits `wait_s` for a slot,
    then gets 503 (UploadError). A slot is freed when its decode ends, even if the request was cancelled
    meanwhile, so a deadline never lets more decodes run than there are slots."""

    def __init__(self, slots: int, *, wait_s: float):
        self.slots = slots
        self.wait_s = wait_s
        self._free = asyncio.Semaphore(slots)
        self._threads = ThreadPoolExecutor(max_workers=slots, thread_name_prefix="clipkit-decode")

    async def run(self, function, *args):
        try:
            await asyncio.wait_for(self._free.acquire(), self.wait_s)
        except asyncio.TimeoutError:
            raise UploadError(503, f"all {self.slots} image decoders are busy; retry later") from None
        loop = asyncio.get_running_loop()
        try:
            job = self._threads.submit(function, *args)
        except BaseException:
            self._free.release()
            raise
        # On the job itself, not on the awaiting task: a cancelled request does not stop a running decode.
        job.add_done_callback(lambda _: loop.call_soon_threadsafe(self._free.release))
        return await asyncio.wrap_future(job)

    def close(self) -> None:
        self._threads.shutdown(wait=True)


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
        await drain_body(receive, declared, limit=_DRAIN_LIMIT_FACTOR * self.max_bytes)


async def drain_body(receive, declared: int | None, *, limit: int) -> None:
    """Read and drop the rest of a refused body (up to `limit` bytes), so the client sees our answer
    instead of a reset connection while it is still sending."""
    if declared is not None and declared > limit:
        return
    seen = 0
    while seen <= limit:
        message = await receive()
        if message["type"] != "http.request":
            return
        seen += len(message.get("body", b""))
        if not message.get("more_body", False):
            return


KEY_COOKIE = "clipkit-key"


class ApiKeyGuard:
    """ASGI middleware: every request but those to `open_paths` needs the key, else 401 at once (a route added
    later is guarded without anyone remembering to). The key comes as
    `Authorization: Bearer <key>`, or from the search page as the HttpOnly cookie its sign-in set (no script
    can read it, and SameSite=Strict keeps other sites' pages from sending it)."""

    def __init__(self, app, *, api_key: str, open_paths: frozenset[str]):
        self.app = app
        self.expected = f"Bearer {api_key}".encode()
        self.expected_cookie = api_key.encode()
        self.open_paths = open_paths

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] == "http" and scope["path"] not in self.open_paths:
            headers = dict(scope["headers"])
            given = headers.get(b"authorization", b"")
            cookie = _cookie(headers.get(b"cookie", b""), KEY_COOKIE.encode())
            # Constant time: no prefix of the key leaks.
            if not hmac.compare_digest(given, self.expected) and not (
                cookie is not None and hmac.compare_digest(cookie, self.expected_cookie)
            ):
                await refuse(
                    send, 401, "missing or wrong API key: send Authorization: Bearer <key>",
                    extra_headers=[(b"www-authenticate", b"Bearer")],
                )  # fmt: skip
                return
        await self.app(scope, receive, send)


def key_cookie(api_key: str) -> str:
    """The Set-Cookie value that signs the search page in: HttpOnly (no script reads it), SameSite=Strict."""
    return f"{KEY_COOKIE}={api_key}; HttpOnly; SameSite=Strict; Path=/"


def _cookie(header: bytes, name: bytes) -> bytes | None:
    for part in header.split(b";"):
        key, _, value = part.strip().partition(b"=")
        if key == name:
            return value
    return None


class CrossSiteGuard:
    """ASGI middleware: requests to `paths` (state changes) that a browser says come from another origin get
    403 at once. Browsers name the requesting page (Sec-Fetch-Site, Origin), and a page elsewhere, or one
    on a name rebound to this address, must not reload the index; clients that are not browsers send
    neither header and pass."""

    def __init__(self, app, *, paths: tuple[str, ...]):
        self.app = app
        self.paths = paths

    async def __call__(self, scope, receive, send) -> None:
        if (
            scope["type"] == "http"
            and scope["path"] in self.paths
            and self._cross_origin(dict(scope["headers"]))
        ):
            await refuse(send, 403, f"{scope['path']} refused: the request comes from another site's page")
            return
        await self.app(scope, receive, send)

    @staticmethod
    def _cross_origin(headers: dict[bytes, bytes]) -> bool:
        fetch_site = headers.get(b"sec-fetch-site")
        if fetch_site is not None and fetch_site not in (b"same-origin", b"none"):  # none: typed by the user
            return True
        origin = headers.get(b"origin")
        if origin is None:
            return False
        # Origin is scheme://host[:port]; this server's own pages send the Host they were loaded from.
        return origin.partition(b"://")[2] != headers.get(b"host", b"")


async def refuse(send, status: int, detail: str, *, extra_headers: list[tuple[bytes, bytes]] = ()) -> None:
    """Answer with a JSON `detail`, as FastAPI's errors look, and close the connection (the body is unread)."""
    body = json.dumps({"detail": detail}).encode()
    headers = [(b"content-type", b"application/json"), (b"connection", b"close"), *extra_headers]
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body})
