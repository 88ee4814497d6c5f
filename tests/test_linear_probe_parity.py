"""clipkit's linear probe gives CLIP_benchmark's (`clip_benchmark.metrics.linear_probe.evaluate`).

Same model (exported small model), same data (the generated digits: train split with a seeded 20%
validation hold-out, test split), same features: CLIP_benchmark reads them from its feature cache, where
clipkit's are written in its file names (and a test batch checks them against CLIP_benchmark's own
`Featurizer`). Tolerance: the chosen weight decay is equal, and acc1 / acc5 / mean per-class recall agree
within 1e-6: the probes draw the same random numbers in the same order, so only float summation order
could differ.

CLIP_benchmark's probe is written for CUDA (`assert device == 'cuda'`, `.cuda()` calls); on a CPU
machine the test makes `.cuda()` a no-op and runs its `infer` on the CPU; nothing of the arithmetic
changes. Its `accuracy` is replaced by the NumPy 2.4-safe copy in test_zeroshot_parity.
"""

from __future__ import annotations

import pytest
import torch

from test_eval_datasets import export_small_model
from test_zeroshot_parity import clip_benchmark_accuracy, load_with_clip_benchmark

pytest.importorskip("clip_benchmark", reason="CLIP_benchmark is in the dev extra: pip install -e '.[dev]'")

from clip_benchmark.datasets.builder import build_dataset  # noqa: E402
from clip_benchmark.metrics import linear_probe as cb_linear_probe  # noqa: E402
from clip_benchmark.metrics.linear_probe import Featurizer  # noqa: E402

from clipkit.data.prepare import ensure_generated  # noqa: E402
from clipkit.eval import open_eval_dataset  # noqa: E402
from clipkit.eval.features import encode_split  # noqa: E402
from clipkit.eval.linear_probe import LinearProbeConfig, linear_probe, validation_split  # noqa: E402
from clipkit.eval.metrics import classification_metrics  # noqa: E402
from clipkit.models import build_model  # noqa: E402

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")
SEED = 0


@pytest.fixture(scope="module")
def probe_inputs(tmp_path_factory):
    root = tmp_path_factory.mktemp("probe")
    model_dir = export_small_model(root / "model")
    data = ensure_generated({"name": "digits", "dir": str(root / "digits"), "seed": 0, "image_size": 32})
    bundle = build_model(str(model_dir))

    def features(dataset):
        return encode_split(bundle.model, dataset, transform=bundle.eval_transform, batch_size=128)

    train = features(open_eval_dataset(data / "train", task="classification"))
    test = features(open_eval_dataset(data, split="test"))
    # 500 training samples (about 50 per class) keep the 2 x 20 probe fits short.
    train.image_features, train.labels = train.image_features[:500], train.labels[:500]
    return model_dir, data, train, test


def run_clip_benchmark(tmp_path, monkeypatch, model, splits, fewshot_k):
    """CLIP_benchmark's evaluate on features put where its cache looks (features_{train,val,test}.pt)."""
    feature_dir = tmp_path / "features" / "model"
    feature_dir.mkdir(parents=True)
    for split, (features, labels) in splits.items():
        torch.save(features, feature_dir / f"features_{split}.pt")
        torch.save(labels, feature_dir / f"targets_{split}.pt")
    monkeypatch.setattr(cb_linear_probe, "accuracy", clip_benchmark_accuracy)
    monkeypatch.setattr(torch.nn.Module, "cuda", lambda self, *a, **k: self)
    monkeypatch.setattr(torch.Tensor, "cuda", lambda self, *a, **k: self)
    infer = cb_linear_probe.infer
    monkeypatch.setattr(cb_linear_probe, "infer", lambda m, loader, amp, device: infer(m, loader, amp, "cpu"))
    torch.manual_seed(SEED)  # CLIP_benchmark's CLI seeds the global RNG before the few-shot permutation
    return cb_linear_probe.evaluate(
        model, train_dataloader=None, dataloader=None, fewshot_k=fewshot_k, batch_size=64, num_workers=0,
        lr=0.1, epochs=10, model_id="model", seed=SEED, feature_root=str(tmp_path / "features"),
        device="cuda", val_dataloader=object(), normalize=True, amp=False,
    )  # fmt: skip


@pytest.mark.parametrize("fewshot_k", [-1, 5])
def test_linear_probe_matches_clip_benchmark(probe_inputs, tmp_path, monkeypatch, fewshot_k):
    model_dir, _, train, test = probe_inputs
    keep, held_out = validation_split(len(train.labels), 0.2, seed=SEED)
    train_pair = (train.image_features[keep], train.labels[keep])
    val_pair = (train.image_features[held_out], train.labels[held_out])
    model, _, _ = load_with_clip_benchmark(model_dir)
    theirs = run_clip_benchmark(
        tmp_path, monkeypatch, model,
        {"train": train_pair, "val": val_pair, "test": (test.image_features, test.labels)}, fewshot_k,
    )  # fmt: skip
    ours = linear_probe(
        train_pair, test.image_features, 10, val=val_pair, fewshot_k=fewshot_k, seed=SEED,
        config=LinearProbeConfig(lr=0.1, epochs=10, batch_size=64),
    )  # fmt: skip
    metrics = classification_metrics(ours.logits, test.labels)
    # The comparison only means something if the probe is neither at chance (10 classes) nor perfect.
    assert 0.12 < theirs["lp_acc1"] < 0.99
    assert ours.weight_decay == theirs["weight_decay"]
    assert metrics["acc1"] == pytest.approx(theirs["lp_acc1"], abs=1e-6)
    assert metrics["acc5"] == pytest.approx(theirs["lp_acc5"], abs=1e-6)
    assert metrics["mean_per_class_recall"] == pytest.approx(theirs["lp_mean_per_class_recall"], abs=1e-6)


def test_features_equal_clip_benchmarks_featurizer(probe_inputs):
    model_dir, data, _, test = probe_inputs
    model, transform, _ = load_with_clip_benchmark(model_dir)
    dataset = build_dataset("wds/digits", root=str(data), transform=transform, split="test")
    images, _ = next(iter(torch.utils.data.DataLoader(dataset.batched(32), batch_size=None)))
    with torch.no_grad():
        theirs = Featurizer(model, normalize=True)(images)
    torch.testing.assert_close(test.image_features[:32], theirs, rtol=0, atol=1e-5)
