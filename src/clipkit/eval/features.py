"""Frozen image (and caption) features of an evaluation set, computed once and kept on disk.

Every evaluation of the benchmark (zero-shot classification, retrieval, linear probes) reads the
L2-normalised image embeddings of a split; they are computed once per (model weights, dataset, split,
preprocessing) and stored as safetensors under `CACHE/features/KEY.safetensors` (+ `KEY.json` with the
captions and what was skipped), where KEY hashes the model's weights (every tensor), the preprocessing,
the dataset's files (paths, sizes, modification times) and the split. A second task, or rerunning
a benchmark, reads the file instead of the images. Caption embeddings are cached the same way, keyed by
the weights, the tokenizer and the captions.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from clipkit.eval.classifier import autocast, eval_mode, tokenizer_identity
from clipkit.eval.datasets import CLASSIFICATION, EvalDataset
from clipkit.eval.loader import EvalLoader
from clipkit.files import atomic_path, write_text_atomic

log = logging.getLogger(__name__)

FEATURES_FORMAT = 1  # bump when what a features file holds changes, so old files stop matching


@dataclass(kw_only=True)
class SplitFeatures:
    """One split of a dataset through one model's image tower, in the dataset's sample order."""

    image_features: torch.Tensor  # (N, D) float32, L2-normalised
    indices: torch.Tensor  # (N,) int64 sample positions in the dataset's order
    labels: torch.Tensor | None = None  # (N,) int64 class indices (classification sets)
    captions: list[list[str]] | None = None  # each image's captions, when the samples carry any
    skipped_images: int = 0  # undecodable images (left out)
    bad_shards: list[str] = field(default_factory=list)  # shards read in part or not at all
    from_cache: bool = False

    @property
    def num_images(self) -> int:
        return int(self.indices.shape[0])


def dataset_fingerprint(dataset: EvalDataset) -> dict[str, Any]:
    """What identifies a dataset's content cheaply: its files with their sizes and modification times."""
    paths = [path for path, _ in dataset.files] if dataset.layout == "class_folders" else dataset.shards
    files = []
    for path in paths:
        p = Path(path)
        stat = p.stat() if "://" not in path and p.is_file() else None
        files.append([path, stat.st_size if stat else None, stat.st_mtime_ns if stat else None])
    labels = [label for _, label in dataset.files]
    return {"layout": dataset.layout, "task": dataset.task, "files": files, "labels": labels}


def features_cache_key(
    weights_hash: str, dataset: EvalDataset, preprocess_cfg: dict[str, Any], *, precision: str
) -> str:
    identity = {
        "format": FEATURES_FORMAT,
        "weights": weights_hash,
        "dataset": dataset_fingerprint(dataset),
        "preprocess": {k: list(v) if isinstance(v, tuple) else v for k, v in preprocess_cfg.items()},
        "precision": precision,
    }
    return hashlib.sha256(json.dumps(identity, sort_keys=True, default=str).encode()).hexdigest()[:32]


def encode_split(
    model: torch.nn.Module,
    dataset: EvalDataset,
    *,
    transform: Callable,
    device: str | torch.device = "cpu",
    batch_size: int = 64,
    workers: int = 0,
    precision: str = "fp32",
    rank: int = 0,
    world_size: int = 1,
) -> SplitFeatures:
    """Normalised image embeddings (and labels, captions) of this process's share of `dataset`."""
    loader = EvalLoader(
        dataset, transform=transform, batch_size=batch_size, workers=workers, rank=rank,
        world_size=world_size, captions=True,
    )  # fmt: skip
    features, indices, labels, captions = [], [], [], []
    with torch.inference_mode(), eval_mode(model), autocast(device, precision):
        for batch in loader:
            images = batch.images.to(device, non_blocking=True)
            features.append(F.normalize(model.encode_image(images), dim=-1).float().cpu())  # (B, D)
            indices.append(batch.indices)
            if batch.labels is not None:
                labels.append(batch.labels)
            captions.extend(batch.captions or [])
    if not features:
        raise_empty(dataset, len(loader.skipped))
    return SplitFeatures(
        image_features=torch.cat(features),
        indices=torch.cat(indices),
        labels=torch.cat(labels) if dataset.task == CLASSIFICATION else None,
        captions=captions if any(captions) else None,
        skipped_images=len(loader.skipped),
        bad_shards=[shard.url for shard in loader.bad_shards],
    )


def raise_empty(dataset: EvalDataset, skipped: int) -> None:
    from clipkit.errors import ClipkitError

    raise ClipkitError(f"no decodable images in {dataset.source} ({skipped} skipped); check the dataset")


def load_or_encode_split(
    model: torch.nn.Module,
    dataset: EvalDataset,
    *,
    weights_hash: str,
    preprocess_cfg: dict[str, Any],
    transform: Callable,
    cache_dir: str | Path | None,
    device: str | torch.device = "cpu",
    batch_size: int = 64,
    workers: int = 0,
    precision: str = "fp32",
) -> SplitFeatures:
    """`encode_split` over the whole dataset, read from `cache_dir` when computed before (None: no cache)."""

    def encode() -> SplitFeatures:
        return encode_split(
            model, dataset, transform=transform, device=device, batch_size=batch_size, workers=workers,
            precision=precision,
        )  # fmt: skip

    if cache_dir is None:
        return encode()
    key = features_cache_key(weights_hash, dataset, preprocess_cfg, precision=precision)
    path = Path(cache_dir) / "features" / f"{key}.safetensors"
    cached = _read_features(path)
    if cached is not None:
        return cached
    features = encode()
    _write_features(path, features)
    return features


def _read_features(path: Path) -> SplitFeatures | None:
    import safetensors.torch

    meta_path = path.with_suffix(".json")
    if not (path.is_file() and meta_path.is_file()):
        return None
    try:
        tensors = safetensors.torch.load_file(str(path))
        meta = json.loads(meta_path.read_text(encoding="utf-8"))
        return SplitFeatures(
            image_features=tensors["image_features"],
            indices=tensors["indices"],
            labels=tensors.get("labels"),
            captions=meta["captions"],
            skipped_images=int(meta["skipped_images"]),
            bad_shards=list(meta["bad_shards"]),
            from_cache=True,
        )
    except Exception as e:  # a damaged cache file is recomputed, never trusted
        log.warning("ignoring unreadable cached features %s (%s)", path, e)
        return None


def _write_features(path: Path, features: SplitFeatures) -> None:
    import safetensors.torch

    tensors = {"image_features": features.image_features.contiguous(), "indices": features.indices}
    if features.labels is not None:
        tensors["labels"] = features.labels
    meta = {
        "captions": features.captions,
        "skipped_images": features.skipped_images,
        "bad_shards": features.bad_shards,
    }
    # The JSON goes first: the tensors file is what marks the entry complete.
    write_text_atomic(path.with_suffix(".json"), json.dumps(meta))
    with atomic_path(path) as tmp:
        safetensors.torch.save_file(tensors, str(tmp))


def load_or_encode_texts(
    model: torch.nn.Module,
    tokenizer: Callable[[list[str]], torch.Tensor],
    texts: list[str],
    *,
    weights_hash: str,
    cache_dir: str | Path | None,
    device: str | torch.device = "cpu",
    batch_size: int = 256,
    precision: str = "fp32",
) -> torch.Tensor:
    """(T, D) float32 normalised text embeddings of `texts`, cached like the image features."""

    def encode() -> torch.Tensor:
        return encode_texts(
            model, tokenizer, texts, device=device, batch_size=batch_size, precision=precision
        )

    if cache_dir is None:
        return encode()
    import safetensors.torch

    identity = [FEATURES_FORMAT, weights_hash, tokenizer_identity(tokenizer), precision, _digest(texts)]
    key = hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()[:32]
    path = Path(cache_dir) / "text_features" / f"{key}.safetensors"
    if path.is_file():
        try:
            return safetensors.torch.load_file(str(path))["text_features"]
        except Exception as e:  # a damaged cache file is recomputed, never trusted
            log.warning("ignoring unreadable cached text features %s (%s)", path, e)
    features = encode()
    with atomic_path(path) as tmp:
        safetensors.torch.save_file({"text_features": features.contiguous()}, str(tmp))
    return features


def encode_texts(
    model: torch.nn.Module,
    tokenizer: Callable[[list[str]], torch.Tensor],
    texts: list[str],
    *,
    device: str | torch.device = "cpu",
    batch_size: int = 256,
    precision: str = "fp32",
) -> torch.Tensor:
    """(T, D) float32 L2-normalised text embeddings, on the CPU."""
    features = []
    with torch.inference_mode(), eval_mode(model), autocast(device, precision):
        for start in range(0, len(texts), batch_size):
            tokens = tokenizer(texts[start : start + batch_size]).to(device)
            features.append(F.normalize(model.encode_text(tokens), dim=-1).float().cpu())  # (b, D)
    return torch.cat(features).clone()


def _digest(texts: Iterable[str]) -> str:
    digest = hashlib.sha256()
    for text in texts:
        digest.update(text.encode("utf-8") + b"\0")
    return digest.hexdigest()
