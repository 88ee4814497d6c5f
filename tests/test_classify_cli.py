"""`clipkit classify`: top labels and probabilities as open_clip computes them, for files, folders and globs."""

from __future__ import annotations

import json
import math

import open_clip
import pytest
import torch
from PIL import Image

from clipkit.cli.main import main
from clipkit.models import export_model
from conftest import run_clipkit
from test_eval_datasets import export_small_model, make_images, small_model_bundle

LABELS = ["cat", "dog", "bird", "fish"]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return export_small_model(tmp_path_factory.mktemp("model") / "small", seed=5)


@pytest.fixture(scope="module")
def photos(tmp_path_factory):
    root = tmp_path_factory.mktemp("photos")
    for i, image in enumerate(make_images(5, seed=31)):
        folder = root / ("album" if i >= 3 else "")
        folder.mkdir(exist_ok=True)
        image.save(folder / f"photo{i}.{'jpg' if i % 2 else 'png'}")
    (root / "notes.txt").write_text("not an image")
    return root


def open_clip_probabilities(model_dir, paths, templates, *, sigmoid=False):
    """The reference: open_clip itself, class embedding = normalised mean of normalised prompts."""
    model, _, preprocess = open_clip.create_model_and_transforms(f"local-dir:{model_dir}")
    tokenizer = open_clip.get_tokenizer(f"local-dir:{model_dir}")
    model.eval()
    with torch.no_grad():
        columns = []
        for label in LABELS:
            prompts = model.encode_text(tokenizer([t.format(c=label) for t in templates]), normalize=True)
            columns.append(torch.nn.functional.normalize(prompts.mean(0), dim=0))
        images = torch.stack([preprocess(Image.open(p)) for p in paths])
        logits = (
            model.logit_scale.exp() * model.encode_image(images, normalize=True) @ torch.stack(columns, 1)
        )
        if sigmoid:
            return torch.sigmoid(logits + model.logit_bias)
        return logits.softmax(dim=1)


def classify(capsys, *args):
    code = main(["classify", *args])
    captured = capsys.readouterr()
    return code, captured


def test_json_output_matches_open_clip_for_files_folders_and_globs(model_dir, photos, tmp_path, capsys):
    code, captured = classify(
        capsys, "--model", str(model_dir), "--labels", " cat, dog,bird ,fish", "--top-k", "3", "--json",
        "--cache-dir", str(tmp_path), str(photos / "photo0.png"), str(photos / "album"), str(photos / "photo[12].*"),
    )  # fmt: skip
    assert code == 0, captured.err
    output = json.loads(captured.out)
    expected_paths = [photos / "photo0.png", photos / "album" / "photo3.jpg", photos / "album" / "photo4.png"]
    expected_paths += [photos / "photo1.jpg", photos / "photo2.png"]
    assert [r["image"] for r in output["results"]] == [str(p) for p in expected_paths]
    assert output["labels"] == LABELS and output["skipped"] == []
    expected = open_clip_probabilities(model_dir, expected_paths, ["a photo of a {c}."])
    for result, row in zip(output["results"], expected, strict=True):
        values, indices = row.topk(3)
        assert [t["label"] for t in result["top"]] == [LABELS[i] for i in indices]
        assert [t["probability"] for t in result["top"]] == pytest.approx(values.tolist(), abs=1e-5)


def test_text_output_labels_file_and_templates(model_dir, photos, tmp_path, capsys):
    labels_file = tmp_path / "labels.txt"
    labels_file.write_text("\n".join(LABELS) + "\n")
    templates = tmp_path / "templates.txt"
    templates.write_text("a photo of a {c}.\na blurry picture of the {c}.\n")
    image = photos / "photo0.png"
    code, captured = classify(
        capsys, "--model", str(model_dir), "--labels-file", str(labels_file), "--templates", str(templates),
        "--top-k", "2", "--no-cache", str(image),
    )  # fmt: skip
    assert code == 0, captured.err
    (line,) = captured.out.strip().splitlines()
    expected = open_clip_probabilities(model_dir, [image], templates.read_text().splitlines())[0]
    values, indices = expected.topk(2)
    assert line.split() == [str(image)] + [
        x for v, i in zip(values, indices, strict=True) for x in (LABELS[i], f"{v:.3f}")
    ]


def test_siglip_models_score_each_label_with_a_sigmoid(photos, tmp_path, capsys):
    bundle = small_model_bundle(seed=3, init_logit_scale=math.log(10), init_logit_bias=-10.0)
    model_dir = export_model(bundle, tmp_path / "siglip")
    image = photos / "photo1.jpg"
    code, captured = classify(
        capsys,
        "--model",
        str(model_dir),
        "--labels",
        ",".join(LABELS),
        "--top-k",
        "9",
        "--json",
        "--no-cache",
        str(image),
    )
    assert code == 0, captured.err
    (result,) = json.loads(captured.out)["results"]
    expected = open_clip_probabilities(model_dir, [image], ["a photo of a {c}."], sigmoid=True)[0]
    assert len(result["top"]) == 4  # top-k is capped at the number of labels
    assert {t["label"]: t["probability"] for t in result["top"]} == pytest.approx(
        dict(zip(LABELS, expected.tolist(), strict=True)), abs=1e-6
    )


def test_undecodable_images_are_skipped_and_counted(model_dir, photos, tmp_path, capsys):
    broken = tmp_path / "broken.jpg"
    broken.write_bytes(b"\xff\xd8 truncated")
    code, captured = classify(
        capsys,
        "--model",
        str(model_dir),
        "--labels",
        "cat,dog",
        "--json",
        "--no-cache",
        str(broken),
        str(photos / "photo0.png"),
    )
    assert code == 0
    output = json.loads(captured.out)
    assert [r["image"] for r in output["results"]] == [str(photos / "photo0.png")]
    assert [s["image"] for s in output["skipped"]] == [str(broken)]
    assert "cannot decode" in output["skipped"][0]["reason"]
    code, captured = classify(
        capsys, "--model", str(model_dir), "--labels", "cat,dog", "--no-cache", str(broken)
    )
    assert code == 2
    assert "1 image(s) classified" not in captured.err
    assert (
        captured.err.strip().splitlines()[-1]
        == "clipkit classify: error: none of the 1 image(s) could be decoded"
    )


@pytest.mark.parametrize(
    "args,message",
    [
        (["--labels", "cat,,dog,cat", "x.png"], "--labels repeats ['cat']; give each label once"),
        (
            ["--labels", " , ", "x.png"],
            '--labels names no labels; give them comma-separated, e.g. --labels "cat,dog,bird"',
        ),
        (["--labels", "cat", "missing.png"], "image missing.png not found (give files, folders or globs)"),
        (["--labels", "cat", "nothing*.png"], "no images match nothing*.png"),
        (["--labels-file", "nope.txt", "x.png"], "class names file not found: nope.txt"),
    ],
)
def test_bad_input_is_one_clear_line(model_dir, tmp_path, monkeypatch, capsys, args, message):
    monkeypatch.chdir(tmp_path)
    Image.new("RGB", (8, 8)).save(tmp_path / "x.png")
    code, captured = classify(capsys, "--model", str(model_dir), *args)
    assert code == 2
    assert captured.err.strip().splitlines()[-1] == f"clipkit classify: error: {message}"


def test_command_line_run(model_dir, photos, tmp_path):
    result = run_clipkit(
        "classify",
        "--model",
        str(model_dir),
        "--labels",
        "cat,dog",
        str(photos / "album"),
        CLIPKIT_CACHE=str(tmp_path),
    )
    assert result.returncode == 0, result.stderr
    lines = result.stdout.strip().splitlines()
    assert [line.split()[0] for line in lines] == [
        str(photos / "album" / "photo3.jpg"),
        str(photos / "album" / "photo4.png"),
    ]
    assert all(len(line.split()) == 5 for line in lines)  # image, then two labels with probabilities
    assert list(tmp_path.glob("zeroshot_classifiers/*.safetensors"))
