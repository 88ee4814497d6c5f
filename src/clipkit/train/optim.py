"""AdamW with decoupled weight decay on the right parameters, and the learning-rate schedule."""

from __future__ import annotations

import logging
import math

import torch

from clipkit.train.config import OptimConfig
from clipkit.train.param_groups import TowerOptim, build_param_groups, is_decayed

__all__ = ["build_optimizer", "build_scheduler", "is_decayed", "lr_factor"]

log = logging.getLogger(__name__)


def build_optimizer(model: torch.nn.Module, config: OptimConfig) -> torch.optim.AdamW:
    groups = build_param_groups(model, **tower_settings(config))
    kwargs = {"lr": config.lr, "betas": config.betas, "eps": config.eps}
    if config.fused:
        try:
            # One kernel over all parameters instead of a Python loop over them: the optimizer step
            # of ViT-S-32-alt on CPU goes from ~96 ms to ~32 ms, with the same update.
            return torch.optim.AdamW(groups, fused=True, **kwargs)
        except RuntimeError as err:  # parameters on a device or of a dtype the kernel does not cover
            log.info("fused AdamW unavailable (%s); using the per-parameter loop", err)
    return torch.optim.AdamW(groups, **kwargs)


def tower_settings(config: OptimConfig) -> dict[str, TowerOptim]:
    """The base, image and text settings of `config`: a tower's own value, else the base one."""

    def pick(own, fallback):
        return fallback if own is None else own

    base = TowerOptim(lr=config.lr, weight_decay=config.weight_decay)
    return {
        "base": base,
        "image": TowerOptim(
            lr=pick(config.image_lr, config.lr),
            weight_decay=pick(config.image_weight_decay, config.weight_decay),
            layer_decay=pick(config.image_layer_decay, config.layer_decay),
        ),
        "text": TowerOptim(
            lr=pick(config.text_lr, config.lr),
            weight_decay=pick(config.text_weight_decay, config.weight_decay),
            layer_decay=pick(config.text_layer_decay, config.layer_decay),
        ),
    }


def lr_factor(step: int, *, warmup_steps: int, total_steps: int, schedule: str) -> float:
    """Multiplier of the base learning rate at optimizer step `step` (0-based), as open_clip's trainer:
    linear warmup to the base rate, then cosine decay to zero or constant."""
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    if schedule == "constant":
        return 1.0
    progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
    return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))


def build_scheduler(optimizer, config: OptimConfig, total_steps: int) -> torch.optim.lr_scheduler.LambdaLR:
    def factor(step: int) -> float:
        return lr_factor(
            step, warmup_steps=config.warmup_steps, total_steps=total_steps, schedule=config.schedule
        )

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
