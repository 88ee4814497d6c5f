"""The zero-shot text classifier: one unit vector per class from its prompts, as CLIP_benchmark builds it.

For each class, every prompt (template filled with the class name) is encoded, L2-normalised, the
prompts are averaged and the mean is normalised again (`clip_benchmark.metrics.zeroshot_classification.
zero_shot_classifier`). Here all prompts are encoded in batches across classes, and the result can be
cached on disk, keyed by the text tower's weights and the prompt set.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import NamedTuple

import torch
import torch.nn.functional as F

from clipkit.configs import cache_dir as clipkit_cache_dir
from clipkit.files import atomic_path

log = logging.getLogger(__name__)

PRECISIONS = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}
CACHE_FORMAT = 1  # bump when the classifier's definition changes, so old cache files stop matching


def class_prompts(
    classnames: Sequence[str], templates: Sequence[str] | Mapping[str, Sequence[str]]
) -> list[list[str]]:
    """Each class's prompts: templates filled with `template.format(c=classname)`, or a class's own list."""
    if isinstance(templates, Mapping):  # per-class prompts, e.g. CuPL
        return [list(templates[name]) for name in classnames]
    return [[template.format(c=name) for template in templates] for name in classnames]


def build_zeroshot_classifier(
    model: torch.nn.Module,
    tokenizer: Callable[[list[str]], torch.Tensor],
    classnames: Sequence[str],
    templates: Sequence[str] | Mapping[str, Sequence[str]],
    *,
    device: str | torch.device = "cpu",
    batch_size: int = 256,
    precision: str = "fp32",
    progress: bool = False,
) -> torch.Tensor:
    """The (D, C) float32 matrix whose column c is class c's normalised mean prompt embedding.

    `model` is an open_clip model (unwrapped: it needs `encode_text`); it runs in eval mode and is
    put back in its previous mode. `precision` "bf16"/"fp16" encodes under autocast.
    """
    prompts = class_prompts(classnames, templates)
    flat = [prompt for class_prompts_ in prompts for prompt in class_prompts_]
    owner = torch.tensor(
        [c for c, class_prompts_ in enumerate(prompts) for _ in class_prompts_], device=device
    )
    features = []
    steps = range(0, len(flat), batch_size)
    if progress:
        from tqdm import tqdm

        steps = tqdm(steps, desc="text classifier", unit="batch", disable=None)
    with torch.inference_mode(), eval_mode(model), autocast(device, precision):
        for start in steps:
            tokens = tokenizer(flat[start : start + batch_size]).to(device)
            features.append(F.normalize(model.encode_text(tokens), dim=-1).float())  # (b, D)
    features = torch.cat(features)  # (P, D)
    num_classes = len(prompts)
    sums = torch.zeros(num_classes, features.shape[1], device=features.device).index_add_(0, owner, features)
    counts = torch.bincount(owner, minlength=num_classes).to(features.dtype)  # (C,)
    class_embeddings = sums / counts[:, None]  # (C, D) mean of normalised prompt embeddings
    class_embeddings = class_embeddings / class_embeddings.norm(dim=-1, keepdim=True)
    return class_embeddings.T.contiguous().clone()  # (D, C); clone leaves inference mode's tensor type


class CachedClassifier(NamedTuple):
    classifier: torch.Tensor  # (D, C)
    path: Path | None  # the cache file (None when caching is off)
    from_cache: bool


def load_or_build_zeroshot_classifier(
    model: torch.nn.Module,
    tokenizer: Callable[[list[str]], torch.Tensor],
    classnames: Sequence[str],
    templates: Sequence[str] | Mapping[str, Sequence[str]],
    *,
    device: str | torch.device = "cpu",
    cache_dir: str | Path | None = None,
    batch_size: int = 256,
    precision: str = "fp32",
    progress: bool = False,
) -> CachedClassifier:
    """`build_zeroshot_classifier`, computed once per text tower and prompt set and kept in `cache_dir`.

    The key hashes the text tower's weights (every parameter and buffer outside `visual`), the
    tokenizer's settings, the class names, the templates and the precision.
    """

    def build() -> torch.Tensor:
        return build_zeroshot_classifier(
            model, tokenizer, classnames, templates, device=device, batch_size=batch_size,
            precision=precision, progress=progress,
        )  # fmt: skip

    if cache_dir is None:
        return CachedClassifier(build(), None, False)
    import safetensors.torch

    key = classifier_cache_key(model, tokenizer, classnames, templates, precision=precision)
    path = Path(cache_dir) / "zeroshot_classifiers" / f"{key}.safetensors"
    if path.is_file():
        try:
            classifier = safetensors.torch.load_file(str(path))["classifier"]
            if classifier.shape[1] == len(classnames):
                return CachedClassifier(classifier.to(device), path, True)
        except Exception as e:  # a damaged cache file is rebuilt, never trusted
            log.warning("ignoring unreadable cached classifier %s (%s)", path, e)
    classifier = build()
    with atomic_path(path) as tmp:
        safetensors.torch.save_file({"classifier": classifier.cpu()}, str(tmp))
    return CachedClassifier(classifier, path, False)


def classifier_cache_key(
    model: torch.nn.Module,
    tokenizer: Callable,
    classnames: Sequence[str],
    templates: Sequence[str] | Mapping[str, Sequence[str]],
    *,
    precision: str,
) -> str:
    prompts = {
        "format": CACHE_FORMAT,
        "classnames": list(classnames),
        "templates": dict(templates) if isinstance(templates, Mapping) else list(templates),
        "precision": precision,
        "tokenizer": tokenizer_identity(tokenizer),
        "text_tower": text_tower_fingerprint(model),
    }
    return hashlib.sha256(json.dumps(prompts, sort_keys=True).encode()).hexdigest()[:32]


def weights_fingerprint(model: torch.nn.Module, *, skip_prefix: str | None = None) -> str:
    """SHA-256 over the names, dtypes, shapes and bytes of the model's tensors (those not under `skip_prefix`)."""
    digest = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        if skip_prefix is not None and name.startswith(skip_prefix):
            continue
        tensor = tensor.detach().to("cpu").contiguous()
        digest.update(f"{name}:{tensor.dtype}:{tuple(tensor.shape)}".encode())
        digest.update(tensor.view(-1).view(torch.uint8).numpy().data)
    return digest.hexdigest()


def text_tower_fingerprint(model: torch.nn.Module) -> str:
    """The fingerprint of every tensor outside the image tower (what a zero-shot classifier depends on)."""
    return weights_fingerprint(model, skip_prefix="visual.")


def tokenizer_identity(tokenizer: Callable) -> dict[str, object]:
    inner = getattr(tokenizer, "tokenizer", None)
    return {
        "type": f"{type(tokenizer).__module__}.{type(tokenizer).__qualname__}",
        "context_length": getattr(tokenizer, "context_length", None),
        "name": getattr(inner, "name_or_path", None),
    }


def default_cache_dir() -> Path:
    """clipkit's cache root: $CLIPKIT_CACHE, else ~/.cache/clipkit (classifiers go in zeroshot_classifiers/)."""
    return clipkit_cache_dir()


@contextlib.contextmanager
def eval_mode(model: torch.nn.Module) -> Iterator[None]:
    """Run in eval mode (no dropout) and restore the caller's mode, so a training loop can call in."""
    was_training = model.training
    model.eval()
    try:
        yield
    finally:
        model.train(was_training)


def autocast(device: str | torch.device, precision: str) -> contextlib.AbstractContextManager:
    """Autocast to bf16/fp16 for `precision` "bf16"/"fp16"; nothing for "fp32"."""
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {sorted(PRECISIONS)}, got {precision!r}")
    if PRECISIONS[precision] is None:
        return contextlib.nullcontext()
    return torch.autocast(torch.device(device).type, dtype=PRECISIONS[precision])
