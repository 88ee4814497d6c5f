"""Writing shards: the img2dataset training layout and CLIP_benchmark's "wds" test layout.

    train/{00000..N}.tar   KEY.jpg|png|webp + KEY.txt (caption) + KEY.json (metadata)   + train/_info.json
    test/{0..N}.tar        KEY.jpg|png|webp + KEY.cls (label) + KEY.txt (caption)       + test/nshards.txt
    classnames.txt, zeroshot_classification_templates.txt ({c} placeholder), dataset_type.txt

Every shard is written under a temporary name and renamed when complete; `_info.json` is written last.
"""

from __future__ import annotations

import io
import json
import multiprocessing
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from PIL import Image

from clipkit.errors import ClipkitError
from clipkit.files import atomic_path, write_text_atomic

IMAGE_FORMATS = ("keep", "jpg", "png", "webp")
_PIL_FORMATS = {"jpg": "JPEG", "png": "PNG", "webp": "WEBP"}
_EXTENSION_OF_PIL_FORMAT = {"JPEG": "jpg", "PNG": "png", "WEBP": "webp"}
TRAIN_LAYOUT, TEST_LAYOUT = "train", "test"
CLASSNAMES_FILE = "classnames.txt"
TEMPLATES_FILE = "zeroshot_classification_templates.txt"
INFO_FILE = "_info.json"


@dataclass(frozen=True, kw_only=True)
class ImageOptions:
    max_side: int | None = None  # longest side after resizing (aspect kept, never enlarged); None: as is
    format: str = "keep"  # keep (jpg/png/webp stay as they are, anything else becomes jpg) | jpg | png | webp
    quality: int = 95  # jpg / webp quality

    def __post_init__(self):
        if self.format not in IMAGE_FORMATS:
            raise ClipkitError(f"image format '{self.format}' is not one of {IMAGE_FORMATS}")
        if self.max_side is not None and self.max_side < 1:
            raise ClipkitError(f"max image side must be a positive number of pixels, got {self.max_side}")
        if not 1 <= self.quality <= 100:
            raise ClipkitError(f"image quality must be in 1..100, got {self.quality}")


@dataclass(kw_only=True)
class Record:
    """One sample to write. The image comes from `image_path`, or from the split's `load_image(record)`."""

    key: str
    caption: str
    image_path: str | None = None
    label: int | None = None  # for the test layout (.cls)
    meta: dict[str, Any] = field(default_factory=dict)  # goes into KEY.json (train layout)
    payload: Any = None  # what a generator's load_image draws from; not written


@dataclass(kw_only=True)
class SplitResult:
    samples: int = 0
    shards: dict[str, int] = field(default_factory=dict)  # shard file name -> samples written
    failed: list[dict[str, str]] = field(default_factory=list)  # {"input", "error"} per unreadable input


def load_image_file(record: Record) -> tuple[bytes, str]:
    """The bytes of the record's image file and their extension; re-encoded only when needed."""
    path = Path(record.image_path)
    return path.read_bytes(), path.suffix.lower().lstrip(".")


def encode_image(source: bytes | Image.Image, source_ext: str, options: ImageOptions) -> tuple[bytes, str]:
    """(bytes, extension) to store: the original bytes when they can stay, else resized / re-encoded.

    The image is always decoded fully, so an unreadable input fails here, not during training.
    """
    if isinstance(source, Image.Image):
        image, original = source, None
    else:
        original = source
        image = Image.open(io.BytesIO(source))
        image.load()
        source_ext = _EXTENSION_OF_PIL_FORMAT.get(image.format or "", source_ext)
    target = options.format
    if target == "keep":
        target = source_ext if source_ext in _PIL_FORMATS else "jpg"
    resize = options.max_side is not None and max(image.size) > options.max_side
    if original is not None and not resize and target == source_ext:
        return original, target
    if resize:
        image = image.copy()
        image.thumbnail((options.max_side, options.max_side), Image.Resampling.LANCZOS)
    if target == "jpg" and image.mode not in ("RGB", "L"):
        image = image.convert("RGB")
    elif target in ("png", "webp") and image.mode not in ("RGB", "RGBA", "L", "LA"):
        image = image.convert("RGBA" if "A" in image.getbands() else "RGB")
    out = io.BytesIO()
    save_args = {"quality": options.quality} if target in ("jpg", "webp") else {}
    image.save(out, format=_PIL_FORMATS[target], **save_args)
    return out.getvalue(), target


def shard_file_name(index: int, layout: str) -> str:
    return f"{index:05d}.tar" if layout == TRAIN_LAYOUT else f"{index}.tar"


def _write_shard(
    job: tuple[Path, Sequence[Record], str, ImageOptions, Callable[[Record], Any]],
) -> tuple[str, int, list[dict[str, str]]]:
    path, records, layout, options, load_image = job
    failed: list[dict[str, str]] = []
    written = 0
    import webdataset as wds  # here, not at the top: webdataset imports torch; readers of Record need not

    with atomic_path(path) as temporary:
        with open(temporary, "wb") as stream, wds.TarWriter(stream, encoder=False, mtime=0) as tar:
            for record in records:
                try:
                    loaded = load_image(record)
                    source, ext = loaded if isinstance(loaded, tuple) else (loaded, "png")
                    data, ext = encode_image(source, ext, options)
                except Exception as e:
                    failed.append(
                        {"input": record.image_path or record.key, "error": f"{type(e).__name__}: {e}"}
                    )
                    continue
                sample = {"__key__": record.key, ext: data, "txt": record.caption.encode("utf-8")}
                if layout == TRAIN_LAYOUT:
                    sample["json"] = json.dumps(
                        {"key": record.key, "caption": record.caption, **record.meta}
                    ).encode()
                else:
                    sample["cls"] = str(record.label).encode()
                tar.write(sample)
                written += 1
    return path.name, written, failed


def write_split(
    records: Sequence[Record],
    out_dir: str | Path,
    *,
    layout: str,
    samples_per_shard: int = 1000,
    image_options: ImageOptions | None = None,
    workers: int = 1,
    load_image: Callable[[Record], Any] = load_image_file,
    info: dict[str, Any] | None = None,
    failed_inputs: Sequence[dict[str, str]] = (),
) -> SplitResult:
    """Write `records` as shards in `out_dir` (train or test layout), `workers` shards at a time.

    `load_image(record)` returns (bytes, extension) or a PIL image; it must be a module-level function
    when workers > 1. Inputs that fail are listed in the result and, after `failed_inputs` (those the
    caller could not turn into records), in `_info.json`; none is fatal.
    """
    if samples_per_shard < 1:
        raise ClipkitError(f"samples per shard must be at least 1, got {samples_per_shard}")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    options = image_options or ImageOptions()
    chunks = [records[i : i + samples_per_shard] for i in range(0, len(records), samples_per_shard)]
    jobs = [
        (out_dir / shard_file_name(i, layout), chunk, layout, options, load_image)
        for i, chunk in enumerate(chunks)
    ]
    result = SplitResult()
    if workers > 1 and len(jobs) > 1:
        with multiprocessing.Pool(min(workers, len(jobs))) as pool:
            outcomes = list(pool.imap(_write_shard, jobs))
    else:
        outcomes = [_write_shard(job) for job in jobs]
    for name, written, failed in outcomes:
        result.shards[name] = written
        result.samples += written
        result.failed.extend(failed)
    if layout == TEST_LAYOUT:
        write_text_atomic(out_dir / "nshards.txt", f"{len(jobs)}\n")
    failed = [*failed_inputs, *result.failed]
    summary = {"samples": result.samples, "shards": result.shards, "failed": failed, **(info or {})}
    write_text_atomic(out_dir / INFO_FILE, json.dumps(summary, indent=2) + "\n")
    return result


def write_classification_dataset(
    out_dir: str | Path,
    *,
    train: Sequence[Record],
    test: Sequence[Record],
    classnames: Sequence[str],
    templates: Sequence[str],
    load_image: Callable[[Record], Any] = load_image_file,
    **split_options: Any,
) -> dict[str, SplitResult]:
    """train/ and test/ shards plus the zero-shot files: the shared layout (module docstring)."""
    out_dir = Path(out_dir)
    results = {
        split: write_split(records, out_dir / split, layout=layout, load_image=load_image, **split_options)
        for split, layout, records in (("train", TRAIN_LAYOUT, train), ("test", TEST_LAYOUT, test))
    }
    write_zeroshot_files(out_dir, classnames, templates)
    return results


def write_zeroshot_files(out_dir: str | Path, classnames: Sequence[str], templates: Sequence[str]) -> None:
    """classnames.txt (line index = label), templates with {c}, and dataset_type.txt (CLIP_benchmark)."""
    out_dir = Path(out_dir)
    for template in templates:
        if "{c}" not in template:
            raise ClipkitError(f"zero-shot template '{template}' has no {{c}} placeholder for the class name")
    write_text_atomic(out_dir / CLASSNAMES_FILE, "".join(f"{name}\n" for name in classnames))
    write_text_atomic(out_dir / TEMPLATES_FILE, "".join(f"{t}\n" for t in templates))
    write_text_atomic(out_dir / "dataset_type.txt", "classification\n")
