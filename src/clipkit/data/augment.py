"""Training-time image augmentation: presets by name, or open_clip's `aug_cfg` keys, -> the train transform.

Light at import (no torch, no open_clip): `DataConfig` checks preset names with it; open_clip is imported
when a transform is built.
"""

from __future__ import annotations

import warnings
from collections.abc import Mapping
from typing import Any

from clipkit.errors import ClipkitError

# Each preset is a mapping of open_clip AugmentationCfg keys; None means the eval transform (no randomness).
AUGMENTATION_PRESETS: dict[str, dict[str, Any] | None] = {
    # Resize + center crop, as evaluation sees images: for tiny datasets or when crops cut away the object.
    "none": None,
    # open_clip's default (what augmentation: null gives): a mild random resized crop, nothing else.
    "openclip": {"scale": (0.9, 1.0)},
    # A wider crop range: more views of each image for small datasets, still mostly the whole object.
    "light": {"scale": (0.7, 1.0)},
    # SimCLR-style: wide crops, colour jitter and some grey scale, for small colour datasets seen many times.
    "strong": {
        "scale": (0.4, 1.0),
        "color_jitter": (0.4, 0.4, 0.4, 0.1),
        "color_jitter_prob": 0.8,
        "gray_scale_prob": 0.2,
    },
    # Grey-scale data (scans, X-rays, documents): crops only; colour jitter would invent colours never seen.
    "grayscale": {"scale": (0.6, 1.0)},
}


def check_augmentation_name(name: str) -> None:
    if name not in AUGMENTATION_PRESETS:
        raise ClipkitError(
            f"augmentation: unknown preset '{name}'; choose one of {list(AUGMENTATION_PRESETS)} "
            "or give a mapping of open_clip aug_cfg keys"
        )


def resolve_augmentation(augmentation: str | Mapping[str, Any] | None) -> dict[str, Any] | None:
    """open_clip's `aug_cfg` for `data.augmentation` (a preset name, a mapping, or null = open_clip's default).

    None means no augmentation: the eval transform is the train transform.
    """
    if augmentation is None:
        return {}
    if isinstance(augmentation, str):
        check_augmentation_name(augmentation)
        preset = AUGMENTATION_PRESETS[augmentation]
        return None if preset is None else dict(preset)
    return dict(augmentation)


def build_train_transform(preprocess_cfg: Any, augmentation: str | Mapping[str, Any] | None):
    """The training image transform for a model's open_clip PreprocessCfg and `data.augmentation`."""
    from open_clip.transform import image_transform_v2

    aug_cfg = resolve_augmentation(augmentation)
    if aug_cfg is None:
        return image_transform_v2(preprocess_cfg, is_train=False)
    with warnings.catch_warnings():
        # open_clip warns that colour jitter / grey-scale keys are "unused" although its transform uses them.
        warnings.filterwarnings("ignore", message="Unused augmentation cfg items")
        return image_transform_v2(preprocess_cfg, is_train=True, aug_cfg=aug_cfg)
