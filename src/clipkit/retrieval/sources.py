"""The images an index is built from: a folder, webdataset shards, or a table of image paths.

Each source becomes a list of `ImageItem`s. An item says where its bytes are (a whole file, or a byte
range inside a tar shard, so the server can read one image without unpacking anything), how the
collection names it (`uri`), and the caption and metadata that came with it.

A damaged shard (truncated, corrupt part-way, or not a tar at all) does not stop a collection: the samples
before the damage are kept and the shard is listed as skipped, so one bad copy among thousands of shards
costs only its own images. A shard that is named but missing is still an error: that is a typo.
"""

from __future__ import annotations

import glob
import json
import logging
import tarfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from clipkit.data.images import IMAGE_EXTENSIONS, is_image_file  # the one decoder's formats
from clipkit.data.inputs import TABLE_SUFFIXES, table_rows  # the table reader `clipkit shards` uses
from clipkit.errors import ClipkitError

log = logging.getLogger(__name__)

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


@dataclass(frozen=True, kw_only=True)
class ImageListing:
    """What a source names: its images, and the damaged shards that were read in part or not at all."""

    items: list[ImageItem]
    # (shard path, reason), each reason starting with DAMAGED_SHARD; the same (uri, reason) pairs as the
    # undecodable images a command skips, so both go in one `skipped` list.
    skipped: list[tuple[str, str]] = field(default_factory=list)


DAMAGED_SHARD = "damaged shard skipped"


def is_damaged_shard(entry: tuple[str, str]) -> bool:
    """Whether a `skipped` (uri, reason) entry is a shard rather than one image."""
    return entry[1].startswith(DAMAGED_SHARD)


def list_images(
    source: str | Path, *, image_column: str = "image", caption_column: str = "caption"
) -> ImageListing:
    """Every image `source` names, in a fixed order (sorted paths; shards and tar members in order)."""
    text = str(source)
    path = Path(text)
    skipped: list[tuple[str, str]] = []
    if path.is_file() and path.suffix.lower() in TABLE_SUFFIXES:
        items = _table_items(path, image_column=image_column, caption_column=caption_column)
    elif path.is_file() and path.suffix == ".tar":
        items = _shard_items([path], root=path.parent, skipped=skipped)
    elif path.is_dir() and sorted(path.glob("*.tar")):
        items = _shard_items(sorted(path.glob("*.tar")), root=path, skipped=skipped)
    elif path.is_dir():
        items = _folder_items(path)
    elif any(ch in text for ch in "{*?["):
        shards = _expand_shard_pattern(text)
        items = _shard_items(shards, root=Path(shards[0]).parent, skipped=skipped)
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
    if not items and skipped:
        shard, reason = skipped[0]
        raise ClipkitError(
            f"{text} holds no readable images; {len(skipped)} damaged shard(s), the first {shard}: {reason}; "
            "re-copy them from their source"
        )
    if not items:
        raise ClipkitError(f"{text} holds no images; give one of: {'; '.join(SOURCE_KINDS)}")
    return ImageListing(items=items, skipped=skipped)


def warn_damaged_shards(listing: ImageListing) -> None:
    """One warning line per damaged shard, naming it and the fix."""
    for shard, reason in listing.skipped:
        log.warning("%s: %s; re-copy it from its source to include the images left out", shard, reason)


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


def _shard_items(shards: list[Path], *, root: Path, skipped: list[tuple[str, str]]) -> list[ImageItem]:
    """The images of `shards`; a damaged shard adds its intact samples and appends (path, reason) to `skipped`."""
    items = []
    for shard in shards:
        shard = shard.resolve()
        try:
            name = shard.relative_to(root.resolve()).as_posix()
        except ValueError:
            name = str(shard)
        samples, damage = _read_tar_samples(shard)
        if damage is not None:
            kept = f"after {len(samples)} sample(s)" if samples else "whole"
            skipped.append((str(shard), f"{DAMAGED_SHARD} {kept} ({damage})"))
        for key, members, texts in samples:
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

TarSample = tuple[str, dict[str, tarfile.TarInfo], dict[str, str]]


def _read_tar_samples(shard: Path) -> tuple[list[TarSample], str | None]:
    """(key, {ext: member}, {ext: text of small text members}) per sample, grouped as webdataset groups,
    and the damage that stopped the reading (None: the shard is whole).

    A damaged shard keeps the samples before the damage, and of the sample being read when it was met, the
    members whose bytes all lie in the file (as webdataset keeps a sample cut short).
    """
    from webdataset.tariterators import base_plus_ext

    samples: list[TarSample] = []
    current_key, members, texts = None, {}, {}
    try:
        # "r:": a plain tar, whose member offsets are byte offsets in the file (what the server reads).
        with tarfile.open(shard, "r:") as tar:
            for member in tar:
                if not member.isreg():
                    continue
                key, ext = base_plus_ext(member.name)
                if key is None or Path(member.name).name.startswith("__"):
                    continue
                if key != current_key:
                    if current_key is not None:
                        samples.append((current_key, members, texts))
                    current_key, members, texts = key, {}, {}
                ext = ext.lower()
                members[ext] = member
                if ext in _TEXT_EXTENSIONS and member.size <= _MAX_TEXT_MEMBER_BYTES:
                    texts[ext] = tar.extractfile(member).read().decode("utf-8", errors="replace")
            damage = _end_of_archive_damage(tar)
    except (tarfile.TarError, OSError) as e:
        damage = f"{type(e).__name__}: {e}".splitlines()[0]
    if damage is not None and current_key is not None:
        members, texts = _whole_members(shard, members, texts)
    if members:
        samples.append((current_key, members, texts))
    return samples, damage


def _whole_members(
    shard: Path, members: dict[str, tarfile.TarInfo], texts: dict[str, str]
) -> tuple[dict[str, tarfile.TarInfo], dict[str, str]]:
    """The members of a sample cut short whose bytes all lie in the file, and their texts."""
    try:
        size = shard.stat().st_size
    except OSError:
        return {}, {}
    whole = {ext: m for ext, m in members.items() if m.offset_data + m.size <= size}
    return whole, {ext: text for ext, text in texts.items() if ext in whole}


def _end_of_archive_damage(tar: tarfile.TarFile) -> str | None:
    """Python's tarfile stops quietly at a header it cannot parse (past the first one) and where the file
    ends at a header; only a zero end-of-archive block where it stopped means nothing came after."""
    tar.fileobj.seek(tar.offset)
    end = tar.fileobj.read(tarfile.BLOCKSIZE)
    if len(end) < tarfile.BLOCKSIZE:
        return f"truncated: the file ends at byte {tar.offset + len(end)} without tar's end-of-archive block"
    if any(end):
        return f"corrupt tar header at byte {tar.offset}"
    return None


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
