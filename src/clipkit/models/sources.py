"""Where a model comes from: one small resolver per kind of source, all giving a `ResolvedModel`.

A source is what a user names: `build_model(source, pretrained=...)`, `--model` / `--pretrained`,
`model=NAME model.pretrained=...`. Two lists decide it, tried in order:

- `MODEL_RESOLVERS`: sources that carry a whole model (architecture, preprocessing, tokenizer and
  weights): `hf-hub:ORG/NAME` in open_clip's layout, `local-dir:DIR`, an exported directory, a clipkit
  run directory, a transformers CLIP / SigLIP checkpoint (a directory, or `hf:ORG/NAME` from the
  Hugging Face cache). Each takes the source string and returns a `ResolvedModel`, or None when the string
  is not of its kind. Another kind of checkpoint (e.g. a transformers CLIPModel) is one more function
  here, added with `register_model_resolver`.
- `PRETRAINED_RESOLVERS`: what `pretrained` may name for an architecture: an open_clip pretrained tag
  of that architecture, any source of `MODEL_RESOLVERS`, or a state-dict file.

Architectures themselves (a `conf/model` name or YAML path, an open_clip architecture name, a
`ModelConfig`) have no weights; `resolve` builds them through `resolve_config`.

Files from the Hugging Face hub go through huggingface_hub's cache (so `HF_HUB_OFFLINE=1` works for
cached models); a model that is neither cached nor reachable stops with one line naming it and the
command that fetches it.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import open_clip
import torch

from clipkit.errors import ClipkitError
from clipkit.models.config import (
    PREPROCESS_KEYS,
    ModelConfig,
    find_model_config_file,
    list_model_configs,
    load_model_config,
)
from clipkit.models.tokenizer import is_sentencepiece_dir
from clipkit.models.weights import WEIGHTS_SUFFIXES, find_weights_file

log = logging.getLogger(__name__)

OPEN_CLIP_CONFIG_NAME = "open_clip_config.json"
LOCAL_DIR_PREFIX = "local-dir:"
HF_HUB_PREFIX = "hf-hub:"
# open_clip's hub weights, safetensors first (open_clip.constants HF_SAFE_WEIGHTS_NAME, HF_WEIGHTS_NAME).
HUB_WEIGHTS_NAMES = ("open_clip_model.safetensors", "open_clip_pytorch_model.bin")


@dataclass
class TokenizerSpec:
    """Which tokenizer the model uses, beyond what its text config says (see `models.tokenizer`)."""

    hf_dir: Path | None = None  # a directory holding Hugging Face tokenizer files (exported models)
    sentencepiece: Path | None = None  # a clipkit SentencePiece tokenizer (model file or directory)


@dataclass
class ResolvedModel:
    """Everything `build_model` needs, whatever the source was."""

    name: str  # for logs and reports
    model_cfg: dict[str, Any]  # open_clip's model_cfg (embed_dim, vision_cfg, text_cfg, ...)
    preprocess: dict[str, Any]  # open_clip PreprocessCfg keys the source sets (mean, std, ...)
    tokenizer: TokenizerSpec = field(default_factory=TokenizerSpec)
    weights: Path | None = None  # a .safetensors / weights-only .pt file
    state_dict: dict[str, torch.Tensor] | None = None  # weights already in memory (converted checkpoints)
    source: str = ""  # where the weights came from, e.g. "hf-hub:ORG/NAME"; "" for random weights

    @property
    def has_weights(self) -> bool:
        return self.weights is not None or self.state_dict is not None


ModelResolver = Callable[[str], "ResolvedModel | None"]
PretrainedResolver = Callable[[str, ModelConfig], "ResolvedModel | None"]


# -- entry point -----------------------------------------------------------------------------------
def resolve(
    source: str | Path | ModelConfig | Mapping[str, Any], pretrained: str | Path | None = None
) -> ResolvedModel:
    """The resolved description of `source` (with `pretrained` weights for an architecture)."""
    if isinstance(source, ModelConfig):
        return resolve_config(source, pretrained)
    if isinstance(source, Mapping):
        return resolve_config(ModelConfig.from_dict(source), pretrained)
    text = str(source)
    resolved = resolve_model_source(text)
    if resolved is not None:
        if pretrained is not None:
            raise ClipkitError(
                f"model '{text}' carries its own weights; drop --pretrained/pretrained='{pretrained}' "
                "or name an architecture with it"
            )
        return resolved
    config = find_architecture(text)
    if config is not None:
        return resolve_config(config, pretrained)
    path = Path(text)
    if path.is_dir():
        raise ClipkitError(
            f"{path} is not a model directory: expected {path / OPEN_CLIP_CONFIG_NAME} (an exported model) "
            f"or {path / 'model' / OPEN_CLIP_CONFIG_NAME} (a finished clipkit run) or config.json + model.safetensors (a "
            "transformers CLIP / SigLIP checkpoint); export one with `clipkit export`"
        )
    if path.is_file() and path.suffix in WEIGHTS_SUFFIXES:
        raise ClipkitError(
            f"{path} holds weights but not the architecture; name both, e.g. "
            f"build_model('ViT-B-32', pretrained='{path}') or `--model ViT-B-32 --pretrained {path}`"
        )
    raise ClipkitError(
        f"unknown model '{text}': not an hf-hub:ORG/NAME repo, an hf:ORG/NAME transformers checkpoint, a directory with {OPEN_CLIP_CONFIG_NAME} or a "
        f"clipkit run directory ({path.resolve()}), a config in conf/model ({', '.join(list_model_configs())}), "
        "or an open_clip architecture (open_clip.list_models())"
    )


def resolve_model_source(text: str) -> ResolvedModel | None:
    """The first of `MODEL_RESOLVERS` that recognises `text`, or None."""
    for resolver in MODEL_RESOLVERS:
        resolved = resolver(text)
        if resolved is not None:
            return resolved
    return None


def register_model_resolver(resolver: ModelResolver, *, first: bool = True) -> None:
    """Add a kind of whole-model source (tried before the built-in ones unless first=False)."""
    if resolver not in MODEL_RESOLVERS:
        MODEL_RESOLVERS.insert(0, resolver) if first else MODEL_RESOLVERS.append(resolver)


# -- architectures (no weights of their own) -------------------------------------------------------
def find_architecture(text: str) -> ModelConfig | None:
    """A `conf/model` name or YAML path, else an open_clip architecture name, else None."""
    config_file = find_model_config_file(text)
    if config_file is not None:
        return load_model_config(config_file)
    if open_clip.get_model_config(text) is not None:
        return ModelConfig(name=text, arch=text)
    return None


def resolve_config(config: ModelConfig, pretrained: str | Path | None = None) -> ResolvedModel:
    """A model config, with the weights `pretrained` (or `config.pretrained`) names, if any."""
    unknown_pp = sorted(set(config.preprocess) - set(PREPROCESS_KEYS))
    if unknown_pp:
        raise ClipkitError(
            f"model '{config.name}': unknown preprocess key(s) {unknown_pp}; valid: {PREPROCESS_KEYS}"
        )
    weights = pretrained if pretrained is not None else config.pretrained
    if weights is not None and str(weights) != "":
        for resolver in PRETRAINED_RESOLVERS:
            resolved = resolver(str(weights), config)
            if resolved is not None:
                return resolved
        tags = open_clip.list_pretrained_tags_by_model(config.arch) if config.arch else []
        raise ClipkitError(
            f"model '{config.name}': pretrained '{weights}' is not a weights file, a model directory, an "
            f"hf-hub:ORG/NAME repo"
            + (f" or an open_clip tag of {config.arch} ({', '.join(tags)})" if tags else "")
        )
    return _architecture(config)


def _architecture(config: ModelConfig) -> ResolvedModel:
    """The model config with random weights (its SentencePiece tokenizer applied to the text tower)."""
    from clipkit.models.tokenizer import SentencePieceTokenizer, text_cfg_for_sentencepiece

    model_cfg = config.to_open_clip_cfg()
    for key in ("init_logit_scale", "init_logit_bias"):
        value = getattr(config, key)
        if value is not None:
            model_cfg[key] = float(value)
    resolved = ResolvedModel(name=config.name, model_cfg=model_cfg, preprocess=dict(config.preprocess))
    if config.tokenizer is not None:
        resolved.tokenizer.sentencepiece = Path(config.tokenizer).expanduser()
        tokenizer = SentencePieceTokenizer(resolved.tokenizer.sentencepiece)
        model_cfg["text_cfg"] = text_cfg_for_sentencepiece(
            model_cfg["text_cfg"], tokenizer, model_name=config.name
        )
    return resolved


# -- whole-model sources ---------------------------------------------------------------------------
def resolve_hf_hub(text: str) -> ResolvedModel | None:
    """`hf-hub:ORG/NAME[@REVISION]`: a hub repo in open_clip's layout (open_clip_config.json + weights)."""
    if not text.startswith(HF_HUB_PREFIX):
        return None
    repo_id, _, revision = text[len(HF_HUB_PREFIX) :].partition("@")
    if repo_id.count("/") != 1 or not all(repo_id.split("/")):
        raise ClipkitError(f"'{text}' is not an hf-hub name; expected hf-hub:ORG/NAME")
    config_path = hub_file(repo_id, (OPEN_CLIP_CONFIG_NAME,), revision=revision or None, model=text)
    config = _read_open_clip_config(config_path)
    weights = hub_file(repo_id, HUB_WEIGHTS_NAMES, revision=revision or None, model=text)
    return ResolvedModel(
        name=repo_id.split("/")[1],
        model_cfg=config["model_cfg"],
        preprocess=config.get("preprocess_cfg", {}),
        weights=weights,
        source=text,
    )


def resolve_local_dir(text: str) -> ResolvedModel | None:
    """`local-dir:DIR`, an exported directory (open_clip_config.json + weights) or a clipkit run dir."""
    explicit = text.startswith(LOCAL_DIR_PREFIX)
    path = Path(text[len(LOCAL_DIR_PREFIX) :] if explicit else text).expanduser()
    if not path.is_dir():
        if explicit:
            raise ClipkitError(f"model directory not found: {path}")
        return None
    if not (path / OPEN_CLIP_CONFIG_NAME).is_file() and (path / "model" / OPEN_CLIP_CONFIG_NAME).is_file():
        path = path / "model"  # a finished clipkit run
    config_path = path / OPEN_CLIP_CONFIG_NAME
    if not config_path.is_file():
        if explicit:
            raise ClipkitError(f"{path} is not an open_clip model directory: {config_path} is missing")
        return None
    config = _read_open_clip_config(config_path)
    weights = find_weights_file(path)
    if weights is None:
        raise ClipkitError(f"{path} has {OPEN_CLIP_CONFIG_NAME} but no weights (open_clip_model.safetensors)")
    return ResolvedModel(
        name=path.resolve().name,
        model_cfg=config["model_cfg"],
        preprocess=config.get("preprocess_cfg", {}),
        tokenizer=TokenizerSpec(hf_dir=path, sentencepiece=path if is_sentencepiece_dir(path) else None),
        weights=weights,
        source=str(path),
    )


def resolve_transformers(text: str) -> ResolvedModel | None:
    """`hf:ORG/NAME[@REVISION]` (from the Hugging Face cache) or a directory holding a transformers CLIP /
    SigLIP checkpoint (config.json + weights), converted to open_clip towers (see `models.hf_import`)."""
    from clipkit.models import hf_import

    if text.startswith(hf_import.HF_PREFIX):
        return hf_import.resolve_transformers_dir(hf_import.snapshot_from_cache(text), source=text)
    path = Path(text).expanduser()
    if not hf_import.is_transformers_dir(path):
        return None
    return hf_import.resolve_transformers_dir(path, source=str(path))


# resolve_local_dir before resolve_transformers: a directory with both layouts loads as open_clip's.
MODEL_RESOLVERS: list[ModelResolver] = [resolve_hf_hub, resolve_local_dir, resolve_transformers]


# -- what `pretrained` names for an architecture ---------------------------------------------------
def resolve_pretrained_tag(tag: str, config: ModelConfig) -> ResolvedModel | None:
    """An open_clip pretrained tag of `config.arch` (open_clip.list_pretrained()), from its hub entry."""
    if config.arch is None or not open_clip.is_pretrained_cfg(config.arch, tag):
        return None
    pretrained_cfg = open_clip.get_pretrained_cfg(config.arch, tag)
    hub_entry = pretrained_cfg.get("hf_hub", "")
    if not hub_entry:
        raise ClipkitError(
            f"open_clip tag {config.arch}/{tag} has no Hugging Face hub entry, only {pretrained_cfg.get('url')}; "
            f"download it and pass the file as pretrained"
        )
    # As open_clip.download_pretrained reads it: 'ORG/NAME/FILE', or 'ORG/NAME/' for the default file.
    repo_id, filename = os.path.split(hub_entry)
    names = _safetensors_first(filename) if filename else HUB_WEIGHTS_NAMES
    weights = hub_file(repo_id, names, model=f"{config.arch} pretrained={tag}")
    resolved = _architecture(config)
    if config.quick_gelu is None and pretrained_cfg.get("quick_gelu") is not None:
        # Tags such as `openai` were trained with QuickGELU; open_clip only warns, the weights need it.
        resolved.model_cfg["quick_gelu"] = bool(pretrained_cfg["quick_gelu"])
    tag_preprocess = {k: pretrained_cfg[k] for k in PREPROCESS_KEYS if k in pretrained_cfg}
    resolved.preprocess = {**tag_preprocess, **explicit_overrides(config).get("preprocess", {})}
    resolved.weights = weights
    resolved.source = f"{config.arch}/{tag} (hf-hub:{repo_id})"
    return resolved


def resolve_pretrained_model(text: str, config: ModelConfig) -> ResolvedModel | None:
    """A whole model (hf-hub repo, directory, ...): its architecture, preprocessing and tokenizer win over
    the selected model group; a tower key set explicitly that disagrees with it is an error."""
    resolved = resolve_model_source(text)
    if resolved is None:
        return None
    overrides = explicit_overrides(config)
    conflicts = _conflicts(overrides, resolved.model_cfg)
    if conflicts:
        raise ClipkitError(
            f"model '{config.name}': pretrained '{text}' defines its own architecture, which differs in "
            f"{', '.join(conflicts)}; drop those model keys"
        )
    resolved.preprocess = {**resolved.preprocess, **overrides.get("preprocess", {})}
    return resolved


def resolve_pretrained_file(text: str, config: ModelConfig) -> ResolvedModel | None:
    """A .safetensors / .pt state dict for the config's architecture."""
    path = Path(text).expanduser()
    if not path.is_file():
        return None
    resolved = _architecture(config)
    resolved.weights = path
    resolved.source = str(path)
    return resolved


PRETRAINED_RESOLVERS: list[PretrainedResolver] = [
    resolve_pretrained_tag,
    resolve_pretrained_model,
    resolve_pretrained_file,
]


# -- helpers ---------------------------------------------------------------------------------------
def hub_file(repo_id: str, filenames: tuple[str, ...], *, revision: str | None = None, model: str) -> Path:
    """The first of `filenames` in hub repo `repo_id`, through huggingface_hub's cache."""
    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import EntryNotFoundError, LocalEntryNotFoundError

    reason = ""
    for filename in filenames:
        try:
            return Path(hf_hub_download(repo_id=repo_id, filename=filename, revision=revision))
        except LocalEntryNotFoundError as e:  # offline (or unreachable) and not cached
            reason = _first_line(e)
        except EntryNotFoundError:  # the repo exists but lacks this file: try the next name
            reason = f"{filename} not found"
        except Exception as e:  # missing repo, gated repo, network errors
            reason = _first_line(e)
    from huggingface_hub.constants import HF_HUB_CACHE

    raise ClipkitError(
        f"model '{model}' needs {' or '.join(filenames)} from hub repo {repo_id}, which is not in the Hugging "
        f"Face cache ({HF_HUB_CACHE}) and could not be fetched ({reason[:160]}); fetch it with "
        f"`hf download {repo_id}` (then HF_HUB_OFFLINE=1 works)"
    )


def explicit_overrides(config: ModelConfig) -> dict[str, Any]:
    """The model keys set beyond the config's own `conf/model` file (e.g. on the command line), as
    {"embed_dim": .., "vision_cfg": {..}, "text_cfg": {..}, "preprocess": {..}, ...}."""
    config_file = find_model_config_file(config.name)
    base = load_model_config(config_file) if config_file is not None else ModelConfig(name=config.name)
    overrides: dict[str, Any] = {}
    for key in ("vision_cfg", "text_cfg", "preprocess"):
        mine, theirs = getattr(config, key), getattr(base, key)
        changed = {k: v for k, v in mine.items() if theirs.get(k, _MISSING) != v}
        if changed:
            overrides[key] = changed
    for key in ("embed_dim", "quick_gelu", "custom_text"):
        value = getattr(config, key)
        if value is not None and value != getattr(base, key):
            overrides[key] = value
    return overrides


_MISSING = object()


def _conflicts(overrides: Mapping[str, Any], model_cfg: Mapping[str, Any]) -> list[str]:
    conflicts = []
    for tower in ("vision_cfg", "text_cfg"):
        for key, value in overrides.get(tower, {}).items():
            if model_cfg.get(tower, {}).get(key, _MISSING) != value:
                conflicts.append(f"{tower}.{key}={value!r} (it has {model_cfg.get(tower, {}).get(key)!r})")
    for key in ("embed_dim", "quick_gelu", "custom_text"):
        if key in overrides and model_cfg.get(key, _MISSING) != overrides[key]:
            conflicts.append(f"{key}={overrides[key]!r} (it has {model_cfg.get(key)!r})")
    return conflicts


def _read_open_clip_config(path: Path) -> dict[str, Any]:
    try:
        config = json.loads(Path(path).read_text(encoding="utf-8"))
        if not isinstance(config["model_cfg"], dict):
            raise TypeError("model_cfg is not a mapping")
    except (json.JSONDecodeError, KeyError, TypeError) as e:
        raise ClipkitError(f"{path} is not an open_clip config with a 'model_cfg' entry ({e})") from None
    return config


def _safetensors_first(filename: str) -> tuple[str, ...]:
    stem = filename.rsplit(".", 1)[0]
    return (f"{stem}.safetensors", filename) if not filename.endswith(".safetensors") else (filename,)


def _first_line(error: BaseException) -> str:
    text = str(error).strip()
    return (text.splitlines()[0] if text else type(error).__name__)[:200]
