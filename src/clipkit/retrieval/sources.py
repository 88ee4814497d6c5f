"""The images an index is built from: a folder, webdataset shards, or a table of image paths.

Each source becomes a list of `ImageItem`s. An item says where its bytes are (a whole file, or a byte
range inside a tar shard, so the server can read one image without unpacking anything), how the
collection names it (`uri`), and the caption and metadata that came with it.
"""

from __future__ import annotations

import glob
import json
import tarfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from clipkit.data.images import IMAGE_EXTENSIONS, is_image_file  # the one decoder's formats
from clipkit.data.inputs import TABLE_SUFFIXES, table_rows  # the table reader `clipkit shards` uses
from clipkit.errors import ClipkitError

SOURCE_KINDS = (
    "a folder of images (searched recursively; IMAGE.txt beside an image is its caption)",
    "webdataset shards (FILE.tar, a folder of .tar files, or a glob / {000..009} pattern) with "
    "KEY.jpg|png|webp and optional KEY.txt, KEY.cls, KEY.json",
    f"a table ({', '.join(TABLE_SUFFIXES)}) with an image path column and optional caption / metadata columns",
)


@dataclass(frozen=True, kw_only=True)
class ImageItem:
    """One image of a collection and where to read its bytes."""

    uri: str  # how the collection names it: a relative path, SHARD#KEY, or the table's value
    path: str  # absolute path of the file that holds the bytes (an image file or a tar shard)
    offset: int | None = None  # byte offset inside `path` for a shard member; None: the whole file
    length: int | None = None  # bytes to read at `offset`
    caption: str | None = None
    metadata: dict[str, Any] = field(default_factory=dict)


def read_item_bytes(path: str, offset: int | None, length: int | None) -> bytes:
    """The image bytes of an item (or of an index row, which stores the same three fields)."""
    with open(path, "rb") as f:
        if offset is None:
            return f.read()
        f.seek(offset)
        data = f.read(length)
    if length is not None and len(data) != length:
        raise OSError(f"{path} is shorter than when it was indexed (wanted {length} bytes at {offset})")
    return data


def list_image_items(
    source: str | Path, *, image_column: str = "image", caption_column: str = "caption"
) -> list[ImageItem]:
    """Every image `source` names, in a fixed order (sorted paths; shards and tar members in order)."""
    text = str(source)
    path = Path(text)
    if path.is_file() and path.suffix.lower() in TABLE_SUFFIXES:
        items = _table_items(path, image_column=image_column, caption_column=caption_column)
    elif path.is_file() and path.suffix == ".tar":
        items = _shard_items([path], root=path.parent)
    elif path.is_dir() and sorted(path.glob("*.tar")):
        items = _shard_items(sorted(path.glob("*.tar")), root=path)
    elif path.is_dir():
        items = _folder_items(path)
    elif any(ch in text for ch in "{*?["):
        shards = _expand_shard_pattern(text)
        items = _shard_items(shards, root=Path(shards[0]).parent)
    elif "://" in text or text.startswith("pipe:"):
        raise ClipkitError(
            f"{text}: clipkit indexes local files only, because the server reads images back from them; "
            "copy the shards to this machine first"
        )
    elif not path.exists():
        raise ClipkitError(f"image source {text} not found; give one of: {'; '.join(SOURCE_KINDS)}")
    else:
        raise ClipkitError(
            f"{text} is not an image source clipkit reads; give one of: {'; '.join(SOURCE_KINDS)}"
        )
    if not items:
        raise ClipkitError(f"{text} holds no images; give one of: {'; '.join(SOURCE_KINDS)}")
    return items


def _folder_items(root: Path) -> list[ImageItem]:
    files = sorted(p for p in root.rglob("*") if is_image_file(p))
    if not files:
        nested_shards = sorted({p.parent for p in root.rglob("*.tar")})
        if nested_shards:
            folders = ", ".join(str(p) for p in nested_shards[:4])
            raise ClipkitError(f"{root} holds no images but has shards in sub-folders; name one: {folders}")
    items = []
    for file in files:
        caption_file = file.with_suffix(".txt")
        caption = caption_file.read_text(encoding="utf-8").strip() if caption_file.is_file() else None
        items.append(
            ImageItem(
                uri=file.relative_to(root).as_posix(), path=str(file.resolve()), caption=caption or None
            )
        )
    return items


def _shard_items(shards: list[Path], *, root: Path) -> list[ImageItem]:
    items = []
    for shard in shards:
        shard = shard.resolve()
        try:
            name = shard.relative_to(root.resolve()).as_posix()
        except ValueError:
            name = str(shard)
        for key, members, texts in _iter_tar_samples(shard):
            ext = next((ext for ext in IMAGE_EXTENSIONS if ext in members), None)
            if ext is None:
                continue  # a sample without an image (e.g. a text-only record) is not searchable
            member = members[ext]
            metadata = {}
            if "json" in texts:
                try:
                    parsed = json.loads(texts["json"])
                except json.JSONDecodeError:
                    parsed = None
                if isinstance(parsed, dict):
                    metadata.update(parsed)
            if "cls" in texts and texts["cls"].strip().lstrip("-").isdigit():
                metadata.setdefault("label", int(texts["cls"].strip()))
            caption = texts.get("txt", "").strip() or None
            items.append(
                ImageItem(
                    uri=f"{name}#{key}",
                    path=str(shard),
                    offset=member.offset_data,
                    length=member.size,
                    caption=caption,
                    metadata=metadata,
                )
            )
    return items


# Small text members a sample may carry; images are located, not read, while listing.
_TEXT_EXTENSIONS = ("txt", "cls", "json")
_MAX_TEXT_MEMBER_BYTES = 1 << 20


def _iter_tar_samples(shard: Path) -> Iterator[tuple[str, dict[str, tarfile.TarInfo], dict[str, str]]]:
    """(key, {ext: member}, {ext: text of small text members}) per sample, grouped as webdataset groups."""
    from webdataset.tariterators import base_plus_ext

    current_key, members, texts = None, {}, {}
    try:
        with tarfile.open(shard) as tar:
            for member in tar:
                if not member.isreg():
                    continue
                key, ext = base_plus_ext(member.name)
                if key is None or Path(member.name).name.startswith("__"):
                    continue
                if key != current_key:
                    if current_key is not None:
                        yield current_key, members, texts
                    current_key, members, texts = key, {}, {}
                ext = ext.lower()
                members[ext] = member
                if ext in _TEXT_EXTENSIONS and member.size <= _MAX_TEXT_MEMBER_BYTES:
                    texts[ext] = tar.extractfile(member).read().decode("utf-8", errors="replace")
    except (tarfile.TarError, OSError) as e:
        raise ClipkitError(
            f"cannot read {shard} as a webdataset tar shard ({type(e).__name__}: {e})"
        ) from None
    if current_key is not None:
        yield current_key, members, texts


def _expand_shard_pattern(pattern: str) -> list[Path]:
    from webdataset.shardlists import expand_urls  # braces, as webdataset reads them

    shards: list[Path] = []
    for item in expand_urls(pattern):
        if any(ch in item for ch in "*?["):
            shards.extend(Path(p) for p in sorted(glob.glob(item)))
        elif Path(item).is_file():
            shards.append(Path(item))
        else:
            raise ClipkitError(f"shard {item} (from {pattern}) not found")
    if not shards:
        raise ClipkitError(f"no shards match {pattern}")
    return shards


def _table_items(path: Path, *, image_column: str, caption_column: str) -> list[ImageItem]:
    rows = table_rows(path)
    if not all(isinstance(row, dict) for row in rows):
        raise ClipkitError(f"{path}: every row of a table must be an object with named columns")
    if rows and image_column not in rows[0]:
        raise ClipkitError(
            f"{path}: no column '{image_column}' (columns: {sorted(rows[0])}); name it with --image-column"
        )
    items = []
    for number, row in enumerate(rows, start=1):
        value = row.get(image_column)
        if value is None or str(value).strip() == "":
            raise ClipkitError(f"{path} row {number}: empty '{image_column}'; give every row an image path")
        value = str(value).strip()
        if "://" in value:
            raise ClipkitError(
                f"{path} row {number}: {value} is a URL; clipkit indexes local files only "
                "(download them first, e.g. with img2dataset)"
            )
        image_path = Path(value).expanduser()
        image_path = image_path if image_path.is_absolute() else path.parent / image_path
        if not image_path.is_file():
            raise ClipkitError(f"{path} row {number}: image {image_path} not found")
        caption = str(row.get(caption_column) or "").strip() or None
        metadata = {k: v for k, v in row.items() if k not in (image_column, caption_column)}
        items.append(ImageItem(uri=value, path=str(image_path.resolve()), caption=caption, metadata=metadata))
    return items
