"""Exponential moving average of the weights: after each optimizer step, ema <- decay * ema + (1 - decay) * w.

The average starts at the weights training starts from and is kept in float32 whatever the training
precision, beside the parameters: on their device and, under FSDP2, sharded like them (each average is a
DTensor with its parameter's placements; the update is elementwise, so every process updates its own
shard and no collective runs). At the end of a run it is copied into the model, which is then evaluated and
exported.

In checkpoints the average is kept in a form any number of processes can read back:
- DDP: every process holds the whole average, so the main process writes it once (`ema.safetensors`);
- FSDP2: every process writes its shards into the checkpoint's torch.distributed.checkpoint directory
  beside the model's and the optimizer's (`ema.*` keys, see `sharded_state`), which re-splits them for
  the resuming run's number of processes. No process ever holds the whole float32 average.
"""

from __future__ import annotations

from pathlib import Path

import safetensors.torch
import torch

from clipkit.errors import ClipkitError
from clipkit.models.sharded import EMA_PREFIX  # its keys in a sharded (DCP) checkpoint
from clipkit.models.weights import EMA_FILE_NAME, find_ema_weights


class WeightEMA:
    def __init__(self, model: torch.nn.Module, decay: float):
        self.decay = decay
        self.names = [name for name, _ in model.named_parameters()]
        # A DTensor under FSDP2: detach/float/clone keep its placements.
        self.shadow = [p.detach().float().clone() for p in model.parameters()]

    @torch.no_grad()
    def update(self, model: torch.nn.Module) -> None:
        # Local shards: an average and its parameter are split alike, so this is the same elementwise
        # update as on whole tensors, without DTensor dispatch per parameter.
        # lerp_(w, 1 - decay) = ema + (1 - decay) * (w - ema), the same recursion in one fused op.
        for average, param in zip(self.shadow, model.parameters(), strict=True):
            _local(average).lerp_(_local(param.detach()).float(), 1.0 - self.decay)

    @torch.no_grad()
    def copy_to(self, model: torch.nn.Module) -> None:
        """Put the averaged weights into `model`'s parameters (in their dtype; shard by shard under FSDP2)."""
        for average, param in zip(self.shadow, model.parameters(), strict=True):
            _local(param).copy_(_local(average))

    # -- checkpoints ---------------------------------------------------------------------------------
    def sharded_state(self) -> dict[str, torch.Tensor]:
        """{ema.NAME: DTensor} to save and load with the model's shards (torch.distributed.checkpoint
        loads into these tensors in place)."""
        return {EMA_PREFIX + name: t for name, t in zip(self.names, self.shadow, strict=True)}

    def save(self, directory: Path) -> None:
        """DDP: the whole average, from one process (every process holds the same)."""
        tensors = {name: t.contiguous() for name, t in zip(self.names, self.shadow, strict=True)}
        safetensors.torch.save_file(tensors, str(directory / EMA_FILE_NAME))

    def load(self, directory: Path) -> None:
        """DDP: every process reads the whole average, whatever number of processes saved it."""
        found = find_ema_weights(directory)
        if found is None or found[1]:  # none, or only in a sharded (FSDP) state, which DDP does not resume
            raise ClipkitError(
                f"{directory} holds no EMA: it was saved without train.ema_decay; resume with the same "
                "train.ema_decay the run started with, or start a new output_dir"
            )
        path = found[0]
        saved = safetensors.torch.load_file(str(path))
        if sorted(saved) != sorted(self.names):
            raise ClipkitError(f"{path} holds the EMA of another model; start a new output_dir")
        with torch.no_grad():
            for name, average in zip(self.names, self.shadow, strict=True):
                average.copy_(saved[name])


def _local(tensor: torch.Tensor) -> torch.Tensor:
    """A DTensor's local shard (FSDP2), else the tensor itself."""
    return tensor.to_local() if hasattr(tensor, "to_local") else tensor
