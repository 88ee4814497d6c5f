"""Read a Hugging Face transformers CLIP / SigLIP checkpoint as open_clip towers (a `ResolvedModel`).

The checkpoint is a directory (config.json + model.safetensors or pytorch_model.bin, tokenizer files,
preprocessor_config.json), local or a snapshot in the Hugging Face cache (`hf:ORG/NAME[@REVISION]`). Its
config becomes open_clip's `model_cfg` and its weights an open_clip state dict (`hf_convert`); its tokenizer
becomes open_clip's CLIP BPE when the vocabulary is that one, else it is used through open_clip's
HFTokenizer from the checkpoint's own files.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import torch

from clipkit.errors import ClipkitError
from clipkit.models.hf_convert import (
    CLIP_BPE_VOCAB_SIZE,
    from_hf_state_dict,
    open_clip_cfg_from_hf,
    require_transformers,
)
from clipkit.models.sources import ResolvedModel, TokenizerSpec, hub_file
from clipkit.models.tokenizer import is_sentencepiece_dir
from clipkit.models.weights import read_state_dict

log = logging.getLogger(__name__)

HF_PREFIX = "hf:"
CONFIG_NAME = "config.json"
WEIGHTS_NAMES = ("model.safetensors", "pytorch_model.bin")
# Files fetched with a hub checkpoint when the repo has them.
OPTIONAL_FILES = (
    "preprocessor_config.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "vocab.json",
    "merges.txt",
    "spiece.model",
    "clipkit_tokenizer.json",
)
_INTERPOLATION = {0: "nearest", 2: "bilinear", 3: "bicubic"}


def is_transformers_dir(path: Path) -> bool:
    """A directory holding a transformers config.json and weights."""
    return (
        path.is_dir() and (path / CONFIG_NAME).is_file() and any((path / n).is_file() for n in WEIGHTS_NAMES)
    )


def snapshot_from_cache(text: str) -> Path:
    """The local snapshot of `hf:ORG/NAME[@REVISION]` (fetched when not cached and the hub is reachable)."""
    repo_id, _, revision = text[len(HF_PREFIX) :].partition("@")
    if repo_id.count("/") != 1 or not all(repo_id.split("/")):
        raise ClipkitError(f"'{text}' is not a Hugging Face model name; expected hf:ORG/NAME")
    config = hub_file(repo_id, (CONFIG_NAME,), revision=revision or None, model=text)
    hub_file(repo_id, WEIGHTS_NAMES, revision=revision or None, model=text)
    from huggingface_hub import hf_hub_download

    for name in OPTIONAL_FILES:
        try:
            hf_hub_download(repo_id=repo_id, filename=name, revision=revision or None)
        except Exception:  # absent from the repo (or from an offline cache): the checkpoint lacks it
            pass
    return config.parent


def resolve_transformers_dir(path: Path, *, source: str) -> ResolvedModel:
    """The open_clip description of the transformers checkpoint in `path`."""
    transformers = require_transformers()
    config = _read_config(path, transformers)
    model_cfg = open_clip_cfg_from_hf(config)
    tokenizer = _tokenizer(path, model_cfg, config, source=source)
    weights = next(path / name for name in WEIGHTS_NAMES if (path / name).is_file())
    hf_state = read_state_dict(weights)
    state_dict = from_hf_state_dict(_template(model_cfg), model_cfg, hf_state, config)
    return ResolvedModel(
        name=source.removeprefix(HF_PREFIX).split("/")[-1]
        if source.startswith(HF_PREFIX)
        else path.resolve().name,
        model_cfg=model_cfg,
        preprocess=_preprocess(path, model_cfg),
        tokenizer=tokenizer,
        state_dict=state_dict,
        source=source,
    )


def _read_config(path: Path, transformers):
    try:
        model_type = json.loads((path / CONFIG_NAME).read_text(encoding="utf-8")).get("model_type")
    except json.JSONDecodeError as e:
        raise ClipkitError(f"{path / CONFIG_NAME} is not valid JSON ({e})") from None
    if model_type not in ("clip", "siglip"):
        raise ClipkitError(
            f"{path / CONFIG_NAME} describes a transformers '{model_type}' model; clipkit imports CLIP "
            "(model_type clip) and SigLIP (model_type siglip) checkpoints"
        )
    return transformers.AutoConfig.from_pretrained(str(path))


def _template(model_cfg: dict[str, Any]) -> torch.nn.Module:
    """The open_clip model on the meta device: its parameter names and shapes, without allocating them."""
    from clipkit.models.factory import create_model

    with torch.device("meta"):
        return create_model(model_cfg, device="meta")


def _tokenizer(path: Path, model_cfg: dict[str, Any], config, *, source: str) -> TokenizerSpec:
    """open_clip's CLIP BPE when the checkpoint's vocabulary is exactly it; clipkit's SentencePiece for a
    clipkit export; else the checkpoint's own tokenizer files through open_clip's HFTokenizer."""
    text_cfg = model_cfg["text_cfg"]
    if is_sentencepiece_dir(path):
        text_cfg["hf_tokenizer_name"] = "clipkit-sentencepiece"
        return TokenizerSpec(hf_dir=path, sentencepiece=path)
    if not any((path / name).is_file() for name in ("tokenizer.json", "tokenizer_config.json", "vocab.json")):
        raise ClipkitError(
            f"{path} has no tokenizer files (tokenizer.json / tokenizer_config.json); a model without its "
            "tokenizer cannot encode text"
        )
    transformers = require_transformers()
    hf = transformers.AutoTokenizer.from_pretrained(str(path))
    if config.model_type == "clip" and _is_clip_bpe(hf):
        return TokenizerSpec()  # open_clip's SimpleTokenizer: no hf_tokenizer_name
    text_cfg["hf_tokenizer_name"] = (
        source.removeprefix(HF_PREFIX) if source.startswith(HF_PREFIX) else str(path)
    )
    if type(hf).__name__.startswith("Siglip"):
        text_cfg["tokenizer_kwargs"] = {"clean": "canonicalize"}  # as open_clip's own SigLIP configs
    return TokenizerSpec(hf_dir=path)


def _is_clip_bpe(hf_tokenizer) -> bool:
    import open_clip

    if len(hf_tokenizer) != CLIP_BPE_VOCAB_SIZE:
        return False
    ours = dict(open_clip.SimpleTokenizer().encoder)
    ours["<|startoftext|>"] = ours.pop("<start_of_text>")
    ours["<|endoftext|>"] = ours.pop("<end_of_text>")
    return hf_tokenizer.get_vocab() == ours


def _preprocess(path: Path, model_cfg: dict[str, Any]) -> dict[str, Any]:
    """open_clip preprocessing keys from preprocessor_config.json (absent: open_clip's defaults)."""
    file = path / "preprocessor_config.json"
    if not file.is_file():
        log.warning("%s has no preprocessor_config.json; using open_clip's default preprocessing", path)
        return {}
    values = json.loads(file.read_text(encoding="utf-8"))
    preprocess: dict[str, Any] = {}
    if "image_mean" in values:
        preprocess["mean"] = tuple(values["image_mean"])
    if "image_std" in values:
        preprocess["std"] = tuple(values["image_std"])
    if values.get("resample") in _INTERPOLATION:
        preprocess["interpolation"] = _INTERPOLATION[values["resample"]]
    size = values.get("size") or {}
    preprocess["resize_mode"] = (
        "shortest" if values.get("do_center_crop") or "shortest_edge" in size else "squash"
    )
    resized = size.get("shortest_edge", size.get("height"))
    image_size = model_cfg["vision_cfg"]["image_size"]
    if resized is not None and resized != image_size:
        log.warning(
            "%s resizes images to %s before cropping to %s; open_clip resizes straight to %s",
            file, resized, image_size, image_size,
        )  # fmt: skip
    return preprocess
