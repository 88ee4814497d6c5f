"""The training run: setup, the step, checkpoints, evaluation and the final export."""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import math
import signal
import time
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path
from types import MethodType
from typing import Any

import torch
from accelerate import Accelerator
from accelerate.utils import broadcast_object_list, gather_object, set_seed
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf
from tqdm.auto import tqdm

from clipkit.data import DataConfig, TrainStream, prepare_data
from clipkit.errors import ClipkitError
from clipkit.models import ModelBundle, ModelConfig, build_model, export_model
from clipkit.redaction import redact
from clipkit.train.allocator import keep_freed_memory
from clipkit.train.checkpoint import load_checkpoint, resolve_resume, save_checkpoint
from clipkit.train.config import LoggerConfig, OptimConfig, TrainConfig, config_from_dict
from clipkit.train.device_input import split_normalisation
from clipkit.train.ema import WeightEMA
from clipkit.train.evaluation import evaluate
from clipkit.train.metrics import MetricsLogger
from clipkit.train.optim import build_optimizer, build_scheduler
from clipkit.train.report import write_run_report
from clipkit.train.sharding import (
    Sharding,
    full_state_dict,
    full_value,
    gradient_sync_off,
    load_full_state_dict,
    resolve_sharding,
    shard_model,
    stop_accelerate_from_sharding,
)
from clipkit.train.step import contrastive_backward
from clipkit.train.wise_ft import START_MODEL_DIR, WISE_FT_MODEL_DIR, export_start_model, wise_ft_state_dict

log = logging.getLogger("clipkit.train")

RAW_MODEL_DIR = "model-raw"  # with train.ema_decay: the optimizer's final weights beside the EMA in model/
_MIXED_PRECISION = {"fp32": "no", "bf16": "bf16", "fp16": "fp16"}


@dataclass
class RunState:
    """What the loop carries from step to step; saved in every checkpoint's trainer_state.json."""

    step: int = 0
    nonfinite_skips: int = 0
    consecutive_nonfinite: int = 0
    last_finite: dict[str, float] = field(default_factory=dict)


class StopSignal:
    """SIGTERM / SIGINT ask the loop to checkpoint and exit after the current step (preemption)."""

    def __init__(self):
        self.signum: int | None = None
        self._previous: dict[int, Any] = {}

    def __enter__(self) -> StopSignal:
        for signum in (signal.SIGTERM, signal.SIGINT):
            self._previous[signum] = signal.signal(signum, self._handle)
        return self

    def _handle(self, signum, frame) -> None:
        self.signum = signum

    def __exit__(self, *exc) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)


def run(cfg: DictConfig) -> dict[str, Any]:
    """Train with a composed Hydra config. Returns the final evaluation metrics."""
    trainer = Trainer(cfg)
    try:
        return trainer.fit()
    finally:
        trainer.close()


class Trainer:
    """Holds the prepared objects of one run; `fit` runs it to `train.steps` or to a stop signal."""

    def __init__(self, cfg: DictConfig):
        self.started = time.perf_counter()  # the summary's time includes data generation and setup
        self.train_cfg = config_from_dict(TrainConfig, _plain(cfg.train), group="train")
        self.optim_cfg = config_from_dict(OptimConfig, _plain(cfg.optim), group="optim")
        logger_cfg = config_from_dict(LoggerConfig, _plain(cfg.logger), group="logger")
        model_cfg = ModelConfig.from_dict(_plain(cfg.model), origin="model")
        data_cfg = DataConfig.from_dict(_plain(cfg.data))
        if self.train_cfg.keep_freed_memory:
            keep_freed_memory()  # before the model and the data workers exist, so they all inherit it

        self.sharding = self._setup_sharding()
        self.accelerator = accelerator = Accelerator(
            mixed_precision=_MIXED_PRECISION[self.train_cfg.precision],
            step_scheduler_with_optimizer=False,
            # Without cpu=True, Accelerate under torchrun on a GPU-less machine reports one process.
            cpu=not torch.cuda.is_available(),
        )
        _set_tf32(self.train_cfg, accelerator.device)
        self.output_dir = self._setup_output_dir(cfg)
        set_seed(self.train_cfg.seed)  # the same initial weights on every process

        self.loss_fn = instantiate(
            cfg.loss, rank=accelerator.process_index, world_size=accelerator.num_processes
        )
        # Data first: generated demo datasets are built (by the main process; the others reuse them) and
        # every shard spec is checked before a large model is built.
        with accelerator.main_process_first():
            self.data_cfg = prepare_data(data_cfg)
        self.bundle = build_model(
            model_cfg,
            init_logit_scale=self.loss_fn.init_logit_scale,
            init_logit_bias=self.loss_fn.init_logit_bias,
            aug_cfg=self.data_cfg.augmentation,
        )
        # From here on each process draws its own random numbers (dropout, patch dropout); augmentation
        # is seeded per sample by the data stream, so it does not depend on this.
        set_seed(self.train_cfg.seed, device_specific=True)
        if self.train_cfg.wise_ft_alpha is not None and accelerator.is_main_process:
            export_start_model(self.bundle, self.output_dir)  # kept from the first start of the run
        transform, self.normalise = self.bundle.train_transform, None
        if self.train_cfg.uint8_images:
            transform, self.normalise = split_normalisation(transform) or (transform, None)
        self.stream = TrainStream(
            self.data_cfg,
            transform=transform,
            tokenizer=self.bundle.tokenizer,
            rank=accelerator.process_index,
            world_size=accelerator.num_processes,
            seed=self.train_cfg.seed,
            pin_memory=accelerator.device.type == "cuda",
        )
        self._setup_model()
        ema_decay = self.train_cfg.ema_decay
        self.ema = WeightEMA(self.unwrapped, ema_decay) if ema_decay is not None else None
        self.state = RunState()
        self._resume()
        self.logger = None
        if accelerator.is_main_process:
            self.logger = MetricsLogger(
                self.output_dir, logger_cfg, run_config=_plain(cfg), resume_step=self.state.step
            )

    # -- setup ------------------------------------------------------------------------------------
    def _setup_sharding(self) -> Sharding | None:
        sharding = resolve_sharding(self.train_cfg.sharding)
        if sharding is not None:
            if self.train_cfg.precision == "fp16":
                raise ClipkitError(
                    "train.precision=fp16 is not supported with FSDP (its loss scaler is per process); "
                    "use train.precision=bf16"
                )
            stop_accelerate_from_sharding()
        return sharding

    def _setup_output_dir(self, cfg: DictConfig) -> Path:
        # Every process derives the same directory; broadcast anyway, so a config that differs between
        # processes cannot split the run.
        output_dir = cfg.output_dir or default_output_dir(cfg)
        output_dir = Path(broadcast_object_list([str(output_dir)])[0])
        if self.accelerator.is_main_process:
            output_dir.mkdir(parents=True, exist_ok=True)
            OmegaConf.save(redact(OmegaConf.to_container(cfg, resolve=True)), output_dir / "config.yaml")
            if not cfg.output_dir:
                log.info("output_dir: %s (the same command writes and resumes here)", output_dir)
        return output_dir

    def _setup_model(self) -> None:
        """Wrap the model (DDP through Accelerate, or FSDP2 here), then build the optimizer and compile."""
        accelerator = self.accelerator
        model = _configure_model(self.bundle.model, self.train_cfg)
        if self.sharding is None:
            optimizer = build_optimizer(model, self.optim_cfg)
            scheduler = build_scheduler(optimizer, self.optim_cfg, self.train_cfg.steps)
            self.model, self.optimizer, self.scheduler = accelerator.prepare(model, optimizer, scheduler)
            self.unwrapped = accelerator.unwrap_model(self.model)
            _autocast_forward(self.unwrapped, accelerator)
        else:
            model = shard_model(model, self.sharding, accelerator.device)
            _autocast_forward(model, accelerator)
            # The optimizer is built on the sharded parameters and stays clipkit's: Accelerate would save
            # its state from the main process only. Accelerate keeps the scheduler and the RNG states.
            self.optimizer = build_optimizer(model, self.optim_cfg)
            scheduler = build_scheduler(self.optimizer, self.optim_cfg, self.train_cfg.steps)
            self.scheduler = accelerator.prepare(scheduler)
            self.model = self.unwrapped = model
        if self.train_cfg.compile:  # after wrapping, so DDP / FSDP hooks and communication are in the graph
            self.model.compile()

    def _resume(self) -> None:
        checkpoint = resolve_resume(self.train_cfg.resume, self.output_dir)
        if checkpoint is None:
            return
        saved = load_checkpoint(self.accelerator, checkpoint, sharded=self._sharded_state())
        if self.sharding is not None:
            # The sharded checkpoint holds optimizer tensors, not param_groups: the learning rate the
            # restored schedule is at goes back into the groups (Accelerate's optimizer file does this
            # under DDP). Without it the first resumed step would use the rate of step 0.
            for group, lr in zip(self.optimizer.param_groups, self.scheduler.get_last_lr(), strict=True):
                group["lr"] = lr
        if self.ema is not None and self.sharding is None:  # under FSDP it came with the model's shards
            self.ema.load(checkpoint)
        self.state = RunState(**saved["run"])
        data_states = saved["data"]
        rank = self.accelerator.process_index
        if len(data_states) != self.accelerator.num_processes:
            log.warning(
                "resuming %d processes from a checkpoint of %d: the data position is re-derived (see below)",
                self.accelerator.num_processes,
                len(data_states),
            )
        # With another number of processes any saved state will do: the stream restarts the epoch.
        self.stream.load_state_dict(data_states[rank] if rank < len(data_states) else data_states[0])
        log.info("resumed from %s at step %d", checkpoint, self.state.step)

    # -- the run ---------------------------------------------------------------------------------
    def fit(self) -> dict[str, Any]:
        if self.train_cfg.eval_at_start and self.state.step == 0:
            self.evaluate()  # step 0: the baseline that fine-tuning's gains and forgetting are measured against
        with StopSignal() as stop:
            stopped_by = self._loop(stop)
        checkpoint = self.checkpoint()
        if stopped_by is not None:
            log.warning(
                "stopped by %s at step %d; saved %s. Continue with: train.resume=auto output_dir=%s",
                signal.Signals(stopped_by).name,
                self.state.step,
                checkpoint,
                self.output_dir,
            )
            return {"stopped_at_step": self.state.step}
        if self.ema is None:
            metrics = self.evaluate()
        else:  # the optimizer's own weights as "raw/..." and model-raw/, then the EMA becomes the model
            metrics = {f"raw/{k}": v for k, v in self.evaluate(prefix="raw/").items()}
            self._export(self.output_dir / RAW_MODEL_DIR)
            self.ema.copy_to(self.unwrapped)
            metrics.update(self.evaluate())
        exported = self._export(self.output_dir / "model")
        if self.train_cfg.wise_ft_alpha is not None:
            metrics.update(self._wise_ft())
        if self.accelerator.is_main_process:
            _print_summary(metrics, exported)
            print(
                write_run_report(
                    output_dir=self.output_dir,
                    exported=exported,
                    bundle=self._bundle_with_trained_model(),
                    data=self.data_cfg,
                    metrics=metrics,
                    steps=self.state.step,
                    samples=self.state.step * self.samples_per_step,
                    elapsed_s=time.perf_counter() - self.started,
                    device=self.accelerator.device,
                ),
                flush=True,
            )
        self.accelerator.wait_for_everyone()
        return metrics

    def _export(self, out_dir: Path) -> Path:
        """The model in open_clip's layout (under FSDP gathered from all processes: every one calls this)."""
        if self.sharding is None:
            state = self.unwrapped.state_dict() if self.accelerator.is_main_process else {}
        else:
            state = full_state_dict(self.model)  # a collective
        if self.accelerator.is_main_process:
            export_model(self.bundle, out_dir, overwrite=True, state_dict=state)
        self.accelerator.wait_for_everyone()
        return out_dir

    def _wise_ft(self) -> dict[str, Any]:
        """Evaluate and export (1 - alpha) * start + alpha * final weights beside the model."""
        merged = wise_ft_state_dict(self.output_dir, self.train_cfg.wise_ft_alpha)
        if self.sharding is None:
            self.unwrapped.load_state_dict(merged, strict=True)
        else:  # every process read the whole merge from disk and keeps its shards of it
            load_full_state_dict(self.model, merged)
        metrics = {f"wise_ft/{k}": v for k, v in self.evaluate(prefix="wise_ft/").items()}
        exported = self._export(self.output_dir / WISE_FT_MODEL_DIR)
        if self.accelerator.is_main_process:
            print(
                f"WiSE-FT alpha {self.train_cfg.wise_ft_alpha:g}: {exported} (start weights: {self.output_dir / START_MODEL_DIR})"
            )
        return metrics

    def _loop(self, stop: StopSignal) -> int | None:
        """Steps until train.steps; returns the signal number if a signal ended it early."""
        cfg = self.train_cfg
        batches = iter(self.stream)
        progress = tqdm(
            total=cfg.steps,
            initial=self.state.step,
            desc="train",
            dynamic_ncols=True,
            disable=not self.accelerator.is_main_process,
        )
        window_start, window_steps = time.perf_counter(), 0
        try:
            while self.state.step < cfg.steps:
                micro_batches = [next(batches) for _ in range(cfg.accum_steps)]
                step_metrics = self.step(micro_batches)
                window_steps += 1
                progress.update(1)
                step = self.state.step
                log_step = self._is_log_step(step)
                if log_step:
                    elapsed = time.perf_counter() - window_start
                    step_metrics["samples_per_s"] = self.samples_per_step * window_steps / elapsed
                    self._log(step_metrics, progress)
                    window_start, window_steps = time.perf_counter(), 0
                paused = time.perf_counter()  # evaluation and checkpoints do not count against samples/s
                if cfg.eval_every and step % cfg.eval_every == 0 and step < cfg.steps:
                    self.evaluate()
                checkpoint_step = step % cfg.checkpoint_every == 0 and step < cfg.steps
                if checkpoint_step:
                    self.checkpoint()
                window_start += time.perf_counter() - paused
                # Asking the other processes is a host sync: only where the loop syncs anyway.
                if (log_step or checkpoint_step) and self._stop_requested(stop):
                    return stop.signum or signal.SIGTERM
            return None
        finally:
            progress.close()

    @property
    def samples_per_step(self) -> int:
        return self.data_cfg.batch_size * self.train_cfg.accum_steps * self.accelerator.num_processes

    def _is_log_step(self, step: int) -> bool:
        return step % self.train_cfg.log_every == 0 or step == self.train_cfg.steps

    def step(self, micro_batches) -> dict[str, Any]:
        """One optimizer step over `accum_steps` micro-batches. A non-finite loss or gradient skips it.

        One host sync per step (whether the step is finite). Returns floats (loss, grad_norm) on log steps,
        else the loss as a 0-d device tensor.
        """
        log_step = self._is_log_step(self.state.step + 1)
        micro_batches = [self.to_device(images, tokens) for images, tokens in micro_batches]
        self.model.train()
        no_sync = gradient_sync_off if self.sharding else self.accelerator.no_sync
        loss = contrastive_backward(
            self.model, self.loss_fn, micro_batches, self.accelerator, no_sync=no_sync
        )
        grad_norm = self._clip_gradients(measure=log_step)
        loss = self.accelerator.reduce(loss, reduction="mean")  # identical on every process from here on
        fp16 = self.train_cfg.precision == "fp16"
        # fp16: the loss scaler skips inf/NaN gradients itself (and lowers the scale); only the loss counts.
        checks = loss if fp16 or grad_norm is None else torch.stack([loss, grad_norm.to(loss.dtype)])
        finite = bool(torch.isfinite(checks).all())
        if finite or fp16:
            self.optimizer.step()
        # The schedule follows the step count, skipped steps included (lr is a function of the step).
        with warnings.catch_warnings():  # torch warns when a skipped step leaves the optimizer unstepped
            warnings.filterwarnings("ignore", message="Detected call of `lr_scheduler.step()`")
            self.scheduler.step()
            if self.ema is not None:
                self.ema.update(self.unwrapped)
        self.optimizer.zero_grad(set_to_none=True)
        with torch.no_grad():
            # On the sharded parameter each process clamps its own shard: the one holding the value does.
            self.unwrapped.logit_scale.clamp_(0, self.loss_fn.max_logit_scale or math.inf)
        self.state.step += 1
        self._account_nonfinite(finite, loss)
        if not log_step:  # no host sync: the loss stays a (detached) device tensor
            return {"loss": loss}
        return {"loss": loss.item(), "grad_norm": math.nan if grad_norm is None else grad_norm.item()}

    def to_device(self, images: torch.Tensor, tokens: torch.Tensor):
        """A batch as the data stream gives it -> on the training device, images normalised as the model takes them."""
        device = self.accelerator.device
        # non_blocking: from pinned memory (CUDA) the copy overlaps the previous step's work.
        images = images.to(device, non_blocking=True)  # uint8 (B, 3, H, W) with train.uint8_images
        if self.normalise is not None:
            images = self.normalise(images)  # float32 (B, 3, H, W), as the model's transform makes them
        return images, tokens.to(device, non_blocking=True)

    def _clip_gradients(self, *, measure: bool) -> torch.Tensor | None:
        """Clip to optim.grad_clip_norm and return the global gradient norm; without clipping, measure it
        only when asked (a full pass over the gradients)."""
        max_norm = self.optim_cfg.grad_clip_norm
        if max_norm is None and not measure:
            return None
        trainable = [p for p in self.model.parameters() if p.requires_grad and p.grad is not None]
        if self.sharding is None:
            return self.accelerator.clip_grad_norm_(trainable, max_norm or math.inf)
        # DTensor gradients: the norm is reduced over all shards, so every process clips by the same factor.
        return full_value(torch.nn.utils.clip_grad_norm_(trainable, max_norm or math.inf))

    def _account_nonfinite(self, finite: bool, loss: torch.Tensor) -> None:
        state = self.state
        if finite:
            state.consecutive_nonfinite = 0
            return
        state.nonfinite_skips += 1
        state.consecutive_nonfinite += 1
        log.warning("step %d: non-finite loss or gradient (loss=%s); step skipped", state.step, loss.item())
        if state.consecutive_nonfinite >= self.train_cfg.max_nonfinite_steps:
            raise ClipkitError(
                f"training diverged: {state.consecutive_nonfinite} non-finite steps in a row up to step "
                f"{state.step}; last finite values {state.last_finite or 'none'}; lower optim.lr, set "
                "optim.grad_clip_norm, or use train.precision=bf16 instead of fp16"
            )

    def _log(self, metrics: dict[str, Any], progress) -> None:
        metrics = {
            **metrics,
            "lr": self.scheduler.get_last_lr()[0],
            "logit_scale": self._logit_scale(),
            "samples": self.state.step * self.samples_per_step,
            "bad_samples": self._sum_over_processes(self.stream.stats()["bad_samples"]),
            "nonfinite_skips": self.state.nonfinite_skips,
        }
        if getattr(self.unwrapped, "logit_bias", None) is not None:
            metrics["logit_bias"] = full_value(self.unwrapped.logit_bias.detach()).item()
        if self.state.consecutive_nonfinite == 0:
            self.state.last_finite = {
                "step": self.state.step,
                "loss": metrics["loss"],
                "logit_scale": metrics["logit_scale"],
            }
        postfix = {
            "loss": f"{metrics['loss']:.4f}",
            "lr": f"{metrics['lr']:.2e}",
            "scale": f"{metrics['logit_scale']:.1f}",
            "samples_s": f"{metrics['samples_per_s']:.0f}",
        }
        if "logit_bias" in metrics:
            postfix["bias"] = f"{metrics['logit_bias']:.2f}"
        progress.set_postfix(postfix)
        if self.logger is not None:
            self.logger.log(self.state.step, metrics)

    def _logit_scale(self) -> float:
        """exp(logit_scale); a collective under FSDP (every process calls it, on log steps)."""
        return full_value(self.unwrapped.logit_scale.detach()).exp().item()

    # -- checkpoints, evaluation and export -----------------------------------------------------
    def checkpoint(self) -> Path:
        open_clip_config = {
            "model_cfg": self.bundle.model_cfg,
            "preprocess_cfg": _json_ready(self.bundle.preprocess_cfg),
        }
        return save_checkpoint(
            self.accelerator,
            self.output_dir,
            self.state.step,
            trainer_state={
                "run": asdict(self.state),
                "data": gather_object([self.stream.state_dict()]),
                "sharded": self.sharding is not None,
            },
            open_clip_config=open_clip_config,
            keep=self.train_cfg.keep_checkpoints,
            sharded=self._sharded_state(),
            write_extra=self._save_ema if self.ema is not None and self.sharding is None else None,
        )

    def _sharded_state(self) -> tuple[torch.nn.Module, torch.optim.Optimizer, dict] | None:
        """Under FSDP: what every process saves and loads through torch.distributed.checkpoint."""
        if self.sharding is None:
            return None
        return self.model, self.optimizer, {} if self.ema is None else self.ema.sharded_state()

    def _save_ema(self, directory: Path) -> None:
        """DDP: every process holds the same average; one writes it."""
        if self.accelerator.is_main_process:
            self.ema.save(directory)

    def evaluate(self, prefix: str = "") -> dict[str, Any]:
        """Evaluate the model as it is now; metrics are logged with `prefix` and returned without it."""
        # Under FSDP the processes may run different numbers of batches (their shares of the set differ
        # by up to one sample), so the model is gathered once for the whole evaluation, not per forward.
        gathered = _gathered(self.model, self.sharding) if self.sharding else contextlib.nullcontext()
        with gathered:
            metrics = evaluate(
                self.unwrapped,
                self.bundle,
                self.data_cfg,
                self.accelerator,
                precision=self.train_cfg.precision,
            )
        if self.logger is not None and metrics:
            self.logger.log(self.state.step, {f"{prefix}{k}": v for k, v in metrics.items()})
        return metrics

    def close(self) -> None:
        if self.logger is not None:
            self.logger.close()
        self.accelerator.end_training()

    # -- helpers --------------------------------------------------------------------------------
    def _bundle_with_trained_model(self) -> ModelBundle:
        return ModelBundle(**{**vars(self.bundle), "model": self.unwrapped})

    def _stop_requested(self, stop: StopSignal) -> bool:
        """Every process stops at the same step: a signal seen by any of them stops all."""
        seen = 1.0 if stop.signum is not None else 0.0
        return self._sum_over_processes(seen) > 0

    def _sum_over_processes(self, value: float) -> float:
        if self.accelerator.num_processes == 1:
            return value
        tensor = torch.tensor([float(value)], device=self.accelerator.device)
        return self.accelerator.reduce(tensor, reduction="sum").item()


def _plain(node) -> dict[str, Any]:
    return OmegaConf.to_container(node, resolve=True)


def _configure_model(model: torch.nn.Module, config: TrainConfig) -> torch.nn.Module:
    # open_clip's own locks: LiT for the image tower (top groups stay trainable), blocks of the text tower.
    if config.lock_image:
        model.lock_image_tower(unlocked_groups=config.lock_image_unlocked_groups, freeze_bn_stats=False)
    if config.lock_text:
        model.lock_text_tower(unlocked_layers=config.lock_text_unlocked_groups)  # open_clip counts groups
    if config.grad_checkpointing:
        model.set_grad_checkpointing(True)
    return model


def default_output_dir(cfg: DictConfig) -> Path:
    """runs/<model>-<hash of the settings>: the same command gets the same directory, so re-running it
    (a requeued job) resumes from its checkpoints with train.resume=auto."""
    settings = _plain(cfg)
    settings.pop("output_dir", None)
    settings.get("train", {}).pop("resume", None)
    digest = hashlib.sha256(json.dumps(settings, sort_keys=True, default=str).encode()).hexdigest()[:8]
    return Path("runs") / f"{cfg.model.name}-{digest}"


def _set_tf32(config: TrainConfig, device: torch.device) -> None:
    """TF32 tensor cores for float32 matmuls and convolutions on Ampere and newer GPUs (train.tf32)."""
    if device.type != "cuda":
        return
    # One API family with clipkit.losses.precision: torch >= 2.9 refuses to read a setting back after
    # writes through both `fp32_precision` and `allow_tf32`.
    if hasattr(torch.backends.cuda.matmul, "fp32_precision"):
        torch.backends.cuda.matmul.fp32_precision = "tf32" if config.tf32 else "ieee"
        torch.backends.cudnn.conv.fp32_precision = "tf32" if config.tf32 else "ieee"
    else:
        torch.backends.cuda.matmul.allow_tf32 = config.tf32
        torch.backends.cudnn.allow_tf32 = config.tf32
    if config.tf32 and config.precision == "fp32" and torch.cuda.get_device_capability(device)[0] >= 8:
        log.info("train.tf32: float32 matmuls run on TF32 tensor cores (train.tf32=false turns this off)")


def _autocast_forward(model: torch.nn.Module, accelerator) -> None:
    """Forward under autocast, as Accelerate's prepare sets it up, but with the outputs left in the autocast
    dtype: Accelerate also converts them to float32, and then the features would cross the loss's all-gather
    or ring exchange in float32, twice the bytes of bf16. The losses upcast after the exchange and do their
    math in float32 (clipkit.losses.distributed). Replaces the forward Accelerate's prepare installed (DDP
    path); `accelerator.unwrap_model(..., keep_fp32_wrapper=False)` still restores the original."""
    from accelerate.utils import get_mixed_precision_context_manager

    if not accelerator.native_amp:
        return
    context = get_mixed_precision_context_manager(accelerator.native_amp, accelerator.autocast_handler)
    model.forward = MethodType(context(type(model).forward), model)


@contextlib.contextmanager
def _gathered(model: torch.nn.Module, sharding: Sharding):
    """Every FSDP unit unsharded for the duration (no collectives per forward), resharded afterwards."""
    from torch.distributed.fsdp import FSDPModule

    units = [m for m in model.modules() if isinstance(m, FSDPModule)]
    model.set_reshard_after_forward(False)  # recursive: no unit reshards after its forward
    for unit in units:
        unit.unshard()
    try:
        yield
    finally:
        for unit in units:
            unit.reshard()
        model.set_reshard_after_forward(sharding.reshard_after_forward)


def _json_ready(preprocess_cfg: dict[str, Any]) -> dict[str, Any]:
    return {k: (list(v) if isinstance(v, tuple) else v) for k, v in preprocess_cfg.items()}


def _print_summary(metrics: dict[str, Any], exported: Path) -> None:
    """Every final metric as `key: value`, one per line (what scripts parse), then the model's path."""
    for key in sorted(metrics):
        value = metrics[key]
        print(f"{key}: {value:.4f}" if isinstance(value, float) else f"{key}: {value}")
    print(f"model: {exported} (load with open_clip: 'local-dir:{exported}')")
