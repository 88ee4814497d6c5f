#!/usr/bin/env python
"""Training throughput on one GPU, ViT-B-32 and ViT-B-16 at 224 px in bf16: samples/s, peak memory, MFU.

For each model:
  - in memory: clipkit's own `Trainer` (what `python -m clipkit.train` builds: model, loss, fused AdamW,
    Accelerate's bf16 autocast, `train.compile`) runs `Trainer.step` on one batch that stays on the GPU.
    The batch size is the largest power of two that fits, found by doubling (eager); then the step is
    timed at that size with torch.compile off and on;
  - shard loader: the real `python -m clipkit.train` command at the same batch size on webdataset shards
    generated for the run (`data=synthetic` at 256 px, as img2dataset would resize), with its samples/s
    as the trainer logs it (the first log window, with start-up, left out).
MFU = model FLOPs per sample x samples/s / the GPU's dense bf16 peak, by the trainer's own code
      (clipkit.train.throughput: FLOPs of one sample's forward + backward counted by torch.utils.flop_counter,
      the peak from its table by device name; null for a device it does not list).

    python scripts/gpu/bench_gpu.py --out gpu.json   # on a GPU; ends within --budget-s (default 330 s)
    python scripts/gpu/bench_gpu.py --dry-run        # on CPU: tiny model, 32 px, batch 8, 2 steps

`scripts/gpu/check.sh` runs it after the `gpu` tests. Every measurement runs in its own process under a time
budget: one that fails or runs out is reported with its error, the others still run, and the exit status
is 1. The dry run takes the same code paths; only sizes and the device differ (no compile, no search).
Prints JSON (and writes it to --out).
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import json
import os
import platform
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from torch.utils._python_dispatch import TorchDispatchMode

from clipkit.train.throughput import Throughput, peak_flops

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # scripts/: the shared report writer
from _report import write_report  # noqa: E402

REPO_ROOT = Path(__file__).resolve().parents[2]

RESULT = "RESULT "  # a child process's result lines on stdout start with this


@dataclasses.dataclass(frozen=True, kw_only=True)
class Plan:
    """What to measure and how big; the GPU run and the dry run differ only here."""

    models: tuple[str, ...]  # conf/model names
    dry_run: bool
    measure_compiled: bool  # also time the in-memory step with train.compile=true
    start_batch: int  # the doubling search starts here ...
    max_batch: int  # ... and stops here
    warmup_steps: int
    timed_steps: int
    loader_steps: int
    loader_log_every: int
    loader_workers: int
    loader_max_batch: int  # workers x prefetched batches of float32 images live in shared memory
    shard_image_size: int  # side of the generated images on disk
    train_samples: int
    samples_per_shard: int
    budget_s: float  # the whole run ends within this
    # Each measurement's own limit (seconds); it is also given no more than what is left of budget_s.
    eager_s: float  # search + eager timing + FLOP count
    compiled_s: float  # compile + timing
    loader_s: float  # the trainer command, start to end


def gpu_plan(budget_s: float) -> Plan:
    workers = max(1, min(16, (os.cpu_count() or 2) - 1))
    return Plan(
        models=("vit-b-16", "vit-b-32"),
        dry_run=False,
        measure_compiled=True,
        start_batch=128,
        max_batch=8192,
        warmup_steps=3,
        timed_steps=10,
        loader_steps=15,
        loader_log_every=5,
        loader_workers=workers,
        loader_max_batch=1024,
        shard_image_size=256,
        train_samples=workers * 1000,  # one shard per worker
        samples_per_shard=1000,
        budget_s=budget_s,
        eager_s=90,
        compiled_s=180,
        loader_s=120,
    )


def dry_run_plan() -> Plan:
    return Plan(
        models=("tiny",),
        dry_run=True,
        measure_compiled=False,  # compiling on a CPU takes minutes
        start_batch=8,
        max_batch=8,
        warmup_steps=1,
        timed_steps=2,
        loader_steps=2,
        loader_log_every=1,
        loader_workers=1,
        loader_max_batch=8,
        shard_image_size=32,
        train_samples=64,
        samples_per_shard=32,
        budget_s=240,
        eager_s=120,
        compiled_s=0,
        loader_s=120,
    )


# -- the configuration both paths share ---------------------------------------------------------------
def data_overrides(plan: Plan, work_dir: Path) -> list[str]:
    return [
        "data=synthetic",
        f"data.generate.dir={work_dir / 'shards'}",
        f"data.generate.image_size={plan.shard_image_size}",
        f"data.generate.train_samples={plan.train_samples}",
        "data.generate.test_samples=20",
        f"+data.generate.samples_per_shard={plan.samples_per_shard}",
        f"+data.generate.workers={plan.loader_workers}",
        "data.val_shards=null",  # no evaluation: the run is about the training step
        "data.zeroshot_dataset=null",
    ]


def run_overrides(plan: Plan, work_dir: Path, model: str, *, compile: bool, batch_size: int, name: str):
    """The Hydra overrides of one run; the in-memory Trainer and the trainer command use the same ones."""
    return [
        f"model={model}",
        "loss=clip",
        "train.precision=bf16",
        f"train.compile={str(compile).lower()}",
        "train.resume=none",
        "train.checkpoint_every=1000000",
        "logger=none",
        *data_overrides(plan, work_dir),
        f"data.batch_size={batch_size}",
        f"output_dir={work_dir / 'runs' / name}",
    ]


def compose_config(overrides: list[str]):
    from clipkit.train.schema import compose_config as compose

    return compose(*overrides)


def generate_shards(plan: Plan, work_dir: Path) -> None:
    """Write the shards once, before any timing; later runs find them."""
    from omegaconf import OmegaConf

    from clipkit.data import DataConfig, prepare_data

    cfg = compose_config(data_overrides(plan, work_dir))
    prepare_data(DataConfig.from_dict(OmegaConf.to_container(cfg.data, resolve=True)))


# -- measurements inside one process ------------------------------------------------------------------
def peak_bf16_flops(device_name: str) -> float | None:
    return peak_flops(device_name, "bf16")


def mfu(flops_per_sample: int | None, samples_per_s: float | None, device_name: str) -> float | None:
    """Model FLOPs utilisation of one device, as the trainer logs it (clipkit.train.throughput)."""
    if not samples_per_s:
        return None
    throughput = Throughput(
        flops_per_sample=flops_per_sample, peak_flops=peak_bf16_flops(device_name), processes=1
    )
    return throughput.metrics(samples_per_s)["mfu"]


class _AtenOps(TorchDispatchMode):
    """Records the names of the aten operators a region runs."""

    def __init__(self):
        super().__init__()
        self.names: set[str] = set()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.names.add(str(func.overloadpacket))
        return func(*args, **(kwargs or {}))


def attention_ops(model: torch.nn.Module, *inputs: torch.Tensor) -> list[str]:
    """The attention kernels one bf16 forward of `model(*inputs)` runs: fused SDPA kernels (flash,
    efficient, cuDNN), or `aten._softmax` where attention falls back to matmuls and a softmax."""
    with _AtenOps() as ops, torch.no_grad(), torch.autocast(inputs[0].device.type, dtype=torch.bfloat16):
        model(*inputs)
    return sorted(name for name in ops.names if "attention" in name or name == "aten._softmax")


def feature_dtype(model: torch.nn.Module, images: torch.Tensor, tokens: torch.Tensor) -> str:
    """The dtype the model's image features leave it in under bf16 autocast, i.e. what the loss gathers:
    bf16 features cross processes as bf16, float32 ones (F.normalize may upcast) as float32."""
    with torch.no_grad(), torch.autocast(images.device.type, dtype=torch.bfloat16):
        return str(model(images, tokens)[0].dtype)


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def build_trainer(overrides: list[str]):
    from clipkit.train import Trainer

    return Trainer(compose_config(overrides))


def first_batch(trainer) -> tuple[torch.Tensor, torch.Tensor]:
    """One batch as the trainer's own data stream delivers it, on the training device."""
    images, tokens = next(iter(trainer.stream))
    device = trainer.accelerator.device
    return images.to(device), tokens.to(device)


def tile(batch: tuple[torch.Tensor, torch.Tensor], size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """`size` rows, repeating the batch's rows: the step's cost depends on shapes only."""
    rows = torch.arange(size, device=batch[0].device) % batch[0].shape[0]
    return batch[0][rows], batch[1][rows]


def time_steps(trainer, batch, *, warmup: int, steps: int) -> dict:
    """Trainer.step on the same in-memory batch: samples/s and peak memory over the timed steps."""
    device = trainer.accelerator.device
    for _ in range(warmup):  # compilation, optimizer state, allocator growth
        trainer.step([batch])
    synchronize(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    start = time.perf_counter()
    for _ in range(steps):
        trainer.step([batch])
    synchronize(device)
    elapsed = time.perf_counter() - start
    size = batch[0].shape[0]
    result = {
        "batch_size": size,
        "steps": steps,
        "step_s": elapsed / steps,
        "samples_per_s": size * steps / elapsed,
    }
    if device.type == "cuda":
        result["peak_memory_gib"] = torch.cuda.max_memory_allocated(device) / 2**30
        result["peak_reserved_gib"] = torch.cuda.max_memory_reserved(device) / 2**30
    else:
        result["peak_memory_gib"] = None  # measured on CUDA only
    return result


def fits(trainer, sample, size: int) -> bool:
    """Whether two steps at batch `size` run without running out of GPU memory."""
    out_of_memory = False
    try:
        batch = tile(sample, size)
        for _ in range(2):
            trainer.step([batch])
    except torch.cuda.OutOfMemoryError:
        out_of_memory = True
    batch = None
    if out_of_memory:  # the failed step's gradients and activations go before the next try
        trainer.optimizer.zero_grad(set_to_none=True)
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    return not out_of_memory


def largest_batch(trainer, sample, *, start: int, limit: int, deadline: float) -> tuple[int, list[dict]]:
    """The largest power-of-two multiple of `start` up to `limit` that fits (doubling while it does)."""
    probes = []
    size = start
    if not fits(trainer, sample, size):
        raise RuntimeError(f"batch {start} does not fit on the device; lower the plan's start_batch")
    probes.append({"batch_size": size, "fits": True})
    while size * 2 <= limit and time.monotonic() < deadline:
        ok = fits(trainer, sample, size * 2)
        probes.append({"batch_size": size * 2, "fits": ok})
        if not ok:
            break
        size *= 2
    return size, probes


def emit(record: dict) -> None:
    print(RESULT + json.dumps(record), flush=True)


def child_in_memory(spec: dict) -> None:
    """One in-memory measurement: `search` finds the batch size (eager) and counts FLOPs; else `batch_size`."""
    plan = Plan(**{**spec["plan"], "models": tuple(spec["plan"]["models"])})
    work_dir = Path(spec["work_dir"])
    started = time.monotonic()
    name = f"{spec['model']}-memory-{'compiled' if spec['compile'] else 'eager'}"
    trainer = build_trainer(
        run_overrides(plan, work_dir, spec["model"], compile=spec["compile"], batch_size=8, name=name)
        + ["data.workers=0", "data.shuffle_buffer=0"]
    )
    try:
        device = trainer.accelerator.device
        emit({"device": device.type, "device_name": device_name(device), "torch": torch.__version__})
        sample = first_batch(trainer)
        if spec.get("search"):
            # Half of this measurement's time for the search, the rest for the timing.
            deadline = started + spec["timeout_s"] / 2
            size, probes = largest_batch(
                trainer, sample, start=plan.start_batch, limit=plan.max_batch, deadline=deadline
            )
            emit({"batch_size": size, "search": probes})
            # The count the trainer made at its start and logs tflops and mfu with.
            emit({"flops_per_sample": trainer.throughput.flops_per_sample})
            # The model itself, called directly, takes the normalised float images the trainer makes of the
            # stream's uint8 ones (train.uint8_images); Trainer.step normalises by itself.
            few = trainer.to_device(*tile(sample, 2))
            emit({"attention_ops": attention_ops(trainer.unwrapped, *few)})
            emit({"feature_dtype": feature_dtype(trainer.unwrapped, *few)})
        else:
            size = spec["batch_size"]
        emit(
            {
                "timing": time_steps(
                    trainer, tile(sample, size), warmup=plan.warmup_steps, steps=plan.timed_steps
                )
            }
        )
    finally:
        trainer.close()


def device_name(device: torch.device) -> str:
    return torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu"


# -- the parent: runs each measurement in its own process ---------------------------------------------
def child_env(plan: Plan) -> dict[str, str]:
    env = dict(os.environ)
    src = str(REPO_ROOT / "src")
    env["PYTHONPATH"] = os.pathsep.join(p for p in (src, env.get("PYTHONPATH")) if p)
    env.setdefault("HF_HUB_OFFLINE", "1")
    env.setdefault("PYTHONUNBUFFERED", "1")
    if plan.dry_run:
        env["CUDA_VISIBLE_DEVICES"] = ""  # the dry run is a CPU run even on a GPU machine
    return env


def run_with_limit(command: list[str], *, timeout_s: float, env: dict[str, str]) -> dict:
    """Run `command` in its own process group; past `timeout_s` the whole group (data workers too) is killed.
    Returns returncode (None when killed), stdout, stderr and seconds."""
    started = time.monotonic()
    process = subprocess.Popen(
        command, cwd=REPO_ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        start_new_session=True,
    )  # fmt: skip
    try:
        stdout, stderr = process.communicate(timeout=max(1.0, timeout_s))
        returncode = process.returncode
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        stdout, stderr = process.communicate()
        returncode = None
    return {"returncode": returncode, "stdout": stdout, "stderr": stderr, "s": time.monotonic() - started}


def outcome(run: dict, timeout_s: float) -> dict:
    """Status fields for a finished child: ok, or the error with the end of its stderr."""
    if run["returncode"] == 0:
        return {"status": "ok", "s": round(run["s"], 1)}
    error = (
        f"ran past its {timeout_s:.0f} s limit" if run["returncode"] is None else f"exit {run['returncode']}"
    )
    return {"status": "error", "error": error, "stderr_tail": run["stderr"][-2000:], "s": round(run["s"], 1)}


def measure_in_memory(plan: Plan, work_dir: Path, model: str, *, compile: bool, batch_size, timeout_s):
    spec = {
        "plan": dataclasses.asdict(plan),
        "work_dir": str(work_dir),
        "model": model,
        "compile": compile,
        "search": batch_size is None,
        "batch_size": batch_size,
        "timeout_s": timeout_s,
    }
    command = [sys.executable, str(Path(__file__).resolve()), "--child", json.dumps(spec)]
    run = run_with_limit(command, timeout_s=timeout_s, env=child_env(plan))
    result = outcome(run, timeout_s)
    for line in run["stdout"].splitlines():  # what it measured, also when it was stopped
        if line.startswith(RESULT):
            result.update(json.loads(line[len(RESULT) :]))
    if run["returncode"] == 0 and "timing" not in result:
        result.update(status="error", error="the child printed no timing")
    return result


def logged_rates(metrics_file: Path, *, skip_first_window: bool) -> list[float]:
    """samples/s the trainer logged, per log window."""
    if not metrics_file.is_file():
        return []
    rates = [
        json.loads(line)["samples_per_s"]
        for line in metrics_file.read_text(encoding="utf-8").splitlines()
        if line.strip() and "samples_per_s" in json.loads(line)
    ]
    return rates[1:] if skip_first_window and len(rates) > 1 else rates


def measure_loader(plan: Plan, work_dir: Path, model: str, *, batch_size: int, timeout_s: float) -> dict:
    """The trainer command on the generated shards; samples/s from its metrics.jsonl."""
    name = f"{model}-loader"
    overrides = run_overrides(plan, work_dir, model, compile=False, batch_size=batch_size, name=name)
    overrides += [
        f"train.steps={plan.loader_steps}",
        f"train.log_every={plan.loader_log_every}",
        f"data.workers={plan.loader_workers}",
    ]
    command = [sys.executable, "-m", "clipkit.train", *overrides]
    run = run_with_limit(command, timeout_s=timeout_s, env=child_env(plan))
    result = {"command": "python -m clipkit.train " + " ".join(overrides), **outcome(run, timeout_s)}
    rates = logged_rates(work_dir / "runs" / name / "metrics.jsonl", skip_first_window=not plan.dry_run)
    result.update(batch_size=batch_size, workers=plan.loader_workers, window_samples_per_s=rates)
    result["samples_per_s"] = statistics.median(rates) if rates else None
    return result


def with_mfu(result: dict, flops_per_sample: float | None, name: str) -> dict:
    rate = (result.get("timing") or {}).get("samples_per_s", result.get("samples_per_s"))
    return {**result, "mfu": mfu(flops_per_sample, rate, name)}


def measure_model(plan: Plan, work_dir: Path, model: str, limit) -> dict:
    """eager (batch-size search, FLOPs, timing), compiled, loader: in that order, each in its own process.
    `limit(own_s)` gives a measurement its time, or None when the budget has run out."""
    skipped = {"status": "skipped", "error": "the time budget (--budget-s) ran out before it"}
    no_batch = {"status": "skipped", "error": "no batch size: the eager measurement failed"}
    timeout_s = limit(plan.eager_s)
    entry = {
        "eager": skipped if timeout_s is None
        else measure_in_memory(plan, work_dir, model, compile=False, batch_size=None, timeout_s=timeout_s)
    }  # fmt: skip
    batch_size = entry["eager"].get("batch_size")
    if plan.measure_compiled:
        timeout_s = limit(plan.compiled_s)
        entry["compiled"] = (
            no_batch if batch_size is None
            else skipped if timeout_s is None
            else measure_in_memory(plan, work_dir, model, compile=True, batch_size=batch_size, timeout_s=timeout_s)
        )  # fmt: skip
    timeout_s = limit(plan.loader_s)
    entry["loader"] = (
        no_batch if batch_size is None
        else skipped if timeout_s is None
        else measure_loader(
            plan, work_dir, model, batch_size=min(batch_size, plan.loader_max_batch), timeout_s=timeout_s
        )
    )  # fmt: skip

    flops, name = entry["eager"].get("flops_per_sample"), entry["eager"].get("device_name", "")
    for key in list(entry):
        entry[key] = with_mfu(entry[key], flops, name)
    entry.update(flops_per_sample=flops, peak_bf16_flops=peak_bf16_flops(name))
    return entry


def run_plan(plan: Plan, work_dir: Path, out: str | None) -> dict:
    started = time.monotonic()
    deadline = started + plan.budget_s

    def limit(own_s: float) -> float | None:
        """This measurement's time: its own limit or what is left, None when too little is left."""
        left = deadline - time.monotonic()
        return min(own_s, left) if left >= min(own_s, 30) else None

    report = {
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "torch": torch.__version__},
        "plan": dataclasses.asdict(plan),
        "models": {},
    }
    generate_shards(plan, work_dir)
    report["shards_s"] = round(time.monotonic() - started, 1)
    # The models in the plan's order (the design target first), each complete before the next.
    for model in plan.models:
        report["models"][model] = measure_model(plan, work_dir, model, limit)
        report["total_s"] = round(time.monotonic() - started, 1)
        report["failed"] = failed(report)
        write_report(report, out)  # what is measured so far survives a kill from outside
    return report


def failed(report: dict) -> list[str]:
    """The measurements that failed (a budget skip is not a failure)."""
    return [
        f"{model}/{key}: {result.get('error')}"
        for model, entry in report["models"].items()
        for key, result in entry.items()
        if isinstance(result, dict) and result.get("status") == "error"
    ]


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--dry-run", action="store_true", help="CPU, tiny model, batch 8, 2 steps")
    parser.add_argument("--budget-s", type=float, default=330, help="the whole run's time limit (GPU run)")
    parser.add_argument("--work-dir", help="shards and run directories (default: a new temporary directory)")
    parser.add_argument("--out", help="also write the JSON here")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child_in_memory(json.loads(args.child))
        return
    plan = dry_run_plan() if args.dry_run else gpu_plan(args.budget_s)
    work_dir = Path(args.work_dir or tempfile.mkdtemp(prefix="clipkit-bench-gpu-"))
    report = run_plan(plan, work_dir, args.out)
    print(write_report(report, args.out))
    sys.exit(1 if report["failed"] else 0)


if __name__ == "__main__":
    main()
