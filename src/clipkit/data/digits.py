"""Handwritten digits (1,797 real 8x8 scans, no download) as shards.

The scans are the UCI "Optical Recognition of Handwritten Digits" test set (E. Alpaydin, C. Kaynak,
1998; CC BY 4.0), in the copy scikit-learn bundles (`digits.csv.gz`: 64 pixel values in 0..16, then the
label, per row); clipkit ships the same 57 KB file, so the Quickstart needs no scikit-learn.
A stratified train/test split (70/30 by default), captions such as "a handwritten seven.", and the
zero-shot files, in the shared layout.
"""

from __future__ import annotations

import gzip
import random
from pathlib import Path

import numpy as np
from PIL import Image

from clipkit.data.seeds import stable_seed
from clipkit.data.writer import ImageOptions, Record, write_classification_dataset
from clipkit.errors import ClipkitError

CLASSNAMES = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
CAPTION_TEMPLATES = (
    "a handwritten {name}.",
    "a handwritten digit {name}.",
    "the number {name}, handwritten.",
    "a scan of a handwritten {numeral}.",
    "the digit {numeral} written by hand.",
)
ZEROSHOT_TEMPLATES = ("a handwritten {c}.", "a handwritten digit {c}.", "the number {c}, handwritten.")


DIGITS_FILE = Path(__file__).with_name("digits.csv.gz")


def load_digits_arrays() -> tuple[np.ndarray, np.ndarray]:
    """(images (N, 8, 8) in 0..16, labels (N,)), as scikit-learn's `load_digits()` returns them."""
    try:
        with gzip.open(DIGITS_FILE, "rt", encoding="ascii") as f:
            table = np.loadtxt(f, delimiter=",")  # (1797, 65)
    except OSError as e:
        raise ClipkitError(
            f"cannot read the bundled digits file {DIGITS_FILE} ({e}); reinstall clipkit"
        ) from None
    return table[:, :-1].reshape(-1, 8, 8), table[:, -1].astype(int)


def render(record: Record) -> Image.Image:
    """Dark ink on white paper, enlarged from 8x8 with bicubic smoothing."""
    pixels, image_size = record.payload
    ink = np.asarray(pixels, dtype=np.float32) / 16.0
    small = Image.fromarray((255 * (1.0 - ink)).round().astype(np.uint8))
    return small.resize((image_size, image_size), Image.Resampling.BICUBIC)


def split_indices(labels: np.ndarray, *, test_fraction: float, seed: int) -> tuple[list[int], list[int]]:
    """A stratified split: `test_fraction` of every class goes to test, drawn from the seed."""
    if not 0.0 < test_fraction < 1.0:
        raise ClipkitError(f"test fraction must be between 0 and 1, got {test_fraction}")
    train, test = [], []
    for label in sorted(set(labels.tolist())):
        members = [i for i, y in enumerate(labels.tolist()) if y == label]
        random.Random(stable_seed(seed, "digits-split", label)).shuffle(members)
        cut = round(len(members) * test_fraction)
        test.extend(members[:cut])
        train.extend(members[cut:])
    return sorted(train), sorted(test)


def write_digits_dataset(
    out_dir: str | Path,
    *,
    seed: int = 0,
    test_fraction: float = 0.3,
    image_size: int = 32,
    samples_per_shard: int = 2000,
    workers: int = 1,
) -> dict[str, int]:
    """Write the digits in the shared layout (train/, test/, classnames, templates); sample counts.

    One training shard by default: every reader then keeps its own blocks of it, which balances any
    number of processes x workers (a few shards of unequal size would not).
    """
    images, labels = load_digits_arrays()
    train, test = split_indices(labels, test_fraction=test_fraction, seed=seed)
    records = {}
    for split, indices in (("train", train), ("test", test)):
        records[split] = []
        for position, index in enumerate(indices):
            label = int(labels[index])
            rng = random.Random(stable_seed(seed, "digits-caption", split, index))
            caption = rng.choice(CAPTION_TEMPLATES).format(name=CLASSNAMES[label], numeral=label)
            meta = {"label": label, "classname": CLASSNAMES[label], "sklearn_index": int(index)}
            payload = (images[index].tolist(), image_size)
            records[split].append(
                Record(key=f"{position:09d}", caption=caption, label=label, meta=meta, payload=payload)
            )
    results = write_classification_dataset(
        out_dir,
        train=records["train"],
        test=records["test"],
        classnames=CLASSNAMES,
        templates=ZEROSHOT_TEMPLATES,
        load_image=render,
        samples_per_shard=samples_per_shard,
        image_options=ImageOptions(format="png"),
        workers=workers,
        info={"dataset": "scikit-learn digits", "seed": seed, "image_size": image_size},
    )
    return {split: result.samples for split, result in results.items()}
