"""Zero-shot classification and retrieval over an evaluation set.

Two levels:
- per process: `zeroshot_classification_counts` and `encode_retrieval_set` run a model over one
  `EvalLoader` (this process's share of the samples) and return what a distributed caller combines:
  counts to sum (all-reduce), or features to gather;
- whole dataset, one process: `evaluate_zeroshot` / `evaluate_retrieval` (what `clipkit zeroshot` runs).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, NamedTuple

import torch
import torch.nn.functional as F

from clipkit.errors import ClipkitError
from clipkit.eval.classifier import autocast, build_zeroshot_classifier, eval_mode
from clipkit.eval.datasets import CLASSIFICATION, RETRIEVAL, EvalDataset
from clipkit.eval.loader import EvalBatch, EvalLoader, SkippedImage, SkippedShard
from clipkit.eval.metrics import classification_counts, classification_metrics_from_counts, retrieval_metrics

# CLIP_benchmark (after OpenAI's notebook) scales cosine similarities by 100 for classification logits.
CLASSIFICATION_LOGIT_SCALE = 100.0


@dataclass(kw_only=True)
class ZeroshotResult:
    task: str  # "classification" | "retrieval"
    metrics: dict[str, Any]  # CLIP_benchmark's keys (+ per_class_recall, confusion_matrix)
    num_images: int  # images evaluated
    num_texts: int = 0  # captions evaluated (retrieval)
    skipped: list[SkippedImage] = field(default_factory=list)
    bad_shards: list[SkippedShard] = field(default_factory=list)  # read in part or not at all


class RetrievalFeatures(NamedTuple):
    image_features: torch.Tensor  # (N, D) float32, L2-normalised
    image_ids: torch.Tensor  # (N,) int64 sample positions in the dataset
    text_features: torch.Tensor  # (T, D) float32, L2-normalised
    text_image_ids: torch.Tensor  # (T,) int64: the image each caption describes


def zeroshot_logits(model: torch.nn.Module, images: torch.Tensor, classifier: torch.Tensor) -> torch.Tensor:
    """(B, C) logits: 100 x cosine similarity of each image to each class (classifier (D, C))."""
    features = F.normalize(model.encode_image(images), dim=-1)  # (B, D)
    return CLASSIFICATION_LOGIT_SCALE * features @ classifier.to(features.dtype)


def zeroshot_classification_counts(
    model: torch.nn.Module,
    loader: EvalLoader,
    classifier: torch.Tensor,
    *,
    device: str | torch.device = "cpu",
    precision: str = "fp32",
    progress: bool = False,
) -> dict[str, torch.Tensor]:
    """`classification_counts` over this process's share of the samples (zeros when it has none).

    Sum the counts across processes, then call `classification_metrics_from_counts`. The counts sit on
    `device` so a collective can reduce them in place.
    """
    classifier = classifier.to(device)
    logits, labels = [], []
    with torch.inference_mode(), eval_mode(model), autocast(device, precision):
        for batch in _with_progress(loader, progress):
            logits.append(
                zeroshot_logits(model, batch.images.to(device, non_blocking=True), classifier).float()
            )
            labels.append(batch.labels.to(device))
    num_classes = classifier.shape[1]
    if not logits:  # an empty share still takes part in the sum
        logits, labels = (
            [torch.empty(0, num_classes, device=device)],
            [torch.empty(0, dtype=torch.long, device=device)],
        )
    return classification_counts(torch.cat(logits), torch.cat(labels))  # (N, C), (N,)


def encode_retrieval_set(
    model: torch.nn.Module,
    tokenizer: Callable[[list[str]], torch.Tensor],
    loader: EvalLoader,
    *,
    device: str | torch.device = "cpu",
    precision: str = "fp32",
    progress: bool = False,
) -> RetrievalFeatures:
    """Image and caption embeddings of this process's share of a captioned set (on the CPU).

    Gather the four tensors across processes (their lengths differ between processes), then call
    `retrieval_metrics(image_features, text_features, text_image_ids, image_ids=image_ids)`.
    """
    image_features, image_ids, text_features, text_image_ids = [], [], [], []
    with torch.inference_mode(), eval_mode(model), autocast(device, precision):
        for batch in _with_progress(loader, progress):
            images = batch.images.to(device, non_blocking=True)
            image_features.append(F.normalize(model.encode_image(images), dim=-1).float().cpu())  # (B, D)
            image_ids.append(batch.indices)
            texts = [caption for captions in batch.captions for caption in captions]
            if texts:
                tokens = tokenizer(texts).to(device)
                text_features.append(F.normalize(model.encode_text(tokens), dim=-1).float().cpu())  # (b, D)
            text_image_ids.extend(
                int(i) for i, captions in zip(batch.indices, batch.captions, strict=True) for _ in captions
            )
    if not image_features or not text_features:  # an empty share still has the embedding width
        with torch.inference_mode(), eval_mode(model):
            width = model.encode_text(tokenizer([""]).to(device)).shape[-1]
        image_features = image_features or [torch.empty(0, width)]
        text_features = text_features or [torch.empty(0, width)]
    return RetrievalFeatures(
        torch.cat(image_features),
        torch.cat(image_ids) if image_ids else torch.empty(0, dtype=torch.long),
        torch.cat(text_features),
        torch.tensor(text_image_ids, dtype=torch.long),
    )


def evaluate_zeroshot(
    model: torch.nn.Module,
    tokenizer: Callable[[list[str]], torch.Tensor],
    dataset: EvalDataset,
    *,
    transform: Callable,
    classifier: torch.Tensor | None = None,
    device: str | torch.device = "cpu",
    batch_size: int = 64,
    workers: int = 0,
    precision: str = "fp32",
    progress: bool = False,
) -> ZeroshotResult:
    """Zero-shot classification of every image in `dataset` (see `clipkit.eval.open_eval_dataset`).

    `classifier` (D, C) defaults to `build_zeroshot_classifier` on the dataset's class names and
    templates. Metrics: acc1, acc5 (>= 5 classes), mean_per_class_recall, per_class_recall,
    confusion_matrix.
    """
    if dataset.task != CLASSIFICATION:
        raise ClipkitError(
            f"{dataset.source} is a {dataset.task} dataset; evaluate it with --task {dataset.task}"
        )
    if classifier is None:
        classifier = build_zeroshot_classifier(
            model, tokenizer, dataset.classnames, dataset.templates, device=device, precision=precision
        )
    loader = _loader(dataset, transform, device=device, batch_size=batch_size, workers=workers)
    counts = zeroshot_classification_counts(
        model, loader, classifier, device=device, precision=precision, progress=progress
    )
    num_images = int(counts["confusion_matrix"].sum())
    if num_images == 0:
        raise ClipkitError(f"no decodable images in {dataset.source} ({len(loader.skipped)} skipped)")
    return ZeroshotResult(
        task=CLASSIFICATION,
        metrics=classification_metrics_from_counts(counts),
        num_images=num_images,
        skipped=loader.skipped,
        bad_shards=loader.bad_shards,
    )


def evaluate_retrieval(
    model: torch.nn.Module,
    tokenizer: Callable[[list[str]], torch.Tensor],
    dataset: EvalDataset,
    *,
    transform: Callable,
    device: str | torch.device = "cpu",
    batch_size: int = 64,
    workers: int = 0,
    precision: str = "fp32",
    ks: Sequence[int] = (1, 5, 10),
    progress: bool = False,
) -> ZeroshotResult:
    """Image <-> text recall@k over a captioned dataset (each image's captions are its positives)."""
    if dataset.task != RETRIEVAL:
        raise ClipkitError(
            f"{dataset.source} is a {dataset.task} dataset, not captioned; drop --task retrieval"
        )
    loader = _loader(dataset, transform, device=device, batch_size=batch_size, workers=workers)
    features = encode_retrieval_set(
        model, tokenizer, loader, device=device, precision=precision, progress=progress
    )
    if len(features.image_ids) == 0:
        raise ClipkitError(f"no decodable images in {dataset.source} ({len(loader.skipped)} skipped)")
    if len(features.text_image_ids) == 0:
        raise ClipkitError(f"{dataset.source} has no captions (KEY.txt, one caption per line)")
    metrics = retrieval_metrics(
        features.image_features,
        features.text_features,
        features.text_image_ids,
        image_ids=features.image_ids,
        ks=ks,
    )
    return ZeroshotResult(
        task=RETRIEVAL,
        metrics=metrics,
        num_images=len(features.image_ids),
        num_texts=len(features.text_image_ids),
        skipped=loader.skipped,
        bad_shards=loader.bad_shards,
    )


def _loader(
    dataset: EvalDataset, transform: Callable, *, device, batch_size: int, workers: int
) -> EvalLoader:
    pin_memory = torch.device(device).type == "cuda"
    return EvalLoader(
        dataset, transform=transform, batch_size=batch_size, workers=workers, pin_memory=pin_memory
    )


def _with_progress(loader: EvalLoader, progress: bool) -> Iterator[EvalBatch]:
    if not progress:
        yield from loader
        return
    from tqdm import tqdm

    with tqdm(total=loader.count_samples(), unit="img", desc="images", disable=None) as bar:
        seen_skipped = 0
        for batch in loader:
            bar.update(len(batch.indices) + len(loader.skipped) - seen_skipped)
            seen_skipped = len(loader.skipped)
            yield batch
        bar.update(len(loader.skipped) - seen_skipped)
