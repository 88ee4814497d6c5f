"""Each evaluation-set layout reads to the same samples, labels and captions; bad layouts fail clearly.

The helpers at the top write small deterministic datasets in every layout; the other eval test modules
import them from here.
"""

from __future__ import annotations

import io
import json
import math
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
import torchvision.transforms.functional as TF
from PIL import Image

from clipkit.errors import ClipkitError
from clipkit.eval import EvalLoader, open_eval_dataset, openai_imagenet_templates
from clipkit.models import build_model, export_model

CLASSNAMES = [
    "red square",
    "green circle",
    "blue triangle",
    "yellow star",
    "purple cross",
    "black dot",
    "white",
]
TEMPLATES = ["a photo of a {c}.", "a drawing of the {c}.", "{c}"]
FORMATS = ("jpg", "png", "webp")

# Small towers: a forward pass over a hundred 32 px images takes well under a second on a CPU.
SMALL_MODEL = {
    "name": "eval-small",
    "embed_dim": 32,
    "vision_cfg": {"image_size": 32, "patch_size": 8, "layers": 2, "width": 64, "head_width": 32},
    "text_cfg": {"context_length": 16, "width": 64, "heads": 2, "layers": 2},
}


def make_images(count: int, *, seed: int = 0, size: tuple[int, int] = (40, 36)) -> list[Image.Image]:
    """Deterministic RGB images: a random colour field plus noise, so a random model tells them apart."""
    rng = np.random.default_rng(seed)
    images = []
    for _ in range(count):
        base = rng.integers(0, 256, size=3)
        noise = rng.normal(0, 40, size=(size[1], size[0], 3))
        pixels = np.clip(base + noise, 0, 255).astype(np.uint8)
        images.append(Image.fromarray(pixels))
    return images


def encode(image: Image.Image, fmt: str) -> bytes:
    buffer = io.BytesIO()
    image.save(
        buffer, format={"jpg": "JPEG"}.get(fmt, fmt.upper()), **({"lossless": True} if fmt == "webp" else {})
    )
    return buffer.getvalue()


def write_tar(path: Path, samples: list[dict[str, bytes]]) -> None:
    """A webdataset shard: one tar member KEY.EXT per entry, samples in order."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with tarfile.open(path, "w") as tar:
        for sample in samples:
            key = sample["__key__"]
            for ext, data in sample.items():
                if ext == "__key__":
                    continue
                info = tarfile.TarInfo(f"{key}.{ext}")
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))


def split_into_shards(samples: list, num_shards: int) -> list[list]:
    per_shard = math.ceil(len(samples) / num_shards)
    return [samples[i : i + per_shard] for i in range(0, len(samples), per_shard)]


def write_clip_benchmark_dir(
    root: Path,
    images: list[Image.Image],
    *,
    labels: list[int] | None = None,
    captions: list[list[str]] | None = None,
    classnames: list[str] = CLASSNAMES,
    templates: list[str] = TEMPLATES,
    num_shards: int = 2,
    split: str = "test",
    formats: tuple[str, ...] = FORMATS,
) -> Path:
    """A CLIP_benchmark wds directory, as `clip_benchmark_export_wds` writes one (retrieval with captions)."""
    samples = []
    for i, image in enumerate(images):
        fmt = formats[i % len(formats)]
        sample = {"__key__": f"s{i:05d}", fmt: encode(image, fmt)}
        if captions is not None:
            sample["txt"] = "\n".join(captions[i]).encode()
        else:
            sample["cls"] = str(labels[i]).encode()
        samples.append(sample)
    shards = split_into_shards(samples, num_shards)
    for n, shard in enumerate(shards):
        write_tar(root / split / f"{n}.tar", shard)
    (root / split / "nshards.txt").write_text(str(len(shards)))
    if captions is not None:
        (root / "dataset_type.txt").write_text("retrieval")
    else:
        (root / "classnames.txt").write_text("\n".join(classnames) + "\n")
        (root / "zeroshot_classification_templates.txt").write_text("\n".join(templates) + "\n")
    return root


def write_labelled_shards(
    folder: Path,
    images: list[Image.Image],
    labels: list[int],
    *,
    classnames=CLASSNAMES,
    num_shards: int = 3,
    formats: tuple[str, ...] = ("jpg", "png"),
) -> Path:
    """img2dataset layout with clipkit's labels: KEY.jpg + KEY.txt + KEY.json {"label", "classname"}."""
    samples = [
        {
            "__key__": f"{i:09d}",
            "jpg": encode(image, formats[i % len(formats)]),  # PIL reads the content, whatever the name
            "txt": f"a photo of a {classnames[label]}".encode(),
            "json": json.dumps({"label": label, "classname": classnames[label]}).encode(),
        }
        for i, (image, label) in enumerate(zip(images, labels, strict=True))
    ]
    for n, shard in enumerate(split_into_shards(samples, num_shards)):
        write_tar(folder / f"{n:05d}.tar", shard)
    return folder


def write_captioned_shards(
    folder: Path, images: list[Image.Image], captions: list[list[str]], *, num_shards: int = 2
) -> Path:
    """img2dataset layout for retrieval: KEY.jpg + KEY.txt (one caption per line)."""
    samples = [
        {"__key__": f"{i:09d}", "jpg": encode(image, FORMATS[i % 3]), "txt": "\n".join(caps).encode()}
        for i, (image, caps) in enumerate(zip(images, captions, strict=True))
    ]
    for n, shard in enumerate(split_into_shards(samples, num_shards)):
        write_tar(folder / f"{n:05d}.tar", shard)
    return folder


def write_class_folders(
    root: Path, images: list[Image.Image], labels: list[int], *, classnames=CLASSNAMES
) -> Path:
    for i, (image, label) in enumerate(zip(images, labels, strict=True)):
        folder = root / classnames[label]
        folder.mkdir(parents=True, exist_ok=True)
        image.save(folder / f"img{i:04d}.png")
    return root


def small_model_bundle(*, seed: int = 0, **build_options):
    """The small towers with fixed random weights, moved off their initialisation (seeded end to end)."""
    torch.manual_seed(seed)
    bundle = build_model(SMALL_MODEL, **build_options)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for parameter in bundle.model.parameters():
            parameter.add_(0.05 * torch.randn(parameter.shape, generator=generator))
    return bundle


def export_small_model(out: Path, *, seed: int = 0) -> Path:
    """`small_model_bundle` (CLIP logit scale) exported for open_clip."""
    return export_model(small_model_bundle(seed=seed, init_logit_scale=math.log(1 / 0.07)), out)


def labels_for(count: int, num_classes: int = len(CLASSNAMES)) -> list[int]:
    return [(i * 3) % num_classes for i in range(count)]


def read_all(dataset, **loader_options):
    transform = TF.pil_to_tensor
    loader = EvalLoader(
        dataset, transform=transform, batch_size=loader_options.pop("batch_size", 8), **loader_options
    )
    images, targets, indices = [], [], []
    for batch in loader:
        images.extend(batch.images)
        targets.extend(batch.labels.tolist() if batch.labels is not None else batch.captions)
        indices.extend(batch.indices.tolist())
    return images, targets, indices, loader.skipped


# ---------------------------------------------------------------------------------------------- tests


def test_clip_benchmark_dir_reads_images_labels_names_and_templates(tmp_path):
    images = make_images(20)
    labels = labels_for(20)
    root = write_clip_benchmark_dir(tmp_path / "cb", images, labels=labels)
    dataset = open_eval_dataset(root)
    assert (dataset.layout, dataset.task) == ("clip_benchmark_wds", "classification")
    assert dataset.classnames == CLASSNAMES and dataset.templates == TEMPLATES
    assert dataset.count_samples() == 20
    pixels, targets, indices, skipped = read_all(dataset)
    assert indices == list(range(20)) and targets == labels and skipped == []
    for i in (0, 1, 2):  # jpg, png, webp: the pixels PIL decodes from the stored bytes
        expected = TF.pil_to_tensor(Image.open(io.BytesIO(encode(images[i], FORMATS[i]))).convert("RGB"))
        assert torch.equal(pixels[i], expected)
    assert torch.equal(pixels[1], TF.pil_to_tensor(images[1]))  # png is lossless


def test_class_folders_take_sorted_folder_names_and_override_them(tmp_path):
    images = make_images(14)
    labels = labels_for(14)
    root = write_class_folders(tmp_path / "folders", images, labels)
    dataset = open_eval_dataset(root)
    assert dataset.layout == "class_folders"
    assert dataset.classnames == sorted(CLASSNAMES)
    assert dataset.templates == openai_imagenet_templates() and len(dataset.templates) == 80
    _, targets, _, _ = read_all(dataset)
    assert [sorted(CLASSNAMES)[t] for t in targets] == sorted(CLASSNAMES[label] for label in labels)
    names = tmp_path / "names.txt"
    names.write_text("\n".join(f"class {i}" for i in range(7)) + "\n\n")
    assert open_eval_dataset(root, classnames=names).classnames == [f"class {i}" for i in range(7)]


def test_labelled_shards_take_labels_from_json_and_names_from_the_parent(tmp_path):
    images = make_images(12, seed=3)
    labels = labels_for(12)
    # clipkit's generated datasets: train/ shards in img2dataset layout, classnames.txt beside them.
    root = tmp_path / "generated"
    write_labelled_shards(root / "train", images, labels)
    (root / "classnames.txt").write_text("\n".join(CLASSNAMES))
    templates = tmp_path / "templates.txt"
    templates.write_text("itap of a {c}.\n\n  a {c} in the wild.\n")
    for source in (root / "train", root / "train" / "00001.tar", str(root / "train" / "{00000..00002}.tar")):
        dataset = open_eval_dataset(source, templates=templates)
        assert (dataset.layout, dataset.classnames) == ("labelled_shards", CLASSNAMES)
        assert dataset.templates == ["itap of a {c}.", "a {c} in the wild."]
    dataset = open_eval_dataset(str(root / "train" / "*.tar"), classnames=root / "classnames.txt")
    _, targets, indices, _ = read_all(dataset)
    assert targets == labels and indices == list(range(12))


def test_captioned_shards_and_clip_benchmark_retrieval_dir_read_the_same_captions(tmp_path):
    images = make_images(9, seed=4)
    captions = [[f"caption {i}.{j}" for j in range(1 + i % 3)] for i in range(9)]
    shards = open_eval_dataset(write_captioned_shards(tmp_path / "shards", images, captions))
    cb_dir = open_eval_dataset(write_clip_benchmark_dir(tmp_path / "cb", images, captions=captions))
    assert (shards.layout, shards.task) == ("captioned_shards", "retrieval")
    assert (cb_dir.layout, cb_dir.task) == ("clip_benchmark_wds", "retrieval")
    for dataset in (shards, cb_dir):
        _, targets, indices, _ = read_all(dataset, batch_size=4)
        assert targets == captions and indices == list(range(9))


@pytest.mark.parametrize("world_size,workers", [(1, 0), (1, 2), (3, 0), (2, 2)])
def test_ranks_and_workers_see_every_sample_exactly_once(tmp_path, world_size, workers):
    labels = labels_for(23)
    root = write_clip_benchmark_dir(tmp_path / "cb", make_images(23, seed=5), labels=labels, num_shards=3)
    dataset = open_eval_dataset(root)
    seen = []
    for rank in range(world_size):
        loader = EvalLoader(
            dataset,
            transform=TF.pil_to_tensor,
            batch_size=4,
            rank=rank,
            world_size=world_size,
            workers=workers,
        )
        rank_indices = [i for batch in loader for i in batch.indices.tolist()]
        for batch in loader:
            assert batch.labels.tolist() == [labels[i] for i in batch.indices.tolist()]
        assert sorted(rank_indices) == list(range(rank, 23, world_size))
        assert loader.count_samples() == len(rank_indices)
        seen.extend(rank_indices)
    assert sorted(seen) == list(range(23))


def test_undecodable_images_are_skipped_and_counted_per_rank(tmp_path):
    root = write_clip_benchmark_dir(
        tmp_path / "cb", make_images(10, seed=6), labels=labels_for(10), num_shards=1
    )
    # Replace samples 3 and 8 with bytes that are not an image.
    shard = root / "test" / "0.tar"
    with tarfile.open(shard) as tar:
        members = [(m, tar.extractfile(m).read()) for m in tar.getmembers()]
    with tarfile.open(shard, "w") as tar:
        for member, data in members:
            if member.name.startswith(("s00003.", "s00008.")) and not member.name.endswith(".cls"):
                data = b"not an image"
                member.size = len(data)
            tar.addfile(member, io.BytesIO(data))
    dataset = open_eval_dataset(root)
    _, _, indices, skipped = read_all(dataset, workers=2, batch_size=3)
    assert sorted(indices) == [0, 1, 2, 4, 5, 6, 7, 9]
    assert sorted(s.key for s in skipped) == ["s00003", "s00008"]
    assert all("cannot decode" in s.reason for s in skipped)
    skipped_by_rank = [read_all(dataset, rank=r, world_size=2)[3] for r in range(2)]
    assert [[s.key for s in ranks] for ranks in skipped_by_rank] == [["s00008"], ["s00003"]]


def test_unknown_layout_lists_the_supported_ones(tmp_path):
    (tmp_path / "notes.txt").write_text("hello")
    with pytest.raises(ClipkitError) as error:
        open_eval_dataset(tmp_path)
    message = str(error.value)
    assert "\n" not in message and str(tmp_path) in message
    for layout in (
        "CLIP_benchmark wds directory",
        "class sub-folders",
        "webdataset shards",
        "--task retrieval",
    ):
        assert layout in message
    with pytest.raises(ClipkitError, match="not found"):
        open_eval_dataset(tmp_path / "missing")


def test_class_count_and_label_mismatches_are_named(tmp_path):
    root = write_class_folders(tmp_path / "folders", make_images(7), labels_for(7))
    names = tmp_path / "names.txt"
    names.write_text("a\nb\nc\n")
    with pytest.raises(
        ClipkitError, match=r"names.txt lists 3 class names but .*folders has 7 class folders"
    ):
        open_eval_dataset(root, classnames=names)

    cb = write_clip_benchmark_dir(tmp_path / "cb", make_images(6), labels=[0, 1, 2, 3, 9, 1], num_shards=1)
    dataset = open_eval_dataset(cb)
    with pytest.raises(
        ClipkitError, match=r"sample s00004 in .*0.tar has label 9 but the dataset has 7 class names"
    ):
        read_all(dataset, workers=1)

    shards = write_captioned_shards(tmp_path / "captions", make_images(3), [["a"], ["b"], ["c"]])
    with pytest.raises(
        ClipkitError, match=r"has no label: expected 000000000.cls or 000000000.json .*--task retrieval"
    ):
        read_all(open_eval_dataset(shards, task="classification", classnames=names))
    with pytest.raises(ClipkitError, match="has no class names: pass --classnames"):
        open_eval_dataset(write_labelled_shards(tmp_path / "nonames", make_images(3), [0, 1, 2]))


def test_bad_templates_and_classnames_files_are_named(tmp_path):
    root = write_class_folders(tmp_path / "folders", make_images(7), labels_for(7))
    bad = tmp_path / "bad.txt"
    bad.write_text("a photo of a thing.\n")
    with pytest.raises(ClipkitError, match=r"template 'a photo of a thing.' has no \{c\} placeholder"):
        open_eval_dataset(root, templates=bad)
    bad.write_text("a {c} with {braces}\n")
    with pytest.raises(ClipkitError, match="does not fill with"):
        open_eval_dataset(root, templates=bad)
    per_class = tmp_path / "cupl.json"
    per_class.write_text(json.dumps({name: [f"a {name}"] for name in sorted(CLASSNAMES)[:-1]}))
    with pytest.raises(
        ClipkitError, match=r"per-class prompts are missing for 1 class\(es\), e.g. \['yellow star'\]"
    ):
        open_eval_dataset(root, templates=per_class)
    per_class.write_text("{'not': json}")
    with pytest.raises(ClipkitError, match=r"cupl.json is not valid JSON \(Expecting property name"):
        open_eval_dataset(root, templates=per_class)
    names = tmp_path / "names.txt"
    names.write_text("a\n\nc\n")
    with pytest.raises(ClipkitError, match="names.txt: line 2 is empty"):
        open_eval_dataset(root, classnames=names)
    cb = write_clip_benchmark_dir(tmp_path / "cb", make_images(2), captions=[["x"], ["y"]])
    with pytest.raises(ClipkitError, match="is a CLIP_benchmark retrieval dataset .*--task retrieval"):
        open_eval_dataset(cb, task="classification")
    with pytest.raises(
        ClipkitError, match=r"has no split 'val' \(val/nshards.txt\); it has: test. Pass --split"
    ):
        open_eval_dataset(cb, split="val")
