"""`clipkit zeroshot` gives CLIP_benchmark's numbers: same model (exported), same generated dataset.

CLIP_benchmark runs through its Python API on `local-dir:` the exported model, exactly as its
`clip_benchmark eval` command wires it (wds dataset, `dataset.batched(batch_size)`, fp32: amp off);
clipkit runs as a user runs it, through the `clipkit zeroshot` command.
"""

from __future__ import annotations

import json

import pytest
import torch

from conftest import run_clipkit
from test_eval_datasets import (
    CLASSNAMES,
    TEMPLATES,
    export_small_model,
    labels_for,
    make_images,
    write_captioned_shards,
    write_clip_benchmark_dir,
)

pytest.importorskip("clip_benchmark", reason="CLIP_benchmark is in the dev extra: pip install -e '.[dev]'")

from clip_benchmark.datasets.builder import build_dataset  # noqa: E402
from clip_benchmark.metrics import zeroshot_classification, zeroshot_retrieval  # noqa: E402
from clip_benchmark.models import load_clip  # noqa: E402

from clipkit.eval import build_zeroshot_classifier  # noqa: E402

BATCH_SIZE = 16

# CLIP_benchmark's wds builder leaves webdataset's shardshuffle unset (it does not shuffle either way).
pytestmark = pytest.mark.filterwarnings("ignore:WebDataset.shardshuffle:UserWarning")


def clip_benchmark_accuracy(output, target, topk=(1,)):
    # CLIP_benchmark 1.6.2's `accuracy` calls float() on a 1-element NumPy array, which NumPy >= 2.4
    # refuses ("only 0-dimensional arrays can be converted"). This is that function with `.item()`
    # instead; the arithmetic is unchanged.
    pred = output.topk(max(topk), 1, True, True)[1].t()
    correct = pred.eq(target.view(1, -1).expand_as(pred))
    n = len(target)
    return [float(correct[:k].reshape(-1).float().sum(0, keepdim=True).item()) / n for k in topk]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return export_small_model(tmp_path_factory.mktemp("model") / "small")


def load_with_clip_benchmark(model_dir):
    """The model, transform and tokenizer as `clip_benchmark eval --model local-dir:DIR` loads them."""
    model, transform, tokenizer = load_clip(
        model_type="open_clip",
        model_name=f"local-dir:{model_dir}",
        pretrained=None,
        cache_dir=None,
        device="cpu",
    )
    return model.eval(), transform, tokenizer


def run_clip_benchmark(model_dir, dataset_dir, task):
    model, transform, tokenizer = load_with_clip_benchmark(model_dir)
    dataset = build_dataset(
        "wds/generated", root=str(dataset_dir), transform=transform, split="test", task=task
    )
    loader = torch.utils.data.DataLoader(
        dataset.batched(BATCH_SIZE), batch_size=None, shuffle=False, num_workers=0
    )
    if task == "zeroshot_retrieval":
        return zeroshot_retrieval.evaluate(
            model, loader, tokenizer, device="cpu", amp=False, recall_k_list=[1, 5, 10]
        )
    return zeroshot_classification.evaluate(
        model, loader, tokenizer, dataset.classes, dataset.templates, device="cpu", amp=False
    )


def run_clipkit_zeroshot(model_dir, dataset, tmp_path, *extra):
    out = tmp_path / "results.json"
    result = run_clipkit(
        "zeroshot", "--model", str(model_dir), "--dataset", str(dataset), "--batch-size", str(BATCH_SIZE),
        "--workers", "2", "--output", str(out), *extra, CLIPKIT_CACHE=str(tmp_path / "cache"),
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    return json.loads(out.read_text()), result


def test_classifier_equals_clip_benchmarks(model_dir):
    model, _, tokenizer = load_with_clip_benchmark(model_dir)
    per_class = {
        name: [f"a photo of a {name}.", f"{name}, up close"][: 1 + i % 2] for i, name in enumerate(CLASSNAMES)
    }
    for templates in (TEMPLATES, per_class):
        theirs = zeroshot_classification.zero_shot_classifier(
            model, tokenizer, CLASSNAMES, templates, "cpu", amp=False
        )
        ours = build_zeroshot_classifier(model, tokenizer, CLASSNAMES, templates, batch_size=5)
        assert ours.shape == theirs.shape == (32, len(CLASSNAMES))
        torch.testing.assert_close(ours, theirs, rtol=0, atol=1e-6)


def test_zeroshot_classification_matches_clip_benchmark(model_dir, tmp_path, monkeypatch):
    monkeypatch.setattr(zeroshot_classification, "accuracy", clip_benchmark_accuracy)
    count = 120
    dataset = write_clip_benchmark_dir(
        tmp_path / "cb", make_images(count, seed=11), labels=labels_for(count), num_shards=3
    )
    theirs = run_clip_benchmark(model_dir, dataset, "zeroshot_classification")
    ours, result = run_clipkit_zeroshot(model_dir, dataset, tmp_path)
    # The comparison only means something if the model's predictions are not all alike.
    assert 0.05 < theirs["acc1"] < 0.95 and theirs["acc5"] < 1.0
    for key in ("acc1", "acc5", "mean_per_class_recall"):
        assert ours["metrics"][key] == pytest.approx(theirs[key], abs=1e-6), key
    assert ours["task"] == "zeroshot_classification" and ours["num_images"] == count
    assert ours["classnames"] == CLASSNAMES
    confusion = torch.tensor(ours["confusion_matrix"])
    assert confusion.shape == (7, 7) and confusion.sum() == count
    recall = [confusion[c, c].item() / confusion[c].sum().item() for c in range(7)]
    assert ours["per_class_recall"] == pytest.approx(recall)
    assert sum(recall) / 7 == pytest.approx(ours["metrics"]["mean_per_class_recall"])
    assert "acc1" in result.stdout and "mean_per_class_recall" in result.stdout


def test_zeroshot_retrieval_matches_clip_benchmark(model_dir, tmp_path):
    count = 60
    images = make_images(count, seed=12)
    captions = [
        [f"picture number {i}", f"the {CLASSNAMES[i % 7]} image {i % 5}"][: 1 + i % 2] for i in range(count)
    ]
    cb_dir = write_clip_benchmark_dir(tmp_path / "cb", images, captions=captions, num_shards=2)
    theirs = run_clip_benchmark(model_dir, cb_dir, "zeroshot_retrieval")
    assert 0 < theirs["image_retrieval_recall@5"] < 1 and 0 < theirs["text_retrieval_recall@5"] < 1
    shards = write_captioned_shards(tmp_path / "shards", images, captions)
    for dataset, extra in ((cb_dir, ()), (shards, ("--task", "retrieval"))):
        ours, _ = run_clipkit_zeroshot(model_dir, dataset, tmp_path, *extra)
        assert ours["task"] == "zeroshot_retrieval" and ours["num_images"] == count
        assert ours["num_texts"] == sum(len(c) for c in captions)
        assert ours["metrics"].keys() == theirs.keys()
        for key, value in theirs.items():
            assert ours["metrics"][key] == pytest.approx(value, abs=1e-6), (dataset, key)
