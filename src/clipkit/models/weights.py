"""Reading state dicts safely and putting them into a model.

Only safetensors files and `torch.load(..., weights_only=True)` are used: unpickling arbitrary
objects can run code, so a checkpoint that needs it is refused with the way to convert it.
"""

from __future__ import annotations

import logging
import pickle
from pathlib import Path

import safetensors.torch
import torch
from open_clip.model import resize_pos_embed, resize_text_pos_embed

from clipkit.errors import ClipkitError

log = logging.getLogger(__name__)

WEIGHTS_SUFFIXES = (".safetensors", ".pt", ".pth", ".bin")
# Prefixes that wrappers add to parameter names: DDP, torch.compile.
_WRAPPER_PREFIXES = ("module.", "_orig_mod.")


class UnsafeCheckpointError(ClipkitError):
    """The file needs arbitrary pickled objects, which weights_only loading refuses."""


def read_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """Tensors by name from a .safetensors file, a weights-only .pt/.pth/.bin file, or the sharded state
    directory of an FSDP checkpoint."""
    path = Path(path)
    if path.is_dir() and (path / ".metadata").is_file():
        from clipkit.models.sharded import read_sharded_model  # torch.distributed.checkpoint: slow import

        return read_sharded_model(path)
    if not path.is_file():
        raise ClipkitError(f"weights file not found: {path}")
    if path.suffix == ".safetensors":
        try:
            return _unwrap_state_dict(safetensors.torch.load_file(str(path), device="cpu"), path)
        except Exception as e:  # safetensors raises its own error types for corrupt headers
            raise ClipkitError(f"{path} is not a readable safetensors file ({e}); re-export it") from e
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        lines = str(e).strip().splitlines()
        reason = next((line.strip() for line in lines if "WeightsUnpickler error" in line), lines[0])[:200]
        raise UnsafeCheckpointError(
            f"refusing to load {path}: it holds pickled Python objects beyond tensors ({reason}), and "
            "unpickling them could run code. If you trust the file, convert it once with: "
            f"python -c \"import torch, safetensors.torch as st; c = torch.load('{path}', weights_only=False); "
            f"st.save_file(c.get('state_dict', c), '{path.with_suffix('.safetensors')}')\""
        ) from None
    except Exception as e:
        raise ClipkitError(f"{path} is not a readable PyTorch checkpoint ({e})") from e
    return _unwrap_state_dict(obj, path)


def _unwrap_state_dict(obj, path: Path) -> dict[str, torch.Tensor]:
    # open_clip's trainer saves {"epoch", "name", "state_dict", "optimizer"}; others save a bare dict.
    if isinstance(obj, dict):
        for key in ("state_dict", "model"):
            if isinstance(obj.get(key), dict):
                obj = obj[key]
                break
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise ClipkitError(f"{path} does not hold a state dict (a mapping of parameter names to tensors)")
    state_dict = {}
    for name, tensor in obj.items():
        for prefix in _WRAPPER_PREFIXES:
            if name.startswith(prefix):
                name = name[len(prefix) :]
        state_dict[name] = tensor
    return state_dict


def find_weights_file(directory: Path) -> Path | None:
    """The weights in a model directory, preferring open_clip's own file names and safetensors."""
    preferred = (
        "open_clip_model.safetensors",
        "open_clip_pytorch_model.safetensors",
        "model.safetensors",
        "open_clip_pytorch_model.bin",
        "open_clip_pytorch_model.pth",
        "pytorch_model.bin",
    )
    for name in preferred:
        if (directory / name).is_file():
            return directory / name
    if (directory / "sharded" / ".metadata").is_file():  # a checkpoint of an FSDP run (models.sharded)
        return directory / "sharded"
    candidates = sorted(p for p in directory.iterdir() if p.suffix in WEIGHTS_SUFFIXES)
    return candidates[0] if candidates else None


EMA_FILE_NAME = "ema.safetensors"  # a DDP checkpoint's EMA of the weights (train.ema_decay)
OLD_EMA_FILE_NAME = "ema_0.safetensors"  # written by clipkit before the EMA was saved once per checkpoint


def find_ema_weights(checkpoint: Path) -> tuple[Path, str] | None:
    """Where a training checkpoint keeps its EMA of the weights: (a safetensors file, "") for DDP runs,
    (the sharded state directory, the EMA's key prefix) for FSDP runs; None if it holds none."""
    checkpoint = Path(checkpoint)
    for name in (EMA_FILE_NAME, OLD_EMA_FILE_NAME):
        if (checkpoint / name).is_file():
            return checkpoint / name, ""
    sharded = checkpoint / "sharded"
    if (sharded / ".metadata").is_file():
        from clipkit.models.sharded import EMA_PREFIX, has_prefix

        if has_prefix(sharded, EMA_PREFIX):
            return sharded, EMA_PREFIX
    return None


def read_ema_weights(checkpoint: Path) -> dict[str, torch.Tensor]:
    """The EMA of the weights a training checkpoint holds, by parameter name; a one-line error if none."""
    found = find_ema_weights(checkpoint)
    if found is None:
        raise ClipkitError(
            f"{checkpoint} holds no EMA of the weights (the run did not set train.ema_decay, or it is not a "
            "training checkpoint); export it without --ema"
        )
    path, prefix = found
    if prefix:
        from clipkit.models.sharded import read_sharded_model

        return read_sharded_model(path, prefix)
    return read_state_dict(path)


def load_weights(model: torch.nn.Module, path: str | Path) -> None:
    """Load a weights file into `model`, strictly, resizing position embeddings when sizes differ."""
    load_state_dict_into(model, read_state_dict(path), origin=str(path))


def load_state_dict_into(model: torch.nn.Module, state_dict: dict[str, torch.Tensor], *, origin: str) -> None:
    """Load `state_dict` (named after `origin` in messages) into `model` strictly, resizing position
    embeddings when sizes differ."""
    state_dict = dict(state_dict)
    path = origin
    # A scalar saved for a 1-element logit parameter (or the reverse) is the same value.
    for key in ("logit_scale", "logit_bias"):
        param = getattr(model, key, None)
        if key in state_dict and param is not None and state_dict[key].shape != param.shape:
            state_dict[key] = state_dict[key].reshape(param.shape)
    if getattr(model, "logit_bias", None) is not None and "logit_bias" not in state_dict:
        # Starting SigLIP from CLIP weights: the bias keeps its initial value.
        log.warning("%s has no logit_bias; keeping the initial value %.3f", path, model.logit_bias.item())
        state_dict["logit_bias"] = model.logit_bias.detach().clone()
    try:
        resize_pos_embed(state_dict, model)
        resize_text_pos_embed(state_dict, model)
        model.load_state_dict(state_dict, strict=True)
    except (RuntimeError, AssertionError) as e:  # open_clip's resizers assert on width mismatches
        summary = (str(e) or type(e).__name__).splitlines()[0]
        raise ClipkitError(
            f"weights in {path} do not fit this architecture ({summary}); "
            "check that the model config matches the one the weights were trained with"
        ) from None
