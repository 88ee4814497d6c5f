"""Zero-shot metrics as pure functions of tensors, with CLIP_benchmark's definitions and key names.

Classification goes through additive counts (`classification_counts`): a confusion matrix and top-k hit
counts have the same shape on every process, so a distributed caller sums them (all-reduce) and calls
`classification_metrics_from_counts` once, with no padding or de-duplication of uneven batches.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch

# CLIP_benchmark reports top-5 accuracy only when there are at least 5 classes.
TOP5_MIN_CLASSES = 5


def classification_counts(logits: torch.Tensor, labels: torch.Tensor) -> dict[str, torch.Tensor]:
    """Additive counts for `classification_metrics_from_counts` from one process's logits.

    logits (N, C), labels (N,) int. Returns int64 tensors: `confusion_matrix` (C, C), rows the true
    label and columns the arg-max prediction; `top1_correct` and, with C >= 5, `top5_correct` (scalars).
    """
    num_classes = logits.shape[1]
    labels = labels.to(device=logits.device, dtype=torch.long)
    predictions = logits.argmax(dim=1)  # (N,)
    confusion = torch.bincount(labels * num_classes + predictions, minlength=num_classes * num_classes)
    counts = {"confusion_matrix": confusion.view(num_classes, num_classes)}
    # Top-k as CLIP_benchmark's `accuracy`: the k largest logits, sorted, contain the label.
    k = min(TOP5_MIN_CLASSES, num_classes)
    hits = logits.topk(k, dim=1, largest=True, sorted=True).indices == labels[:, None]  # (N, k)
    counts["top1_correct"] = hits[:, :1].sum()
    if num_classes >= TOP5_MIN_CLASSES:
        counts["top5_correct"] = hits[:, :5].sum()
    return counts


def classification_metrics_from_counts(counts: Mapping[str, torch.Tensor]) -> dict[str, Any]:
    """acc1, acc5 (with >= 5 classes), mean_per_class_recall, per_class_recall, confusion_matrix.

    `mean_per_class_recall` is scikit-learn's `balanced_accuracy_score` (CLIP_benchmark's): the mean
    recall over the classes that occur among the labels. `per_class_recall` is None for a class
    without samples.
    """
    confusion = counts["confusion_matrix"].detach().cpu().to(torch.float64)  # (C, C)
    num_samples = confusion.sum().item()
    if num_samples == 0:
        raise ValueError("no samples to compute classification metrics from")
    support = confusion.sum(dim=1)  # (C,)
    recall = confusion.diagonal() / support.clamp(min=1)
    present = support > 0
    metrics: dict[str, Any] = {"acc1": counts["top1_correct"].item() / num_samples}
    if "top5_correct" in counts:
        metrics["acc5"] = counts["top5_correct"].item() / num_samples
    metrics["mean_per_class_recall"] = recall[present].mean().item()
    metrics["per_class_recall"] = [
        r if p else None for r, p in zip(recall.tolist(), present.tolist(), strict=True)
    ]
    metrics["confusion_matrix"] = counts["confusion_matrix"].cpu().tolist()
    return metrics


def classification_metrics(logits: torch.Tensor, labels: torch.Tensor) -> dict[str, Any]:
    """`classification_metrics_from_counts(classification_counts(logits, labels))`: logits (N, C), labels (N,)."""
    return classification_metrics_from_counts(classification_counts(logits, labels))


def retrieval_metrics(
    image_features: torch.Tensor,
    text_features: torch.Tensor,
    text_image_ids: torch.Tensor,
    *,
    image_ids: torch.Tensor | None = None,
    ks: Sequence[int] = (1, 5, 10),
    chunk_size: int = 1024,
) -> dict[str, float]:
    """Recall@k both ways, with several captions per image, under CLIP_benchmark's key names.

    image_features (N, D) and text_features (T, D) are L2-normalised. Text t describes the image whose
    id is `text_image_ids[t]`; `image_ids` (N,) defaults to the row numbers 0..N-1. A query counts as a
    hit when any of its positives is among its k best matches:
    `image_retrieval_recall@k` (text -> image) averages over texts, `text_retrieval_recall@k`
    (image -> text) over images. A k above the number of candidates counts all of them.
    """
    if image_features.shape[0] == 0 or text_features.shape[0] == 0:
        raise ValueError("retrieval metrics need at least one image and one caption")
    if image_ids is None:
        image_ids = torch.arange(image_features.shape[0], device=image_features.device)
    image_ids = image_ids.to(image_features.device)
    text_image_ids = text_image_ids.to(image_features.device)
    text_features = text_features.to(image_features.device, image_features.dtype)
    max_k = max(ks)

    def hit_rates(queries, candidates, query_ids, candidate_ids, transpose: bool) -> torch.Tensor:
        k = min(max_k, candidates.shape[0])
        hits = []
        for start in range(0, queries.shape[0], chunk_size):
            chunk = queries[start : start + chunk_size]
            # Scores as CLIP_benchmark computes them (texts @ images.T), so ties break the same way.
            scores = (candidates @ chunk.T).T if transpose else chunk @ candidates.T  # (n, candidates)
            top = scores.topk(k, dim=1).indices  # (n, k)
            hits.append(candidate_ids[top] == query_ids[start : start + chunk_size, None])
        hits = torch.cat(hits)  # (queries, k)
        return torch.stack([hits[:, :kk].any(dim=1).double().mean() for kk in ks])

    text_to_image = hit_rates(text_features, image_features, text_image_ids, image_ids, transpose=False)
    image_to_text = hit_rates(image_features, text_features, image_ids, text_image_ids, transpose=True)
    metrics = {}
    for i, k in enumerate(ks):
        metrics[f"image_retrieval_recall@{k}"] = text_to_image[i].item()
        metrics[f"text_retrieval_recall@{k}"] = image_to_text[i].item()
    return metrics
