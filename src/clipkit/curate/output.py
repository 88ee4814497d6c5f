"""What `clipkit filter` writes: a key list (`data.keep_keys`), or the kept samples as new shards, and a summary
(JSON and pictures) of what was removed and why. Nothing is written when the selection keeps no sample."""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from clipkit.curate.score import ScoredCollection
from clipkit.curate.select import Selection
from clipkit.errors import ClipkitError
from clipkit.files import write_text_atomic


def check_not_empty(selection: Selection, total: int) -> None:
    if not selection.kept.any():
        counts = ", ".join(f"{n} {reason}" for reason, n in selection.removed_by().items())
        raise ClipkitError(
            f"the rule keeps none of the {total} samples ({counts}); loosen it; nothing was written"
        )


def write_key_list(collection: ScoredCollection, selection: Selection, path: str | Path) -> int:
    """SHARD#KEY of every kept sample, in collection order; the number written."""
    uris = collection.uris
    kept = [uris[i] for i in np.flatnonzero(selection.kept)]
    write_text_atomic(path, "".join(f"{uri}\n" for uri in kept))
    return len(kept)


def _stored_image(job: tuple[str, int | None, int | None]) -> tuple[bytes, str]:
    from clipkit.retrieval.sources import read_item_bytes

    path, offset, length = job
    data = read_item_bytes(path, offset, length)
    return data, Path(path).suffix.lstrip(".") if offset is None else "keep"


def _load_record_image(record) -> tuple[bytes, str]:
    return _stored_image(record.payload)


def write_reshard(
    collection: ScoredCollection,
    selection: Selection,
    out_dir: str | Path,
    *,
    samples_per_shard: int = 10_000,
    workers: int = 1,
) -> dict[str, Any]:
    """The kept samples as training shards (`data/writer.py`'s layout: KEY.<image> + KEY.txt + KEY.json,
    `_info.json` with the counts), their image bytes copied unchanged and their keys kept."""
    from clipkit.data.writer import ImageOptions, Record, write_split

    out_dir = Path(out_dir)
    if out_dir.exists() and any(out_dir.iterdir()):
        raise ClipkitError(f"--reshard {out_dir} is not empty; choose a new folder")
    columns = collection.columns
    records = []
    for i in np.flatnonzero(selection.kept):
        meta = json.loads(columns["metadata"][i] or "{}")
        offset = None if not np.isfinite(columns["offset"][i]) else int(columns["offset"][i])
        records.append(
            Record(
                key=str(columns["key"][i]),
                caption=str(columns["caption"][i] or ""),
                meta={k: v for k, v in meta.items() if k not in ("key", "caption")},
                payload=(_location(columns, i), offset, int(columns["length"][i])),
            )
        )
    result = write_split(
        records,
        out_dir,
        layout="train",
        samples_per_shard=samples_per_shard,
        image_options=ImageOptions(format="keep"),
        workers=workers,
        load_image=_load_record_image,
        info={"curated_from": str(collection.out_dir)},
    )
    return {"samples": result.samples, "shards": len(result.shards), "failed": result.failed}


def summary(collection: ScoredCollection, selection: Selection, rule: Any) -> dict[str, Any]:
    uris = collection.uris
    return {
        "scores": str(collection.out_dir),
        "model": collection.manifest.get("model", {}),
        "rule": rule,
        "samples": len(collection),
        "kept": int(selection.kept.sum()),
        "removed": int((~selection.kept).sum()),
        "removed_by": selection.removed_by(),
        "score_cut": selection.cut,
        "duplicate_groups": [[uris[i] for i in group] for group in selection.groups],
    }


def write_summary(
    collection: ScoredCollection, selection: Selection, rule: dict[str, Any], out_dir: str | Path
) -> list[Path]:
    """summary.json and the pictures: the score histogram with the cut, the samples just above and just below
    it, a few near-duplicate groups (kept member first)."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    written = [out_dir / "summary.json"]
    write_text_atomic(written[0], json.dumps(summary(collection, selection, rule), indent=2) + "\n")
    column = rule["score_column"]  # what the cut ranks by
    scores = collection.columns[column].astype(np.float64)
    written.append(plot_score_histogram(scores, selection, out_dir / "scores.png", column=column))
    written.append(plot_examples_at_cut(collection, selection, out_dir / "examples.png", column=column))
    if selection.groups:
        written.append(plot_duplicate_groups(collection, selection.groups, out_dir / "duplicates.png"))
    return written


SCORE_LABELS = {
    "clip_score": "CLIP score (cosine of image and caption embeddings)",
    "neighbour_score": "neighbour_score (mean CLIP score of the caption with its image and the nearest images)",
}


def plot_score_histogram(
    scores: np.ndarray, selection: Selection, path: Path, *, column: str = "clip_score"
) -> Path:
    from clipkit.eval.plot import _pyplot, _save

    plt = _pyplot()
    finite = np.isfinite(scores)
    fig, ax = plt.subplots(figsize=(7, 4))
    bins = np.linspace(np.nanmin(scores[finite]), np.nanmax(scores[finite]), 41) if finite.any() else 10
    ax.hist(scores[finite & selection.kept], bins=bins, color="tab:green", alpha=0.7, label="kept")
    ax.hist(scores[finite & ~selection.kept], bins=bins, color="tab:red", alpha=0.6, label="removed")
    if selection.cut is not None:
        ax.axvline(selection.cut, color="black", linestyle="--", label=f"cut {selection.cut:.3f}")
    ax.set_xlabel(SCORE_LABELS.get(column, column))
    ax.set_ylabel("samples")
    ax.set_title(f"kept {int(selection.kept.sum())} of {len(scores)}")
    ax.legend()
    return _save(fig, path)


def plot_examples_at_cut(
    collection: ScoredCollection,
    selection: Selection,
    path: Path,
    *,
    per_side: int = 6,
    column: str = "clip_score",
) -> Path:
    """The lowest-scoring kept samples (top row) and the highest-scoring removed ones (bottom row), by `column`."""
    scores = collection.columns[column].astype(np.float64)
    order = np.argsort(np.where(np.isfinite(scores), scores, -np.inf), kind="stable")
    kept = [i for i in order if selection.kept[i]][:per_side]
    removed = [i for i in order[::-1] if not selection.kept[i]][:per_side]
    rows = [("kept, just above", kept), ("removed, just below", removed)]
    return _image_grid(collection, rows, path, column=column)


def plot_duplicate_groups(
    collection: ScoredCollection, groups: list[list[int]], path: Path, *, count: int = 4
) -> Path:
    biggest = sorted(groups, key=len, reverse=True)[:count]
    rows = [(f"group {n + 1} (first kept)", group[:6]) for n, group in enumerate(biggest)]
    return _image_grid(collection, rows, path)


def _image_grid(
    collection: ScoredCollection,
    rows: Sequence[tuple[str, Sequence[int]]],
    path: Path,
    *,
    column: str = "clip_score",
) -> Path:
    import io

    from PIL import Image

    from clipkit.eval.plot import _pyplot, _save
    from clipkit.retrieval.sources import read_item_bytes

    plt = _pyplot()
    columns = collection.columns
    width = max([len(members) for _, members in rows] + [1])
    fig, axes = plt.subplots(len(rows), width, figsize=(2.2 * width, 2.6 * len(rows)), squeeze=False)
    for r, (title, members) in enumerate(rows):
        for c in range(width):
            ax = axes[r][c]
            ax.axis("off")
            if c >= len(members):
                continue
            i = members[c]
            offset = None if not np.isfinite(columns["offset"][i]) else int(columns["offset"][i])
            try:
                data = read_item_bytes(_location(columns, i), offset, int(columns["length"][i]))
                ax.imshow(Image.open(io.BytesIO(data)).convert("RGB"))
            except OSError:
                pass
            caption = str(columns["caption"][i] or "")[:28]
            ax.set_title(f"{columns[column][i]:.4f}\n{caption}", fontsize=7)
        axes[r][0].text(
            -0.1, 0.5, title, transform=axes[r][0].transAxes, rotation=90, va="center", ha="right", fontsize=8
        )
    fig.tight_layout()
    return _save(fig, path)


def _location(columns, i: int) -> str:
    """The file holding sample i's bytes: its shard (`shard_path`, embeddings format 2), else its image file
    (`image_path`: an image file, or a shard in format-1 embeddings); as retrieval.parts.row_location reads it."""
    for name in ("shard_path", "image_path"):
        if (
            name in columns
            and columns[name][i] is not None
            and str(columns[name][i]) not in ("", "nan", "None")
        ):
            return str(columns[name][i])
    raise KeyError(f"sample {i} names no file (neither shard_path nor image_path)")
