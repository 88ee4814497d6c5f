"""`clipkit zeroshot` as a user runs it: every layout, the cache, the plot, skipped images, bad input."""

from __future__ import annotations

import json
import re

import pytest
from PIL import Image

from clipkit.cli.main import main
from conftest import run_clipkit
from test_eval_datasets import (
    CLASSNAMES,
    TEMPLATES,
    export_small_model,
    labels_for,
    make_images,
    write_captioned_shards,
    write_class_folders,
    write_clip_benchmark_dir,
    write_labelled_shards,
)

COUNT = 28


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return export_small_model(tmp_path_factory.mktemp("model") / "small")


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """The same images and labels in each classification layout (PNG, so pixels are identical)."""
    root = tmp_path_factory.mktemp("data")
    images, labels = make_images(COUNT, seed=21), labels_for(COUNT)
    (root / "classnames.txt").write_text("\n".join(CLASSNAMES) + "\n")
    (root / "templates.txt").write_text("\n".join(TEMPLATES) + "\n")
    return {
        "images": images,
        "labels": labels,
        "root": root,
        "cb": write_clip_benchmark_dir(root / "cb", images, labels=labels, formats=("png",)),
        "folders": write_class_folders(root / "folders", images, labels),
        "shards": write_labelled_shards(root / "shards", images, labels, formats=("png",)),
    }


def zeroshot(tmp_path, capsys, *args, expect=0):
    out = tmp_path / "results.json"
    code = main(
        ["zeroshot", *args, "--output", str(out), "--workers", "0", "--cache-dir", str(tmp_path / "cache")]
    )
    captured = capsys.readouterr()
    assert code == expect, captured.err
    return (json.loads(out.read_text()) if code == 0 else None), captured


def test_every_layout_gives_the_same_metrics(model_dir, data, tmp_path, capsys):
    common = ["--model", str(model_dir), "--batch-size", "8"]
    templates = ["--templates", str(data["root"] / "templates.txt")]
    cb, captured = zeroshot(tmp_path, capsys, *common, "--dataset", str(data["cb"]))
    folders, _ = zeroshot(tmp_path, capsys, *common, "--dataset", str(data["folders"]), *templates)
    shards, _ = zeroshot(
        tmp_path, capsys, *common, "--dataset", str(data["shards"]), "--classnames",
        str(data["root"] / "classnames.txt"), *templates,
    )  # fmt: skip
    assert [r["layout"] for r in (cb, folders, shards)] == [
        "clip_benchmark_wds",
        "class_folders",
        "labelled_shards",
    ]
    for result in (folders, shards):
        assert result["metrics"] == pytest.approx(cb["metrics"], abs=1e-9)
        assert result["num_images"] == COUNT and result["skipped_images"] == 0
        recall = dict(zip(result["classnames"], result["per_class_recall"], strict=True))
        assert recall == pytest.approx(
            dict(zip(cb["classnames"], cb["per_class_recall"], strict=True)), abs=1e-9
        )
    assert folders["classnames"] == sorted(CLASSNAMES)  # class folders: sorted folder names
    # The printed table: the dataset line and one line per CLIP_benchmark metric.
    lines = captured.out.strip().splitlines()
    assert lines[0].startswith(f"{data['cb']} (clip benchmark wds, 7 classes): {COUNT} images, 0 skipped")
    assert [line.split()[0] for line in lines[1:]] == ["acc1", "acc5", "mean_per_class_recall"]
    assert float(lines[1].split()[1]) == pytest.approx(cb["metrics"]["acc1"], abs=1e-4)


def test_text_classifier_is_cached_and_the_confusion_matrix_plotted(model_dir, data, tmp_path, capsys):
    args = [
        "--model",
        f"local-dir:{model_dir}",  # open_clip's spelling of a model directory
        "--dataset",
        str(data["cb"]),
        "--plot",
        str(tmp_path / "confusion.png"),
    ]
    first, _ = zeroshot(tmp_path, capsys, *args)
    second, _ = zeroshot(tmp_path, capsys, *args)
    assert first["text_classifier"]["from_cache"] is False and second["text_classifier"]["from_cache"] is True
    assert first["text_classifier"]["cache"] == second["text_classifier"]["cache"]
    assert first["metrics"] == second["metrics"]
    with Image.open(tmp_path / "confusion.png") as plot:
        assert plot.format == "PNG" and plot.width > 200
    uncached, _ = zeroshot(tmp_path, capsys, *args, "--no-cache")
    assert uncached["text_classifier"] == {"cache": None, "from_cache": False}


def test_undecodable_images_are_skipped_and_counted(model_dir, data, tmp_path, capsys):
    folders = write_class_folders(tmp_path / "folders", data["images"][:14], data["labels"][:14])
    (folders / CLASSNAMES[0] / "broken.png").write_bytes(b"\x89PNG not really")
    (folders / CLASSNAMES[1] / "empty.jpg").write_bytes(b"")
    result, captured = zeroshot(tmp_path, capsys, "--model", str(model_dir), "--dataset", str(folders))
    assert result["num_images"] == 14 and result["skipped_images"] == 2
    assert sorted(s["key"] for s in result["skipped"]) == sorted(
        [f"{CLASSNAMES[0]}/broken.png", f"{CLASSNAMES[1]}/empty.jpg"]
    )
    assert all("cannot decode" in s["reason"] for s in result["skipped"])
    assert "14 images, 2 skipped (undecodable)" in captured.out


def test_retrieval_on_captioned_shards(model_dir, data, tmp_path, capsys):
    captions = [[f"image {i}", f"caption {i % 4}"] for i in range(10)]
    shards = write_captioned_shards(tmp_path / "captions", data["images"][:10], captions)
    result, captured = zeroshot(
        tmp_path, capsys, "--model", str(model_dir), "--dataset", str(shards), "--recall-k", "1", "3"
    )
    assert result["task"] == "zeroshot_retrieval" and result["layout"] == "captioned_shards"
    assert sorted(result["metrics"]) == sorted(
        f"{d}_retrieval_recall@{k}" for d in ("image", "text") for k in (1, 3)
    )
    assert "10 images, 20 captions, 0 skipped" in captured.out


def error_of(capsys, *args):
    code = main(list(args))
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2
    return err[-1]


def test_bad_input_is_one_clear_line(model_dir, data, tmp_path, capsys):
    model = ["--model", str(model_dir)]
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "readme.md").write_text("not a dataset")
    message = error_of(capsys, "zeroshot", *model, "--dataset", str(tmp_path / "empty"))
    assert message.startswith(f"clipkit zeroshot: error: {tmp_path / 'empty'} is not a dataset layout")
    assert "supported layouts: a CLIP_benchmark wds directory" in message and "class sub-folders" in message

    three = tmp_path / "three.txt"
    three.write_text("a\nb\nc\n")
    message = error_of(
        capsys, "zeroshot", *model, "--dataset", str(data["folders"]), "--classnames", str(three)
    )
    assert "three.txt lists 3 class names but" in message and "has 7 class folders" in message

    message = error_of(
        capsys, "zeroshot", *model, "--dataset", str(data["shards"]), "--classnames", str(three)
    )
    assert re.search(
        r"sample \d{9} in \S+/0000\d.tar has label [3-6] but the dataset has 3 class names; labels must be 0..2",
        message,
    )

    message = error_of(capsys, "zeroshot", *model, "--dataset", str(data["cb"]), "--task", "retrieval")
    assert "is a CLIP_benchmark classification dataset" in message and "--task classification" in message


def test_missing_model_says_what_was_looked_for(data, tmp_path):
    missing = tmp_path / "runs" / "nope"
    result = run_clipkit("zeroshot", "--model", str(missing), "--dataset", str(data["cb"]))
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith(
        f"clipkit zeroshot: error: unknown model '{missing}': looked for a directory with"
    )
    assert "open_clip_config.json" in lines[0] and "open_clip architecture" in lines[0]
