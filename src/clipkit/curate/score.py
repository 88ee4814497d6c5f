"""Score a collection: `clipkit embed`'s image embeddings and metadata, plus caption embeddings and per-sample
columns, in the same parts.

Layout of DIR (clip-retrieval's, as `clipkit embed` writes it, plus):

    text_emb/text_emb_NNNN.npy    (n, D) float32, L2-normalised caption embeddings, row i of img_emb_NNNN's row i
                                  (zeros for an image without a caption)
    scores/scores_NNNN.parquet    n rows: key, shard, clip_score (cosine of the image and caption embeddings,
                                  NaN without a caption), caption_length (characters), caption_words, width, height
    scores.json                   the model that scored (its fingerprint) and counts, once complete

The image side is `embed_collection` itself, so resuming, splitting parts over processes and skipping damaged
shards or undecodable images behave as `clipkit embed` does; the caption side is done part by part afterwards,
each part's files written under temporary names and renamed (the parquet file last: its presence marks it done).
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from clipkit.errors import ClipkitError
from clipkit.retrieval.embed_job import EmbedReport, embed_collection
from clipkit.retrieval.encoder import Encoder
from clipkit.retrieval.manifests import read_versioned_json
from clipkit.retrieval.parts import TEMP_PREFIX, metadata_file, read_job

SCORES_NAME = "scores.json"
SCORES_FORMAT = "clipkit-scores"
SCORES_VERSION = 1
# The per-sample columns `clipkit score` adds; `clipkit filter` rules name these or the metadata columns.
SCORE_COLUMNS = ("clip_score", "caption_length", "caption_words", "width", "height")


def text_embedding_file(out_dir: Path, part: int) -> Path:
    return out_dir / "text_emb" / f"text_emb_{part:04d}.npy"


def scores_file(out_dir: Path, part: int) -> Path:
    return out_dir / "scores" / f"scores_{part:04d}.parquet"


@dataclass(kw_only=True)
class ScoreReport:
    embedded: EmbedReport
    scored_here: int  # parts whose captions this process embedded in this run


def score_collection(
    source: str | Path,
    out_dir: str | Path,
    *,
    encoder: Encoder,
    identity: dict[str, Any],
    rank: int = 0,
    world_size: int = 1,
    barrier: Callable[[], None] = lambda: None,
    part_size: int = 10_000,
    batch_size: int = 64,
    workers: int = 0,
    image_column: str = "image",
    caption_column: str = "caption",
    progress: bool = False,
) -> ScoreReport:
    """Embed `source`'s images (`embed_collection`) and score every embedded image against its caption."""
    out_dir = Path(out_dir)
    embedded = embed_collection(
        source,
        out_dir,
        encoder=encoder,
        identity=identity,
        rank=rank,
        world_size=world_size,
        barrier=barrier,
        part_size=part_size,
        batch_size=batch_size,
        workers=workers,
        image_column=image_column,
        caption_column=caption_column,
        progress=progress,
    )
    done = 0
    for part in range(rank, embedded.parts, world_size):
        if scores_file(out_dir, part).is_file():
            continue  # scored by an earlier run
        _score_part(out_dir, part, encoder, batch_size)
        done += 1
    barrier()  # every part is scored
    if rank == 0:
        from clipkit.files import write_text_atomic

        manifest = {
            "format": SCORES_FORMAT,
            "version": SCORES_VERSION,
            "model": identity,
            "parts": embedded.parts,
            "scored": embedded.images,
            "columns": list(SCORE_COLUMNS),
        }
        write_text_atomic(out_dir / SCORES_NAME, json.dumps(manifest, indent=2) + "\n")
    barrier()
    return ScoreReport(embedded=embedded, scored_here=done)


def _score_part(out_dir: Path, part: int, encoder: Encoder, batch_size: int) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    images = np.load(out_dir / "img_emb" / f"img_emb_{part:04d}.npy")  # (n, D)
    meta = pq.read_table(metadata_file(out_dir, part), columns=["key", "shard", "caption", "width", "height"])
    captions = meta.column("caption").to_pylist()
    texts = np.zeros_like(images)  # (n, D)
    present = [i for i, caption in enumerate(captions) if caption]
    for start in range(0, len(present), batch_size):
        rows = present[start : start + batch_size]
        texts[rows] = encoder.encode_texts([captions[i] for i in rows])
    scores = np.full(len(images), np.nan, dtype=np.float32)
    scores[present] = np.einsum("nd,nd->n", images[present], texts[present])  # cosine: both unit length
    table = pa.table(
        {
            "key": meta.column("key"),
            "shard": meta.column("shard"),
            "clip_score": pa.array(scores, pa.float32()),
            "caption_length": pa.array([len(c or "") for c in captions], pa.int32()),
            "caption_words": pa.array([len((c or "").split()) for c in captions], pa.int32()),
            "width": meta.column("width"),
            "height": meta.column("height"),
        }
    )
    npy, parquet = text_embedding_file(out_dir, part), scores_file(out_dir, part)
    npy.parent.mkdir(parents=True, exist_ok=True)
    parquet.parent.mkdir(parents=True, exist_ok=True)
    staged_npy, staged_parquet = (
        npy.with_name(TEMP_PREFIX + npy.name),
        parquet.with_name(TEMP_PREFIX + parquet.name),
    )
    with open(staged_npy, "wb") as f:
        np.save(f, texts)
    pq.write_table(table, staged_parquet)
    os.replace(staged_npy, npy)
    os.replace(staged_parquet, parquet)  # last: its presence marks the part scored


@dataclass
class ScoredCollection:
    """Every scored sample of a `clipkit score` folder, row for row across its parts."""

    out_dir: Path
    manifest: dict[str, Any]  # scores.json
    columns: dict[str, np.ndarray]  # name -> (N,) values: the score columns and the metadata columns
    image_vectors: np.ndarray  # (N, D) float32, L2-normalised

    def __len__(self) -> int:
        return len(self.image_vectors)

    @property
    def uris(self) -> list[str]:
        """SHARD#KEY (or the key of a file), as key lists name samples."""
        return [
            f"{shard}#{key}" if shard is not None else str(key)
            for shard, key in zip(self.columns["shard"], self.columns["key"], strict=True)
        ]


def read_scores(out_dir: str | Path) -> ScoredCollection:
    """A complete `clipkit score` folder, loaded whole (the columns and the image embeddings)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    out_dir = Path(out_dir)
    path = out_dir / SCORES_NAME
    if not path.is_file():
        raise ClipkitError(
            f"{out_dir} holds no scores ({SCORES_NAME} is missing); write them with `clipkit score` (or finish "
            "the job there by rerunning it)"
        )
    manifest = read_versioned_json(
        path, format_name=SCORES_FORMAT, version=SCORES_VERSION, kind="scores", fix="rerun `clipkit score`"
    )
    job = read_job(out_dir)
    tables, vectors = [], []
    for part in range(job.parts):
        metadata = pq.read_table(metadata_file(out_dir, part))
        scores = pq.read_table(scores_file(out_dir, part)).drop_columns(["key", "shard", "width", "height"])
        for name in scores.column_names:
            metadata = metadata.append_column(name, scores.column(name))
        tables.append(metadata)
        vectors.append(np.load(out_dir / "img_emb" / f"img_emb_{part:04d}.npy"))
    # Parts may differ in their columns (embed writes a metadata field's column only where a part has it,
    # typed by that part's values): missing columns become nulls, differing types are unified.
    table = pa.concat_tables(tables, promote_options="permissive")
    columns = {name: np.asarray(table.column(name).to_pylist(), dtype=object) for name in table.column_names}
    for name in table.column_names:
        if pa.types.is_integer(table.schema.field(name).type) or pa.types.is_floating(
            table.schema.field(name).type
        ):
            columns[name] = table.column(name).to_numpy(zero_copy_only=False).astype(np.float64)
    dim = int(job.manifest["dim"])
    stacked = np.concatenate(vectors) if vectors else np.zeros((0, dim), np.float32)
    return ScoredCollection(out_dir, manifest, columns, stacked.astype(np.float32))


def read_text_vectors(collection: ScoredCollection) -> np.ndarray:
    """(N, D) float32 caption embeddings of a collection, row for row with its image vectors (zeros: no caption)."""
    parts = int(collection.manifest["parts"])
    try:  # allow_pickle stays off: a hostile .npy cannot run code
        vectors = [np.load(text_embedding_file(collection.out_dir, part)) for part in range(parts)]
    except (OSError, ValueError) as error:
        raise ClipkitError(
            f"{collection.out_dir}/text_emb cannot be read ({error}); rerun `clipkit score` there"
        ) from None
    stacked = np.concatenate(vectors) if vectors else np.zeros_like(collection.image_vectors)
    if stacked.shape != collection.image_vectors.shape:
        raise ClipkitError(
            f"{collection.out_dir}/text_emb holds {stacked.shape[0]} caption embeddings for {len(collection)} images; "
            "rerun `clipkit score` there"
        )
    return stacked.astype(np.float32)
