"""What a training loop does on N processes (simulated here one rank at a time) equals one process.

Per rank: `EvalLoader(rank, world_size)` + `zeroshot_classification_counts` (summed, as an all-reduce
would) or `encode_retrieval_set` (concatenated, as a gather would).
"""

from __future__ import annotations

import pytest
import torch

from clipkit.eval import (
    EvalLoader,
    build_zeroshot_classifier,
    classification_metrics_from_counts,
    encode_retrieval_set,
    evaluate_retrieval,
    evaluate_zeroshot,
    open_eval_dataset,
    retrieval_metrics,
    zeroshot_classification_counts,
)
from test_eval_datasets import (
    labels_for,
    make_images,
    small_model_bundle,
    write_captioned_shards,
    write_clip_benchmark_dir,
)


@pytest.fixture(scope="module")
def bundle():
    return small_model_bundle(seed=1)


@pytest.mark.parametrize("count,world_size", [(33, 3), (7, 9)])  # 9 ranks for 7 samples: two have none
def test_summed_per_rank_counts_equal_a_single_process(bundle, tmp_path, count, world_size):
    images, labels = make_images(count, seed=7), labels_for(count)
    dataset = open_eval_dataset(write_clip_benchmark_dir(tmp_path / "cb", images, labels=labels))
    model, tokenizer, transform = bundle.model, bundle.tokenizer, bundle.eval_transform
    single = evaluate_zeroshot(model, tokenizer, dataset, transform=transform, batch_size=5)
    classifier = build_zeroshot_classifier(model, tokenizer, dataset.classnames, dataset.templates)
    per_rank = []
    for rank in range(world_size):
        loader = EvalLoader(dataset, transform=transform, batch_size=4, rank=rank, world_size=world_size)
        per_rank.append(zeroshot_classification_counts(model, loader, classifier))
    summed = {key: sum(counts[key] for counts in per_rank) for key in per_rank[0]}
    metrics = classification_metrics_from_counts(summed)
    assert metrics["confusion_matrix"] == single.metrics["confusion_matrix"]
    for key in ("acc1", "acc5", "mean_per_class_recall"):
        assert metrics[key] == pytest.approx(single.metrics[key], abs=1e-12)
    if count > len(dataset.classnames):
        assert 0.0 < single.metrics["acc1"] < 1.0


def test_gathered_per_rank_retrieval_features_equal_a_single_process(bundle, tmp_path):
    captions = [[f"photo {i}", f"picture {i % 5}"][: 1 + i % 2] for i in range(17)]
    dataset = open_eval_dataset(
        write_captioned_shards(tmp_path / "shards", make_images(17, seed=8), captions)
    )
    model, tokenizer, transform = bundle.model, bundle.tokenizer, bundle.eval_transform
    single = evaluate_retrieval(model, tokenizer, dataset, transform=transform, batch_size=6, ks=(1, 5))
    parts = [
        encode_retrieval_set(
            model, tokenizer, EvalLoader(dataset, transform=transform, batch_size=3, rank=r, world_size=4)
        )
        for r in range(4)
    ]
    gathered = [torch.cat([getattr(part, field) for part in parts]) for field in parts[0]._fields]
    image_features, image_ids, text_features, text_image_ids = gathered
    metrics = retrieval_metrics(image_features, text_features, text_image_ids, image_ids=image_ids, ks=(1, 5))
    assert metrics == pytest.approx(single.metrics, abs=1e-12)
    assert single.num_texts == len(text_image_ids) == sum(len(c) for c in captions)
