"""Embed a collection in batches: read, hash and decode images in worker processes, encode in this one.

Images whose content hash is already known (indexed before, or earlier in this run) are skipped
before decoding; images that cannot be read or decoded are skipped and reported.
"""

from __future__ import annotations

import hashlib
import io
from collections.abc import Callable, Collection, Iterator, Sequence
from dataclasses import dataclass
from typing import Any, NamedTuple

import numpy as np
import torch
from PIL import Image

from clipkit.data.images import decode_image
from clipkit.errors import ClipkitError
from clipkit.retrieval.encoder import Encoder
from clipkit.retrieval.sources import ImageItem, read_item_bytes


class DecodedImage(NamedTuple):
    position: int  # index into the item list
    sha256: str
    length: int  # bytes
    media_type: str
    width: int
    height: int


@dataclass
class EmbeddedBatch:
    images: list[DecodedImage]
    vectors: np.ndarray  # (B, D) float32, L2-normalised, row i embeds images[i]
    duplicates: list[int]  # positions whose content was already known
    skipped: list[tuple[int, str]]  # (position, reason) for images that could not be read or decoded


def embed_items(
    items: Sequence[ImageItem],
    encoder: Encoder,
    *,
    batch_size: int = 64,
    workers: int = 0,
    known_hashes: Collection[str] = frozenset(),
    progress: bool = False,
) -> Iterator[EmbeddedBatch]:
    """`EmbeddedBatch`es in item order. `known_hashes` (hex SHA-256) are skipped without decoding."""
    if batch_size < 1:
        raise ClipkitError(f"--batch-size must be at least 1, got {batch_size}")
    if workers < 0:
        raise ClipkitError(f"--workers must be 0 or more, got {workers}")
    dataset = _DecodeDataset(items, encoder.bundle.eval_transform, frozenset(known_hashes))
    loader = torch.utils.data.DataLoader(
        dataset, batch_size=batch_size, num_workers=workers, collate_fn=_collate, shuffle=False
    )
    bar = _progress_bar(len(items), progress)
    try:
        for batch in loader:
            vectors = (
                encoder.encode_pixels(batch["pixels"])
                if batch["images"]
                else np.zeros((0, encoder.embed_dim), dtype=np.float32)
            )
            yield EmbeddedBatch(batch["images"], vectors, batch["duplicates"], batch["skipped"])
            bar.update(len(batch["images"]) + len(batch["duplicates"]) + len(batch["skipped"]))
    finally:
        bar.close()


class _DecodeDataset(torch.utils.data.Dataset):
    """Runs in DataLoader workers: bytes -> content hash -> RGB image -> the model's input tensor."""

    def __init__(self, items: Sequence[ImageItem], transform: Callable, known_hashes: frozenset[str]):
        self.items = items
        self.transform = transform
        self.known_hashes = known_hashes

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, position: int) -> dict[str, Any]:
        item = self.items[position]
        try:
            data = read_item_bytes(item.path, item.offset, item.length)
        except OSError as e:
            return {"position": position, "skipped": f"cannot read {item.uri} ({e.strerror or e})"}
        sha256 = hashlib.sha256(data).hexdigest()
        if sha256 in self.known_hashes:
            return {"position": position, "duplicate": True}
        image, reason = decode_image(data, name=item.uri)
        if image is None:
            return {"position": position, "skipped": reason}
        with Image.open(io.BytesIO(data)) as header:  # the format as stored, for the served content type
            media_type = Image.MIME.get(header.format or "", "application/octet-stream")
        decoded = DecodedImage(position, sha256, len(data), media_type, image.width, image.height)
        return {"position": position, "image": decoded, "pixels": self.transform(image)}


def _collate(samples: list[dict[str, Any]]) -> dict[str, Any]:
    decoded = [s for s in samples if "image" in s]
    return {
        "images": [s["image"] for s in decoded],
        "pixels": torch.stack([s["pixels"] for s in decoded]) if decoded else None,  # (B, 3, H, W)
        "duplicates": [s["position"] for s in samples if s.get("duplicate")],
        "skipped": [(s["position"], s["skipped"]) for s in samples if "skipped" in s],
    }


def _progress_bar(total: int, enabled: bool):
    from tqdm import tqdm

    return tqdm(total=total, unit="img", desc="embedding", disable=not enabled, dynamic_ncols=True)
