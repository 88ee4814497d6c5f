"""The demo datasets (generated shapes, scikit-learn digits) and prepare_data's cache."""

from __future__ import annotations

import collections
import hashlib
import io
import json
import multiprocessing

import numpy as np
import pytest
from omegaconf import OmegaConf
from PIL import Image

from clipkit.cli.main import main as clipkit_main
from clipkit.data import DataConfig, prepare_data
from clipkit.data.prepare import ensure_generated
from clipkit.data.shards import iter_shard_samples
from clipkit.data.synthetic import CLASSNAMES, COLOURS, write_synthetic_dataset
from clipkit.errors import ClipkitError
from clipkit.train.schema import compose_config


def samples_of(directory) -> list[dict]:
    return [
        s for shard in sorted(directory.glob("*.tar")) for s in iter_shard_samples(str(shard), pytest.fail)
    ]


def file_digests(directory) -> dict[str, str]:
    return {
        str(p.relative_to(directory)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(directory.rglob("*"))
        if p.is_file()
    }


def test_synthetic_dataset_is_deterministic_and_its_captions_name_what_is_drawn(tmp_path):
    counts = write_synthetic_dataset(
        tmp_path / "a", seed=3, train_samples=60, test_samples=40, samples_per_shard=25
    )
    assert counts == {"train": 60, "test": 40}
    write_synthetic_dataset(tmp_path / "b", seed=3, train_samples=60, test_samples=40, samples_per_shard=25)
    assert file_digests(tmp_path / "a") == file_digests(tmp_path / "b")
    write_synthetic_dataset(tmp_path / "c", seed=4, train_samples=60, test_samples=40, samples_per_shard=25)
    assert file_digests(tmp_path / "a") != file_digests(tmp_path / "c")

    root = tmp_path / "a"
    assert (root / "classnames.txt").read_text().splitlines() == list(CLASSNAMES)
    assert all("{c}" in t for t in (root / "zeroshot_classification_templates.txt").read_text().splitlines())
    assert sorted(p.name for p in (root / "train").glob("*.tar")) == ["00000.tar", "00001.tar", "00002.tar"]
    for sample in samples_of(root / "train"):
        meta, caption = json.loads(sample["json"]), sample["txt"].decode()
        assert (
            f"{meta['colour']} {meta['shape']}" in caption and meta["classname"] == CLASSNAMES[meta["label"]]
        )
        image = np.asarray(Image.open(io.BytesIO(sample["jpg"])).convert("RGB"), dtype=np.float32)
        # The shape's colour is in the picture: some pixel is close to it.
        distance = np.abs(image - np.asarray(COLOURS[meta["colour"]], dtype=np.float32)).sum(-1).min()
        assert distance < 90, (caption, distance)
    test = samples_of(root / "test")
    assert (root / "test" / "nshards.txt").read_text().strip() == "2"
    assert collections.Counter(int(s["cls"]) for s in test) == {label: 2 for label in range(20)}


def test_bundled_digits_are_scikit_learns():
    """clipkit ships the digits file so the Quickstart needs no scikit-learn; it reads what scikit-learn reads."""
    sklearn_datasets = pytest.importorskip("sklearn.datasets")
    from clipkit.data.digits import load_digits_arrays

    images, labels = load_digits_arrays()
    reference = sklearn_datasets.load_digits()
    np.testing.assert_array_equal(images, reference.images)
    np.testing.assert_array_equal(labels, reference.target)


def test_digits_dataset_builds_with_a_stratified_split(tmp_path, capsys):
    pytest.importorskip("sklearn")
    assert clipkit_main(["shards", "digits", "--out", str(tmp_path / "digits")]) == 0
    assert "wrote 1258 train and 539 test samples" in capsys.readouterr().out
    root = tmp_path / "digits"
    classnames = (root / "classnames.txt").read_text().splitlines()
    assert classnames == ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]
    train, test = samples_of(root / "train"), samples_of(root / "test")
    from sklearn.datasets import load_digits

    digits = load_digits()
    per_class = collections.Counter(digits.target.tolist())
    test_labels = collections.Counter(int(s["cls"]) for s in test)
    for label, count in per_class.items():
        assert test_labels[label] == round(count * 0.3)
    for sample in train:
        meta = json.loads(sample["json"])
        caption = sample["txt"].decode()
        assert classnames[meta["label"]] in caption or str(meta["label"]) in caption
        # The image is the scan it says it is: shrunk back to 8x8 it matches the original closely.
        image = np.asarray(
            Image.open(io.BytesIO(sample["png"])).resize((8, 8), Image.Resampling.BOX), dtype=float
        )
        original = 255 * (1 - digits.images[meta["sklearn_index"]] / 16)
        assert np.abs(image - original).mean() < 25
    assert len({json.loads(s["json"])["sklearn_index"] for s in train}) == len(train) == 1797 - len(test)


def _compose_data(option: str) -> dict:
    cfg = compose_config(f"data={option}")
    return OmegaConf.to_container(cfg.data, resolve=True)


def test_synthetic_config_works_on_a_fresh_machine(tmp_path, monkeypatch):
    monkeypatch.setenv("CLIPKIT_CACHE", str(tmp_path / "cache"))
    values = _compose_data("synthetic")
    values["generate"].update(train_samples=50, test_samples=20)  # small, for the test
    values["generate"]["dir"] = values["generate"]["dir"].replace("20000", "50")
    for key in ("train_shards", "val_shards", "zeroshot_dataset"):
        values[key] = values[key].replace("20000", "50")
    cfg = prepare_data(DataConfig.from_dict(values))
    root = tmp_path / "cache" / "datasets" / "synthetic-seed0-50x64px-test1000-noise0.0"
    assert cfg.train_sources == [[str(root / "train" / "00000.tar")]]
    assert cfg.val_sources == [[str(root / "test" / "0.tar")]]
    assert cfg.zeroshot_dataset == str(root)
    stamp = (root / "train" / "00000.tar").stat().st_mtime_ns
    prepare_data(DataConfig.from_dict(values))  # idempotent: nothing rebuilt
    assert (root / "train" / "00000.tar").stat().st_mtime_ns == stamp
    values["generate"]["test_samples"] = 21
    with pytest.raises(ClipkitError, match="exists but does not hold the generated dataset"):
        prepare_data(DataConfig.from_dict(values))


def test_a_dataset_recorded_with_fewer_options_matches_when_the_rest_are_defaults(tmp_path):
    # Written by a caller (or an older clipkit) that named only some options: the config, which names all of
    # them at their defaults, reuses it; a non-default value is another dataset and is refused.
    target = tmp_path / "digits"
    ensure_generated(
        {"name": "digits", "dir": str(target), "seed": 0, "test_fraction": 0.3, "image_size": 32}
    )
    stamp = (target / "test" / "0.tar").stat().st_mtime_ns
    full = _compose_data("digits")["generate"]
    assert {"train_fraction", "caption_noise", "captions_per_sample"} <= set(full)
    assert ensure_generated({**full, "dir": str(target)}) == target
    assert (target / "test" / "0.tar").stat().st_mtime_ns == stamp  # reused, not rebuilt
    with pytest.raises(ClipkitError, match="exists but does not hold the generated dataset"):
        ensure_generated({**full, "dir": str(target), "caption_noise": 0.3})
    with pytest.raises(ClipkitError, match="exists but does not hold the generated dataset"):
        ensure_generated({"name": "synthetic", "dir": str(target)})


def test_digits_config_points_at_its_test_split_for_zero_shot(tmp_path, monkeypatch):
    monkeypatch.setenv("CLIPKIT_CACHE", str(tmp_path))
    cfg = prepare_data(DataConfig.from_dict(_compose_data("digits")))
    root = tmp_path / "datasets" / "digits-seed0-32px-test0.3-train1.0-noise0.0-captions1"
    assert cfg.zeroshot_dataset == str(root) and (root / "test" / "nshards.txt").is_file()
    assert [len(s) for s in cfg.train_sources] == [1]


def _prepare_in_child(values, queue):
    cfg = prepare_data(DataConfig.from_dict(values))
    queue.put(cfg.train_sources)


def test_processes_preparing_at_once_build_the_dataset_once(tmp_path):
    values = {
        "generate": {
            "name": "synthetic",
            "dir": str(tmp_path / "shapes"),
            "train_samples": 30,
            "test_samples": 5,
        },
        "train_shards": str(tmp_path / "shapes" / "train"),
    }
    context = multiprocessing.get_context("fork")
    queue = context.Queue()
    children = [context.Process(target=_prepare_in_child, args=(values, queue)) for _ in range(3)]
    for child in children:
        child.start()
    results = [queue.get(timeout=120) for _ in children]
    for child in children:
        child.join(timeout=60)
        assert child.exitcode == 0
    assert results == [[[str(tmp_path / "shapes" / "train" / "00000.tar")]]] * 3
    assert sorted(p.name for p in tmp_path.iterdir()) == [".shapes.lock", "shapes"]  # no staging left
