"""Metrics against scikit-learn and brute-force float64 references; counts add up across processes."""

from __future__ import annotations

import pytest
import torch
from sklearn.metrics import balanced_accuracy_score, confusion_matrix, recall_score, top_k_accuracy_score

from clipkit.eval import (
    classification_counts,
    classification_metrics,
    classification_metrics_from_counts,
    retrieval_metrics,
)


def random_classification(num_samples=200, num_classes=9, seed=0):
    generator = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, num_classes - 1, (num_samples,), generator=generator)  # last class: no samples
    logits = torch.randn(num_samples, num_classes, generator=generator)
    logits[torch.arange(num_samples), labels] += 1.0  # better than chance, not perfect
    logits[:, 2] -= 10.0  # class 2 is never predicted
    return logits, labels


# The data predicts a class that has no samples on purpose: scikit-learn warns, then leaves it out.
@pytest.mark.filterwarnings("ignore:y_pred contains classes not in y_true")
def test_classification_metrics_match_scikit_learn():
    logits, labels = random_classification()
    metrics = classification_metrics(logits, labels)
    y_true, y_pred, scores = labels.numpy(), logits.argmax(1).numpy(), logits.numpy()
    all_classes = list(range(9))
    assert metrics["acc1"] == pytest.approx((y_pred == y_true).mean(), abs=1e-12)
    assert metrics["acc5"] == pytest.approx(
        top_k_accuracy_score(y_true, scores, k=5, labels=all_classes), abs=1e-12
    )
    assert metrics["mean_per_class_recall"] == pytest.approx(
        balanced_accuracy_score(y_true, y_pred), abs=1e-12
    )
    assert metrics["confusion_matrix"] == confusion_matrix(y_true, y_pred, labels=all_classes).tolist()
    recall = recall_score(y_true, y_pred, labels=all_classes[:-1], average=None)
    assert metrics["per_class_recall"][:-1] == pytest.approx(recall.tolist(), abs=1e-12)
    assert metrics["per_class_recall"][-1] is None  # no samples of the last class
    assert metrics["per_class_recall"][2] == 0.0


def test_top5_is_omitted_below_five_classes():
    logits, labels = random_classification(num_classes=4)
    metrics = classification_metrics(logits, labels)
    assert "acc5" not in metrics
    assert metrics["acc1"] == pytest.approx((logits.argmax(1) == labels).double().mean().item())


def test_counts_from_uneven_shards_sum_to_the_whole():
    # What a training loop does: counts per process (one of them empty), summed by an all-reduce.
    logits, labels = random_classification(num_samples=101, seed=1)
    parts = [(0, 0), (0, 40), (40, 41), (41, 101)]
    per_process = [classification_counts(logits[a:b], labels[a:b]) for a, b in parts]
    summed = {key: sum(counts[key] for counts in per_process) for key in per_process[0]}
    assert classification_metrics_from_counts(summed) == classification_metrics(logits, labels)


def brute_force_recalls(image_features, text_features, text_image, k):
    """Float64 loops: a text finds its image in its k best images; an image finds any of its texts."""
    scores = text_features.double() @ image_features.double().T  # (T, N)
    text_hits = [
        text_image[t].item() in scores[t].argsort(descending=True)[:k].tolist() for t in range(len(scores))
    ]
    image_hits = []
    for n in range(scores.shape[1]):
        best_texts = scores[:, n].argsort(descending=True)[:k].tolist()
        image_hits.append(any(text_image[t].item() == n for t in best_texts))
    return sum(text_hits) / len(text_hits), sum(image_hits) / len(image_hits)


def test_retrieval_recalls_match_brute_force_with_several_captions_per_image():
    generator = torch.Generator().manual_seed(2)
    num_images, dim = 30, 16
    images = torch.nn.functional.normalize(torch.randn(num_images, dim, generator=generator), dim=-1)
    text_image = torch.tensor([n for n in range(num_images) for _ in range(1 + n % 3)])  # 1-3 captions each
    texts = images[text_image] + 0.9 * torch.randn(len(text_image), dim, generator=generator)
    texts = torch.nn.functional.normalize(texts, dim=-1)
    metrics = retrieval_metrics(images, texts, text_image, ks=(1, 5, 10, 100), chunk_size=7)
    for k in (1, 5, 10):
        text_to_image, image_to_text = brute_force_recalls(images, texts, text_image, k)
        assert metrics[f"image_retrieval_recall@{k}"] == pytest.approx(text_to_image, abs=1e-12)
        assert metrics[f"text_retrieval_recall@{k}"] == pytest.approx(image_to_text, abs=1e-12)
    assert 0 < metrics["image_retrieval_recall@1"] < metrics["image_retrieval_recall@10"] < 1
    # k beyond the number of candidates finds everything.
    assert metrics["image_retrieval_recall@100"] == metrics["text_retrieval_recall@100"] == 1.0

    # Gathered from several processes, rows come in any order: ids say which image is which.
    order = torch.randperm(num_images, generator=generator)
    shuffled = retrieval_metrics(images[order], texts, text_image, image_ids=order, ks=(1, 5, 10, 100))
    assert shuffled == metrics


def test_an_image_without_captions_is_a_miss_as_in_clip_benchmark():
    images = torch.eye(3)
    texts = torch.eye(3)[:2]
    metrics = retrieval_metrics(images, texts, torch.tensor([0, 1]), ks=(1,))
    assert metrics["image_retrieval_recall@1"] == 1.0
    assert metrics["text_retrieval_recall@1"] == pytest.approx(2 / 3)
