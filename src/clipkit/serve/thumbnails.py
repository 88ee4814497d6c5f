"""Thumbnails in a few fixed sizes, from a cache bounded in bytes.

Only `THUMBNAIL_SIZES` are made, so clients cannot multiply cache entries (or decodes) by asking for
every size in a range; the cache evicts least recently used entries once it holds `max_bytes`.
"""

from __future__ import annotations

import io
import threading
from collections import OrderedDict
from collections.abc import Hashable

from PIL import Image, ImageOps

from clipkit.serve.guards import UPLOAD_FORMATS

THUMBNAIL_SIZES = (64, 128, 256, 512)  # pixels, the longer side at most


class ByteBoundedCache:
    """Least-recently-used cache of (bytes, media type) values whose bytes add up to `max_bytes` at most.

    Safe to share across threads."""

    def __init__(self, max_bytes: int):
        self.max_bytes = max_bytes
        self.nbytes = 0
        self._entries: OrderedDict[Hashable, tuple[bytes, str]] = OrderedDict()
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return len(self._entries)

    def get(self, key: Hashable) -> tuple[bytes, str] | None:
        with self._lock:
            value = self._entries.get(key)
            if value is not None:
                self._entries.move_to_end(key)
            return value

    def put(self, key: Hashable, value: tuple[bytes, str]) -> None:
        size = len(value[0])
        if size > self.max_bytes:
            return  # would evict everything else for one entry
        with self._lock:
            previous = self._entries.pop(key, None)
            if previous is not None:
                self.nbytes -= len(previous[0])
            while self._entries and self.nbytes + size > self.max_bytes:
                _, evicted = self._entries.popitem(last=False)
                self.nbytes -= len(evicted[0])
            self._entries[key] = value
            self.nbytes += size


def render_thumbnail(data: bytes, media_type: str, size: int) -> tuple[bytes, str]:
    """The image in `data` shrunk to fit size x size (never enlarged), upright, as PNG or JPEG."""
    # Only the formats uploads may have: a row's bytes are checked against its hash, not its media type.
    Image.init()
    with Image.open(io.BytesIO(data), formats=UPLOAD_FORMATS) as image:
        # thumbnail() on an image not yet loaded lets a JPEG decode at 1/2, 1/4 or 1/8 scale (Image.draft)
        # when that still leaves twice the size: no full decode of a large photo. The box is square, so
        # shrinking before turning the image upright gives the same size.
        image.thumbnail((size, size))
        small = ImageOps.exif_transpose(image)
        out = io.BytesIO()
        if small.mode in ("RGBA", "LA", "P") or media_type == "image/png":
            small.save(out, format="PNG")
            return out.getvalue(), "image/png"
        small.convert("RGB").save(out, format="JPEG", quality=85)
        return out.getvalue(), "image/jpeg"
