"""The data component's config: what `conf/data/*.yaml` holds."""

from __future__ import annotations

import copy
import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from clipkit.data.augment import check_augmentation_name
from clipkit.errors import ClipkitError

# open_clip.transform.AugmentationCfg's fields (listed, not imported: this module does not import torch).
AUGMENTATION_KEYS = (
    "scale", "ratio", "color_jitter", "re_prob", "re_count", "use_timm", "color_jitter_prob", "gray_scale_prob",
)  # fmt: skip
CAPTION_CHOICES = ("random", "first", "whole")


@dataclass(kw_only=True)
class DataConfig:
    """Training and evaluation data.

    Shard specs (`train_shards`, `val_shards`) are webdataset URLs: local paths, `pipe:` commands and
    remote URLs, with brace expansion (`shards/{00000..00099}.tar`); several sources are joined with `::`
    (or given as a list) and mixed by `weights`. A local directory stands for all `*.tar` files in it.
    """

    train_shards: str | list[str] | None = None
    # Held-out captioned shards (image + .txt) for retrieval recall during training; null to skip.
    val_shards: str | list[str] | None = None
    # One weight per train source (sampling proportions); null reads the sources as one concatenated set.
    weights: list[float] | None = None
    batch_size: int = 32  # per process
    workers: int = 2  # DataLoader worker processes per training process; 0 reads in the main process
    # Infinite stream: every worker draws shards with replacement instead of splitting them.
    resampled: bool = False
    # Samples held for shuffling in each worker; 0 keeps the shard order (shards are still shuffled).
    shuffle_buffer: int = 1000
    # A key list (`clipkit filter --out FILE`, one SHARD#KEY a line): only those samples of train_shards are
    # read, the others skipped before decoding; null reads every sample.
    keep_keys: str | None = None
    # A directory in the zero-shot layout (test/, classnames.txt, templates) evaluated during training.
    zeroshot_dataset: str | None = None
    # Training-time image augmentation: a preset name (none | openclip | light | strong | grayscale, see
    # clipkit.data.augment) or open_clip's `aug_cfg` keys (AugmentationCfg): scale, ratio, color_jitter,
    # color_jitter_prob, gray_scale_prob, re_prob, re_count, use_timm. null: open_clip's default (a random
    # resized crop with scale (0.9, 1.0)). Evaluation always uses the eval transform.
    augmentation: str | dict[str, Any] | None = None
    # Which caption of a sample with several (KEY.txt: one per non-empty line; or KEY.json: a JSON list of
    # strings) a training visit uses: random (one drawn per visit from the seed, epoch and sample), first, or
    # whole (the .txt as one caption, lines kept). Evaluation ignores it and templates: retrieval evaluation
    # takes every line of KEY.txt as a caption of its image (as CLIP_benchmark does); iter_val_batches the first.
    caption_choice: str = "random"
    # Templates with one `{}` (e.g. "a photo of {}."): one drawn per training visit wraps the caption; null: none.
    caption_templates: list[str] | None = None
    # A dataset clipkit generates when missing: {name: synthetic | digits, dir: DIR, ...its options}.
    generate: dict[str, Any] | None = None
    # Filled by prepare_data: each train / val source as a list of concrete shard URLs. Not user keys.
    train_sources: list[list[str]] | None = field(default=None, metadata={"internal": True})
    val_sources: list[list[str]] | None = field(default=None, metadata={"internal": True})

    @classmethod
    def user_keys(cls) -> list[str]:
        return sorted(f.name for f in dataclasses.fields(cls) if not f.metadata.get("internal"))

    @classmethod
    def from_dict(cls, values: Mapping[str, Any], *, origin: str = "data config") -> DataConfig:
        """Build from a plain mapping (e.g. `OmegaConf.to_container(cfg.data, resolve=True)`)."""
        if not isinstance(values, Mapping):
            raise ClipkitError(f"{origin}: expected a mapping of keys, got {type(values).__name__}")
        known = cls.user_keys()
        unknown = sorted(set(values) - set(known) - {"_target_"})
        if unknown:
            raise ClipkitError(f"{origin}: unknown key(s) {unknown}; valid keys are {known}")
        kwargs = {k: copy.deepcopy(v) for k, v in values.items() if k != "_target_"}
        for key in ("train_shards", "val_shards"):
            if isinstance(kwargs.get(key), tuple | list):
                kwargs[key] = [str(part) for part in kwargs[key]]
        try:
            return cls(**kwargs)
        except ClipkitError as e:
            raise ClipkitError(f"{origin}: {e}") from None

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        for key, minimum in (("batch_size", 1), ("workers", 0), ("shuffle_buffer", 0)):
            value = getattr(self, key)
            if not isinstance(value, int) or isinstance(value, bool) or value < minimum:
                raise ClipkitError(f"{key} must be an integer >= {minimum}, got {value!r}")
        if self.weights is not None:
            if not isinstance(self.weights, list | tuple) or not self.weights:
                raise ClipkitError(f"weights must be a list of numbers, got {self.weights!r}")
            if any(not isinstance(w, int | float) or isinstance(w, bool) or w <= 0 for w in self.weights):
                raise ClipkitError(f"weights must all be positive numbers, got {self.weights!r}")
        if isinstance(self.augmentation, str):
            check_augmentation_name(self.augmentation)
        elif self.augmentation is not None:
            if not isinstance(self.augmentation, Mapping):
                raise ClipkitError(
                    "augmentation must be a preset name or a mapping of open_clip aug_cfg keys, "
                    f"got {self.augmentation!r}"
                )
            unknown = sorted(set(self.augmentation) - set(AUGMENTATION_KEYS))
            if unknown:
                raise ClipkitError(
                    f"augmentation: unknown key(s) {unknown}; open_clip's aug_cfg keys are {list(AUGMENTATION_KEYS)}"
                )
        if self.caption_choice not in CAPTION_CHOICES:
            raise ClipkitError(
                f"caption_choice must be one of {list(CAPTION_CHOICES)}, got {self.caption_choice!r}"
            )
        if self.caption_templates is not None:
            templates = self.caption_templates
            if not isinstance(templates, list | tuple) or not templates:
                raise ClipkitError(
                    f"caption_templates must be a list of strings with one '{{}}', got {templates!r}"
                )
            for template in templates:
                if not isinstance(template, str) or template.count("{}") != 1:
                    raise ClipkitError(
                        f"caption_templates: {template!r} must hold exactly one '{{}}' where the caption goes "
                        "(e.g. 'a photo of {}.')"
                    )
        if self.generate is not None:
            if (
                not isinstance(self.generate, Mapping)
                or "name" not in self.generate
                or "dir" not in self.generate
            ):
                raise ClipkitError(
                    "generate must be a mapping with at least `name` (synthetic | digits) and `dir`, "
                    f"got {self.generate!r}"
                )


def split_sources(spec: str | list[str] | None) -> list[str]:
    """The sources of a shard spec: `a::b` or a list ["a", "b"] -> ["a", "b"]."""
    if spec is None:
        return []
    parts = spec if isinstance(spec, list) else [spec]
    return [source for part in parts for source in str(part).split("::") if source.strip()]
