"""The training loop's own small configs: one keyword-only dataclass per Hydra group it reads."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from clipkit.errors import ClipkitError

PRECISIONS = ("fp32", "bf16", "fp16")
SCHEDULES = ("cosine", "constant")


def config_from_dict(cls, values: Mapping[str, Any], *, group: str):
    """Build dataclass `cls` from a Hydra group, naming any unknown key and the valid ones."""
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - known)
    if unknown:
        raise ClipkitError(f"unknown key(s) {[f'{group}.{k}' for k in unknown]}; valid keys: {sorted(known)}")
    return cls(**values)


@dataclass(kw_only=True)
class TrainConfig:
    steps: int = 1000  # optimizer steps
    accum_steps: int = 1  # micro-batches per optimizer step, with the negatives of all of them
    precision: str = "fp32"
    seed: int = 0
    log_every: int = 10
    eval_every: int = 0  # 0: evaluate at the end only
    checkpoint_every: int = 500
    keep_checkpoints: int = 2
    resume: str = "auto"  # auto | none | PATH to a checkpoint directory
    max_nonfinite_steps: int = 5  # abort after this many skipped (non-finite) steps in a row
    compile: bool = False  # torch.compile the model
    grad_checkpointing: bool = False
    lock_image: bool = False  # LiT: freeze the image tower
    keep_freed_memory: bool = True  # reuse freed host memory across steps (clipkit.train.allocator)
    sharding: str = "auto"  # auto (from the accelerate launch config) | none (DDP) | full | grad_op (FSDP2)
    tf32: bool = True  # TF32 tensor cores for float32 matmuls on Ampere+ GPUs
    uint8_images: bool = True  # images travel as uint8 and are normalised on the device (train.device_input)

    def __post_init__(self):
        if self.precision not in PRECISIONS:
            raise ClipkitError(f"train.precision={self.precision!r} is not one of {PRECISIONS}")
        for key in ("steps", "accum_steps", "log_every", "checkpoint_every", "max_nonfinite_steps"):
            if getattr(self, key) < 1:
                raise ClipkitError(f"train.{key}={getattr(self, key)} must be at least 1")
        if self.keep_checkpoints < 1:
            raise ClipkitError(f"train.keep_checkpoints={self.keep_checkpoints} must be at least 1")


@dataclass(kw_only=True)
class OptimConfig:
    lr: float = 5e-4
    weight_decay: float = 0.2
    betas: tuple[float, float] = (0.9, 0.98)
    eps: float = 1e-6
    warmup_steps: int = 100
    schedule: str = "cosine"
    grad_clip_norm: float | None = None
    fused: bool = True  # torch's fused AdamW kernel (CPU and CUDA); falls back to the loop where unsupported

    def __post_init__(self):
        if self.schedule not in SCHEDULES:
            raise ClipkitError(f"optim.schedule={self.schedule!r} is not one of {SCHEDULES}")
        self.betas = tuple(self.betas)


@dataclass(kw_only=True)
class LoggerConfig:
    name: str = "none"  # none | wandb
    mode: str = "offline"  # wandb: offline | online | disabled
    project: str = "clipkit"
    entity: str | None = None
    run_name: str | None = None
