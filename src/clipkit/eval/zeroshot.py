"""Zero-shot classification and retrieval over a whole dataset in one process (what `clipkit zeroshot` runs).

A training loop that evaluates on several processes uses the parts instead: `EvalLoader(rank=...,
world_size=...)`, `zeroshot_logits` or `encode_images`, then sums `classification_counts` (or gathers
features for `retrieval_metrics`) across processes.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F

from clipkit.errors import ClipkitError
from clipkit.eval.classifier import autocast, build_zeroshot_classifier, eval_mode
from clipkit.eval.datasets import CLASSIFICATION, RETRIEVAL, EvalDataset
from clipkit.eval.loader import EvalBatch, EvalLoader, SkippedImage
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


def zeroshot_logits(model: torch.nn.Module, images: torch.Tensor, classifier: torch.Tensor) -> torch.Tensor:
    """(B, C) logits: 100 x cosine similarity of each image to each class (classifier (D, C))."""
    features = F.normalize(model.encode_image(images), dim=-1)  # (B, D)
    return CLASSIFICATION_LOGIT_SCALE * features @ classifier.to(features.dtype)


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
    classifier = classifier.to(device)
    loader = _loader(dataset, transform, device=device, batch_size=batch_size, workers=workers)
    logits, labels = [], []
    with torch.inference_mode(), eval_mode(model), autocast(device, precision):
        for batch in _with_progress(loader, progress):
            images = batch.images.to(device, non_blocking=True)
            logits.append(zeroshot_logits(model, images, classifier).float())  # (B, C)
            labels.append(batch.labels)
    if not logits:
        raise ClipkitError(f"no decodable images in {dataset.source} ({len(loader.skipped)} skipped)")
    counts = classification_counts(torch.cat(logits).cpu(), torch.cat(labels))
    return ZeroshotResult(
        task=CLASSIFICATION,
        metrics=classification_metrics_from_counts(counts),
        num_images=int(counts["confusion_matrix"].sum()),
        skipped=loader.skipped,
    )


def encode_images(model: torch.nn.Module, images: torch.Tensor) -> torch.Tensor:
    """(B, D) L2-normalised image embeddings."""
    return F.normalize(model.encode_image(images), dim=-1)


def encode_texts(
    model: torch.nn.Module, tokenizer: Callable[[list[str]], torch.Tensor], texts: list[str], *, device
) -> torch.Tensor:
    """(T, D) L2-normalised text embeddings."""
    return F.normalize(model.encode_text(tokenizer(texts).to(device)), dim=-1)


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
    image_features, image_ids, text_features, text_image_ids = [], [], [], []
    with torch.inference_mode(), eval_mode(model), autocast(device, precision):
        for batch in _with_progress(loader, progress):
            image_features.append(
                encode_images(model, batch.images.to(device, non_blocking=True)).float().cpu()
            )
            image_ids.append(batch.indices)
            texts = [caption for captions in batch.captions for caption in captions]
            if texts:
                text_features.append(encode_texts(model, tokenizer, texts, device=device).float().cpu())
            text_image_ids.extend(
                int(i) for i, captions in zip(batch.indices, batch.captions, strict=True) for _ in captions
            )
    if not image_features:
        raise ClipkitError(f"no decodable images in {dataset.source} ({len(loader.skipped)} skipped)")
    if not text_features:
        raise ClipkitError(f"{dataset.source} has no captions (KEY.txt, one caption per line)")
    metrics = retrieval_metrics(
        torch.cat(image_features),
        torch.cat(text_features),
        torch.tensor(text_image_ids),
        image_ids=torch.cat(image_ids),
        ks=ks,
    )
    return ZeroshotResult(
        task=RETRIEVAL,
        metrics=metrics,
        num_images=sum(len(ids) for ids in image_ids),
        num_texts=len(text_image_ids),
        skipped=loader.skipped,
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
