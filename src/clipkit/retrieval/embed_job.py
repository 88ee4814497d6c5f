"""Embed a whole collection into parts (see `clipkit.retrieval.parts`), split over any number of processes.

The source's images, in `list_images` order, are cut into parts of `part_size`; process `rank` of
`world_size` embeds parts rank, rank + world_size, ... that are not finished yet, so every image is embedded
by exactly one process and a restarted job redoes only the parts that were not renamed into place. Ranks
and the barrier come from the caller (`clipkit.embed` gets them from Accelerate), so this module runs in one
process without any launcher.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from clipkit.errors import ClipkitError
from clipkit.redaction import redact_text
from clipkit.retrieval.embed import embed_items
from clipkit.retrieval.encoder import Encoder
from clipkit.retrieval.parts import (
    FORMAT_NAME,
    FORMAT_VERSION,
    JOB_NAME,
    METADATA_COLUMNS,
    finished_parts,
    flatten_fields,
    part_summary,
    read_job,
    remove_staged_part,
    write_job,
    write_part,
)
from clipkit.retrieval.sources import ImageItem, list_images, warn_damaged_shards

log = logging.getLogger(__name__)

# What a restarted job must share with the one that wrote the parts already there.
_JOB_KEYS = ("source", "images", "part_size", "parts")


@dataclass(kw_only=True)
class EmbedReport:
    out_dir: Path
    images: int  # embedded, over all processes and runs
    parts: int
    parts_done_here: int  # by this process in this run
    images_per_second: float  # this process, this run
    # (uri, reason): damaged shards (found while listing, by every process), then undecodable images (all parts)
    skipped: list[tuple[str, str]] = field(default_factory=list)


def embed_collection(
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
) -> EmbedReport:
    """Embed `source` into `out_dir`; every process of the job calls this with its rank. Returns, on every
    rank, the report of the whole job (read back from the parts once all processes are done)."""
    if part_size < 1:
        raise ClipkitError(f"--part-size must be at least 1, got {part_size}")
    out_dir = Path(out_dir)
    listing = list_images(source, image_column=image_column, caption_column=caption_column)
    items = listing.items
    if rank == 0:
        warn_damaged_shards(listing)  # every process finds them; one says so
    job = {
        "format": FORMAT_NAME,
        "version": FORMAT_VERSION,
        "model": identity,
        "dim": encoder.embed_dim,
        "source": redact_text(_absolute(source)),  # also what a resumed job is compared with
        "images": len(items),
        "part_size": part_size,
        "parts": -(-len(items) // part_size),
        "complete": False,
    }
    _check_resumable(out_dir, job)
    barrier()  # every process has checked the folder before the first one writes to it
    if rank == 0 and not (out_dir / JOB_NAME).is_file():
        out_dir.mkdir(parents=True, exist_ok=True)
        write_job(out_dir, job)
    barrier()  # everyone sees the job file before any part exists

    done = finished_parts(out_dir)
    mine = [p for p in range(rank, job["parts"], world_size) if p not in done]
    todo = sum(len(_part_items(items, p, part_size)) for p in mine)
    bar = _progress_bar(todo, enabled=progress and rank == 0, rank=rank, world_size=world_size)
    started = time.perf_counter()
    try:
        for part in mine:
            remove_staged_part(out_dir, part)
            _embed_part(out_dir, part, _part_items(items, part, part_size), encoder, batch_size, workers, bar)
    finally:
        bar.close()
    rate = todo / max(time.perf_counter() - started, 1e-9)
    barrier()  # every part is on disk

    report = _summarise(out_dir, job, parts_done_here=len(mine), rate=rate)
    report.skipped[:0] = listing.skipped
    if rank == 0:
        write_job(
            out_dir,
            {
                **job,
                "complete": True,
                "embedded": report.images,
                "skipped": [list(s) for s in report.skipped],
            },
        )
    barrier()  # the job file says complete before any process returns
    return report


def _part_items(items: list[ImageItem], part: int, part_size: int) -> list[ImageItem]:
    return items[part * part_size : (part + 1) * part_size]


def _embed_part(
    out_dir: Path, part: int, items: list[ImageItem], encoder: Encoder, batch_size: int, workers: int, bar
) -> None:
    vectors, rows, skipped = [], [], []
    for batch in embed_items(items, encoder, batch_size=batch_size, workers=workers):
        for image in batch.images:
            rows.append(_metadata_row(items[image.position], image))
        vectors.append(batch.vectors)  # (b, D), row i embeds batch.images[i]
        for position, reason in batch.skipped:
            log.warning("skipped %s: %s", items[position].uri, reason)
            skipped.append((items[position].uri, reason))
        bar.update(len(batch.images) + len(batch.skipped))
    stacked = np.concatenate(vectors) if vectors else np.zeros((0, encoder.embed_dim), np.float32)
    write_part(out_dir, part, stacked, rows, skipped)


def _metadata_row(item: ImageItem, image) -> dict[str, Any]:
    """clipkit's columns, then the item's fields flattened as clip-retrieval's writer flattens KEY.json; a
    field named like one of clipkit's columns (img2dataset's `key`, `width`, ...) stays in `metadata` only."""
    in_shard = item.offset is not None
    shard, key = item.uri.split("#", 1) if in_shard else (None, item.uri)
    own = {
        "key": key,
        "shard": shard,
        "shard_path": item.path if in_shard else None,
        "image_path": None if in_shard else item.path,  # clip-retrieval opens it as an image: files only
        "offset": item.offset,
        "length": image.length,
        "sha256": image.sha256,
        "media_type": image.media_type,
        "width": image.width,
        "height": image.height,
        "caption": item.caption,
        "metadata": json.dumps(item.metadata, ensure_ascii=False, default=str),
    }
    fields = flatten_fields(item.metadata)
    return {**{k: v for k, v in fields.items() if k not in METADATA_COLUMNS}, **own}


def _check_resumable(out_dir: Path, job: dict[str, Any]) -> None:
    """A folder with parts in it must belong to this same job, or resuming would mix two collections."""
    if not out_dir.exists():
        return
    if not out_dir.is_dir():
        raise ClipkitError(f"--out {out_dir} is a file; give a folder for the embeddings")
    if not (out_dir / JOB_NAME).is_file():
        if any(out_dir.iterdir()):
            raise ClipkitError(
                f"--out {out_dir} is not empty and holds no embeddings job; choose a new folder"
            )
        return
    previous = read_job(out_dir).manifest
    if previous["version"] != job["version"]:
        raise ClipkitError(
            f"{out_dir} holds parts in embeddings format version {previous['version']} (an older clipkit); this "
            f"one writes version {job['version']}: choose a new --out (indexes still build from the old folder)"
        )
    if previous["model"]["fingerprint"] != job["model"]["fingerprint"]:
        raise ClipkitError(
            f"{out_dir} holds embeddings of another model (fingerprint {previous['model']['fingerprint'][:12]}); "
            "choose a new --out"
        )
    for key in _JOB_KEYS:
        if previous.get(key) != job[key]:
            raise ClipkitError(
                f"{out_dir} holds a job with {key}={previous.get(key)!r}, this one has {job[key]!r}; rerun it "
                "with the same source and --part-size to resume, or choose a new --out"
            )


def _summarise(out_dir: Path, job: dict[str, Any], *, parts_done_here: int, rate: float) -> EmbedReport:
    images, skipped = 0, []
    for part in range(job["parts"]):
        rows, part_skipped = part_summary(out_dir, part)
        images += rows
        skipped.extend(part_skipped)
    return EmbedReport(
        out_dir=out_dir,
        images=images,
        parts=job["parts"],
        parts_done_here=parts_done_here,
        images_per_second=rate,
        skipped=skipped,
    )


def _absolute(source: str | Path) -> str:
    path = Path(source)
    return str(path.resolve()) if path.exists() else str(source)


def _progress_bar(total: int, *, enabled: bool, rank: int, world_size: int):
    from tqdm import tqdm

    desc = "embedding" if world_size == 1 else f"embedding (process {rank} of {world_size})"
    return tqdm(total=total, unit="img", desc=desc, disable=not enabled, dynamic_ncols=True)
