"""The parallelism plan: DDP or FSDP2, chosen once at start; the Trainer calls it and never asks which.

torchtitan's habit: one object decides, from the config and the launch environment passed in, how the model
is wrapped, and owns everything that differs between backends: every change to `model.forward` (applied
here, in one fixed order), `no_sync`, gradient clipping and the global norm, reading a (sharded) value,
full and sharded state dicts, the gathered context for evaluation and export, checkpoint save / load and
the resume fix-ups, and where the EMA lives. Nothing here reads or writes `os.environ` after start: the
launch environment is a mapping handed in, so two Trainers in one process each get what their config says.

FSDP2 (`torch.distributed.fsdp.fully_shard`) is applied by clipkit itself, on GPUs and CPUs alike.
Accelerate 1.x enables FSDP only on accelerator devices: on a CPU an FSDP launch config silently becomes
DDP, so a test on CPU would never run the sharded code. clipkit therefore reads the launch config's FSDP
keys (or `train.sharding`), builds Accelerate with its own FSDP off, and shards here: each transformer
block (open_clip's ResidualAttentionBlock, timm's Block) is one unit, the rest of the model the root unit.
Accelerate still manages processes, devices, the fp16 loss scaler and RNG states, so a GPU user and the
CPU tests run the same code.

What FSDP changes, and where it is handled here:
- between steps a rank holds 1/N of each parameter (a DTensor): reading one is `full_value` (a collective);
- open_clip's forward returns the `logit_bias` parameter itself, which FSDP frees when the root reshards
  after forward: the returned parameters are copied inside forward (`_install_forward`);
- evaluation calls `encode_image` / `encode_text`, which FSDP's forward hooks do not see: every unit is
  gathered for the whole evaluation (`gathered`), since the processes' shares of the evaluation set, and
  so their numbers of forward passes, may differ;
- gradient norms are DTensors whose `full_tensor()` is the global norm over all shards;
- accumulation turns gradient reduction off with `set_requires_gradient_sync` (DDP's `no_sync`);
- checkpoints are torch.distributed.checkpoint directories of the shards (model, optimizer and the EMA's
  shards), readable on any number of processes, one included; the exported model is the full state dict.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import math
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from types import MethodType
from typing import Any

import torch

from clipkit.errors import ClipkitError
from clipkit.models.sharded import MODEL_PREFIX, SafeFileSystemReader
from clipkit.train.checkpoint import load_checkpoint
from clipkit.train.config import OptimConfig
from clipkit.train.ema import WeightEMA
from clipkit.train.optim import build_optimizer, build_scheduler

log = logging.getLogger(__name__)

SHARDINGS = ("auto", "none", "full", "grad_op")
OPTIMIZER_PREFIX = "optimizer."
_LOGIT_PARAMS = ("logit_scale", "logit_bias")
_MIXED_PRECISION = {"fp32": "no", "bf16": "bf16", "fp16": "fp16"}


@dataclass(frozen=True)
class Sharding:
    """How to shard: `reshard_after_forward` True is FULL_SHARD (ZeRO-3), False SHARD_GRAD_OP (ZeRO-2)."""

    reshard_after_forward: bool

    @property
    def name(self) -> str:
        return "FULL_SHARD" if self.reshard_after_forward else "SHARD_GRAD_OP"


def resolve_sharding(setting: str, launch_env: Mapping[str, str]) -> Sharding | None:
    """The sharding a run asked for: `train.sharding` (full | grad_op | none), or with `auto` the FSDP keys
    `accelerate launch --config_file conf/accelerate/fsdp*.yaml` put in the launch environment. None: DDP."""
    if setting not in SHARDINGS:
        raise ClipkitError(f"train.sharding={setting!r} is not one of {SHARDINGS}")
    if launch_env.get("ACCELERATE_USE_DEEPSPEED", "false").lower() == "true":
        raise ClipkitError(
            "DeepSpeed is not supported: use FSDP2's SHARD_GRAD_OP (ZeRO-2-like) instead, "
            "`accelerate launch --config_file conf/accelerate/fsdp-shard-grad-op.yaml -m clipkit.train ...`"
        )
    if setting == "none":
        return None
    if setting == "full":
        return Sharding(reshard_after_forward=True)
    if setting == "grad_op":
        return Sharding(reshard_after_forward=False)
    if launch_env.get("ACCELERATE_USE_FSDP", "false").lower() != "true":
        return None
    version = launch_env.get("FSDP_VERSION", "1")
    if version != "2":
        raise ClipkitError(
            f"the accelerate config asks for FSDP version {version}; clipkit runs FSDP2 only: set "
            "`fsdp_version: 2` in its fsdp_config (see conf/accelerate/fsdp.yaml)"
        )
    for key, fix in (
        ("FSDP_OFFLOAD_PARAMS", "fsdp_offload_params: false"),
        (
            "FSDP_ACTIVATION_CHECKPOINTING",
            "fsdp_activation_checkpointing: false and train.grad_checkpointing=true",
        ),
    ):
        if launch_env.get(key, "false").lower() == "true":
            raise ClipkitError(
                f"the accelerate config sets {key.lower()}, which clipkit does not run; use {fix}"
            )
    reshard = launch_env.get("FSDP_RESHARD_AFTER_FORWARD", "true").lower()
    # FSDP1-style strategy names are accepted too (accelerate maps them the same way).
    return Sharding(reshard_after_forward=reshard not in ("false", "shard_grad_op", "2"))


def build_plan(setting: str, precision: str, launch_env: Mapping[str, str]) -> ParallelPlan:
    """The plan for `train.sharding` and the launch environment; refuses what it cannot run, at start."""
    sharding = resolve_sharding(setting, launch_env)
    if sharding is None:
        return DDPPlan(precision)
    if precision == "fp16":
        raise ClipkitError(
            "train.precision=fp16 is not supported with FSDP (its loss scaler is per process); "
            "use train.precision=bf16"
        )
    return FSDPPlan(precision, sharding)


def build_accelerator(precision: str):
    """An Accelerator with this run's settings. Accelerate keeps them in a per-process singleton that refuses
    a change: the previous Trainer's settings in this process are dropped (the process group is kept).
    Accelerate's own FSDP stays off whatever the launch config says: clipkit applies FSDP2 itself."""
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState
    from accelerate.utils import patch_environment

    AcceleratorState._reset_state(reset_partial_state=False)
    # Accelerate reads its FSDP switch from the environment while it is built (and only then, for the
    # paths clipkit uses); the patch is undone on return.
    with patch_environment(accelerate_use_fsdp="false"):
        return Accelerator(
            mixed_precision=_MIXED_PRECISION[precision],
            step_scheduler_with_optimizer=False,
            # Without cpu=True, Accelerate under torchrun on a GPU-less machine reports one process.
            cpu=not torch.cuda.is_available(),
        )


class ParallelPlan:
    """What differs between DDP and FSDP2. `setup` wraps the model and builds optimizer and scheduler; the
    other methods are called by the Trainer on every process."""

    name: str
    sharded: bool  # recorded in checkpoints: a sharded one resumes only under FSDP

    def __init__(self, precision: str):
        self.precision = precision
        self.accelerator = None
        self.model: torch.nn.Module  # what the step calls (DDP: the wrapper)
        self.unwrapped: torch.nn.Module  # the open_clip model (FSDP: its sharded self)
        self.optimizer: torch.optim.Optimizer
        self.scheduler: Any

    def setup(
        self, model: torch.nn.Module, accelerator, optim_cfg: OptimConfig, steps: int
    ) -> tuple[torch.nn.Module, torch.optim.Optimizer, Any]:
        raise NotImplementedError

    def _autocast(self) -> Callable | None:
        """The autocast decorator for forward (bf16 / fp16), as Accelerate would build it; None in fp32."""
        from accelerate.utils import get_mixed_precision_context_manager

        if not self.accelerator.native_amp:
            return None
        return get_mixed_precision_context_manager(
            self.accelerator.native_amp, self.accelerator.autocast_handler
        )

    # -- the step --------------------------------------------------------------------------------------
    def no_sync(self, model: torch.nn.Module):
        raise NotImplementedError

    def clip_gradients(self, max_norm: float | None) -> torch.Tensor:
        """Clip to `max_norm` (None: only measure) and return the global gradient norm."""
        raise NotImplementedError

    def full_value(self, tensor: torch.Tensor) -> torch.Tensor:
        """The whole tensor on every process (a collective under FSDP: every process calls it)."""
        return tensor

    # -- whole models ----------------------------------------------------------------------------------
    def full_state_dict(self) -> dict[str, torch.Tensor]:
        """The whole model's state dict on the main process ({} elsewhere); every process calls it."""
        raise NotImplementedError

    def load_full_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        """Put a whole (open_clip-layout) state dict, present on every process, into the model."""
        raise NotImplementedError

    def gathered(self) -> contextlib.AbstractContextManager:
        """The whole model usable through `unwrapped` (encode_image / encode_text) for the duration."""
        return contextlib.nullcontext()

    # -- checkpoints and the EMA -------------------------------------------------------------------------
    def build_ema(self, decay: float) -> WeightEMA:
        """The EMA beside the parameters: whole on every process (DDP) or sharded like them (FSDP)."""
        return WeightEMA(self.unwrapped, decay)

    def checkpoint_parts(self, ema: WeightEMA | None) -> dict[str, Any]:
        """Keyword arguments for `checkpoint.save_checkpoint`: what this backend saves beside Accelerate."""
        raise NotImplementedError

    def load(self, checkpoint: Path, ema: WeightEMA | None) -> dict[str, Any]:
        """Restore model, optimizer, scheduler (and EMA) from `checkpoint`; return its trainer state."""
        raise NotImplementedError


class DDPPlan(ParallelPlan):
    """Accelerate's DDP: every process holds the whole model; gradients are all-reduced in backward."""

    name = "DDP"
    sharded = False

    def setup(self, model, accelerator, optim_cfg, steps):
        self.accelerator = accelerator
        optimizer = build_optimizer(model, optim_cfg)
        scheduler = build_scheduler(optimizer, optim_cfg, steps)
        self.model, self.optimizer, self.scheduler = accelerator.prepare(model, optimizer, scheduler)
        self.unwrapped = accelerator.unwrap_model(self.model)
        # Accelerate's prepare installed its own autocast forward (with outputs converted to float32):
        # replaced by the plan's, built from the class's forward.
        _install_forward(self.unwrapped, autocast=self._autocast(), copy_returned_parameters=False)
        return self.model, self.optimizer, self.scheduler

    def no_sync(self, model):
        return self.accelerator.no_sync(model)

    def clip_gradients(self, max_norm):
        trainable = [p for p in self.model.parameters() if p.requires_grad and p.grad is not None]
        self.accelerator.unscale_gradients()  # fp16: the loss scaler's factor out first
        return torch.nn.utils.clip_grad_norm_(trainable, math.inf if max_norm is None else max_norm)

    def full_state_dict(self):
        return self.unwrapped.state_dict() if self.accelerator.is_main_process else {}

    def load_full_state_dict(self, state):
        self.unwrapped.load_state_dict(state, strict=True)

    def checkpoint_parts(self, ema):
        def save_ema(directory: Path) -> None:  # every process holds the same average; one writes it
            if self.accelerator.is_main_process:
                ema.save(directory)

        return {"sharded": None, "write_extra": save_ema if ema is not None else None}

    def load(self, checkpoint, ema):
        saved = load_checkpoint(self.accelerator, checkpoint, sharded=None)
        if ema is not None:
            ema.load(checkpoint)
        return saved


class FSDPPlan(ParallelPlan):
    """FSDP2 applied by clipkit: each transformer block a unit, the rest of the model the root."""

    sharded = True

    def __init__(self, precision: str, sharding: Sharding):
        super().__init__(precision)
        self.sharding = sharding
        self.name = f"FSDP2 {sharding.name}"

    def setup(self, model, accelerator, optim_cfg, steps):
        self.accelerator = accelerator
        model = shard_model(model, self.sharding, accelerator.device)
        _install_forward(model, autocast=self._autocast(), copy_returned_parameters=True)
        # The optimizer is built on the sharded parameters and stays clipkit's: Accelerate would save its
        # state from the main process only. Accelerate keeps the scheduler and the RNG states.
        self.optimizer = build_optimizer(model, optim_cfg)
        self.scheduler = accelerator.prepare(build_scheduler(self.optimizer, optim_cfg, steps))
        self.model = self.unwrapped = model
        return self.model, self.optimizer, self.scheduler

    @contextlib.contextmanager
    def no_sync(self, model) -> Iterator[None]:
        """FSDP's no_sync: gradients accumulate unreduced until a backward with sync on."""
        model.set_requires_gradient_sync(False)
        try:
            yield
        finally:
            model.set_requires_gradient_sync(True)

    def clip_gradients(self, max_norm):
        trainable = [p for p in self.model.parameters() if p.requires_grad and p.grad is not None]
        # DTensor gradients: the norm is reduced over all shards, so every process clips by the same factor.
        norm = torch.nn.utils.clip_grad_norm_(trainable, math.inf if max_norm is None else max_norm)
        return self.full_value(norm)

    def full_value(self, tensor):
        from torch.distributed.tensor import DTensor

        return tensor.full_tensor() if isinstance(tensor, DTensor) else tensor

    def full_state_dict(self):
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        options = StateDictOptions(full_state_dict=True, cpu_offload=True)
        state = get_model_state_dict(self.model, options=options)  # a collective; {} off rank 0
        for name in _LOGIT_PARAMS:  # back to open_clip's 0-d parameters
            if name in state and state[name].numel() == 1:
                state[name] = state[name].reshape(())
        return state

    def load_full_state_dict(self, state):
        """Every process keeps its shards of `state`; the 0-d logit parameters become the 1-element
        vectors `shard_model` made of them."""
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

        state = dict(state)
        for name in _LOGIT_PARAMS:
            param = getattr(self.model, name, None)
            if name in state and param is not None and state[name].ndim == 0:
                state[name] = state[name].reshape(param.shape)
        set_model_state_dict(self.model, state, options=StateDictOptions(full_state_dict=True, strict=True))

    @contextlib.contextmanager
    def gathered(self) -> Iterator[None]:
        """Every FSDP unit unsharded for the duration (no collectives per forward), resharded afterwards."""
        from torch.distributed.fsdp import FSDPModule

        units = [m for m in self.model.modules() if isinstance(m, FSDPModule)]
        self.model.set_reshard_after_forward(False)  # recursive: no unit reshards after its forward
        for unit in units:
            unit.unshard()
        try:
            yield
        finally:
            for unit in units:
                unit.reshard()
            self.model.set_reshard_after_forward(self.sharding.reshard_after_forward)

    def checkpoint_parts(self, ema):
        extra = {} if ema is None else ema.sharded_state()  # the EMA's shards beside the model's
        return {"sharded": (self.model, self.optimizer, extra), "write_extra": None}

    def load(self, checkpoint, ema):
        extra = {} if ema is None else ema.sharded_state()  # filled in place
        saved = load_checkpoint(self.accelerator, checkpoint, sharded=(self.model, self.optimizer, extra))
        # The sharded checkpoint holds optimizer tensors, not param_groups: the learning rate the restored
        # schedule is at goes back into the groups (Accelerate's optimizer file does this under DDP).
        # Without it the first resumed step would use the rate of step 0.
        for group, lr in zip(self.optimizer.param_groups, self.scheduler.get_last_lr(), strict=True):
            group["lr"] = lr
        return saved


def _install_forward(model: torch.nn.Module, *, autocast: Callable | None, copy_returned_parameters: bool):
    """Every change clipkit makes to `model.forward`, in one place and one order, built from the class's
    forward (so nothing installed before, e.g. Accelerate's float32-converting autocast, survives):

    1. autocast (bf16 / fp16), with the outputs left in the autocast dtype: Accelerate would convert them
       to float32, and then the features would cross the loss's all-gather or ring exchange in float32,
       twice the bytes of bf16. The losses upcast after the exchange (clipkit.losses.distributed).
    2. FSDP: returned parameters copied while still inside forward. open_clip's forward returns
       `self.logit_bias` itself; under FSDP that is the gathered parameter, whose memory is freed when the
       root reshards after forward, so reading it later reads freed memory (a crash or garbage). Gradients
       flow through the copy to the gathered parameter as before.

    FSDP's unshard / reshard run as module hooks around whatever `forward` is, so both steps run between
    them. (Before the plan, autocast was installed after the copy and rebuilt forward from the class,
    discarding the copy: bf16 SigLIP under FSDP read freed memory.)"""
    forward = type(model).forward
    if autocast is not None:
        forward = autocast(forward)
    forward = MethodType(forward, model)
    if copy_returned_parameters:
        forward = _copying_returned_parameters(forward)
    model.forward = forward


def _copying_returned_parameters(forward: Callable) -> Callable:
    @functools.wraps(forward)
    def forward_with_copies(*args, **kwargs):
        out = forward(*args, **kwargs)
        if isinstance(out, tuple):
            return tuple(o.clone() if isinstance(o, torch.nn.Parameter) else o for o in out)
        return out

    return forward_with_copies


def shard_model(model: torch.nn.Module, sharding: Sharding, device: torch.device) -> torch.nn.Module:
    """Apply fully_shard to every transformer block, then to the whole model (in place; returns it)."""
    from torch.distributed.fsdp import fully_shard

    if not torch.distributed.is_initialized():
        raise ClipkitError(
            "FSDP needs a process group: `accelerate launch --config_file conf/accelerate/fsdp.yaml "
            "-m clipkit.train ...` (cpu-fsdp.yaml on a machine without GPUs; `--num_processes 1` for one)"
        )
    model.to(device)
    # fully_shard splits parameters along dim 0 and refuses 0-d ones: the logit scale and bias become
    # 1-element vectors (step.forward_towers reads them back as scalars; exports restore the 0-d shape).
    for name in _LOGIT_PARAMS:
        param = getattr(model, name, None)
        if isinstance(param, torch.nn.Parameter) and param.ndim == 0:
            setattr(
                model, name, torch.nn.Parameter(param.detach().reshape(1), requires_grad=param.requires_grad)
            )
    blocks = [m for m in model.modules() if _is_block(m)]
    if not blocks:
        raise ClipkitError(
            f"FSDP: found no transformer block to shard in {type(model).__name__} "
            "(expected open_clip's ResidualAttentionBlock or timm's Block)"
        )
    for block in blocks:
        fully_shard(block, reshard_after_forward=sharding.reshard_after_forward)
    fully_shard(model, reshard_after_forward=sharding.reshard_after_forward)
    log.info("FSDP2 %s over %d transformer blocks + the root", sharding.name, len(blocks))
    return model


def _is_block(module: torch.nn.Module) -> bool:
    from open_clip.transformer import ResidualAttentionBlock

    if isinstance(module, ResidualAttentionBlock):
        return True
    try:
        from timm.models.vision_transformer import Block
    except ImportError:  # timm is optional: without it there are no timm towers either
        return False
    return isinstance(module, Block)


# -- sharded checkpoints (called by clipkit.train.checkpoint) ------------------------------------------


def save_sharded(
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    directory: Path,
    extra: dict[str, torch.Tensor] | None = None,
) -> None:
    """Every rank writes its shards of the model, the optimizer state (tensors only) and `extra` (sharded
    like the parameters, e.g. the EMA's `ema.*`) to `directory`."""
    import torch.distributed.checkpoint as dcp

    dcp.save({**_flat_state(model, optimizer)[0], **(extra or {})}, checkpoint_id=str(directory))


def load_sharded(
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    directory: Path,
    extra: dict[str, torch.Tensor] | None = None,
) -> None:
    """Fill the model, the optimizer and the tensors of `extra` (in place) from `directory`, re-split for
    this run's number of processes."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import set_model_state_dict, set_optimizer_state_dict

    saved = SafeFileSystemReader(str(directory)).read_metadata().state_dict_metadata
    for key in extra or {}:
        if key not in saved:
            raise ClipkitError(
                f"{directory.parent} holds no {key}: it was saved without the setting that keeps it "
                "(train.ema_decay); resume with the settings the run started with, or start a new output_dir"
            )
    flat, optimizer_state = _flat_state(model, optimizer)
    dcp.load({**flat, **(extra or {})}, storage_reader=SafeFileSystemReader(str(directory)))
    model_state = {k[len(MODEL_PREFIX) :]: v for k, v in flat.items() if k.startswith(MODEL_PREFIX)}
    for fqn, values in optimizer_state["state"].items():
        for key in values:
            values[key] = flat[f"{OPTIMIZER_PREFIX}{fqn}.{key}"]
    set_model_state_dict(model, model_state)
    set_optimizer_state_dict(model, optimizer, optimizer_state)


def _flat_state(model, optimizer) -> tuple[dict[str, torch.Tensor], dict]:
    """One flat {name: tensor} of model and optimizer state. param_groups (hyperparameters, rebuilt from
    the config) stay out, so the checkpoint holds tensors only and loads without unpickling objects."""
    from torch.distributed.checkpoint.state_dict import get_model_state_dict, get_optimizer_state_dict

    flat = {MODEL_PREFIX + k: v for k, v in get_model_state_dict(model).items()}
    optimizer_state = get_optimizer_state_dict(model, optimizer)  # creates the state if no step ran yet
    for fqn, values in optimizer_state["state"].items():
        for key, value in values.items():
            flat[f"{OPTIMIZER_PREFIX}{fqn}.{key}"] = value
    return flat, optimizer_state
