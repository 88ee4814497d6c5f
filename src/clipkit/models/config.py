"""Model descriptions: an open_clip architecture name or tower configs in open_clip's own keys.

A `ModelConfig` is what `conf/model/*.yaml` holds. It resolves to the plain `model_cfg` dict that
open_clip's `CLIP` / `CustomTextCLIP` constructors take and that an exported `open_clip_config.json`
stores, so the same dict builds the model here and in open_clip.
"""

from __future__ import annotations

import copy
import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from clipkit.configs import config_dir
from clipkit.errors import ClipkitError

# Preprocessing keys open_clip's PreprocessCfg understands (size comes from the image tower).
PREPROCESS_KEYS = ("mean", "std", "interpolation", "resize_mode", "fill_color")


@dataclass(kw_only=True)
class ModelConfig:
    """One model: either `arch` (an open_clip architecture) or `embed_dim` + `vision_cfg` + `text_cfg`.

    With `arch`, the tower keys given here are merged over open_clip's config for that architecture
    (for example `vision_cfg: {image_size: 64}`).
    """

    name: str = "custom"
    arch: str | None = None
    embed_dim: int | None = None
    vision_cfg: dict[str, Any] = field(default_factory=dict)
    text_cfg: dict[str, Any] = field(default_factory=dict)
    quick_gelu: bool | None = None
    custom_text: bool | None = None
    # open_clip preprocessing overrides: mean, std, interpolation, resize_mode, fill_color.
    preprocess: dict[str, Any] = field(default_factory=dict)
    # A SentencePiece tokenizer (directory from `clipkit tokenizer train`, or its .model file) instead of
    # the text config's own; the text tower then takes its vocab size and pools at its end token.
    tokenizer: str | None = None
    # Weights to start from: an open_clip tag of the architecture, hf-hub:ORG/NAME, a model directory or a
    # weights file (.safetensors / .pt state dict).
    pretrained: str | None = None
    # Logit parameters at initialisation; None means "whatever the loss starts from".
    init_logit_scale: float | None = None
    init_logit_bias: float | None = None

    @classmethod
    def from_dict(cls, values: Mapping[str, Any], *, origin: str = "model config") -> ModelConfig:
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - known - {"_target_"})
        if unknown:
            raise ClipkitError(
                f"{origin}: unknown key(s) {unknown}; valid keys are {sorted(known)} "
                "(tower settings go under vision_cfg / text_cfg)"
            )
        kwargs = {k: copy.deepcopy(v) for k, v in values.items() if k != "_target_"}
        for key in ("vision_cfg", "text_cfg", "preprocess"):
            if kwargs.get(key) is None:
                kwargs.pop(key, None)
        return cls(**kwargs)

    def to_open_clip_cfg(self) -> dict[str, Any]:
        """The open_clip `model_cfg` dict (embed_dim, vision_cfg, text_cfg, ...) this config describes."""
        if self.arch is not None:
            import open_clip  # ~8 s with torch: only where an architecture is looked up

            base = open_clip.get_model_config(self.arch)
            if base is None:
                raise ClipkitError(
                    f"model '{self.name}': '{self.arch}' is not an open_clip architecture; "
                    "see open_clip.list_models() for the names"
                )
        else:
            if self.embed_dim is None or not self.vision_cfg or not self.text_cfg:
                raise ClipkitError(
                    f"model '{self.name}': give either `arch` (an open_clip architecture name) "
                    "or all of embed_dim, vision_cfg and text_cfg"
                )
            base = {"embed_dim": self.embed_dim, "vision_cfg": {}, "text_cfg": {}}
        if "multimodal_cfg" in base:
            raise ClipkitError(
                f"model '{self.name}': CoCa architectures (multimodal_cfg) are not contrastive-only; "
                "pick a CLIP or SigLIP architecture"
            )
        cfg = copy.deepcopy(base)
        if self.embed_dim is not None:
            cfg["embed_dim"] = self.embed_dim
        cfg["vision_cfg"] = {**cfg["vision_cfg"], **self.vision_cfg}
        cfg["text_cfg"] = {**cfg["text_cfg"], **self.text_cfg}
        if self.quick_gelu is not None:
            cfg["quick_gelu"] = self.quick_gelu
        if self.custom_text is not None:
            cfg["custom_text"] = self.custom_text
        return cfg


def find_model_config_file(name: str) -> Path | None:
    """`conf/model/NAME.yaml`, or NAME itself when it is a path to a YAML file."""
    as_path = Path(name)
    if as_path.suffix in (".yaml", ".yml") and as_path.is_file():
        return as_path
    candidate = config_dir() / "model" / f"{name}.yaml"
    return candidate if candidate.is_file() else None


def list_model_configs() -> list[str]:
    return sorted(p.stem for p in (config_dir() / "model").glob("*.yaml"))


def load_model_config(path: str | Path) -> ModelConfig:
    path = Path(path)
    with path.open(encoding="utf-8") as f:
        values = yaml.safe_load(f) or {}
    if not isinstance(values, Mapping):
        raise ClipkitError(f"{path}: a model config must be a mapping of keys, got {type(values).__name__}")
    values = dict(values)
    values.setdefault("name", path.stem)
    return ModelConfig.from_dict(values, origin=str(path))
