"""The training run: setup, the step, checkpoints, evaluation and the final export."""

from __future__ import annotations

import copy
import hashlib
import json
import logging
import math
import os
import signal
import time
import warnings
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from accelerate.utils import broadcast_object_list, gather_object, set_seed
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf
from tqdm.auto import tqdm

from clipkit.data import DataConfig, TrainStream, prepare_data
from clipkit.errors import ClipkitError
from clipkit.models import ModelBundle, ModelConfig, build_model, export_model
from clipkit.redaction import redact
from clipkit.train.allocator import keep_freed_memory
from clipkit.train.checkpoint import resolve_resume, save_checkpoint
from clipkit.train.config import OptimConfig, TrainConfig, config_from_dict
from clipkit.train.device_input import split_normalisation
from clipkit.train.evaluation import BEST_MODEL_DIR, Evaluations
from clipkit.train.metrics import MetricsLogger
from clipkit.train.optim import resolve_optim_config
from clipkit.train.parallel import build_accelerator, build_plan
from clipkit.train.report import write_run_report
from clipkit.train.step import contrastive_backward
from clipkit.train.throughput import measure_throughput
from clipkit.train.wise_ft import START_MODEL_DIR, WISE_FT_MODEL_DIR, export_start_model, wise_ft_state_dict

log = logging.getLogger("clipkit.train")

RAW_MODEL_DIR = "model-raw"  # with train.ema_decay: the optimizer's final weights beside the EMA in model/


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


def run(cfg: DictConfig, launch_env: Mapping[str, str] | None = None) -> dict[str, Any]:
    """Train with a composed Hydra config. Returns the final evaluation metrics. `launch_env`: the
    environment `accelerate launch` set up (default: this process's, read once here)."""
    trainer = Trainer(cfg, launch_env=launch_env)
    try:
        return trainer.fit()
    finally:
        trainer.close()


class Trainer:
    """Holds the prepared objects of one run; `fit` runs it to `train.steps` or to a stop signal.

    Everything that depends on DDP vs FSDP2 is the parallelism plan's (`self.plan`, clipkit.train.parallel),
    chosen here once from `train.sharding` and `launch_env` (the environment `accelerate launch` set up;
    default: this process's environment, read once here). Nothing process-wide is changed, so several
    Trainers may run one after another in one process, each as its config says."""

    def __init__(self, cfg: DictConfig, *, launch_env: Mapping[str, str] | None = None):
        self.started = time.perf_counter()  # the summary's time includes data generation and setup
        launch_env = dict(os.environ if launch_env is None else launch_env)
        cfg = _with_precision(cfg)  # `auto` resolved, so config.yaml says what ran
        self.train_cfg = config_from_dict(TrainConfig, _plain(cfg.train), group="train")
        self.optim_cfg = config_from_dict(OptimConfig, _plain(cfg.optim), group="optim")
        logger = instantiate(cfg.logger)  # conf/logger: built from its _target_, as the loss is
        model_cfg = ModelConfig.from_dict(_plain(cfg.model), origin="model")
        data_cfg = DataConfig.from_dict(_plain(cfg.data))
        if self.train_cfg.keep_freed_memory:
            keep_freed_memory()  # before the model and the data workers exist, so they all inherit it

        self.plan = build_plan(self.train_cfg.sharding, self.train_cfg.precision, launch_env)
        self.accelerator = accelerator = build_accelerator(self.train_cfg.precision)
        _set_tf32(self.train_cfg, accelerator.device)
        # The pairs one loss call sees: accumulation computes the loss over all micro-batches' features.
        global_batch = data_cfg.batch_size * accelerator.num_processes * self.train_cfg.accum_steps
        self.loss_fn = instantiate(
            cfg.loss,
            rank=accelerator.process_index,
            world_size=accelerator.num_processes,
            global_batch=global_batch,
        )
        cfg = _with_resolved_logit_bias(cfg, self.loss_fn, global_batch)  # before config.yaml is written
        self.optim_cfg = resolve_optim_config(
            self.optim_cfg, global_batch=global_batch, total_steps=self.train_cfg.steps
        )
        self.output_dir = self._setup_output_dir(cfg)
        set_seed(self.train_cfg.seed)  # the same initial weights on every process

        # Data first: generated demo datasets are built (by the main process; the others reuse them) and
        # every shard spec is checked before a large model is built.
        with accelerator.main_process_first():
            self.data_cfg = prepare_data(data_cfg)
        self.evaluations = Evaluations.from_config(
            self.train_cfg.eval,
            self.data_cfg,
            eval_every=self.train_cfg.eval_every,
            keep_best=self.train_cfg.keep_best,
        )
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
        self.ema = self.plan.build_ema(ema_decay) if ema_decay is not None else None
        self.state = RunState()
        self._resume()
        self.logger = None
        if accelerator.is_main_process:
            self.logger = MetricsLogger(
                self.output_dir, logger, run_config=_plain(cfg), resume_step=self.state.step
            )

    # -- setup ------------------------------------------------------------------------------------
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
        """Wrap the model as the plan says (with the optimizer and scheduler), then compile."""
        model = _configure_model(self.bundle.model, self.train_cfg)
        self.throughput = measure_throughput(  # FLOPs counted once, on the configured model before wrapping
            model,
            self.bundle,
            device=self.accelerator.device,
            precision=self.train_cfg.precision,
            tf32=self.train_cfg.tf32,
            processes=self.accelerator.num_processes,
        )
        self.model, self.optimizer, self.scheduler = self.plan.setup(
            model, self.accelerator, self.optim_cfg, self.train_cfg.steps
        )
        self.unwrapped = self.plan.unwrapped
        # FLIP's unmasked tuning: patch dropout off for the last train.unmasked_fraction of the steps.
        self.patch_dropouts = patch_dropout_modules(self.unwrapped)
        if self.train_cfg.unmasked_fraction > 0 and not self.patch_dropouts:
            raise ClipkitError(
                f"train.unmasked_fraction={self.train_cfg.unmasked_fraction} turns off patch dropout, but the image "
                "tower has none: set ++model.vision_cfg.patch_dropout=0.5 or drop train.unmasked_fraction"
            )
        self.unmasked_from = self.train_cfg.steps - round(
            self.train_cfg.unmasked_fraction * self.train_cfg.steps
        )
        log.info("parallelism: %s, precision: %s", self.plan.name, self.train_cfg.precision)
        if self.train_cfg.compile:  # after wrapping, so DDP / FSDP hooks and communication are in the graph
            self.model.compile()

    def _resume(self) -> None:
        checkpoint = resolve_resume(self.train_cfg.resume, self.output_dir)
        if checkpoint is None:
            return
        saved = self.plan.load(checkpoint, self.ema)
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
        # The report draws with the model: whole on the main process (under FSDP every process gathers).
        with self.plan.gathered():
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
        state = self.plan.full_state_dict()
        if self.accelerator.is_main_process:
            export_model(self.bundle, out_dir, overwrite=True, state_dict=state)
        self.accelerator.wait_for_everyone()
        return out_dir

    def _wise_ft(self) -> dict[str, Any]:
        """Evaluate and export (1 - alpha) * start + alpha * final weights beside the model."""
        merged = wise_ft_state_dict(self.output_dir, self.train_cfg.wise_ft_alpha)
        self.plan.load_full_state_dict(merged)  # every process read the whole merge from disk
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
                    samples_per_s = self.samples_per_step * window_steps / elapsed
                    step_metrics.update(self.throughput.metrics(samples_per_s))  # + tflops, mfu
                    self._log(step_metrics, progress)
                    window_start, window_steps = time.perf_counter(), 0
                paused = time.perf_counter()  # evaluation and checkpoints do not count against samples/s
                if self.evaluations.due(step) and step < cfg.steps:
                    self.evaluate(step=step)
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
        if self.state.step >= self.unmasked_from:  # a function of the step, so a resumed run agrees
            for module in self.patch_dropouts:
                module.prob = 0.0
        micro_batches = [self.to_device(images, tokens) for images, tokens in micro_batches]
        self.model.train()
        loss = contrastive_backward(
            self.model, self.loss_fn, micro_batches, self.accelerator, no_sync=self.plan.no_sync
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
        return self.plan.clip_gradients(max_norm)

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
            metrics["logit_bias"] = self.plan.full_value(self.unwrapped.logit_bias.detach()).item()
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
            **({"tflops": f"{metrics['tflops']:.3g}"} if metrics.get("tflops") is not None else {}),
            **({"mfu": f"{metrics['mfu']:.1%}"} if metrics.get("mfu") is not None else {}),
        }
        if "logit_bias" in metrics:
            postfix["bias"] = f"{metrics['logit_bias']:.2f}"
        progress.set_postfix(postfix)
        if self.logger is not None:
            self.logger.log(self.state.step, metrics)

    def _logit_scale(self) -> float:
        """exp(logit_scale); a collective under FSDP (every process calls it, on log steps)."""
        return self.plan.full_value(self.unwrapped.logit_scale.detach()).exp().item()

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
                "sharded": self.plan.sharded,
            },
            open_clip_config=open_clip_config,
            keep=self.train_cfg.keep_checkpoints,
            **self.plan.checkpoint_parts(self.ema),
        )

    def evaluate(self, prefix: str = "", step: int | None = None) -> dict[str, Any]:
        """Evaluate the model as it is now (the entries due at `step`; None: all); metrics are logged with
        `prefix` and returned without it. With train.keep_best, an improved model goes to model-best/."""
        # Under FSDP the processes may run different numbers of batches (their shares of the set differ
        # by up to one sample), so the model is gathered once for the whole evaluation, not per forward.
        with self.plan.gathered():
            metrics = self.evaluations.run(
                self.unwrapped, self.bundle, self.data_cfg, self.accelerator,
                precision=self.train_cfg.precision, step=step,
            )  # fmt: skip
        if self.logger is not None and metrics:
            self.logger.log(self.state.step, {f"{prefix}{k}": v for k, v in metrics.items()})
        if not prefix and self.evaluations.improved(metrics):  # every process sees the same metrics
            self._export(self.output_dir / BEST_MODEL_DIR)
        return metrics

    def close(self, *, keep_process_group: bool = False) -> None:
        """Close the logger and end the process group (`keep_process_group`: another Trainer follows in
        this process, e.g. tests/train_matrix.py)."""
        if self.logger is not None:
            self.logger.close()
            self.logger = None
        if not keep_process_group:
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


def resolve_precision(setting: str) -> str:
    """`train.precision=auto`: bf16 where the training device computes in it natively (a CUDA GPU with bf16
    support: Ampere and newer), else fp32 (CPUs, older GPUs). Other settings are returned as they are."""
    if setting != "auto":
        return setting
    if torch.cuda.is_available() and torch.cuda.is_bf16_supported():
        return "bf16"
    return "fp32"


def _with_precision(cfg: DictConfig) -> DictConfig:
    """`cfg` with train.precision=auto resolved (a copy; logged once), so config.yaml records what ran."""
    chosen = resolve_precision(cfg.train.precision)
    if chosen == cfg.train.precision:
        return cfg
    log.info("train.precision=auto: %s on this machine (set train.precision to choose)", chosen)
    cfg = copy.deepcopy(cfg)  # the caller's config stays as it was
    cfg.train.precision = chosen
    return cfg


def _with_resolved_logit_bias(cfg: DictConfig, loss_fn, global_batch: int) -> DictConfig:
    """`cfg` with loss.init_logit_bias=auto replaced by the loss's value (a copy; logged once), so config.yaml
    records the number the model started from (a resume takes the bias from the checkpoint)."""
    if cfg.loss.get("init_logit_bias") != "auto":
        return cfg
    log.info(
        "loss.init_logit_bias=auto: %.6g = -log(global batch %d = data.batch_size x processes x "
        "train.accum_steps)",
        loss_fn.init_logit_bias,
        global_batch,
    )
    cfg = copy.deepcopy(cfg)  # the caller's config stays as it was
    cfg.loss.init_logit_bias = loss_fn.init_logit_bias
    return cfg


def patch_dropout_modules(model: torch.nn.Module) -> list[torch.nn.Module]:
    """The model's patch dropout (FLIP) layers: open_clip's and timm's PatchDropout, each with a `prob`."""
    return [m for m in model.modules() if type(m).__name__ == "PatchDropout" and hasattr(m, "prob")]


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


def _json_ready(preprocess_cfg: dict[str, Any]) -> dict[str, Any]:
    return {k: (list(v) if isinstance(v, tuple) else v) for k, v in preprocess_cfg.items()}


def _print_summary(metrics: dict[str, Any], exported: Path) -> None:
    """Every final metric as `key: value`, one per line (what scripts parse), then the model's path."""
    for key in sorted(metrics):
        value = metrics[key]
        print(f"{key}: {value:.4f}" if isinstance(value, float) else f"{key}: {value}")
    print(f"model: {exported} (load with open_clip: 'local-dir:{exported}')")
