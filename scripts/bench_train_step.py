#!/usr/bin/env python
"""Where a CPU training step's time goes, in one process, on fixed random tensors (no data loading):

- the optimizer step: torch's fused AdamW (`optim.fused`, clipkit's default) against the per-parameter loop
  (what open_clip's trainer runs), on the same gradients;
- a whole step (forward, loss, backward, optimizer) through clipkit's code path against open_clip's
  trainer's (open_clip's ClipLoss, plain AdamW), interleaved;
- the same clipkit step with and without `train.keep_freed_memory`, each in a fresh process (glibc's
  setting cannot be undone), with the minor page faults per step.

    python scripts/bench_train_step.py --out bench_train_step.json   # ~3 minutes on 2 cores

Prints JSON (and writes it to --out).
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import resource
import statistics
import subprocess
import sys
import time

import open_clip
import torch
from accelerate import Accelerator

from _report import write_report
from clipkit.losses import ClipLoss
from clipkit.models import build_model
from clipkit.train.allocator import keep_freed_memory
from clipkit.train.config import OptimConfig
from clipkit.train.optim import build_optimizer
from clipkit.train.step import contrastive_backward

BATCH = 64


def minor_faults() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt


def timed(fn, repeats: int) -> list[float]:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return times


def bench_optimizer(model_name: str, repeats: int) -> dict:
    model = build_model(model_name).model
    for p in model.parameters():
        p.grad = torch.randn_like(p)
    result = {"parameters": sum(p.numel() for p in model.parameters())}
    for fused in (False, True):
        optimizer = build_optimizer(model, OptimConfig(lr=1e-3, fused=fused))
        optimizer.step()  # state allocated outside the timing
        result["fused_ms" if fused else "loop_ms"] = 1000 * statistics.median(timed(optimizer.step, repeats))
    result["speedup"] = result["loop_ms"] / result["fused_ms"]
    return result


def random_batch(model) -> tuple[torch.Tensor, torch.Tensor]:
    size = model.visual.image_size
    context = model.context_length
    return torch.randn(BATCH, 3, *size), torch.randint(1, model.vocab_size - 1, (BATCH, context))


def clipkit_step_fn(model_name: str):
    """clipkit's step, as Trainer.step runs it with accum_steps=1 on one process."""
    accelerator = Accelerator(cpu=True)
    model = accelerator.prepare(build_model(model_name).model)
    loss_fn = ClipLoss(init_logit_scale=math.log(1 / 0.07), max_logit_scale=math.log(100))
    optimizer = build_optimizer(model, OptimConfig(lr=1e-3))
    images, tokens = random_batch(model)

    def step():
        model.train()
        loss = contrastive_backward(model, loss_fn, [(images, tokens)], accelerator)
        grad_norm = accelerator.clip_grad_norm_(list(model.parameters()), math.inf)
        _ = bool(torch.isfinite(loss)) and bool(torch.isfinite(grad_norm))  # Trainer.step's check
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        with torch.no_grad():
            model.logit_scale.clamp_(0, math.log(100))

    return step


def open_clip_step_fn(arch: str):
    """open_clip's trainer's step (train_one_epoch, fp32, no accumulation) on the same architecture."""
    model = open_clip.create_model(arch)
    loss_fn = open_clip.loss.ClipLoss()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    images, tokens = random_batch(model)

    def step():
        model.train()
        optimizer.zero_grad()
        image_features, text_features, logit_scale = model(images, tokens)[:3]
        loss_fn(image_features, text_features, logit_scale).backward()
        optimizer.step()
        with torch.no_grad():
            model.logit_scale.clamp_(0, math.log(100))

    return step


def bench_step(model_name: str, arch: str, repeats: int) -> dict:
    steps = {"clipkit": clipkit_step_fn(model_name), "open_clip": open_clip_step_fn(arch)}
    times = {name: [] for name in steps}
    for step in steps.values():
        step()  # warm-up
    for _ in range(repeats):  # interleaved
        for name, step in steps.items():
            times[name] += timed(step, 1)
    result = {f"{name}_s": statistics.median(t) for name, t in times.items()}
    result["runs_s"] = times
    result["clipkit_speedup"] = result["open_clip_s"] / result["clipkit_s"]
    return result


def allocator_child(model_name: str, keep: bool, repeats: int) -> dict:
    applied = keep_freed_memory() if keep else False
    step = clipkit_step_fn(model_name)
    step()
    step()  # the heap reaches its working size
    faults, times = [], []
    for _ in range(repeats):
        before = minor_faults()
        times += timed(step, 1)
        faults.append(minor_faults() - before)
    return {
        "applied": applied,
        "step_s": statistics.median(times),
        "minor_faults_per_step": statistics.median(faults),
    }


def bench_allocator(model_name: str, repeats: int) -> dict:
    result = {}
    for keep in (False, True):
        command = [sys.executable, __file__, "--allocator-child", model_name, "--repeats", str(repeats)]
        output = subprocess.run(
            command + (["--keep"] if keep else []), capture_output=True, text=True, check=True
        )
        result["keep_freed_memory" if keep else "default"] = json.loads(output.stdout.splitlines()[-1])
    result["fault_ratio"] = result["default"]["minor_faults_per_step"] / max(
        1, result["keep_freed_memory"]["minor_faults_per_step"]
    )
    result["speedup"] = result["default"]["step_s"] / result["keep_freed_memory"]["step_s"]
    return result


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", default="vit-s-32-alt", help="a conf/model name (default: vit-s-32-alt)")
    parser.add_argument("--arch", default="ViT-S-32-alt", help="the same towers as an open_clip architecture")
    parser.add_argument("--repeats", type=int, default=4, help="timed steps per measurement")
    parser.add_argument("--out", help="also write the JSON here")
    parser.add_argument("--allocator-child", metavar="MODEL", help=argparse.SUPPRESS)
    parser.add_argument("--keep", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    torch.manual_seed(0)
    if args.allocator_child:
        print(json.dumps(allocator_child(args.allocator_child, args.keep, args.repeats)))
        return
    started = time.perf_counter()
    report = {
        "machine": {
            "cpus": torch.get_num_threads(),
            "platform": platform.platform(),
            "torch": torch.__version__,
        },
        "batch_size": BATCH,
        "optimizer": {name: bench_optimizer(name, repeats=20) for name in ("tiny", args.model)},
        "step": bench_step(args.model, args.arch, args.repeats),
        "allocator": bench_allocator(args.model, args.repeats),
    }
    report["total_s"] = round(time.perf_counter() - started, 1)
    print(write_report(report, args.out))


if __name__ == "__main__":
    main()
