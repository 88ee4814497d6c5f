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

The metadata columns are clip-retrieval's where it has one (`image_path`, `caption`, and the sample's
KEY.json / table fields flattened into columns as `clip-retrieval inference --enable_metadata` writes them:
`url`, `width`, ...), so its back end serves clipkit's embeddings; clipkit's own columns say where the
bytes are. Version 1 folders (written before version 2) put a shard's path in `image_path` and the fields
only in the `metadata` JSON; `read_part` gives rows of either, and `row_location` reads both.
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
FORMAT_VERSION = 2
READABLE_VERSIONS = (1, 2)  # version 1: before the clip-retrieval columns (see the module docstring)
SKIPPED_KEY = b"clipkit.skipped"
TEMP_PREFIX = ".tmp-"
_PART = re.compile(r"^img_emb_(\d+)\.npy$")

# clipkit's metadata columns, in order, then the flattened fields. `key`: the webdataset key (shards) or the
# path as the collection names it; `shard`: the shard as the collection names it (null for a file);
# `image_path`: the image file (clip-retrieval's column; left out of a part of shard samples, whose bytes are
# at `offset`, `length` in `shard_path`); `metadata`: JSON of all the fields (KEY.json / table columns /
# label), lossless where the flattened columns are not (nested objects, lists, names clipkit's columns take).
METADATA_COLUMNS = (
    "key",
    "shard",
    "shard_path",
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
    import pyarrow.parquet as pq

    if len(vectors) != len(rows):
        raise ValueError(f"part {part}: {len(vectors)} vectors but {len(rows)} metadata rows")
    npy, parquet = embedding_file(out_dir, part), metadata_file(out_dir, part)
    npy.parent.mkdir(parents=True, exist_ok=True)
    parquet.parent.mkdir(parents=True, exist_ok=True)
    table = metadata_table(rows)
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
        path,
        format_name=FORMAT_NAME,
        version=READABLE_VERSIONS,
        kind="embeddings",
        fix="rerun `clipkit embed`",
    )
    return EmbeddingsJob(out_dir, manifest)


def write_job(out_dir: Path, manifest: dict[str, Any]) -> None:
    from clipkit.files import write_text_atomic

    write_text_atomic(out_dir / JOB_NAME, json.dumps(manifest, indent=2) + "\n")


_FOREIGN_PART = re.compile(r"^img_emb_(\d+)\.npy$")


def foreign_parts(emb_dir: Path) -> list[tuple[Path, Path]]:
    """(img_emb_N.npy, metadata_N.parquet) pairs of a folder `clip-retrieval inference` wrote (no
    embeddings.json; names padded to the job's own width, or not at all), in numeric order."""
    found = sorted(
        (int(m.group(1)), p)
        for p in (emb_dir / "img_emb").glob("img_emb_*.npy")
        if (m := _FOREIGN_PART.match(p.name))
    )
    if not found:
        raise ClipkitError(
            f"{emb_dir}/img_emb holds no img_emb_N.npy files; give the folder clip-retrieval wrote"
        )
    pairs = []
    for _, npy in found:
        parquet = emb_dir / "metadata" / f"metadata_{npy.stem[len('img_emb_') :]}.parquet"
        if not parquet.is_file():
            raise ClipkitError(
                f"{npy} has no {parquet.name} beside it in {emb_dir}/metadata; rerun that inference"
            )
        pairs.append((npy, parquet))
    return pairs


def read_foreign_part(npy: Path, parquet: Path, dim: int) -> tuple[np.ndarray, list[dict[str, Any]]]:
    """(vectors (n, D) float32 L2-normalised, n rows) of one clip-retrieval part; float16 is widened."""
    import pyarrow.parquet as pq

    vectors = np.load(npy, allow_pickle=False)  # a hostile file cannot run code through pickle
    if vectors.ndim != 2 or vectors.dtype not in (np.float16, np.float32, np.float64):
        raise ClipkitError(f"{npy} holds {vectors.dtype} {vectors.shape}, not (n, D) float embeddings")
    if vectors.shape[1] != dim:
        raise ClipkitError(
            f"{npy} holds {vectors.shape[1]}-dimensional embeddings but the model has {dim}: name the model "
            "the embeddings were made with in --model"
        )
    table = pq.read_table(parquet)
    if len(table) != len(vectors):
        raise ClipkitError(
            f"{parquet} has {len(table)} rows but {npy} {len(vectors)} embeddings; rerun that part"
        )
    vectors = vectors.astype(np.float32)  # (n, D)
    norms = np.linalg.norm(vectors, axis=1, keepdims=True)
    return vectors / np.maximum(norms, 1e-12), table.to_pylist()


def row_location(row: dict[str, Any]) -> str:
    """The file that holds a row's image bytes: its shard, else its image file (either layout version)."""
    return row.get("shard_path") or row["image_path"]


def flatten_fields(fields: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """Nested objects flattened to "a.b" names, as pandas.json_normalize (clip-retrieval's writer) does."""
    flat: dict[str, Any] = {}
    for name, value in fields.items():
        if isinstance(value, dict) and value:
            flat.update(flatten_fields(value, f"{prefix}{name}."))
        else:
            flat[f"{prefix}{name}"] = value
    return flat


def metadata_table(rows: list[dict[str, Any]]):
    """A pyarrow table of metadata rows: clipkit's columns with fixed types, then each flattened field in
    the type all its values share (bool, int64, float64, string), else as JSON text. `image_path` is left out
    when no row names an image file (clip-retrieval's back end opens every non-empty one as an image)."""
    import pyarrow as pa

    names = [n for n in METADATA_COLUMNS if any(n in row for row in rows)] if rows else list(METADATA_COLUMNS)
    if rows and not any(row.get("image_path") for row in rows):
        names.remove("image_path")
    extra = sorted({n for row in rows for n in row} - set(METADATA_COLUMNS))
    columns, fields = [], []
    for name in [*names, *extra]:
        values = [row.get(name) for row in rows]
        if name == "image_path":
            values = [v or "" for v in values]  # never null: clip-retrieval's back end would fail on None
        kind = _fixed_type(name) or _common_type(values)
        if kind is None:
            kind, values = pa.string(), [None if v is None else json.dumps(v, default=str) for v in values]
        columns.append(pa.array(values, type=kind))
        fields.append(pa.field(name, kind))
    return pa.Table.from_arrays(columns, schema=pa.schema(fields))


_INT64 = (-(2**63), 2**63 - 1)


def _fixed_type(name: str):
    """The pyarrow type of one of clipkit's columns; None for a flattened field."""
    import pyarrow as pa

    strings = ("key", "shard", "shard_path", "image_path", "sha256", "media_type", "caption", "metadata")
    if name in strings:
        return pa.string()
    return {"offset": pa.int64(), "length": pa.int64(), "width": pa.int32(), "height": pa.int32()}.get(name)


def _common_type(values: list[Any]):
    """The pyarrow type every non-null value fits (bool, int64, float64, string); None: mixed or nested."""
    import pyarrow as pa

    kinds = {type(v) for v in values if v is not None}
    if not kinds:
        return pa.string()
    if kinds == {bool}:
        return pa.bool_()
    if kinds == {int}:
        return pa.int64() if all(_INT64[0] <= v <= _INT64[1] for v in values if v is not None) else None
    if kinds <= {int, float}:
        return pa.float64()
    if kinds == {str}:
        return pa.string()
    return None
