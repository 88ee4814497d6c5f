"""Embeddings of a collection on disk, in clip-retrieval's layout, so its and autofaiss's tools read them.

Layout of DIR:

    embeddings.json                 the job: model identity, source, part size, and (once complete) counts
    img_emb/img_emb_NNNN.npy        (n, D) float32, L2-normalised image embeddings of part NNNN
    metadata/metadata_NNNN.parquet  n rows, row i describes row i of the .npy beside it

Part NNNN covers images [NNNN * part_size, (NNNN + 1) * part_size) of the source as `list_images`
orders it; images that cannot be read or decoded have no row and are listed in the parquet file's key-value
metadata (`clipkit.skipped`). Part numbers are zero-padded so a lexical sort (which autofaiss's reader uses)
is the numeric one. Each file is written under a temporary name and renamed, the parquet file before the
.npy, so a part whose .npy exists is finished.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from clipkit.errors import ClipkitError
from clipkit.retrieval.manifests import read_versioned_json

JOB_NAME = "embeddings.json"
FORMAT_NAME = "clipkit-embeddings"
FORMAT_VERSION = 1
SKIPPED_KEY = b"clipkit.skipped"
TEMP_PREFIX = ".tmp-"
_PART = re.compile(r"^img_emb_(\d+)\.npy$")

# Metadata columns, in order. `key`: the webdataset key (shards) or the path as the collection names it;
# `shard`: the shard as the collection names it (null for a file); `image_path`, `offset`, `length`: where the
# bytes are (the shard or image file; offset null for a whole file); `metadata`: JSON of the table columns /
# KEY.json / label that came with the image.
METADATA_COLUMNS = (
    "key",
    "shard",
    "image_path",
    "offset",
    "length",
    "sha256",
    "media_type",
    "width",
    "height",
    "caption",
    "metadata",
)


def embedding_file(out_dir: Path, part: int) -> Path:
    return out_dir / "img_emb" / f"img_emb_{part:04d}.npy"


def metadata_file(out_dir: Path, part: int) -> Path:
    return out_dir / "metadata" / f"metadata_{part:04d}.parquet"


def finished_parts(out_dir: Path) -> set[int]:
    folder = out_dir / "img_emb"
    if not folder.is_dir():
        return set()
    parts = {int(m.group(1)) for p in folder.iterdir() if (m := _PART.match(p.name))}
    return {part for part in parts if metadata_file(out_dir, part).is_file()}


def write_part(
    out_dir: Path, part: int, vectors: np.ndarray, rows: list[dict[str, Any]], skipped: list[tuple[str, str]]
) -> None:
    """Write part `part`: `vectors` (n, D) and its n metadata `rows`; `skipped` is (uri, reason) per bad image."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    if len(vectors) != len(rows):
        raise ValueError(f"part {part}: {len(vectors)} vectors but {len(rows)} metadata rows")
    npy, parquet = embedding_file(out_dir, part), metadata_file(out_dir, part)
    npy.parent.mkdir(parents=True, exist_ok=True)
    parquet.parent.mkdir(parents=True, exist_ok=True)
    table = pa.Table.from_pylist(rows, schema=_schema())
    table = table.replace_schema_metadata({SKIPPED_KEY: json.dumps(skipped).encode()})
    staged_parquet = parquet.with_name(f"{TEMP_PREFIX}{parquet.name}")
    staged_npy = npy.with_name(f"{TEMP_PREFIX}{npy.name}")
    pq.write_table(table, staged_parquet)
    with open(staged_npy, "wb") as f:
        np.save(f, np.ascontiguousarray(vectors, dtype=np.float32))
    os.replace(staged_parquet, parquet)
    os.replace(staged_npy, npy)  # last: its presence marks the part finished


def remove_staged_part(out_dir: Path, part: int) -> None:
    """What a writer of `part` stopped before its renames left behind."""
    for path in (embedding_file(out_dir, part), metadata_file(out_dir, part)):
        path.with_name(f"{TEMP_PREFIX}{path.name}").unlink(missing_ok=True)


def read_part(out_dir: Path, part: int) -> tuple[np.ndarray, list[dict[str, Any]], list[tuple[str, str]]]:
    """(vectors (n, D), n metadata rows, skipped (uri, reason)) of one finished part."""
    import pyarrow.parquet as pq

    vectors = np.load(embedding_file(out_dir, part))
    table = pq.read_table(metadata_file(out_dir, part))
    if len(table) != len(vectors):
        raise ClipkitError(
            f"{metadata_file(out_dir, part)} has {len(table)} rows but {embedding_file(out_dir, part)} "
            f"{len(vectors)} embeddings; delete both and rerun `clipkit embed` to redo that part"
        )
    skipped = json.loads((table.schema.metadata or {}).get(SKIPPED_KEY, b"[]"))
    return vectors, table.to_pylist(), [tuple(entry) for entry in skipped]


def part_summary(out_dir: Path, part: int) -> tuple[int, list[tuple[str, str]]]:
    """(rows, skipped) of a finished part, from the parquet footer alone."""
    import pyarrow.parquet as pq

    footer = pq.read_metadata(metadata_file(out_dir, part))
    skipped = json.loads((footer.metadata or {}).get(SKIPPED_KEY, b"[]"))
    return footer.num_rows, [tuple(entry) for entry in skipped]


def row_uri(row: dict[str, Any]) -> str:
    """The name `list_images` gives the image: SHARD#KEY, or the key itself for a file."""
    return f"{row['shard']}#{row['key']}" if row["shard"] is not None else row["key"]


@dataclass(frozen=True)
class EmbeddingsJob:
    """An embeddings folder's `embeddings.json`."""

    out_dir: Path
    manifest: dict[str, Any]

    @property
    def parts(self) -> int:
        return int(self.manifest["parts"])

    @property
    def complete(self) -> bool:
        return bool(self.manifest.get("complete"))

    def iter_parts(self) -> Iterator[tuple[np.ndarray, list[dict[str, Any]], list[tuple[str, str]]]]:
        for part in range(self.parts):
            yield read_part(self.out_dir, part)


def read_job(out_dir: str | Path) -> EmbeddingsJob:
    out_dir = Path(out_dir)
    path = out_dir / JOB_NAME
    if not path.is_file():
        raise ClipkitError(
            f"{out_dir} holds no embeddings ({JOB_NAME} is missing); write them with `clipkit embed`"
        )
    manifest = read_versioned_json(
        path, format_name=FORMAT_NAME, version=FORMAT_VERSION, kind="embeddings", fix="rerun `clipkit embed`"
    )
    return EmbeddingsJob(out_dir, manifest)


def write_job(out_dir: Path, manifest: dict[str, Any]) -> None:
    from clipkit.files import write_text_atomic

    write_text_atomic(out_dir / JOB_NAME, json.dumps(manifest, indent=2) + "\n")


def _schema():
    import pyarrow as pa

    return pa.schema(
        [
            ("key", pa.string()),
            ("shard", pa.string()),
            ("image_path", pa.string()),
            ("offset", pa.int64()),
            ("length", pa.int64()),
            ("sha256", pa.string()),
            ("media_type", pa.string()),
            ("width", pa.int32()),
            ("height", pa.int32()),
            ("caption", pa.string()),
            ("metadata", pa.string()),
        ]
    )
