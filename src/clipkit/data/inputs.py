"""What `clipkit shards` reads: a table of image paths and captions, a folder of images with .txt
captions, or a folder of class sub-folders. Each becomes a list of `Record`s; unusable rows are listed."""

from __future__ import annotations

import csv
import json
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from clipkit.data.images import is_image_file
from clipkit.data.seeds import stable_seed
from clipkit.data.writer import Record
from clipkit.errors import ClipkitError

TABLE_SUFFIXES = (".csv", ".tsv", ".jsonl", ".parquet")


@dataclass(kw_only=True)
class Inputs:
    train: list[Record]
    test: list[Record] = field(default_factory=list)
    classnames: list[str] | None = None
    failed: list[dict[str, str]] = field(default_factory=list)  # {"input", "error"}


def detect_kind(path: Path) -> str:
    """table | captions | classes, from what `path` holds."""
    if path.is_file():
        if path.suffix.lower() in TABLE_SUFFIXES:
            return "table"
        raise ClipkitError(f"{path}: a table must be one of {', '.join(TABLE_SUFFIXES)}")
    if not path.is_dir():
        raise ClipkitError(f"input not found: {path} (give a table file, a folder, 'digits' or 'synthetic')")
    if any(is_image_file(p) for p in path.iterdir()):
        return "captions"
    if any(p.is_dir() and any(is_image_file(q) for q in p.rglob("*")) for p in path.iterdir()):
        return "classes"
    raise ClipkitError(f"{path} holds no images, neither directly nor in class sub-folders")


def _key(index: int) -> str:
    return f"{index:09d}"


def read_table(path: Path, *, image_column: str, caption_column: str) -> Inputs:
    """Rows of a CSV / TSV / JSONL / Parquet table; image paths are relative to the table's folder."""
    rows = table_rows(path)
    if rows:
        missing = [c for c in (image_column, caption_column) if c not in rows[0]]
        if missing:
            raise ClipkitError(
                f"{path}: no column {missing} (columns: {sorted(rows[0])}); "
                "name them with --image-column / --caption-column"
            )
    records, failed = [], []
    for number, row in enumerate(rows, start=1):
        image, caption = row.get(image_column), row.get(caption_column)
        where = f"{path} row {number}"
        if image is None or str(image).strip() == "":
            failed.append({"input": where, "error": f"empty {image_column}"})
            continue
        image_path = Path(str(image)).expanduser()
        image_path = image_path if image_path.is_absolute() else path.parent / image_path
        if caption is None or str(caption).strip() == "":
            failed.append({"input": str(image_path), "error": f"empty {caption_column}"})
            continue
        extra = {k: _jsonable(v) for k, v in row.items() if k not in (image_column, caption_column)}
        records.append(
            Record(
                key=_key(len(records)),
                caption=str(caption).strip(),
                image_path=str(image_path),
                meta={"source": str(image), **extra},
            )
        )
    return Inputs(train=records, failed=failed)


def table_rows(path: Path) -> list[dict[str, Any]]:
    suffix = path.suffix.lower()
    try:
        if suffix in (".csv", ".tsv"):
            with path.open(newline="", encoding="utf-8") as f:
                return list(csv.DictReader(f, delimiter="\t" if suffix == ".tsv" else ","))
        if suffix == ".jsonl":
            with path.open(encoding="utf-8") as f:
                return [json.loads(line) for line in f if line.strip()]
        try:
            import pyarrow.parquet as pq
        except ImportError:
            raise ClipkitError(f"{path}: reading Parquet needs pyarrow (pip install pyarrow)") from None
        return pq.read_table(path).to_pylist()
    except (OSError, ValueError, csv.Error) as e:
        raise ClipkitError(f"{path}: cannot read the table ({type(e).__name__}: {e})") from None


def _jsonable(value: Any) -> Any:
    try:
        json.dumps(value)
        return value
    except (TypeError, ValueError):
        return str(value)


def read_caption_folder(folder: Path) -> Inputs:
    """Every image under `folder` (recursively) with the caption in the .txt file of the same name."""
    records, failed = [], []
    for image_path in sorted(p for p in folder.rglob("*") if is_image_file(p)):
        caption_path = image_path.with_suffix(".txt")
        caption = (
            caption_path.read_text(encoding="utf-8", errors="replace").strip()
            if caption_path.is_file()
            else ""
        )
        if not caption:
            reason = (
                "empty caption file" if caption_path.is_file() else f"no caption file {caption_path.name}"
            )
            failed.append({"input": str(image_path), "error": reason})
            continue
        relative = str(image_path.relative_to(folder))
        records.append(
            Record(
                key=_key(len(records)), caption=caption, image_path=str(image_path), meta={"source": relative}
            )
        )
    return Inputs(train=records, failed=failed)


def read_class_folders(folder: Path, *, templates: list[str], test_fraction: float, seed: int) -> Inputs:
    """One class per sub-folder (sorted; label = index), captions from `templates` ({c} = class name).

    `test_fraction` of each class, drawn from the seed, goes to the test split. A folder name's
    underscores become spaces in the class name ("golden_retriever" -> "golden retriever").
    """
    if not 0.0 <= test_fraction < 1.0:
        raise ClipkitError(f"test fraction must be in [0, 1), got {test_fraction}")
    folders = sorted(p for p in folder.iterdir() if p.is_dir() and not p.name.startswith("."))
    classnames = [p.name.replace("_", " ") for p in folders]
    train, test = [], []
    for label, (class_folder, classname) in enumerate(zip(folders, classnames, strict=True)):
        images = sorted(p for p in class_folder.rglob("*") if is_image_file(p))
        random.Random(stable_seed(seed, "class-split", class_folder.name)).shuffle(images)
        cut = round(len(images) * test_fraction)
        for split, members in ((test, images[:cut]), (train, images[cut:])):
            for image_path in sorted(members):
                rng = random.Random(stable_seed(seed, "caption", str(image_path.relative_to(folder))))
                split.append(
                    Record(
                        key=_key(len(split)),
                        caption=rng.choice(templates).format(c=classname),
                        image_path=str(image_path),
                        label=label,
                        meta={
                            "label": label,
                            "classname": classname,
                            "source": str(image_path.relative_to(folder)),
                        },
                    )
                )
    return Inputs(train=train, test=test, classnames=classnames)
