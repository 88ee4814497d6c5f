"""Exponential moving average of the weights: after each optimizer step, ema <- decay * ema + (1 - decay) * w.

The average starts at the weights training starts from and is kept in float32 whatever the training
precision, beside the parameters (on their device, sharded like them under FSDP2: the update is
elementwise). It is saved in every checkpoint (safetensors, one file per process) and, at the end of a run,
copied into the model, which is then evaluated and exported.
"""

from __future__ import annotations

from pathlib import Path

import safetensors.torch
import torch

from clipkit.errors import ClipkitError


class WeightEMA:
    def __init__(self, model: torch.nn.Module, decay: float):
        self.decay = decay
        self.names = [name for name, _ in model.named_parameters()]
        self.shadow = [p.detach().float().clone() for p in model.parameters()]

    @torch.no_grad()
    def update(self, model: torch.nn.Module) -> None:
        # lerp_(w, 1 - decay) = ema + (1 - decay) * (w - ema), the same recursion in one fused op.
        for average, param in zip(self.shadow, model.parameters(), strict=True):
            average.lerp_(param.detach().float(), 1.0 - self.decay)

    @torch.no_grad()
    def copy_to(self, model: torch.nn.Module) -> None:
        """Put the averaged weights into `model`'s parameters (in their dtype)."""
        for average, param in zip(self.shadow, model.parameters(), strict=True):
            param.copy_(average)

    # -- checkpoints: one safetensors file per process (its shards of the average under FSDP2) ---------
    def save(self, directory: Path, process_index: int) -> None:
        tensors = {name: _local(t).contiguous() for name, t in zip(self.names, self.shadow, strict=True)}
        safetensors.torch.save_file(tensors, str(directory / ema_file_name(process_index)))

    def load(self, directory: Path, process_index: int) -> None:
        path = directory / ema_file_name(process_index)
        if not path.is_file():
            raise ClipkitError(
                f"{directory} has no {path.name}: it was saved without train.ema_decay; resume with the same "
                "train.ema_decay the run started with, or start a new output_dir"
            )
        saved = safetensors.torch.load_file(str(path))
        if sorted(saved) != sorted(self.names):
            raise ClipkitError(f"{path} holds the EMA of another model; start a new output_dir")
        with torch.no_grad():
            for name, average in zip(self.names, self.shadow, strict=True):
                _local(average).copy_(saved[name])


def ema_file_name(process_index: int) -> str:
    return f"ema_{process_index}.safetensors"


def _local(tensor: torch.Tensor) -> torch.Tensor:
    """A DTensor's local shard (FSDP2), else the tensor itself."""
    return tensor.to_local() if hasattr(tensor, "to_local") else tensor
