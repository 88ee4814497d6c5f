"""Small webdataset shards for the data tests, written with webdataset's own TarWriter (not clipkit's)."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import webdataset as wds
from PIL import Image


def png_bytes(index: int, size: int = 8) -> bytes:
    """A PNG whose pixels encode `index`, with a gradient so that crops differ."""
    ramp = np.arange(size, dtype=np.uint8)[None, :].repeat(size, 0) * 16
    pixels = np.stack([np.full((size, size), index % 256), np.full((size, size), index // 256), ramp], -1)
    out = io.BytesIO()
    Image.fromarray(pixels.astype(np.uint8)).save(out, format="PNG")
    return out.getvalue()


def write_shards(directory: Path, *, num_shards: int, per_shard: int, prefix: str = "s") -> list[str]:
    """`num_shards` tars of `per_shard` samples (KEY.png + KEY.txt); returns every key, in order."""
    directory.mkdir(parents=True, exist_ok=True)
    keys = []
    for shard in range(num_shards):
        with wds.TarWriter(str(directory / f"{prefix}{shard:05d}.tar")) as writer:
            for i in range(per_shard):
                key = f"{prefix}{shard:03d}_{i:04d}"
                writer.write({"__key__": key, "png": png_bytes(len(keys)), "txt": f"caption of {key}"})
                keys.append(key)
    return keys


def write_samples(path: Path, samples: list[dict]) -> None:
    with wds.TarWriter(str(path)) as writer:
        for sample in samples:
            writer.write(sample)


def key_of(entry: str) -> str:
    """The sample key in TrainStream.last_keys entries ("url#key")."""
    return entry.rsplit("#", 1)[1]
