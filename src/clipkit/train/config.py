"""The training loop's own small configs: one keyword-only dataclass per Hydra group it reads.

These dataclasses are the schema of conf/train and conf/optim (clipkit.train.schema): their defaults are the
only ones; the YAML files hold what differs.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from clipkit.errors import ClipkitError

PRECISIONS = ("auto", "fp32", "bf16", "fp16")
SCHEDULES = ("cosine", "constant", "constant_cooldown")
LR_SCALINGS = ("none", "linear", "sqrt")


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
    precision: str = "auto"  # auto: bf16 on a CUDA GPU that supports it, else fp32 (loop.resolve_precision)
    seed: int = 0
    log_every: int = 10
    eval_every: int = 0  # 0: evaluate at the end only
    checkpoint_every: int = 500
    keep_checkpoints: int = 2
    resume: str = "auto"  # auto (newest complete checkpoint in output_dir) | none | PATH to a checkpoint
    max_nonfinite_steps: int = 5  # a non-finite loss or gradient skips the step; this many in a row abort
    compile: bool = False  # torch.compile the model
    grad_checkpointing: bool = False  # recompute activations in backward to save memory
    lock_image: bool = False  # LiT: freeze the image tower
    lock_image_unlocked_groups: int = 0  # with lock_image: this many top layer groups stay trainable
    lock_text: bool = False  # freeze the text tower
    lock_text_unlocked_groups: int = (
        0  # with lock_text: top groups left trainable (projection, last block + ln_final, ...)
    )
    ema_decay: float | None = None  # keep an EMA of the weights; it is evaluated and exported as the model
    # FLIP's unmasked tuning: the last unmasked_fraction of the steps train without patch dropout
    # (model.vision_cfg.patch_dropout), so the model ends on the whole images it is evaluated on.
    unmasked_fraction: float = 0.0
    wise_ft_alpha: float | None = None  # also export (1 - alpha) * start + alpha * final weights (WiSE-FT)
    eval_at_start: bool = False  # evaluate before the first step (the baseline for forgetting)
    # Evaluations while training: [{type: zeroshot|retrieval|linear_probe, dataset: DIR, name: NAME, every: STEPS}],
    # logged as eval/NAME/METRIC (clipkit.train.evaluation); data.zeroshot_dataset / val_shards add theirs.
    eval: list[dict[str, Any]] = dataclasses.field(default_factory=list)
    keep_best: str | None = None  # e.g. eval/NAME/acc1: export the model to model-best/ whenever it improves
    # Keep freed host memory for the next step instead of returning it to the OS (~10% faster CPU steps;
    # clipkit.train.allocator).
    keep_freed_memory: bool = True
    # auto: FSDP2 when launched with conf/accelerate/fsdp*.yaml, else DDP | none (DDP) | full (ZeRO-3-like)
    # | grad_op (ZeRO-2-like)
    sharding: str = "auto"
    tf32: bool = True  # float32 matmuls on TF32 tensor cores (Ampere and newer GPUs); false: full float32
    uint8_images: bool = True  # images travel as uint8 and are normalised on the device (train.device_input)
    # A sweep's objective: the run returns this metric's last logged value (e.g. zeroshot/acc1) to Hydra's
    # sweeper, which an optimising one (Optuna, `pip install clipkit[sweep]`) minimises or maximises.
    objective: str | None = None

    def __post_init__(self):
        if self.precision not in PRECISIONS:
            raise ClipkitError(f"train.precision={self.precision!r} is not one of {PRECISIONS}")
        for key in ("steps", "accum_steps", "log_every", "checkpoint_every", "max_nonfinite_steps"):
            if getattr(self, key) < 1:
                raise ClipkitError(f"train.{key}={getattr(self, key)} must be at least 1")
        if self.keep_checkpoints < 1:
            raise ClipkitError(f"train.keep_checkpoints={self.keep_checkpoints} must be at least 1")
        if self.ema_decay is not None and not 0.0 <= self.ema_decay < 1.0:
            raise ClipkitError(
                f"train.ema_decay={self.ema_decay} must be in [0, 1), e.g. 0.999 (null: no EMA)"
            )
        if not 0.0 <= self.unmasked_fraction <= 1.0:
            raise ClipkitError(
                f"train.unmasked_fraction={self.unmasked_fraction} must be in [0, 1] (0: patch dropout to the end)"
            )
        if self.wise_ft_alpha is not None and not 0.0 <= self.wise_ft_alpha <= 1.0:
            raise ClipkitError(
                f"train.wise_ft_alpha={self.wise_ft_alpha} must be in [0, 1] (null: no WiSE-FT)"
            )
        for key in ("lock_image_unlocked_groups", "lock_text_unlocked_groups"):
            if getattr(self, key) < 0:
                raise ClipkitError(f"train.{key}={getattr(self, key)} must be 0 or more")


@dataclass(kw_only=True)
class OptimConfig:
    lr: float = 5e-4
    weight_decay: float = 0.2
    betas: tuple[float, float] = (0.9, 0.98)
    eps: float = 1e-6
    warmup_steps: int = 100
    # A share of train.steps, e.g. 0.05; set, it wins over warmup_steps (round(fraction x steps), logged).
    warmup_fraction: float | None = None
    # After linear warmup: cosine (decay to min_lr_ratio x lr) | constant | constant_cooldown (constant,
    # then the last cooldown_fraction of the steps decay linearly to min_lr_ratio x lr); open_clip's formulas.
    schedule: str = "cosine"
    min_lr_ratio: float = 0.0
    cooldown_fraction: float = 0.2  # constant_cooldown only
    # The lr for the global contrastive batch (data.batch_size x processes x train.accum_steps): none (lr as
    # set) | linear (x global batch / lr_base_batch) | sqrt (x its square root); applies to image_lr / text_lr.
    lr_scaling: str = "none"
    lr_base_batch: int = 256
    grad_clip_norm: float | None = None  # e.g. 1.0
    # torch's fused AdamW kernel (CPU and CUDA), 3-7x faster optimizer step; false: the per-tensor loop
    fused: bool = True
    # Per tower (None: the base value above) and layer-wise lr decay (None: off); see train/param_groups.py.
    image_lr: float | None = None
    text_lr: float | None = None
    image_weight_decay: float | None = None
    text_weight_decay: float | None = None
    layer_decay: float | None = None  # e.g. 0.75: the last block gets lr, each block below lr x decay
    image_layer_decay: float | None = None  # per tower (None: layer_decay)
    text_layer_decay: float | None = None

    def __post_init__(self):
        if self.schedule not in SCHEDULES:
            raise ClipkitError(f"optim.schedule={self.schedule!r} is not one of {SCHEDULES}")
        if self.lr_scaling not in LR_SCALINGS:
            raise ClipkitError(f"optim.lr_scaling={self.lr_scaling!r} is not one of {LR_SCALINGS}")
        if self.lr_base_batch < 1:
            raise ClipkitError(f"optim.lr_base_batch={self.lr_base_batch} must be at least 1, e.g. 256")
        if self.warmup_steps < 0:
            raise ClipkitError(f"optim.warmup_steps={self.warmup_steps} must be 0 or more")
        if self.warmup_fraction is not None and not 0.0 <= self.warmup_fraction <= 1.0:
            raise ClipkitError(
                f"optim.warmup_fraction={self.warmup_fraction} must be in [0, 1], e.g. 0.05 (null: off)"
            )
        for key in ("min_lr_ratio", "cooldown_fraction"):
            if not 0.0 <= getattr(self, key) <= 1.0:
                raise ClipkitError(f"optim.{key}={getattr(self, key)} must be in [0, 1]")
        self.betas = tuple(self.betas)
        for key in ("lr", "image_lr", "text_lr", "weight_decay", "image_weight_decay", "text_weight_decay"):
            value = getattr(self, key)
            if value is not None and value < 0:  # 0 is allowed: a zero-lr run is a common sanity check
                raise ClipkitError(f"optim.{key}={value} must be 0 or more")
        for key in ("layer_decay", "image_layer_decay", "text_layer_decay"):
            value = getattr(self, key)
            if value is not None and not 0.0 < value <= 1.0:
                raise ClipkitError(f"optim.{key}={value} must be in (0, 1], e.g. 0.75 (null: off)")
