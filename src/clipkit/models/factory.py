"""Build a model with its image transforms and tokenizer from any source a user names."""

from __future__ import annotations

import copy
import json
import logging
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import open_clip
import torch
from open_clip.model import CLIP, CustomTextCLIP, get_cast_dtype, set_model_preprocess_cfg
from open_clip.transform import PreprocessCfg, image_transform_v2, merge_preprocess_dict

from clipkit.errors import ClipkitError
from clipkit.models.config import (
    PREPROCESS_KEYS,
    ModelConfig,
    find_model_config_file,
    list_model_configs,
    load_model_config,
)
from clipkit.models.weights import WEIGHTS_SUFFIXES, find_weights_file, load_weights

log = logging.getLogger(__name__)

OPEN_CLIP_CONFIG_NAME = "open_clip_config.json"
LOCAL_DIR_PREFIX = "local-dir:"


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


@dataclass
class _Resolved:
    name: str
    model_cfg: dict[str, Any]
    preprocess: dict[str, Any]
    weights: Path | None
    tokenizer_dir: Path | None = None  # where an HF tokenizer's files live, for exported models
    sentencepiece: Path | None = None  # a clipkit SentencePiece tokenizer (model file or directory)


def build_model(
    source: str | Path | ModelConfig | Mapping[str, Any],
    *,
    pretrained: str | Path | None = None,
    init_logit_scale: float | None = None,
    init_logit_bias: float | None = None,
    precision: str = "fp32",
    device: str | torch.device = "cpu",
    aug_cfg: Mapping[str, Any] | None = None,
) -> ModelBundle:
    """Model, train/eval image transforms and tokenizer.

    `source` is one of: an open_clip architecture name (`ViT-B-32`), a config name under
    `conf/model/` (`tiny`) or a YAML path, a `ModelConfig` / mapping of its keys, an exported model
    directory (optionally `local-dir:DIR`), or a clipkit run directory. `pretrained` names a
    .safetensors / .pt state dict for an architecture or config source.

    `init_logit_scale` / `init_logit_bias` are the loss's starting values; a model config that sets
    its own wins, and trained weights overwrite both.
    """
    resolved = _resolve(source, pretrained)
    model_cfg = copy.deepcopy(resolved.model_cfg)
    for key, value in (("init_logit_scale", init_logit_scale), ("init_logit_bias", init_logit_bias)):
        if value is not None and key not in model_cfg:
            model_cfg[key] = float(value)
    model = create_model(model_cfg, precision=precision, device=device)
    if resolved.weights is not None:
        load_weights(model, resolved.weights)
        model.to(device)

    preprocess_cfg = merge_preprocess_dict(asdict(PreprocessCfg()), resolved.preprocess)
    preprocess_cfg["size"] = model.visual.image_size
    set_model_preprocess_cfg(model, preprocess_cfg)
    pp = PreprocessCfg(**preprocess_cfg)
    return ModelBundle(
        model=model,
        train_transform=image_transform_v2(pp, is_train=True, aug_cfg=dict(aug_cfg or {})),
        eval_transform=image_transform_v2(pp, is_train=False),
        tokenizer=build_tokenizer(model_cfg, resolved),
        model_cfg=model_cfg,
        preprocess_cfg=preprocess_cfg,
        name=resolved.name,
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


def build_tokenizer(model_cfg: Mapping[str, Any], resolved: _Resolved) -> Callable:
    """open_clip's choice of tokenizer, from the text config alone (never from the model's name)."""
    text_cfg = model_cfg["text_cfg"]
    context_length = text_cfg.get("context_length", 77)
    if resolved.sentencepiece is not None:
        from clipkit.data.tokenizer import SentencePieceTokenizer

        return SentencePieceTokenizer(resolved.sentencepiece, context_length=context_length)
    hf_name = text_cfg.get("hf_tokenizer_name")
    if hf_name:
        source = resolved.tokenizer_dir or hf_name
        try:
            return open_clip.tokenizer.HFTokenizer(
                str(source),
                context_length=context_length,
                tokenizer_mode=text_cfg.get("tokenizer_mode"),
                **(text_cfg.get("tokenizer_kwargs") or {}),
            )
        except Exception as e:
            raise ClipkitError(
                f"model '{resolved.name}' tokenizes with the Hugging Face tokenizer '{source}', which could "
                f"not be loaded ({type(e).__name__}: {str(e).splitlines()[0][:160]}); install `transformers` "
                "and fetch it once with network access"
            ) from None
    return open_clip.SimpleTokenizer(
        context_length=context_length, **(text_cfg.get("tokenizer_kwargs") or {})
    )


def _resolve(
    source: str | Path | ModelConfig | Mapping[str, Any], pretrained: str | Path | None
) -> _Resolved:
    if isinstance(source, ModelConfig):
        return _resolve_config(source, pretrained)
    if isinstance(source, Mapping):
        return _resolve_config(ModelConfig.from_dict(source), pretrained)
    text = str(source)
    if text.startswith(LOCAL_DIR_PREFIX):
        return _resolve_directory(Path(text[len(LOCAL_DIR_PREFIX) :]))
    path = Path(text)
    if path.is_dir():
        return _resolve_directory(path)
    if path.is_file() and path.suffix in WEIGHTS_SUFFIXES:
        raise ClipkitError(
            f"{path} holds weights but not the architecture; name both, e.g. "
            f"build_model('ViT-B-32', pretrained='{path}') or `--model ViT-B-32 --pretrained {path}`"
        )
    config_file = find_model_config_file(text)
    if config_file is not None:
        return _resolve_config(load_model_config(config_file), pretrained)
    if open_clip.get_model_config(text) is not None:
        return _resolve_config(ModelConfig(name=text, arch=text), pretrained)
    raise ClipkitError(
        f"unknown model '{text}': looked for a directory with {OPEN_CLIP_CONFIG_NAME} or a clipkit run "
        f"directory at {path.resolve()}, a config in conf/model ({', '.join(list_model_configs())}), "
        "and an open_clip architecture (open_clip.list_models())"
    )


def _resolve_config(config: ModelConfig, pretrained: str | Path | None) -> _Resolved:
    unknown_pp = sorted(set(config.preprocess) - set(PREPROCESS_KEYS))
    if unknown_pp:
        raise ClipkitError(
            f"model '{config.name}': unknown preprocess key(s) {unknown_pp}; valid: {PREPROCESS_KEYS}"
        )
    model_cfg = config.to_open_clip_cfg()
    for key in ("init_logit_scale", "init_logit_bias"):
        value = getattr(config, key)
        if value is not None:
            model_cfg[key] = float(value)
    weights = pretrained if pretrained is not None else config.pretrained
    resolved = _Resolved(
        name=config.name, model_cfg=model_cfg, preprocess=dict(config.preprocess), weights=None
    )
    if config.tokenizer is not None:
        from clipkit.data.tokenizer import SentencePieceTokenizer, text_cfg_for_sentencepiece

        resolved.sentencepiece = Path(config.tokenizer).expanduser()
        tokenizer = SentencePieceTokenizer(resolved.sentencepiece)
        model_cfg["text_cfg"] = text_cfg_for_sentencepiece(
            model_cfg["text_cfg"], tokenizer, model_name=config.name
        )
    if weights is not None:
        weights = Path(weights)
        if weights.is_dir():
            exported = _resolve_directory(weights)
            resolved.weights = exported.weights
        elif weights.is_file():
            resolved.weights = weights
        else:
            raise ClipkitError(f"model '{config.name}': pretrained weights not found: {weights}")
    return resolved


def _resolve_directory(path: Path) -> _Resolved:
    if not path.is_dir():
        raise ClipkitError(f"model directory not found: {path}")
    config_path = path / OPEN_CLIP_CONFIG_NAME
    if not config_path.is_file():
        exported = path / "model"
        if (exported / OPEN_CLIP_CONFIG_NAME).is_file():  # a clipkit run directory
            return _resolve_directory(exported)
        raise ClipkitError(
            f"{path} is not a model directory: expected {config_path} (an exported model) "
            f"or {exported / OPEN_CLIP_CONFIG_NAME} (a finished clipkit run); export one with `clipkit export`"
        )
    try:
        config = json.loads(config_path.read_text(encoding="utf-8"))
        model_cfg = config["model_cfg"]
    except (json.JSONDecodeError, KeyError, TypeError) as e:
        raise ClipkitError(
            f"{config_path} is not an open_clip config with a 'model_cfg' entry ({e})"
        ) from None
    weights = find_weights_file(path)
    if weights is None:
        raise ClipkitError(f"{path} has {OPEN_CLIP_CONFIG_NAME} but no weights (open_clip_model.safetensors)")
    from clipkit.data.tokenizer import is_sentencepiece_dir

    return _Resolved(
        name=path.resolve().name,
        model_cfg=model_cfg,
        preprocess=config.get("preprocess_cfg", {}),
        weights=weights,
        tokenizer_dir=path,
        sentencepiece=path if is_sentencepiece_dir(path) else None,
    )
