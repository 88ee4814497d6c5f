"""Evaluation while training: zero-shot classification and image<->text retrieval on held-out data.

Every process evaluates its own share of the samples (EvalLoader splits them by rank); classification
counts are summed and retrieval embeddings gathered across processes, so every process ends with the
metrics of the whole set.
"""

from __future__ import annotations

from typing import Any

import torch
from accelerate.utils import gather_object

from clipkit.data import DataConfig
from clipkit.eval import (
    EvalDataset,
    EvalLoader,
    build_zeroshot_classifier,
    classification_metrics_from_counts,
    encode_retrieval_set,
    open_eval_dataset,
    retrieval_metrics,
    zeroshot_classification_counts,
)
from clipkit.models import ModelBundle


def evaluate(
    model: torch.nn.Module, bundle: ModelBundle, data: DataConfig, accelerator, *, precision: str = "fp32"
) -> dict[str, Any]:
    """Metrics for `data.zeroshot_dataset` (zeroshot/...) and `data.val_shards` (retrieval/...); {} if neither."""
    metrics: dict[str, Any] = {}
    if data.zeroshot_dataset:
        metrics.update(
            _zeroshot(model, bundle, open_eval_dataset(data.zeroshot_dataset), data, accelerator, precision)
        )
    if data.val_sources:
        shards = [url for source in data.val_sources for url in source]
        dataset = EvalDataset(
            source=str(data.val_shards), layout="captioned_shards", task="retrieval", shards=shards
        )
        metrics.update(_retrieval(model, bundle, dataset, data, accelerator, precision))
    return metrics


def _loader(dataset: EvalDataset, bundle: ModelBundle, data: DataConfig, accelerator) -> EvalLoader:
    return EvalLoader(
        dataset,
        transform=bundle.eval_transform,
        batch_size=data.batch_size,
        rank=accelerator.process_index,
        world_size=accelerator.num_processes,
        workers=data.workers,
    )


def _zeroshot(model, bundle, dataset, data, accelerator, precision) -> dict[str, Any]:
    device = accelerator.device
    classifier = build_zeroshot_classifier(
        model, bundle.tokenizer, dataset.classnames, dataset.templates, device=device, precision=precision
    )  # (D, C)
    loader = _loader(dataset, bundle, data, accelerator)
    counts = zeroshot_classification_counts(model, loader, classifier, device=device, precision=precision)
    counts = {name: accelerator.reduce(value, reduction="sum") for name, value in counts.items()}
    result = classification_metrics_from_counts(counts)
    metrics = {
        f"zeroshot/{key}": result[key] for key in ("acc1", "acc5", "mean_per_class_recall") if key in result
    }
    metrics["zeroshot/skipped_images"] = _total(accelerator, len(loader.skipped))
    metrics["zeroshot/bad_shards"] = _total(accelerator, len(loader.bad_shards))
    return metrics


def _retrieval(model, bundle, dataset, data, accelerator, precision) -> dict[str, Any]:
    loader = _loader(dataset, bundle, data, accelerator)
    local = encode_retrieval_set(
        model, bundle.tokenizer, loader, device=accelerator.device, precision=precision
    )
    parts = gather_object([local])  # lengths differ between processes, so gather as objects
    image_features, image_ids, text_features, text_image_ids = (
        torch.cat(field) for field in zip(*parts, strict=True)
    )
    result = retrieval_metrics(image_features, text_features, text_image_ids, image_ids=image_ids)
    metrics = {f"retrieval/{key}": value for key, value in result.items()}
    metrics["retrieval/skipped_images"] = _total(accelerator, len(loader.skipped))
    metrics["retrieval/bad_shards"] = _total(accelerator, len(loader.bad_shards))
    return metrics


def _total(accelerator, value: int) -> int:
    return int(accelerator.reduce(torch.tensor(value, device=accelerator.device), reduction="sum").item())
