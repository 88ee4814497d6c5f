"""Build a model with its image transforms and tokenizer from any source a user names."""

from __future__ import annotations

import copy
import logging
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import open_clip
import torch
from open_clip.model import CLIP, CustomTextCLIP, get_cast_dtype, set_model_preprocess_cfg
from open_clip.transform import PreprocessCfg, image_transform_v2, merge_preprocess_dict

from clipkit.data.augment import build_train_transform
from clipkit.errors import ClipkitError
from clipkit.models.config import ModelConfig
from clipkit.models.sources import OPEN_CLIP_CONFIG_NAME, resolve
from clipkit.models.tokenizer import build_tokenizer
from clipkit.models.weights import load_state_dict_into, load_weights

log = logging.getLogger(__name__)

__all__ = ["OPEN_CLIP_CONFIG_NAME", "ModelBundle", "build_model", "create_model", "warn_if_random_weights"]


@dataclass
class ModelBundle:
    """A model and what travels with it: transforms, tokenizer and the configs that rebuild it."""

    model: torch.nn.Module
    train_transform: Callable
    eval_transform: Callable
    tokenizer: Callable
    model_cfg: dict[str, Any]  # open_clip's model_cfg: rebuilds the architecture
    preprocess_cfg: dict[str, Any]  # open_clip's PreprocessCfg as a dict
    name: str
    weights_source: str = ""  # where the weights came from; "" when they are random (a new model)

    @property
    def has_weights(self) -> bool:
        return bool(self.weights_source)


def build_model(
    source: str | Path | ModelConfig | Mapping[str, Any],
    *,
    pretrained: str | Path | None = None,
    init_logit_scale: float | None = None,
    init_logit_bias: float | None = None,
    precision: str = "fp32",
    device: str | torch.device = "cpu",
    aug_cfg: str | Mapping[str, Any] | None = None,
) -> ModelBundle:
    """Model, train/eval image transforms and tokenizer.

    `source` is one of: an open_clip architecture name (`ViT-B-32`), a config name under
    `conf/model/` (`tiny`) or a YAML path, a `ModelConfig` / mapping of its keys, an exported model
    directory (optionally `local-dir:DIR`), a clipkit run directory, or `hf-hub:ORG/NAME` (a hub repo in
    open_clip's layout). `pretrained`, for an architecture or config source, names a .safetensors / .pt
    state dict, an open_clip pretrained tag of the architecture (`laion2b_s34b_b79k`), or a whole model
    (`hf-hub:ORG/NAME`, a directory) whose architecture and preprocessing then win.
    See `clipkit.models.sources` for the resolvers.

    `aug_cfg` is `data.augmentation`: a preset name (`clipkit.data.augment`), open_clip aug_cfg keys, or None.

    `init_logit_scale` / `init_logit_bias` are the loss's starting values; a model config that sets
    its own wins, and trained weights overwrite both.
    """
    resolved = resolve(source, pretrained)
    model_cfg = copy.deepcopy(resolved.model_cfg)
    for key, value in (("init_logit_scale", init_logit_scale), ("init_logit_bias", init_logit_bias)):
        if value is not None and key not in model_cfg:
            model_cfg[key] = float(value)
    model = create_model(model_cfg, precision=precision, device=device)
    if resolved.state_dict is not None:
        load_state_dict_into(model, resolved.state_dict, origin=resolved.source or resolved.name)
        model.to(device)
    elif resolved.weights is not None:
        load_weights(model, resolved.weights)
        model.to(device)

    preprocess_cfg = merge_preprocess_dict(asdict(PreprocessCfg()), resolved.preprocess)
    preprocess_cfg["size"] = model.visual.image_size
    # JSON gives lists, open_clip's registry tuples: one form, so the same preprocessing compares equal.
    preprocess_cfg = {k: tuple(v) if isinstance(v, list) else v for k, v in preprocess_cfg.items()}
    set_model_preprocess_cfg(model, preprocess_cfg)
    pp = PreprocessCfg(**preprocess_cfg)
    return ModelBundle(
        model=model,
        train_transform=build_train_transform(pp, aug_cfg),
        eval_transform=image_transform_v2(pp, is_train=False),
        tokenizer=build_tokenizer(model_cfg, resolved.tokenizer, model_name=resolved.name),
        model_cfg=model_cfg,
        preprocess_cfg=preprocess_cfg,
        name=resolved.name,
        weights_source=(resolved.source or str(resolved.weights or "")) if resolved.has_weights else "",
    )


def warn_if_random_weights(bundle: ModelBundle) -> None:
    """One line saying that `bundle` is an untrained model (its numbers mean nothing), if it is."""
    if not bundle.has_weights:
        log.warning(
            "model '%s' has random weights (no pretrained weights were named): pass --pretrained "
            "(a weights file, an open_clip tag, hf-hub:ORG/NAME) or a trained model directory",
            bundle.name,
        )


def create_model(
    model_cfg: Mapping[str, Any], *, precision: str = "fp32", device: str | torch.device = "cpu"
) -> torch.nn.Module:
    """The randomly initialised open_clip model for `model_cfg`, chosen exactly as open_clip chooses it."""
    cfg = copy.deepcopy(dict(model_cfg))
    vision_cfg, text_cfg = cfg["vision_cfg"], cfg["text_cfg"]
    # Never reach for the network: towers start random, weights come from files.
    if "timm_model_name" in vision_cfg:
        vision_cfg["timm_model_pretrained"] = False
    if "hf_model_name" in text_cfg:
        text_cfg["hf_model_pretrained"] = False
    custom_text = cfg.pop("custom_text", False) or "hf_model_name" in text_cfg
    model_class = CustomTextCLIP if custom_text else CLIP
    try:
        model = model_class(**cfg, cast_dtype=get_cast_dtype(precision))
    except TypeError as e:
        raise ClipkitError(f"model config is not valid for open_clip's {model_class.__name__}: {e}") from None
    if "timm_model_name" in vision_cfg and "image_size" in vision_cfg:
        # open_clip's timm tower builds at the trunk's default size; resize it as create_model's
        # force_image_size does. (open_clip's local-dir loader skips this, so keep timm towers at
        # their default size when the export must load in open_clip.)
        model.visual.set_input_size(vision_cfg["image_size"])
    model.to(device)
    if precision in ("fp16", "bf16"):
        open_clip.convert_weights_to_lp(model, dtype=torch.float16 if precision == "fp16" else torch.bfloat16)
    return model
