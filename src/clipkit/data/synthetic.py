"""A generated image-caption dataset: coloured shapes at positions and sizes, with captions naming them.

Nothing to download, deterministic from a seed, and learnable in minutes on a CPU: the zero-shot classes
are the colour-shape pairs ("red circle", 20 of them), and the captions name colour and shape in a few
phrasings, some with size, position and background.
"""

from __future__ import annotations

import math
import random
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from clipkit.data.seeds import stable_seed
from clipkit.data.writer import ImageOptions, Record, write_classification_dataset
from clipkit.errors import ClipkitError

SHAPES = ("circle", "square", "triangle", "cross")
COLOURS = {
    "red": (220, 40, 40),
    "green": (40, 180, 60),
    "blue": (50, 80, 230),
    "yellow": (235, 215, 40),
    "purple": (150, 60, 200),
}
CLASSNAMES = tuple(f"{colour} {shape}" for shape in SHAPES for colour in COLOURS)
SIZES = {"small": (0.28, 0.40), "large": (0.55, 0.75)}  # shape extent as a fraction of the image side
POSITIONS = (
    ("in the top left", "at the top", "in the top right"),
    ("on the left", "in the center", "on the right"),
    ("in the bottom left", "at the bottom", "in the bottom right"),
)
CAPTION_TEMPLATES = (
    "a {size} {colour} {shape} {position}.",
    "a {colour} {shape} {position}.",
    "a {size} {colour} {shape}.",
    "a {colour} {shape}.",
    "a photo of a {colour} {shape}.",
    "a {colour} {shape} on a {background} background.",
)
ZEROSHOT_TEMPLATES = ("a photo of a {c}.", "a {c}.", "a small {c}.", "a large {c}.")


def describe_sample(
    seed: int, split: str, index: int, image_size: int, *, caption_label: int | None = None
) -> Record:
    """Everything about sample `index` of `split`, drawn from (seed, split, index): no image yet.

    `caption_label`, when given, is the (wrong) class the caption names instead of the one drawn.
    """
    rng = random.Random(stable_seed(seed, "synthetic", split, index))
    # The test split cycles through the classes so that every class is equally represented.
    label = index % len(CLASSNAMES) if split == "test" else rng.randrange(len(CLASSNAMES))
    shape, colour = SHAPES[label // len(COLOURS)], list(COLOURS)[label % len(COLOURS)]
    size = rng.choice(list(SIZES))
    extent = rng.uniform(*SIZES[size]) * image_size
    radius = extent / 2
    cx, cy = rng.uniform(radius, image_size - radius), rng.uniform(radius, image_size - radius)
    position = POSITIONS[min(2, int(3 * cy / image_size))][min(2, int(3 * cx / image_size))]
    level = rng.randint(20, 210)
    tint = [rng.randint(-15, 15) for _ in range(3)]
    background_rgb = [max(0, min(255, level + t)) for t in tint]
    background = "dark" if level < 80 else "light" if level > 160 else "grey"
    template = rng.choice(CAPTION_TEMPLATES)
    named = label if caption_label is None else caption_label
    named_shape, named_colour = SHAPES[named // len(COLOURS)], list(COLOURS)[named % len(COLOURS)]
    caption = template.format(
        size=size, colour=named_colour, shape=named_shape, position=position, background=background
    )
    drawing = {
        "shape": shape,
        "rgb": [max(0, min(255, c + rng.randint(-20, 20))) for c in COLOURS[colour]],
        "center": [cx, cy],
        "radius": radius,
        "angle": rng.uniform(-30.0, 30.0),
        "background_rgb": background_rgb,
        "noise_seed": rng.getrandbits(32),
        "image_size": image_size,
    }
    meta = {
        "label": label,
        "classname": CLASSNAMES[label],
        "shape": shape,
        "colour": colour,
        "size": size,
        "position": position,
        "background": background,
        **({"caption_label": named} if named != label else {}),
    }
    return Record(key=f"{index:09d}", caption=caption, label=label, meta=meta, payload=drawing)


def render(record: Record) -> Image.Image:
    """Draw a described sample, with a little pixel noise."""
    d = record.payload
    scale = 2
    size = d["image_size"] * scale
    image = Image.new("RGB", (size, size), tuple(d["background_rgb"]))
    draw = ImageDraw.Draw(image)
    cx, cy, r = d["center"][0] * scale, d["center"][1] * scale, d["radius"] * scale
    colour = tuple(d["rgb"])
    if d["shape"] == "circle":
        draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=colour)
    else:
        outline = {
            "square": [(-0.8, -0.8), (0.8, -0.8), (0.8, 0.8), (-0.8, 0.8)],
            "triangle": [(0.0, -1.0), (0.87, 0.6), (-0.87, 0.6)],
            "cross": [
                (-0.3, -1), (0.3, -1), (0.3, -0.3), (1, -0.3), (1, 0.3), (0.3, 0.3),
                (0.3, 1), (-0.3, 1), (-0.3, 0.3), (-1, 0.3), (-1, -0.3), (-0.3, -0.3),
            ],
        }[d["shape"]]  # fmt: skip
        cos, sin = math.cos(math.radians(d["angle"])), math.sin(math.radians(d["angle"]))
        points = [(cx + r * (x * cos - y * sin), cy + r * (x * sin + y * cos)) for x, y in outline]
        draw.polygon(points, fill=colour)
    image = image.reduce(scale)  # box-average the 2x drawing: anti-aliased edges
    shape = (d["image_size"], d["image_size"], 3)
    noise = np.random.default_rng(d["noise_seed"]).integers(-10, 11, shape, dtype=np.int16)
    return Image.fromarray(np.clip(np.asarray(image, dtype=np.int16) + noise, 0, 255).astype(np.uint8))


def write_synthetic_dataset(
    out_dir: str | Path,
    *,
    seed: int = 0,
    train_samples: int = 20000,
    test_samples: int = 1000,
    image_size: int = 64,
    caption_noise: float = 0.0,
    samples_per_shard: int = 1250,
    workers: int = 1,
) -> dict[str, int]:
    """Write the dataset in the shared layout (train/, test/, classnames, templates); sample counts.

    The default 20,000 training samples make 16 equal shards, which split evenly over 1, 2, 4, 8 or 16
    processes x workers. `caption_noise`: this fraction of the training captions name a wrong colour-shape
    pair, drawn from the seed (the true class stays in KEY.json's `label`; the test split stays clean).
    """
    if not 0.0 <= caption_noise <= 1.0:
        raise ClipkitError(f"synthetic: caption_noise must be in [0, 1], got {caption_noise}")
    rng = random.Random(stable_seed(seed, "synthetic-caption-noise"))
    noisy = set(rng.sample(range(train_samples), round(train_samples * caption_noise)))
    train = []
    for i in range(train_samples):
        record = describe_sample(seed, "train", i, image_size)
        if i in noisy:  # a wrong class, drawn from the sample alone: the same whatever else is noisy
            wrong = random.Random(stable_seed(seed, "synthetic-wrong-class", i)).randrange(
                len(CLASSNAMES) - 1
            )
            wrong += wrong >= record.label  # skip the true class
            record = describe_sample(seed, "train", i, image_size, caption_label=wrong)
        train.append(record)
    results = write_classification_dataset(
        out_dir,
        train=train,
        test=[describe_sample(seed, "test", i, image_size) for i in range(test_samples)],
        classnames=CLASSNAMES,
        templates=ZEROSHOT_TEMPLATES,
        load_image=render,
        samples_per_shard=samples_per_shard,
        image_options=ImageOptions(format="jpg", quality=90),
        workers=workers,
        info={"dataset": "clipkit synthetic shapes", "seed": seed, "image_size": image_size},
    )
    return {split: result.samples for split, result in results.items()}
