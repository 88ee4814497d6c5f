"""The one image decoder: which sample fields and files are images, and bytes -> RGB PIL image.

Training, evaluation, `clipkit classify`, `clipkit zeroshot` and the index builder all decode here, so a
shard or folder that one of them reads, all of them read. PIL only: importing this loads no torch.
"""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any

from PIL import Image

# In CLIP_benchmark's order of preference (a sample with several image fields gives the first one), then
# the other formats PIL reads.
IMAGE_EXTENSIONS = ("webp", "png", "jpg", "jpeg", "bmp", "gif", "tif", "tiff")


def image_field(sample: dict[str, Any]) -> str | None:
    """The extension of a raw webdataset sample's image field (its `KEY.EXT` member), or None."""
    return next((ext for ext in IMAGE_EXTENSIONS if ext in sample), None)


def is_image_file(path: Path) -> bool:
    return path.is_file() and path.suffix.lower().lstrip(".") in IMAGE_EXTENSIONS


def decode_image(data: bytes, *, name: str) -> tuple[Image.Image | None, str]:
    """An RGB PIL image, or None and the reason it cannot be decoded (naming `name`)."""
    try:
        # What webdataset's "pil" image decoder (CLIP_benchmark's) does; load() decodes fully, so a
        # truncated file fails here rather than later inside a transform.
        with Image.open(io.BytesIO(data)) as image:
            image.load()
            return image.convert("RGB"), ""
    except Exception as e:  # PIL raises many types for corrupt data
        return None, f"cannot decode {name} ({type(e).__name__}: {e})"


def read_image(path: str | Path) -> tuple[Image.Image | None, str]:
    """`decode_image` on a file's bytes; an unreadable file is a reason too."""
    try:
        data = Path(path).read_bytes()
    except OSError as e:
        return None, f"cannot read {path} ({e.strerror or e})"
    return decode_image(data, name=str(path))


def decode_sample_image(sample: dict[str, Any]) -> tuple[Image.Image | None, str]:
    """The RGB image of a raw webdataset sample, or None and why not (no image field, undecodable)."""
    ext = image_field(sample)
    if ext is None:
        return None, f"no image ({'|'.join('.' + e for e in IMAGE_EXTENSIONS)})"
    return decode_image(sample[ext], name=f"{sample.get('__key__')}.{ext}")
