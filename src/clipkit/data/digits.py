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


def keep_fraction(indices: list[int], labels: np.ndarray, *, fraction: float, seed: int) -> list[int]:
    """A stratified `fraction` of `indices` (at least one per class), drawn from the seed."""
    if not 0.0 < fraction <= 1.0:
        raise ClipkitError(f"digits: train_fraction must be in (0, 1], got {fraction}")
    kept = []
    for label in sorted({int(labels[i]) for i in indices}):
        members = [i for i in indices if labels[i] == label]
        random.Random(stable_seed(seed, "digits-train-fraction", label)).shuffle(members)
        kept.extend(members[: max(1, round(len(members) * fraction))])
    return sorted(kept)


def noisy_caption_labels(
    indices: list[int], labels: np.ndarray, *, caption_noise: float, seed: int
) -> dict[int, int]:
    """{index: wrong class} for round(caption_noise * N) of `indices`, drawn from the seed."""
    if not 0.0 <= caption_noise <= 1.0:
        raise ClipkitError(f"digits: caption_noise must be in [0, 1], got {caption_noise}")
    rng = random.Random(stable_seed(seed, "digits-caption-noise"))
    noisy = rng.sample(indices, round(len(indices) * caption_noise))
    return {i: rng.choice([c for c in range(len(CLASSNAMES)) if c != labels[i]]) for i in sorted(noisy)}


def write_digits_dataset(
    out_dir: str | Path,
    *,
    seed: int = 0,
    test_fraction: float = 0.3,
    image_size: int = 32,
    train_fraction: float = 1.0,
    caption_noise: float = 0.0,
    captions_per_sample: int = 1,
    samples_per_shard: int = 2000,
    workers: int = 1,
) -> dict[str, int]:
    """Write the digits in the shared layout (train/, test/, classnames, templates); sample counts.

    Harder variants change the training split only (the test split stays the same clean 30%):
    `train_fraction` keeps a stratified fraction of it; `caption_noise` makes that fraction of its captions
    name a wrong class (the true class stays in KEY.json's `label`, the named one in `caption_label`);
    `captions_per_sample` > 1 writes that many different phrasings into KEY.txt, one per line, for
    caption augmentation (data.caption_choice). All drawn from the seed.

    One training shard by default: every reader then keeps its own blocks of it, which balances any
    number of processes x workers (a few shards of unequal size would not).
    """
    if not isinstance(captions_per_sample, int) or not 1 <= captions_per_sample <= len(CAPTION_TEMPLATES):
        raise ClipkitError(
            f"digits: captions_per_sample must be an integer from 1 to {len(CAPTION_TEMPLATES)} "
            f"(the number of phrasings), got {captions_per_sample!r}"
        )
    images, labels = load_digits_arrays()
    train, test = split_indices(labels, test_fraction=test_fraction, seed=seed)
    train = keep_fraction(train, labels, fraction=train_fraction, seed=seed)
    named = noisy_caption_labels(train, labels, caption_noise=caption_noise, seed=seed)
    records = {}
    for split, indices in (("train", train), ("test", test)):
        records[split] = []
        for position, index in enumerate(indices):
            label = int(labels[index])
            caption_label = named.get(index, label) if split == "train" else label
            rng = random.Random(stable_seed(seed, "digits-caption", split, index))
            if split == "train" and captions_per_sample > 1:
                templates = rng.sample(CAPTION_TEMPLATES, captions_per_sample)
            else:
                templates = [rng.choice(CAPTION_TEMPLATES)]
            caption = "\n".join(
                t.format(name=CLASSNAMES[caption_label], numeral=caption_label) for t in templates
            )
            meta = {"label": label, "classname": CLASSNAMES[label], "sklearn_index": int(index)}
            if caption_label != label:
                meta["caption_label"] = caption_label
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
