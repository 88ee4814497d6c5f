"""Read an evaluation dataset in batches, split across processes so each sample is seen exactly once.

Sample i (in the dataset's fixed order) belongs to rank `i % world_size`; within a rank, DataLoader
workers take turns the same way. Every process reads the shards from the start and decodes only its
own samples, so the split is exact whatever the number or size of shards, and ranks differ by at
most one sample. Images that cannot be decoded are skipped and reported in `EvalLoader.skipped`.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, NamedTuple

import torch
from PIL import Image

from clipkit.data.images import decode_image, decode_sample_image, read_image
from clipkit.errors import ClipkitError
from clipkit.eval.datasets import CLASSIFICATION, EvalDataset, iter_dataset_samples

__all__ = ["EvalBatch", "EvalLoader", "SkippedImage", "SkippedShard", "decode_image", "read_image"]


class EvalBatch(NamedTuple):
    images: torch.Tensor  # (B, 3, H, W)
    labels: torch.Tensor | None  # (B,) int64 class indices; None for retrieval
    captions: list[list[str]] | None  # each image's captions (retrieval); None for classification
    indices: torch.Tensor  # (B,) int64 position of each sample in the dataset's order


class SkippedImage(NamedTuple):
    key: str
    reason: str


class SkippedShard(NamedTuple):
    url: str
    reason: str  # cannot be opened, corrupt or truncated (its readable samples are still evaluated)


class EvalLoader:
    """Iterable of `EvalBatch` for one process (`rank` of `world_size`).

    `transform` turns a PIL RGB image into a (3, H, W) tensor (a model's `eval_transform`).
    `workers` > 0 decodes in DataLoader worker processes. `captions=True` also reads a labelled set's
    captions (KEY.txt), so one pass gives both a classification and a retrieval evaluation.
    After (or during) iteration, `skipped`
    lists this process's undecodable images and `bad_shards` the shards that could not be read whole
    (reported by rank 0 only, since every rank reads every shard): evaluation goes on without them.
    """

    def __init__(
        self,
        dataset: EvalDataset,
        *,
        transform: Callable[[Image.Image], torch.Tensor],
        batch_size: int,
        rank: int = 0,
        world_size: int = 1,
        workers: int = 0,
        pin_memory: bool = False,
        captions: bool = False,
    ):
        if batch_size < 1:
            raise ClipkitError(f"batch size must be at least 1, got {batch_size}")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is outside world size {world_size}")
        self.dataset = dataset
        self.transform = transform
        self.batch_size = batch_size
        self.rank = rank
        self.world_size = world_size
        self.workers = workers
        self.pin_memory = pin_memory
        self.captions = captions
        self.skipped: list[SkippedImage] = []
        self.bad_shards: list[SkippedShard] = []

    def count_samples(self) -> int | None:
        """How many samples this rank reads (None when the dataset's size is unknown up front)."""
        total = self.dataset.count_samples()
        return None if total is None else len(range(self.rank, total, self.world_size))

    def __iter__(self) -> Iterator[EvalBatch]:
        self.skipped = []
        self.bad_shards = []
        stream = _SampleStream(
            self.dataset,
            self.transform,
            batch_size=self.batch_size,
            rank=self.rank,
            world_size=self.world_size,
            captions=self.captions,
        )
        if self.workers > 0:
            batches: Any = torch.utils.data.DataLoader(
                stream, batch_size=None, num_workers=self.workers, pin_memory=self.pin_memory
            )
        else:
            batches = stream
        for raw in batches:
            if "error" in raw:
                raise ClipkitError(raw["error"])
            self.skipped.extend(SkippedImage(*item) for item in raw["skipped"])
            self.bad_shards.extend(SkippedShard(*item) for item in raw["bad_shards"])
            if len(raw["indices"]):  # a worker's last chunk may hold only skipped samples
                yield EvalBatch(raw["images"], raw["labels"], raw["captions"], raw["indices"])


class _SampleStream(torch.utils.data.IterableDataset):
    """Runs in each DataLoader worker: picks this worker's samples, decodes them, batches them."""

    def __init__(
        self,
        dataset: EvalDataset,
        transform: Callable,
        *,
        batch_size: int,
        rank: int,
        world_size: int,
        captions: bool = False,
    ):
        super().__init__()
        self.captions = captions
        self.dataset = dataset
        self.transform = transform
        self.batch_size = batch_size
        self.rank = rank
        self.world_size = world_size

    def __iter__(self) -> Iterator[dict[str, Any]]:
        info = torch.utils.data.get_worker_info()
        worker, workers = (info.id, info.num_workers) if info is not None else (0, 1)
        # Sample i is this worker's when i % world_size == rank and (i // world_size) % workers == worker.
        stride = self.world_size * workers
        offset = self.rank + self.world_size * worker
        try:
            yield from self._batches(offset, stride)
        except ClipkitError as e:
            # Raised in a worker, an exception reaches the main process wrapped in a traceback; pass the
            # one-line message instead and let EvalLoader raise it.
            yield {"error": str(e)}

    def _batches(self, offset: int, stride: int) -> Iterator[dict[str, Any]]:
        items: list[tuple[torch.Tensor, Any, int]] = []
        skipped: list[tuple[str, str]] = []
        bad_shards: list[tuple[str, str]] = []

        def shard_error(url: str, key: str | None, reason: str) -> None:
            if offset == 0:  # every reader reads every shard: one of them reports it
                bad_shards.append((url, reason))

        for index, raw in enumerate(self._raw_samples(shard_error)):
            if index % stride != offset:
                continue
            target = self._target(raw)
            image, problem = self._decode(raw)
            if image is None:
                skipped.append((raw["__key__"], problem))
                continue
            items.append((self.transform(image), target, index))
            if len(items) == self.batch_size:
                yield self._collate(items, skipped, bad_shards)
                items, skipped, bad_shards = [], [], []
        if items or skipped or bad_shards:
            yield self._collate(items, skipped, bad_shards)

    def _raw_samples(self, on_shard_error) -> Iterator[dict[str, Any]]:
        if self.dataset.layout == "class_folders":
            root = Path(self.dataset.source)
            for path, label in self.dataset.files:
                yield {"__key__": str(Path(path).relative_to(root)), "__path__": path, "label": label}
        else:
            yield from iter_dataset_samples(self.dataset.shards, on_shard_error)

    def _target(self, raw: dict[str, Any]) -> int | list[str] | tuple[int, list[str]]:
        if self.dataset.task != CLASSIFICATION:
            return _captions(raw)
        if self.captions:
            return self._label(raw), _captions(raw)
        return self._label(raw)

    def _label(self, raw: dict[str, Any]) -> int:
        if "label" in raw:
            label = raw["label"]
        elif "cls" in raw:
            label = _parse_label(raw["cls"].decode("utf-8").strip(), raw)
        elif "json" in raw:
            meta = json.loads(raw["json"])
            if not isinstance(meta, dict) or "label" not in meta:
                raise ClipkitError(
                    f'sample {raw["__key__"]} in {raw.get("__url__")}: {raw["__key__"]}.json has no "label"; '
                    'write {"label": CLASS_INDEX} or a KEY.cls file (for captioned shards use --task retrieval)'
                )
            label = _parse_label(meta["label"], raw)
        else:
            raise ClipkitError(
                f"sample {raw['__key__']} in {raw.get('__url__')} has no label: expected {raw['__key__']}.cls or "
                f'{raw["__key__"]}.json with "label" (for captioned shards use --task retrieval)'
            )
        num_classes = self.dataset.num_classes or 0
        if not 0 <= label < num_classes:
            raise ClipkitError(
                f"sample {raw['__key__']} in {raw.get('__url__')} has label {label} but the dataset has "
                f"{num_classes} class names; labels must be 0..{num_classes - 1} (check --classnames)"
            )
        return label

    def _decode(self, raw: dict[str, Any]) -> tuple[Image.Image | None, str]:
        if "__path__" in raw:
            return read_image(raw["__path__"])
        return decode_sample_image(raw)

    def _collate(
        self,
        items: list[tuple[torch.Tensor, Any, int]],
        skipped: list[tuple[str, str]],
        bad_shards: list[tuple[str, str]],
    ) -> dict:
        classification = self.dataset.task == CLASSIFICATION
        targets = [item[1] for item in items]
        labels = [t[0] for t in targets] if self.captions and classification else targets
        captions = [t[1] for t in targets] if self.captions and classification else targets
        return {
            "images": torch.stack([item[0] for item in items]) if items else torch.empty(0),
            "labels": torch.tensor(labels, dtype=torch.long) if classification else None,
            "captions": captions if (self.captions or not classification) else None,
            "indices": torch.tensor([item[2] for item in items], dtype=torch.long),
            "skipped": skipped,
            "bad_shards": bad_shards,
        }


def _captions(raw: dict[str, Any]) -> list[str]:
    text = raw.get("txt", b"").decode("utf-8")
    # One caption per line, as CLIP_benchmark reads its retrieval shards.
    return [line for line in text.splitlines() if line.strip()]


def _parse_label(value: Any, raw: dict[str, Any]) -> int:
    if isinstance(value, int) and not isinstance(value, bool):
        return value
    if isinstance(value, str) and value.strip().lstrip("-").isdigit():
        return int(value)
    raise ClipkitError(f"sample {raw['__key__']} in {raw.get('__url__')}: label {value!r} is not an integer")
