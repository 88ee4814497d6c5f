"""The training run: setup, the step, checkpoints, evaluation and the final export."""

from __future__ import annotations

import logging
import math
import signal
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator
from accelerate.utils import broadcast_object_list, gather_object, set_seed
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf
from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict
from tqdm.auto import tqdm

from clipkit.data import DataConfig, TrainStream, prepare_data
from clipkit.errors import ClipkitError
from clipkit.models import ModelBundle, ModelConfig, build_model, export_model
from clipkit.train.allocator import keep_freed_memory
from clipkit.train.checkpoint import load_checkpoint, resolve_resume, save_checkpoint
from clipkit.train.config import LoggerConfig, OptimConfig, TrainConfig, config_from_dict
from clipkit.train.ema import WeightEMA
from clipkit.train.evaluation import evaluate
from clipkit.train.metrics import MetricsLogger
from clipkit.train.optim import build_optimizer, build_scheduler
from clipkit.train.report import write_run_report
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

        self.accelerator = accelerator = Accelerator(
            mixed_precision=_MIXED_PRECISION[self.train_cfg.precision],
            step_scheduler_with_optimizer=False,
            # Without cpu=True, Accelerate under torchrun on a GPU-less machine reports one process.
            cpu=not torch.cuda.is_available(),
        )
        # Each process resolved ${now:...} on its own; all use the main process's output_dir.
        self.output_dir = Path(broadcast_object_list([str(cfg.output_dir)])[0])
        if accelerator.is_main_process:
            self.output_dir.mkdir(parents=True, exist_ok=True)
            OmegaConf.save(cfg, self.output_dir / "config.yaml", resolve=True)
        set_seed(self.train_cfg.seed)

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
        if self.train_cfg.wise_ft_alpha is not None and accelerator.is_main_process:
            export_start_model(self.bundle, self.output_dir)  # kept from the first start of the run
        model = _configure_model(self.bundle.model, self.train_cfg)
        self.stream = TrainStream(
            self.data_cfg,
            transform=self.bundle.train_transform,
            tokenizer=self.bundle.tokenizer,
            rank=accelerator.process_index,
            world_size=accelerator.num_processes,
            seed=self.train_cfg.seed,
        )
        optimizer = build_optimizer(model, self.optim_cfg)
        scheduler = build_scheduler(optimizer, self.optim_cfg, self.train_cfg.steps)
        self.model, self.optimizer, self.scheduler = accelerator.prepare(model, optimizer, scheduler)
        self.unwrapped = accelerator.unwrap_model(self.model)
        ema_decay = self.train_cfg.ema_decay
        self.ema = WeightEMA(self.unwrapped, ema_decay) if ema_decay is not None else None

        self.state = RunState()
        checkpoint = resolve_resume(self.train_cfg.resume, self.output_dir)
        if checkpoint is not None:
            saved = load_checkpoint(accelerator, checkpoint)
            if self.ema is not None:
                self.ema.load(checkpoint, accelerator.process_index)
            self.state = RunState(**saved["run"])
            self.stream.load_state_dict(saved["data"][accelerator.process_index])
            log.info("resumed from %s at step %d", checkpoint, self.state.step)

        self.logger = None
        if accelerator.is_main_process:
            self.logger = MetricsLogger(
                self.output_dir, logger_cfg, run_config=_plain(cfg), resume_step=self.state.step
            )

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
        if self.accelerator.is_main_process:
            export_model(self._bundle_with_trained_model(), out_dir, overwrite=True)
        self.accelerator.wait_for_everyone()
        return out_dir

    def _wise_ft(self) -> dict[str, Any]:
        """Evaluate and export (1 - alpha) * start + alpha * final weights beside the model."""
        merged = wise_ft_state_dict(self.output_dir, self.train_cfg.wise_ft_alpha)
        set_model_state_dict(
            self.unwrapped, merged, options=StateDictOptions(full_state_dict=True, strict=True)
        )
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
                if step % cfg.log_every == 0 or step == cfg.steps:
                    elapsed = time.perf_counter() - window_start
                    step_metrics["samples_per_s"] = self.samples_per_step * window_steps / elapsed
                    self._log(step_metrics, progress)
                    window_start, window_steps = time.perf_counter(), 0
                paused = time.perf_counter()  # evaluation and checkpoints do not count against samples/s
                if cfg.eval_every and step % cfg.eval_every == 0 and step < cfg.steps:
                    self.evaluate()
                if step % cfg.checkpoint_every == 0 and step < cfg.steps:
                    self.checkpoint()
                window_start += time.perf_counter() - paused
                if self._stop_requested(stop):
                    return stop.signum or signal.SIGTERM
            return None
        finally:
            progress.close()

    @property
    def samples_per_step(self) -> int:
        return self.data_cfg.batch_size * self.train_cfg.accum_steps * self.accelerator.num_processes

    def step(self, micro_batches) -> dict[str, Any]:
        """One optimizer step over `accum_steps` micro-batches. A non-finite loss or gradient skips it."""
        device = self.accelerator.device
        micro_batches = [(images.to(device), tokens.to(device)) for images, tokens in micro_batches]
        self.model.train()
        loss = contrastive_backward(self.model, self.loss_fn, micro_batches, self.accelerator)
        trainable = [p for p in self.model.parameters() if p.requires_grad]
        grad_norm = self.accelerator.clip_grad_norm_(trainable, self.optim_cfg.grad_clip_norm or math.inf)
        loss = self.accelerator.reduce(loss, reduction="mean")  # identical on every process from here on
        fp16 = self.train_cfg.precision == "fp16"
        # fp16: the loss scaler skips inf/NaN gradients itself (and lowers the scale); only the loss counts.
        finite = bool(torch.isfinite(loss)) and (fp16 or bool(torch.isfinite(grad_norm)))
        if finite or fp16:
            self.optimizer.step()
            self.scheduler.step()
            if self.ema is not None:
                self.ema.update(self.unwrapped)
        self.optimizer.zero_grad(set_to_none=True)
        with torch.no_grad():
            self.unwrapped.logit_scale.clamp_(0, self.loss_fn.max_logit_scale or math.inf)
        self.state.step += 1
        self._account_nonfinite(finite, loss.item())
        return {"loss": loss.item(), "grad_norm": grad_norm.item()}

    def _account_nonfinite(self, finite: bool, loss: float) -> None:
        state = self.state
        if finite:
            state.consecutive_nonfinite = 0
            state.last_finite = {"step": state.step, "loss": loss, "logit_scale": self._logit_scale()}
            return
        state.nonfinite_skips += 1
        state.consecutive_nonfinite += 1
        log.warning("step %d: non-finite loss or gradient (loss=%s); step skipped", state.step, loss)
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
            metrics["logit_bias"] = self.unwrapped.logit_bias.item()
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
        return self.unwrapped.logit_scale.exp().item()

    # -- checkpoints and evaluation -------------------------------------------------------------
    def checkpoint(self) -> Path:
        open_clip_config = {
            "model_cfg": self.bundle.model_cfg,
            "preprocess_cfg": _json_ready(self.bundle.preprocess_cfg),
        }
        return save_checkpoint(
            self.accelerator,
            self.output_dir,
            self.state.step,
            trainer_state={"run": asdict(self.state), "data": gather_object([self.stream.state_dict()])},
            open_clip_config=open_clip_config,
            keep=self.train_cfg.keep_checkpoints,
            write_extra=None if self.ema is None else self._save_ema,
        )

    def _save_ema(self, directory: Path) -> None:
        self.ema.save(directory, self.accelerator.process_index)

    def evaluate(self, prefix: str = "") -> dict[str, Any]:
        """Evaluate the model as it is now; metrics are logged with `prefix` and returned without it."""
        metrics = evaluate(
            self.unwrapped, self.bundle, self.data_cfg, self.accelerator, precision=self.train_cfg.precision
        )
        if self.logger is not None and metrics:
            self.logger.log(self.state.step, {f"{prefix}{k}": v for k, v in metrics.items()})
        return metrics

    def close(self) -> None:
        if self.logger is not None:
            self.logger.close()
        self.accelerator.end_training()

    # -- helpers --------------------------------------------------------------------------------
    def _stop_requested(self, stop: StopSignal) -> bool:
        """Every process stops at the same step: a signal seen by any of them stops all."""
        seen = 1.0 if stop.signum is not None else 0.0
        return self._sum_over_processes(seen) > 0

    def _sum_over_processes(self, value: float) -> float:
        if self.accelerator.num_processes == 1:
            return value
        tensor = torch.tensor([float(value)], device=self.accelerator.device)
        return self.accelerator.reduce(tensor, reduction="sum").item()

    def _bundle_with_trained_model(self) -> ModelBundle:
        return ModelBundle(**{**vars(self.bundle), "model": self.unwrapped})


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
    if config.compile:
        model.compile()
    return model


def _json_ready(preprocess_cfg: dict[str, Any]) -> dict[str, Any]:
    return {k: (list(v) if isinstance(v, tuple) else v) for k, v in preprocess_cfg.items()}


def _print_summary(metrics: dict[str, Any], exported: Path) -> None:
    """Every final metric as `key: value`, one per line (what scripts parse), then the model's path."""
    for key in sorted(metrics):
        value = metrics[key]
        print(f"{key}: {value:.4f}" if isinstance(value, float) else f"{key}: {value}")
    print(f"model: {exported} (load with open_clip: 'local-dir:{exported}')")
