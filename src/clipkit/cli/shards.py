"""Write webdataset shards (img2dataset layout) from your images, or build a demo dataset.

INPUT is one of:
  a table (.csv / .tsv / .jsonl / .parquet) with an image-path column and a caption column;
  a folder of images with a .txt caption beside each (photo.jpg + photo.txt);
  a folder of class sub-folders (captions from --template; also writes the zero-shot files and a test split);
  `digits`: handwritten digits (UCI's 8x8 scans, bundled); `synthetic`: clipkit's generated shapes.
Inputs that cannot be read are listed (and kept in _info.json), not fatal.
"""

from __future__ import annotations

import argparse
import re
import shutil
import tempfile
from pathlib import Path

DEFAULT_TEMPLATES = ["a photo of a {c}."]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("input", help="table file, image folder, class folder, 'digits' or 'synthetic'")
    parser.add_argument("--out", required=True, help="output directory")
    parser.add_argument(
        "--kind",
        choices=["auto", "table", "captions", "classes"],
        default="auto",
        help="how to read a file or folder INPUT (default: from what it holds)",
    )
    parser.add_argument(
        "--image-column", default="image", help="table column with image paths (default: image)"
    )
    parser.add_argument(
        "--caption-column", default="caption", help="table column with captions (default: caption)"
    )
    parser.add_argument(
        "--template",
        action="append",
        dest="templates",
        help="class folders: caption template, {c} (or {}) = class name; repeat for several "
        "(default: 'a photo of a {c}.')",
    )
    parser.add_argument(
        "--test-fraction",
        type=float,
        help="class folders and digits: share of each class in the test split (default 0.2; digits 0.3)",
    )
    parser.add_argument("--samples-per-shard", type=int, default=1000, help="default: 1000")
    parser.add_argument(
        "--max-side", type=int, help="resize so the longest side is at most this (keeps aspect)"
    )
    parser.add_argument(
        "--format",
        choices=["keep", "jpg", "png", "webp"],
        default="keep",
        help="image format (default: keep)",
    )
    parser.add_argument("--quality", type=int, default=95, help="jpg / webp quality (default: 95)")
    parser.add_argument("--workers", type=int, default=1, help="processes writing shards (default: 1)")
    parser.add_argument(
        "--seed", type=int, default=0, help="splits, caption choice, generated data (default: 0)"
    )
    parser.add_argument("--train-samples", type=int, default=20000, help="synthetic: training samples")
    parser.add_argument("--test-samples", type=int, default=1000, help="synthetic: test samples")
    parser.add_argument("--image-size", type=int, help="synthetic / digits: image side (default 64 / 32)")
    parser.add_argument("--overwrite", action="store_true", help="write into --out even if it holds files")


def run(args: argparse.Namespace) -> int:
    from clipkit.files import check_output_dir

    out = Path(args.out)
    sources = () if args.input in ("digits", "synthetic") and not Path(args.input).exists() else (args.input,)
    check_output_dir(
        out,
        overwrite=args.overwrite,
        written_by_clipkit=_is_shards_dir,
        kind="shard directory",
        sources=sources,
    )
    if args.input in ("digits", "synthetic") and not Path(args.input).exists():
        counts = _write_generated(args, out)
        print(f"wrote {counts['train']} train and {counts['test']} test samples to {out}")
        return 0
    return _write_from_input(args, out)


def _is_shards_dir(directory: Path) -> bool:
    """A directory `clipkit shards` wrote: a split's `_info.json` present, nothing but its layout's entries."""
    from clipkit.data.writer import CLASSNAMES_FILE, INFO_FILE, TEMPLATES_FILE, TEST_LAYOUT, TRAIN_LAYOUT

    names = {p.name for p in directory.iterdir()}
    if INFO_FILE in names:  # one captioned split written straight into --out
        return all(name == INFO_FILE or re.fullmatch(r"\d+\.tar", name) for name in names)
    layout = {TRAIN_LAYOUT, TEST_LAYOUT, CLASSNAMES_FILE, TEMPLATES_FILE, "dataset_type.txt"}
    return names <= layout and any(
        (directory / split / INFO_FILE).is_file() for split in (TRAIN_LAYOUT, TEST_LAYOUT)
    )


def _write_generated(args: argparse.Namespace, out: Path) -> dict[str, int]:
    """Build in a temporary sibling directory, then rename: a demo dataset is whole or absent."""
    from clipkit.data.prepare import generators

    options = {"seed": args.seed, "workers": args.workers}
    if args.image_size:
        options["image_size"] = args.image_size
    if args.input == "synthetic":
        options.update(train_samples=args.train_samples, test_samples=args.test_samples)
    elif args.test_fraction is not None:
        options["test_fraction"] = args.test_fraction
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".tmp", dir=out.parent))
    try:
        counts = generators()[args.input](staging, **options)
        if out.exists():
            shutil.rmtree(out)
        staging.rename(out)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return counts


def _write_from_input(args: argparse.Namespace, out: Path) -> int:
    from clipkit.data.inputs import detect_kind, read_caption_folder, read_class_folders, read_table
    from clipkit.data.writer import TRAIN_LAYOUT, ImageOptions, write_classification_dataset, write_split

    source = Path(args.input).expanduser()
    kind = detect_kind(source) if args.kind == "auto" else args.kind
    if args.kind == "auto":
        print(f"reading {source} as {_KIND_WORDS[kind]} (override with --kind)")
    templates = [t.replace("{}", "{c}") for t in (args.templates or DEFAULT_TEMPLATES)]
    if kind == "table":
        inputs = read_table(source, image_column=args.image_column, caption_column=args.caption_column)
    elif kind == "captions":
        inputs = read_caption_folder(source)
    else:
        test_fraction = 0.2 if args.test_fraction is None else args.test_fraction
        inputs = read_class_folders(source, templates=templates, test_fraction=test_fraction, seed=args.seed)
    options = {
        "samples_per_shard": args.samples_per_shard,
        "image_options": ImageOptions(max_side=args.max_side, format=args.format, quality=args.quality),
        "workers": args.workers,
        "info": {"input": str(source), "kind": kind},
    }
    if inputs.classnames is None:
        results = {
            "train": write_split(
                inputs.train, out, layout=TRAIN_LAYOUT, failed_inputs=inputs.failed, **options
            )
        }
    else:
        results = write_classification_dataset(
            out,
            train=inputs.train,
            test=inputs.test,
            classnames=inputs.classnames,
            templates=templates,
            **options,
        )
        print(f"{len(inputs.classnames)} classes: {out / 'classnames.txt'}")
    failed = list(inputs.failed)
    for split, result in results.items():
        failed.extend(result.failed)
        print(f"{split}: {result.samples} samples in {len(result.shards)} shards")
    if failed:
        print(f"{len(failed)} inputs could not be used (listed in _info.json), for example:")
        for item in failed[:5]:
            print(f"  {item['input']}: {item['error']}")
    return 0


_KIND_WORDS = {
    "table": "a table of image paths and captions",
    "captions": "a folder of images with .txt captions",
    "classes": "a folder of class sub-folders",
}
