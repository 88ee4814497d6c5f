"""FSDP2 (`torch.distributed.fsdp.fully_shard`): clipkit shards the model itself, on GPUs and on CPUs alike.

Accelerate 1.x enables FSDP only on accelerator devices: on a CPU an FSDP launch config silently becomes
DDP, so a test on CPU would never run the sharded code. clipkit therefore reads the launch config's FSDP
keys (or `train.sharding`), tells Accelerate to leave the model alone, and applies `fully_shard` here:
each transformer block (open_clip's ResidualAttentionBlock, timm's Block) is one unit, the rest of the
model the root unit. Accelerate still manages processes, devices, precision (autocast) and RNG states, so
a GPU user and the CPU tests run the same code.

What FSDP changes for the loop, and where it is handled:
- between steps a rank holds 1/N of each parameter (a DTensor): reading one is `full_value` (a collective);
- evaluation calls `encode_image` / `encode_text`, which FSDP's forward hooks do not see: the loop
  gathers every unit for the evaluation (`loop._gathered`), since the processes' shares of the evaluation
  set, and so their numbers of forward passes, may differ. (Registering them as FSDP forward methods would
  reshard the root in the middle of `forward`, which calls them.)
- gradient norms are DTensors whose `full_tensor()` is the global norm over all shards;
- accumulation turns gradient reduction off with `set_requires_gradient_sync` (DDP's `no_sync`);
- checkpoints are torch.distributed.checkpoint directories of the shards (`save_sharded`: model,
  optimizer and the EMA's shards), readable on any number of processes, one included (`accelerate launch
  --config_file conf/accelerate/cpu-fsdp.yaml --num_processes 1` still starts a process group); the
  exported model is the full state dict, gathered on all ranks.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import os
from dataclasses import dataclass
from pathlib import Path

import torch

from clipkit.errors import ClipkitError
from clipkit.models.sharded import MODEL_PREFIX, SafeFileSystemReader

log = logging.getLogger(__name__)

SHARDINGS = ("auto", "none", "full", "grad_op")
OPTIMIZER_PREFIX = "optimizer."
_LOGIT_PARAMS = ("logit_scale", "logit_bias")


@dataclass(frozen=True)
class Sharding:
    """How to shard: `reshard_after_forward` True is FULL_SHARD (ZeRO-3), False SHARD_GRAD_OP (ZeRO-2)."""

    reshard_after_forward: bool

    @property
    def name(self) -> str:
        return "FULL_SHARD" if self.reshard_after_forward else "SHARD_GRAD_OP"


def resolve_sharding(setting: str, environ: dict[str, str] | None = None) -> Sharding | None:
    """The sharding a run asked for: `train.sharding` (full | grad_op | none), or with `auto` the FSDP keys
    `accelerate launch --config_file conf/accelerate/fsdp*.yaml` puts in the environment. None: DDP."""
    environ = os.environ if environ is None else environ
    if setting not in SHARDINGS:
        raise ClipkitError(f"train.sharding={setting!r} is not one of {SHARDINGS}")
    if environ.get("ACCELERATE_USE_DEEPSPEED", "false").lower() == "true":
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
    if environ.get("ACCELERATE_USE_FSDP", "false").lower() != "true":
        return None
    version = environ.get("FSDP_VERSION", "1")
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
        if environ.get(key, "false").lower() == "true":
            raise ClipkitError(
                f"the accelerate config sets {key.lower()}, which clipkit does not run; use {fix}"
            )
    reshard = environ.get("FSDP_RESHARD_AFTER_FORWARD", "true").lower()
    # FSDP1-style strategy names are accepted too (accelerate maps them the same way).
    return Sharding(reshard_after_forward=reshard not in ("false", "shard_grad_op", "2"))


def stop_accelerate_from_sharding() -> None:
    """Accelerate would wrap the model itself (on GPUs) with its own policy; clipkit does it instead."""
    os.environ["ACCELERATE_USE_FSDP"] = "false"


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
    _copy_returned_parameters(model)
    log.info("FSDP2 %s over %d transformer blocks + the root", sharding.name, len(blocks))
    return model


def _copy_returned_parameters(model: torch.nn.Module) -> None:
    """open_clip's forward returns `self.logit_bias` itself. Under FSDP that is the gathered parameter,
    whose memory is freed when the root reshards after forward: reading it later reads freed memory
    (a crash, or garbage). Returned parameters are copied while still inside forward; gradients flow
    through the copy to the gathered parameter as before."""
    forward = model.forward

    @functools.wraps(forward)
    def forward_with_copies(*args, **kwargs):
        out = forward(*args, **kwargs)
        if isinstance(out, tuple):
            return tuple(o.clone() if isinstance(o, torch.nn.Parameter) else o for o in out)
        return out

    model.forward = forward_with_copies


def _is_block(module: torch.nn.Module) -> bool:
    from open_clip.transformer import ResidualAttentionBlock

    if isinstance(module, ResidualAttentionBlock):
        return True
    try:
        from timm.models.vision_transformer import Block
    except ImportError:  # timm is optional: without it there are no timm towers either
        return False
    return isinstance(module, Block)


def is_sharded(model: torch.nn.Module) -> bool:
    from torch.distributed.fsdp import FSDPModule

    return isinstance(model, FSDPModule)


@contextlib.contextmanager
def gradient_sync_off(model: torch.nn.Module):
    """FSDP's no_sync: gradients accumulate unreduced until a backward with sync on."""
    model.set_requires_gradient_sync(False)
    try:
        yield
    finally:
        model.set_requires_gradient_sync(True)


def full_value(tensor: torch.Tensor) -> torch.Tensor:
    """The whole tensor on every rank (a collective for a DTensor: call it on all ranks)."""
    from torch.distributed.tensor import DTensor

    return tensor.full_tensor() if isinstance(tensor, DTensor) else tensor


def full_state_dict(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The whole model's state dict on CPU, on rank 0 ({} elsewhere); every rank must call it."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    state = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    for name in _LOGIT_PARAMS:  # back to open_clip's 0-d parameters
        if name in state and state[name].numel() == 1:
            state[name] = state[name].reshape(())
    return state


# -- sharded checkpoints ------------------------------------------------------------------------------


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


def load_full_state_dict(model: torch.nn.Module, state: dict[str, torch.Tensor]) -> None:
    """Put a whole (open_clip-layout) state dict, present on every rank, into the sharded model: each rank
    keeps its shards. The 0-d logit parameters become the 1-element vectors `shard_model` made of them."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

    state = dict(state)
    for name in _LOGIT_PARAMS:
        param = getattr(model, name, None)
        if name in state and param is not None and state[name].ndim == 0:
            state[name] = state[name].reshape(param.shape)
    set_model_state_dict(model, state, options=StateDictOptions(full_state_dict=True, strict=True))


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
