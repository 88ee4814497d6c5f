"""One data layer: one decoder and one tolerant shard reader for training, evaluation and the index;
light imports and no import circles; the augmentation config reaches the training transform."""

from __future__ import annotations

import ast
import io
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import webdataset as wds
from accelerate.state import AcceleratorState
from PIL import Image

from conftest import REPO_ROOT, subprocess_env
from test_configs import compose_config


@pytest.fixture(autouse=True)
def _fresh_accelerate_state():
    # Accelerate keeps its state in a process-wide singleton; each run here starts its own.
    AcceleratorState._reset_state(True)
    yield
    AcceleratorState._reset_state(True)


def bmp_bytes(index: int, size: int = 16) -> bytes:
    pixels = np.zeros((size, size, 3), dtype=np.uint8)
    pixels[..., index % 3] = 40 + 20 * (index % 10)
    out = io.BytesIO()
    Image.fromarray(pixels).save(out, format="BMP")
    return out.getvalue()


def write_tar(path: Path, samples: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with wds.TarWriter(str(path)) as writer:
        for sample in samples:
            writer.write(sample)


def corrupt_tar(path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"this is not a tar archive" * 40)


@pytest.fixture
def bmp_data(tmp_path) -> dict[str, Path]:
    """BMP train shards; val shards and a zero-shot dataset each with one readable and one corrupt tar."""
    train = tmp_path / "train"
    for shard in range(2):
        write_tar(
            train / f"{shard:05d}.tar",
            [
                {"__key__": f"t{shard}_{i:03d}", "bmp": bmp_bytes(i), "txt": f"colour {i % 3}"}
                for i in range(16)
            ],
        )
    val = tmp_path / "val"
    write_tar(
        val / "00000.tar",
        [{"__key__": f"v{i:03d}", "bmp": bmp_bytes(i), "txt": f"colour {i % 3}"} for i in range(6)],
    )
    corrupt_tar(val / "00001.tar")
    zeroshot = tmp_path / "zeroshot"
    write_tar(
        zeroshot / "test" / "0.tar",
        [{"__key__": f"z{i:03d}", "bmp": bmp_bytes(i), "cls": str(i % 3)} for i in range(6)],
    )
    corrupt_tar(zeroshot / "test" / "1.tar")
    (zeroshot / "test" / "nshards.txt").write_text("2\n")
    (zeroshot / "classnames.txt").write_text("red\ngreen\nblue\n")
    return {"train": train, "val": val, "zeroshot": zeroshot}


def data_overrides(data: dict[str, Path]) -> list[str]:
    return [
        "model=tiny",
        "data=shards",
        f"data.train_shards={data['train']}",
        f"data.val_shards={data['val']}",
        f"data.zeroshot_dataset={data['zeroshot']}",
        "data.batch_size=8",
        "data.workers=0",
        "data.shuffle_buffer=0",
    ]


def test_bmp_shards_train_and_corrupt_eval_tars_are_skipped_and_counted(bmp_data, tmp_path):
    from clipkit.train.loop import run

    out = tmp_path / "run"
    metrics = run(
        compose_config(
            *data_overrides(bmp_data),
            "train.steps=3",
            "train.log_every=1",
            "train.eval_every=2",
            f"output_dir={out}",
        )  # fmt: skip
    )
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in records if "loss" in r]
    assert [r["step"] for r in steps] == [1, 2, 3] and all(
        r["bad_samples"] == 0 for r in steps
    )  # bmp decodes
    # The evaluation during training (step 2) and the final one both read past the corrupt tars.
    evaluations = [r for r in records if "zeroshot/acc1" in r]
    assert [r["step"] for r in evaluations] == [2, 3]
    for record in evaluations:
        assert record["zeroshot/bad_shards"] == 1 and record["retrieval/bad_shards"] == 1
        assert record["zeroshot/skipped_images"] == 0
    assert metrics["zeroshot/bad_shards"] == 1 and 0.0 <= metrics["zeroshot/acc1"] <= 1.0
    assert (out / "model" / "open_clip_model.safetensors").is_file()
    for picture in ("curves.png", "confusion_matrix.png", "top_images.png"):
        assert (out / "pictures" / picture).stat().st_size > 1000


def test_zeroshot_evaluation_reports_the_corrupt_shard(bmp_data):
    from clipkit.eval import evaluate_zeroshot, open_eval_dataset
    from clipkit.models import build_model

    bundle = build_model("tiny")
    result = evaluate_zeroshot(
        bundle.model,
        bundle.tokenizer,
        open_eval_dataset(str(bmp_data["zeroshot"])),
        transform=bundle.eval_transform,
    )
    assert result.num_images == 6 and result.skipped == []
    assert [s.url for s in result.bad_shards] == [str(bmp_data["zeroshot"] / "test" / "1.tar")]


def test_data_augmentation_reaches_the_training_transform(bmp_data, tmp_path):
    from clipkit.train.loop import Trainer

    def train_transform(*overrides: str, eval_transform: bool = False) -> str:
        trainer = Trainer(
            compose_config(*data_overrides(bmp_data), f"output_dir={tmp_path / 'run'}", *overrides)
        )
        try:
            return repr(trainer.bundle.eval_transform if eval_transform else trainer.bundle.train_transform)
        finally:
            trainer.close()
            AcceleratorState._reset_state(True)

    default = train_transform()
    AcceleratorState._reset_state(True)
    augmented = train_transform(
        "+data.augmentation={scale:[0.5,1.0],color_jitter:[0.4,0.4,0.4,0.1],color_jitter_prob:0.8,gray_scale_prob:0.2}"
    )
    assert "scale=(0.9, 1.0)" in default and "color_jitter" not in default
    # open_clip's own random colour jitter and grey-scale stages
    assert "scale=(0.5, 1.0)" in augmented and "color_jitter" in augmented and "gray_scale" in augmented
    # A preset by name: `none` trains on the eval transform; `light` is a wider crop.
    assert train_transform("data.augmentation=none") == train_transform(eval_transform=True)
    assert "scale=(0.7, 1.0)" in train_transform("data.augmentation=light")


def test_unknown_augmentation_key_is_refused(tmp_path):
    from clipkit.data import DataConfig
    from clipkit.errors import ClipkitError

    with pytest.raises(ClipkitError, match=r"augmentation: unknown key\(s\) \['scal'\]"):
        DataConfig(augmentation={"scal": [0.5, 1.0]})


@pytest.mark.parametrize(
    "module", ["clipkit.data.inputs", "clipkit.retrieval.sources", "clipkit.data.images"]
)
def test_light_modules_import_no_torch(module):
    code = (
        f"import sys, {module}; "
        "heavy = [m for m in ('torch', 'webdataset', 'faiss', 'open_clip') if m in sys.modules]; "
        "print(heavy); sys.exit(1 if heavy else 0)"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], env=subprocess_env(), capture_output=True, text=True
    )
    assert result.returncode == 0, f"{module} imports {result.stdout.strip()} {result.stderr[-500:]}"


def _module_level_imports(path: Path, module: str) -> set[str]:
    """clipkit modules `module` imports when it is imported (not inside functions or TYPE_CHECKING)."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    package = module if path.name == "__init__.py" else module.rsplit(".", 1)[0]
    found = set()
    for node in tree.body:
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join(
                    package.split(".")[: len(package.split(".")) - node.level + 1] + ([base] if base else [])
                )
            found.add(base)
            found.update(f"{base}.{alias.name}" for alias in node.names)
    return {name for name in found if name.startswith("clipkit")}


def test_clipkit_has_no_import_circles():
    root = REPO_ROOT / "src"
    modules = {
        ".".join(path.relative_to(root).with_suffix("").parts).removesuffix(".__init__"): path
        for path in root.joinpath("clipkit").rglob("*.py")
    }
    graph = {
        name: _module_level_imports(path, name) & set(modules) - {name} for name, path in modules.items()
    }
    cycles = []

    def visit(name: str, trail: list[str]) -> None:
        if name in trail:
            cycles.append(trail[trail.index(name) :] + [name])
            return
        if name in done:
            return
        for target in sorted(graph[name]):
            visit(target, trail + [name])
        done.add(name)

    done: set[str] = set()
    for name in sorted(graph):
        visit(name, [])
    assert not cycles, "import circles: " + "; ".join(" -> ".join(c) for c in cycles[:5])


def test_eval_and_retrieval_use_the_data_layer_decoder():
    """One set of image extensions: what training decodes, evaluation and the index decode too."""
    from clipkit.data import images, stream
    from clipkit.eval import datasets, loader
    from clipkit.retrieval import embed, sources

    assert stream.decode_sample_image is loader.decode_sample_image is images.decode_sample_image
    assert embed.decode_image is images.decode_image
    assert datasets.is_image_file is sources.is_image_file is images.is_image_file
    assert sources.IMAGE_EXTENSIONS is images.IMAGE_EXTENSIONS
    for ext in ("bmp", "gif", "tiff", "webp", "jpg"):
        assert images.image_field({"__key__": "k", ext: b""}) == ext
