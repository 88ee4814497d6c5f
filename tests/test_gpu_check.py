"""The GPU check (scripts/gpu/) on CPU: its dry run end to end, and the pieces its MFU figure rests on.

The dry run takes the GPU run's code paths (clipkit's Trainer on an in-memory batch, the trainer's FLOP
count, the real trainer command on generated shards) at tiny sizes on the CPU.
"""

from __future__ import annotations

import importlib.util
import json
import re
import shlex
import subprocess
import sys

import pytest
import torch

from clipkit.models import build_model
from conftest import REPO_ROOT, subprocess_env
from test_train_throughput import TINY, analytic_training_flops


def _load_bench_gpu():
    spec = importlib.util.spec_from_file_location("bench_gpu", REPO_ROOT / "scripts" / "gpu" / "bench_gpu.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules["bench_gpu"] = module  # dataclasses look their module up while it executes
    spec.loader.exec_module(module)
    return module


bench_gpu = _load_bench_gpu()


def test_mfu_is_the_trainers_figure():
    # bench_gpu reads clipkit.train.throughput: the same FLOPs and peak table as the training log.
    assert bench_gpu.mfu(10**9, 1000.0, "NVIDIA H200") == pytest.approx(1e12 / 989.4e12)
    assert bench_gpu.mfu(10**9, 1000.0, "NVIDIA A100-SXM4-80GB") == pytest.approx(1e12 / 312e12)
    assert bench_gpu.mfu(10**9, 1000.0, "some other device") is None  # unknown peak: no figure
    assert bench_gpu.mfu(None, 1000.0, "NVIDIA H200") is None


def test_attention_goes_through_scaled_dot_product_attention():
    # open_clip's blocks call nn.MultiheadAttention without weights, which runs F.scaled_dot_product_attention:
    # on a GPU the flash kernel (tests/test_gpu.py checks it there), on CPU its CPU counterpart.
    generator = torch.Generator().manual_seed(0)
    inputs = (
        torch.randn(2, 3, 32, 32, generator=generator),
        torch.randint(1, 49407, (2, 16), generator=generator),
    )
    ops = bench_gpu.attention_ops(build_model("tiny").model.train(), *inputs)
    assert ops == ["aten._scaled_dot_product_flash_attention_for_cpu"]


def readme_dry_run_command() -> str:
    section = (REPO_ROOT / "README.md").read_text().split("### GPU check", 1)[1]
    block = re.search(r"```bash\n(.*?)```", section, re.S).group(1)
    (command,) = [line for line in block.splitlines() if line.strip()]
    return command


@pytest.mark.slow  # ~40 s on an idle 2-core CPU (the trainer's first bf16 CPU step, the trainer command)
def test_readme_dry_run_measures_through_the_trainer():
    command = readme_dry_run_command()
    assert command == "bash scripts/gpu/check.sh --dry-run"
    result = subprocess.run(
        shlex.split(command),
        cwd=REPO_ROOT,
        env=subprocess_env(PYTHON=sys.executable),  # the interpreter running the tests, venv or not
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    # The gpu tests are collected and all skip without CUDA.
    assert re.search(r"^\d+ skipped in ", result.stdout, re.M), result.stdout[-3000:]
    report = json.loads(result.stdout.split("== bench_gpu.py\n", 1)[1].split("\n== check.sh:", 1)[0])
    assert report["failed"] == []
    tiny = report["models"]["tiny"]
    eager = tiny["eager"]
    assert eager["status"] == "ok" and eager["device"] == "cpu"
    assert eager["batch_size"] == 8 and eager["search"] == [{"batch_size": 8, "fits": True}]
    assert eager["flops_per_sample"] == analytic_training_flops(**TINY)  # the trainer's own count
    assert eager["attention_ops"] == ["aten._scaled_dot_product_flash_attention_for_cpu"]
    assert eager["timing"]["steps"] == 2 and eager["timing"]["samples_per_s"] > 0
    assert eager["mfu"] is None  # no known peak for a CPU
    loader = tiny["loader"]
    assert loader["status"] == "ok" and loader["command"].startswith("python -m clipkit.train model=tiny")
    assert len(loader["window_samples_per_s"]) == 2 and loader["samples_per_s"] > 0  # the trainer's log
    assert "compiled" not in tiny  # the dry run does not compile
