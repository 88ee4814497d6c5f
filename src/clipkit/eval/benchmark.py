"""Run a suite for several models: per (model, dataset), every task's metrics and per-sample scores.

Each (model, dataset) result is written to `OUT/raw/MODEL/DATASET.json` (CLIP_benchmark's metrics per
task) and `.safetensors` (the per-sample scores the intervals are resampled from) when it is complete,
so an interrupted run keeps what it finished and a rerun skips it. Work items are split across
processes by index (`rank`, `world_size`); features come from the on-disk cache
(`clipkit.eval.features`), so a second model, a new task or a rerun never re-reads images it has seen.
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from clipkit.eval.classifier import load_or_build_zeroshot_classifier, weights_fingerprint
from clipkit.eval.datasets import CLASSIFICATION
from clipkit.eval.features import SplitFeatures, load_or_encode_split, load_or_encode_texts
from clipkit.eval.linear_probe import LinearProbeConfig, linear_probe, validation_split
from clipkit.eval.metrics import TOP5_MIN_CLASSES, classification_metrics
from clipkit.eval.suite import FEWSHOT, LINEAR_PROBE, RETRIEVAL_TASK, ZEROSHOT, DatasetSpec, Suite, TaskSpec
from clipkit.eval.uncertainty import (
    SampleScores,
    accuracy_scores,
    grouped_hit_scores,
    per_class_recall_scores,
)
from clipkit.eval.zeroshot import CLASSIFICATION_LOGIT_SCALE
from clipkit.files import atomic_path, write_text_atomic

log = logging.getLogger(__name__)

RECALL_KS = (1, 5, 10)
RAW_DIR = "raw"
CORRECT_SUFFIX = ":correct"


@dataclass(kw_only=True)
class ModelEntry:
    label: str  # how tables name it
    source: str  # what `build_model` takes
    pretrained: str | None = None
    step: int | None = None  # a run's checkpoint step, for metric-vs-step pictures

    @property
    def slug(self) -> str:
        text = re.sub(r"[^A-Za-z0-9._-]+", "_", self.label).strip("_")[:60]
        digest = hashlib.sha256(f"{self.source}|{self.pretrained}".encode()).hexdigest()[:8]
        return f"{text}-{digest}"


@dataclass(kw_only=True)
class RunOptions:
    device: str = "cpu"
    batch_size: int = 64
    workers: int = 0
    precision: str = "fp32"
    cache_dir: Path | None = None  # features and classifiers; None: compute, keep nothing
    probe: LinearProbeConfig | None = None


def raw_paths(out_dir: Path, model: ModelEntry, dataset: DatasetSpec) -> tuple[Path, Path]:
    folder = Path(out_dir) / RAW_DIR / model.slug
    return folder / f"{dataset.name}.json", folder / f"{dataset.name}.safetensors"


def is_done(out_dir: Path, model: ModelEntry, dataset: DatasetSpec) -> bool:
    """Finished before (both files present and the recorded tasks are the ones asked for)."""
    json_path, tensors_path = raw_paths(out_dir, model, dataset)
    if not (json_path.is_file() and tensors_path.is_file()):
        return False
    try:
        recorded = json.loads(json_path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError):
        return False
    return sorted(recorded.get("tasks", {})) == sorted(task.name for task in dataset.tasks)


def run_benchmark(
    models: list[ModelEntry],
    suite: Suite,
    out_dir: Path,
    options: RunOptions,
    *,
    rank: int = 0,
    world_size: int = 1,
) -> list[tuple[ModelEntry, DatasetSpec]]:
    """Evaluate this process's share of the (model, dataset) pairs not done yet; returns what it ran."""
    from clipkit.models import build_model, warn_if_random_weights

    pending = [(m, d) for m in models for d in suite.datasets if not is_done(out_dir, m, d)]
    mine = pending[rank::world_size]
    ran = []
    current: tuple[ModelEntry, Any, str] | None = None
    for model, dataset in mine:
        if current is None or current[0] is not model:
            bundle = build_model(model.source, pretrained=model.pretrained, device=options.device)
            warn_if_random_weights(bundle)
            current = (model, bundle, weights_fingerprint(bundle.model))
        _, bundle, weights_hash = current
        log.info("benchmark: %s on %s", model.label, dataset.name)
        result, scores = evaluate_dataset(bundle, weights_hash, dataset, options)
        result.update(model=model.label, source=model.source, pretrained=model.pretrained, step=model.step)
        _write_raw(out_dir, model, dataset, result, scores)
        ran.append((model, dataset))
    return ran


def evaluate_dataset(
    bundle, weights_hash: str, dataset: DatasetSpec, options: RunOptions
) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """Every task of one dataset for one model: (the JSON record, per-sample tensors by name)."""

    def features(split) -> SplitFeatures:
        return load_or_encode_split(
            bundle.model, split, weights_hash=weights_hash, preprocess_cfg=bundle.preprocess_cfg,
            transform=bundle.eval_transform, cache_dir=options.cache_dir, device=options.device,
            batch_size=options.batch_size, workers=options.workers, precision=options.precision,
        )  # fmt: skip

    test = features(dataset.test)
    record: dict[str, Any] = {
        "dataset": dataset.name,
        "source": dataset.source,
        "num_images": test.num_images,
        "skipped_images": test.skipped_images,
        "bad_shards": test.bad_shards,
        "tasks": {},
    }
    scores: dict[str, torch.Tensor] = {"indices": test.indices}
    train = val = None
    for task in dataset.tasks:
        if task.type == ZEROSHOT:
            metrics, task_scores = _zeroshot(bundle, weights_hash, dataset, test, options)
        elif task.type == RETRIEVAL_TASK:
            metrics, task_scores = _retrieval(bundle, weights_hash, dataset, test, options)
        else:
            if train is None:
                train = features(dataset.train)
                val = features(dataset.val) if dataset.val is not None else None
                record["train_images"] = train.num_images
                record["skipped_images"] += train.skipped_images + (val.skipped_images if val else 0)
            metrics, task_scores = _probe(task, dataset, train, val, test, options)
        record["tasks"][task.name] = metrics
        for metric, sample_scores in task_scores.items():
            if metric.endswith(CORRECT_SUFFIX):  # per-sample correctness, for McNemar's test
                scores[f"{task.name}/{metric.removesuffix(CORRECT_SUFFIX)}/correct"] = sample_scores.to(
                    torch.uint8
                )
                continue
            for part, tensor in _flatten(sample_scores).items():
                scores[f"{task.name}/{metric}/{part}"] = tensor
    record["features_from_cache"] = test.from_cache
    return record, scores


def _flatten(scores: SampleScores) -> dict[str, torch.Tensor]:
    parts = {"numerator": scores.numerator, "denominator": scores.denominator}
    if scores.strata is not None:
        parts["strata"] = scores.strata
    return parts


def read_sample_scores(tensors: dict[str, torch.Tensor], task: str, metric: str) -> SampleScores | None:
    prefix = f"{task}/{metric}/"
    if prefix + "numerator" not in tensors:
        return None
    return SampleScores(
        numerator=tensors[prefix + "numerator"],
        denominator=tensors[prefix + "denominator"],
        strata=tensors.get(prefix + "strata"),
    )


def classification_scores(logits: torch.Tensor, labels: torch.Tensor, prefix: str = "") -> tuple[dict, dict]:
    """CLIP_benchmark's classification metrics (keys with `prefix`) and their per-sample scores.

    logits (N, C) or (S, N, C) for S probes (metrics averaged over them)."""
    stacked = logits if logits.dim() == 3 else logits[None]  # (S, N, C)
    per_seed = [classification_metrics(seed_logits, labels) for seed_logits in stacked]
    keys = [k for k in ("acc1", "acc5", "mean_per_class_recall") if k in per_seed[0]]
    metrics = {f"{prefix}{k}": sum(m[k] for m in per_seed) / len(per_seed) for k in keys}
    correct1 = stacked.argmax(dim=2) == labels[None]  # (S, N)
    scores: dict[str, Any] = {f"{prefix}acc1": accuracy_scores(correct1)}
    if stacked.shape[2] >= TOP5_MIN_CLASSES:
        correct5 = (stacked.topk(TOP5_MIN_CLASSES, dim=2).indices == labels[None, :, None]).any(dim=2)
        scores[f"{prefix}acc5"] = accuracy_scores(correct5)
    scores[f"{prefix}mean_per_class_recall"] = per_class_recall_scores(correct1, labels)
    if len(stacked) == 1:
        scores[f"{prefix}acc1{CORRECT_SUFFIX}"] = correct1[0]
    return metrics, scores


def _zeroshot(bundle, weights_hash, dataset: DatasetSpec, test: SplitFeatures, options: RunOptions):
    cached = load_or_build_zeroshot_classifier(
        bundle.model, bundle.tokenizer, dataset.test.classnames, dataset.test.templates,
        device=options.device, cache_dir=options.cache_dir, precision=options.precision,
    )  # fmt: skip
    logits = CLASSIFICATION_LOGIT_SCALE * test.image_features @ cached.classifier.float().cpu()  # (N, C)
    return classification_scores(logits, test.labels)


def retrieval_hits(
    image_features: torch.Tensor, text_features: torch.Tensor, text_image: torch.Tensor, k: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """(text -> image hits (T,), image -> text hits (N,)) at k: the positive is among the k best.

    text_image (T,) is the row of each caption's image; scores as CLIP_benchmark (texts @ images.T)."""
    scores = text_features @ image_features.T  # (T, N)
    top_images = scores.topk(min(k, scores.shape[1]), dim=1).indices  # (T, k)
    text_hits = (top_images == text_image[:, None]).any(dim=1)
    top_texts = scores.T.topk(min(k, scores.shape[0]), dim=1).indices  # (N, k)
    image_hits = (text_image[top_texts] == torch.arange(scores.shape[1])[:, None]).any(dim=1)
    return text_hits, image_hits


def _retrieval(bundle, weights_hash, dataset: DatasetSpec, test: SplitFeatures, options: RunOptions):
    from clipkit.errors import ClipkitError

    if not test.captions or not any(test.captions):
        raise ClipkitError(f"dataset {dataset.name} has no captions (KEY.txt) for the retrieval task")
    texts = [caption for captions in test.captions for caption in captions]
    text_image = torch.tensor([row for row, captions in enumerate(test.captions) for _ in captions])  # (T,)
    text_features = load_or_encode_texts(
        bundle.model, bundle.tokenizer, texts, weights_hash=weights_hash, cache_dir=options.cache_dir,
        device=options.device, precision=options.precision,
    )  # fmt: skip
    metrics, scores = {}, {}
    num_images = test.num_images
    for k in RECALL_KS:
        text_hits, image_hits = retrieval_hits(test.image_features, text_features, text_image, k)
        image_key, text_key = f"image_retrieval_recall@{k}", f"text_retrieval_recall@{k}"
        # Captions are grouped by their image, so resampling images carries their captions along.
        scores[image_key] = grouped_hit_scores(text_hits, text_image, num_images)
        scores[text_key] = accuracy_scores(image_hits)
        metrics[image_key] = text_hits.double().mean().item()
        metrics[text_key] = image_hits.double().mean().item()
    return metrics, scores


def _probe(task: TaskSpec, dataset: DatasetSpec, train: SplitFeatures, val, test: SplitFeatures, options):
    # CLIP_benchmark's probe settings (batch 64), not the image batch size: results must not depend on --batch-size.
    config = options.probe or LinearProbeConfig()
    num_classes = dataset.test.num_classes
    logits, weight_decays = [], []
    for seed in task.seeds:
        train_pair = (train.image_features, train.labels)
        if val is not None:
            val_pair = (val.image_features, val.labels)
        else:  # hold out part of train for the weight-decay search
            keep, held_out = validation_split(len(train.labels), dataset.val_proportion, seed=seed)
            val_pair = (train.image_features[held_out], train.labels[held_out])
            train_pair = (train.image_features[keep], train.labels[keep])
        result = linear_probe(
            train_pair, test.image_features, num_classes, val=val_pair,
            fewshot_k=task.k if task.type == FEWSHOT else -1, seed=seed, config=config, device=options.device,
        )  # fmt: skip
        logits.append(result.logits)
        weight_decays.append(result.weight_decay)
    metrics, scores = classification_scores(torch.stack(logits), test.labels, prefix="lp_")
    metrics.update(weight_decay=weight_decays, seeds=task.seeds, fewshot_k=task.k if task.type == FEWSHOT else -1,
                   epochs=config.epochs, lr=config.lr)  # fmt: skip
    assert task.type in (LINEAR_PROBE, FEWSHOT) and dataset.test.task == CLASSIFICATION
    return metrics, scores


def _write_raw(out_dir: Path, model: ModelEntry, dataset: DatasetSpec, record: dict, scores: dict) -> None:
    import safetensors.torch

    json_path, tensors_path = raw_paths(out_dir, model, dataset)
    # Tasks share some tensors (the labels as strata): safetensors stores each one on its own.
    tensors = {name: tensor.detach().cpu().clone().contiguous() for name, tensor in scores.items()}
    with atomic_path(tensors_path) as tmp:
        safetensors.torch.save_file(tensors, str(tmp))
    # The JSON is written last: with it, the pair is complete.
    write_text_atomic(json_path, json.dumps(record, indent=2) + "\n")


def read_raw(out_dir: Path, model: ModelEntry, dataset: DatasetSpec) -> tuple[dict, dict[str, torch.Tensor]]:
    import safetensors.torch

    json_path, tensors_path = raw_paths(out_dir, model, dataset)
    return json.loads(json_path.read_text(encoding="utf-8")), safetensors.torch.load_file(str(tensors_path))
