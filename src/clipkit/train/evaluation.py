"""Evaluation while training, listed in the config (big_vision's `evals` habit).

`train.eval` is a list of entries, each `{type: zeroshot | retrieval | linear_probe, dataset: DIR, name: NAME,
every: STEPS}` (every 0: whenever the run evaluates, i.e. every `train.eval_every` steps and at the end);
their metrics are logged as `eval/NAME/METRIC`. The old shorthands keep working and keep their keys:
`data.zeroshot_dataset` is a zeroshot entry logged as `zeroshot/...`, `data.val_shards` a retrieval entry
logged as `retrieval/...`. `train.keep_best: eval/NAME/acc1` exports the model to `model-best/` whenever
that metric improves.

Every process evaluates its own share of the samples (EvalLoader splits them by rank); classification
counts are summed and features gathered across processes, so every process ends with the metrics of the
whole set. The evaluations themselves are `clipkit.eval`'s, the ones `clipkit zeroshot` and
`clipkit benchmark` run.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from accelerate.utils import gather_object

from clipkit.data import DataConfig
from clipkit.errors import ClipkitError
from clipkit.eval import (
    EvalDataset,
    EvalLoader,
    build_zeroshot_classifier,
    classification_metrics,
    classification_metrics_from_counts,
    encode_retrieval_set,
    open_eval_dataset,
    retrieval_metrics,
    zeroshot_classification_counts,
)
from clipkit.eval.features import encode_split
from clipkit.eval.linear_probe import linear_probe, validation_split
from clipkit.models import ModelBundle

EVAL_TYPES = ("zeroshot", "retrieval", "linear_probe")
BEST_MODEL_DIR = "model-best"


@dataclass(kw_only=True)
class EvalEntry:
    type: str  # zeroshot | retrieval | linear_probe
    dataset: str | list[str]  # a dataset `clipkit zeroshot` reads; retrieval: also shard lists
    name: str
    every: int = 0  # steps between evaluations; 0: whenever the run evaluates (train.eval_every, the end)
    split: str = "test"
    prefix: str = ""  # metric key prefix; "" -> "eval/NAME/"

    @property
    def key_prefix(self) -> str:
        return self.prefix or f"eval/{self.name}/"

    @classmethod
    def from_dict(cls, raw: Any, index: int) -> EvalEntry:
        where = f"train.eval[{index}]"
        if not isinstance(raw, Mapping):
            raise ClipkitError(f"{where} must be a mapping {{type, dataset, name, every}}, got {raw!r}")
        unknown = sorted(set(raw) - {"type", "dataset", "name", "every", "split"})
        if unknown:
            raise ClipkitError(
                f"{where}: unknown key {unknown[0]!r}; keys: type, dataset, name, every, split"
            )
        if raw.get("type") not in EVAL_TYPES:
            raise ClipkitError(f"{where}.type={raw.get('type')!r} is not one of {', '.join(EVAL_TYPES)}")
        if not raw.get("dataset"):
            raise ClipkitError(
                f"{where} has no dataset: give `dataset: DIR` (any layout clipkit zeroshot reads)"
            )
        every = int(raw.get("every", 0))
        if every < 0:
            raise ClipkitError(
                f"{where}.every={every} must be 0 (with train.eval_every) or a number of steps"
            )
        return cls(type=raw["type"], dataset=str(raw["dataset"]), name=str(raw.get("name") or raw["type"]),
                   every=every, split=str(raw.get("split", "test")))  # fmt: skip


class Evaluations:
    """The run's evaluation entries: which are due at a step, their metrics, whether the best improved."""

    def __init__(self, entries: Sequence[EvalEntry], *, eval_every: int = 0, keep_best: str | None = None):
        names = [e.name for e in entries if not e.prefix]
        duplicated = sorted({n for n in names if names.count(n) > 1})
        if duplicated:
            raise ClipkitError(
                f"train.eval: name {duplicated[0]!r} is used twice; give each entry its own name"
            )
        self.entries = list(entries)
        self.eval_every = eval_every
        self.keep_best = keep_best
        self.best = -math.inf

    @classmethod
    def from_config(
        cls, entries: Sequence[Any], data: DataConfig, *, eval_every: int = 0, keep_best: str | None = None
    ) -> Evaluations:
        """`train.eval` entries plus the shorthands `data.zeroshot_dataset` and `data.val_shards`."""
        parsed = [EvalEntry.from_dict(raw, i) for i, raw in enumerate(entries or [])]
        if data.zeroshot_dataset:
            parsed.append(
                EvalEntry(type="zeroshot", dataset=data.zeroshot_dataset, name="zeroshot", prefix="zeroshot/")
            )
        if data.val_sources:
            shards = [url for source in data.val_sources for url in source]
            parsed.append(EvalEntry(type="retrieval", dataset=shards, name="retrieval", prefix="retrieval/"))
        if keep_best is not None and not any(keep_best.startswith(e.key_prefix) for e in parsed):
            known = ", ".join(f"{e.key_prefix}acc1" for e in parsed) or "none: add a train.eval entry"
            raise ClipkitError(f"train.keep_best={keep_best} names no evaluation of this run; e.g. {known}")
        return cls(parsed, eval_every=eval_every, keep_best=keep_best)

    def due(self, step: int) -> bool:
        """Whether any entry evaluates after `step` (the end of the run always evaluates all)."""
        return any(self._due(entry, step) for entry in self.entries)

    def _due(self, entry: EvalEntry, step: int | None) -> bool:
        if step is None:
            return True
        every = entry.every or self.eval_every
        return bool(every) and step % every == 0

    def run(
        self, model: torch.nn.Module, bundle: ModelBundle, data: DataConfig, accelerator, *,
        precision: str = "fp32", step: int | None = None,
    ) -> dict[str, Any]:  # fmt: skip
        """Metrics of the entries due at `step` (None: all of them)."""
        metrics: dict[str, Any] = {}
        for entry in self.entries:
            if self._due(entry, step):
                run = {"zeroshot": _zeroshot, "retrieval": _retrieval, "linear_probe": _linear_probe}[
                    entry.type
                ]
                found = run(model, bundle, _open(entry), data, accelerator, precision)
                metrics.update({f"{entry.key_prefix}{key}": value for key, value in found.items()})
        return metrics

    def improved(self, metrics: Mapping[str, Any]) -> bool:
        """True when `keep_best`'s metric is in `metrics` and better than ever before in this process."""
        if self.keep_best is None or self.keep_best not in metrics:
            return False
        value = float(metrics[self.keep_best])
        if value > self.best:
            self.best = value
            return True
        return False


def evaluate(
    model: torch.nn.Module, bundle: ModelBundle, data: DataConfig, accelerator, *, precision: str = "fp32"
) -> dict[str, Any]:
    """Metrics for `data.zeroshot_dataset` (zeroshot/...) and `data.val_shards` (retrieval/...); {} if neither."""
    return Evaluations.from_config([], data).run(model, bundle, data, accelerator, precision=precision)


def _open(entry: EvalEntry) -> EvalDataset:
    if isinstance(entry.dataset, list):  # data.val_shards: captioned shards
        return EvalDataset(source=", ".join(entry.dataset[:3]), layout="captioned_shards", task="retrieval",
                           shards=entry.dataset)  # fmt: skip
    if entry.type == "retrieval":
        dataset = open_eval_dataset(entry.dataset, split=entry.split)
        if dataset.task == "classification":  # a labelled set whose samples carry captions too
            return EvalDataset(source=dataset.source, layout="captioned_shards", task="retrieval",
                               shards=dataset.shards)  # fmt: skip
        return dataset
    return open_eval_dataset(entry.dataset, task="classification", split=entry.split)


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
    metrics = {key: result[key] for key in ("acc1", "acc5", "mean_per_class_recall") if key in result}
    metrics["skipped_images"] = _total(accelerator, len(loader.skipped))
    metrics["bad_shards"] = _total(accelerator, len(loader.bad_shards))
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
    metrics: dict[str, Any] = retrieval_metrics(
        image_features, text_features, text_image_ids, image_ids=image_ids
    )
    metrics["skipped_images"] = _total(accelerator, len(loader.skipped))
    metrics["bad_shards"] = _total(accelerator, len(loader.bad_shards))
    return metrics


def _linear_probe(model, bundle, dataset, data, accelerator, precision) -> dict[str, Any]:
    """CLIP_benchmark's linear probe (clipkit.eval.linear_probe) on the dataset's train split, tested on
    `dataset`; 20% of train held out for the weight-decay search. Features are gathered, every process
    trains the same probe (the same seed), so all end with the same metrics."""
    from pathlib import Path

    train_dir = Path(dataset.source) / "train"
    if not train_dir.is_dir():
        raise ClipkitError(
            f"linear_probe evaluation: {dataset.source} has no train/ split to fit the probe on"
        )
    train_set = open_eval_dataset(train_dir, task="classification", classnames=dataset.classnames)

    def gathered(split: EvalDataset) -> tuple[torch.Tensor, torch.Tensor]:
        local = encode_split(
            model, split, transform=bundle.eval_transform, device=accelerator.device, batch_size=data.batch_size,
            precision=precision, rank=accelerator.process_index, world_size=accelerator.num_processes,
        )  # fmt: skip
        parts = gather_object([(local.indices, local.image_features, local.labels)])
        indices, features, labels = (torch.cat(field) for field in zip(*parts, strict=True))
        order = indices.argsort()  # the dataset's order, whatever the number of processes
        return features[order], labels[order]

    train_features, train_labels = gathered(train_set)
    test_features, test_labels = gathered(dataset)
    keep, held_out = validation_split(len(train_labels), 0.2, seed=0)
    result = linear_probe(
        (train_features[keep], train_labels[keep]), test_features, len(dataset.classnames),
        val=(train_features[held_out], train_labels[held_out]), seed=0,
    )  # fmt: skip
    metrics = classification_metrics(result.logits, test_labels)
    return {key: metrics[key] for key in ("acc1", "acc5", "mean_per_class_recall") if key in metrics}


def _total(accelerator, value: int) -> int:
    return int(accelerator.reduce(torch.tensor(value, device=accelerator.device), reduction="sum").item())
