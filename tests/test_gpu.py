"""What only a CUDA GPU can show. Every test here is marked `gpu` and skips without CUDA;
`bash scripts/gpu/check.sh` runs them on a GPU machine (`pytest -m gpu tests/test_gpu.py`).

- the losses keep float32 math on CUDA, with bf16 features and with TF32 turned on for the process;
- the real trainer command trains `tiny` on CUDA in bf16 with torch.compile, and its export loads;
- the trainer puts the model on the GPU with fused AdamW, and fp32 training runs its matmuls in TF32;
- attention runs through fused scaled-dot-product kernels (flash / cuDNN / efficient), never a softmax.
(The FLOP count behind MFU runs on meta tensors: tests/test_train_throughput.py checks ViT-B-16's on a CPU.)
"""

from __future__ import annotations

import json
import subprocess
import sys

import open_clip
import pytest
import torch
from accelerate.state import AcceleratorState

from clipkit.losses import ClipLoss, SigLipLoss
from clipkit.models import build_model
from conftest import REPO_ROOT, subprocess_env
from test_configs import compose_config
from test_gpu_check import bench_gpu
from test_losses import REFERENCE, START, features, value_and_grads

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(
        not torch.cuda.is_available(), reason="needs a CUDA GPU; scripts/gpu/check.sh runs these on one"
    ),
]

LOSSES = {"clip": ClipLoss, "siglip": SigLipLoss}
SMALL_DATA = (  # as tests/test_train.py: the tiny model on a small generated dataset
    "data=synthetic",
    "data.generate.train_samples=256",
    "data.generate.test_samples=40",
    "data.generate.image_size=32",
    "data.batch_size=8",
    "data.workers=0",
    "data.shuffle_buffer=16",
)
FUSED_ATTENTION = {
    "aten._scaled_dot_product_flash_attention",
    "aten._scaled_dot_product_cudnn_attention",
    "aten._scaled_dot_product_efficient_attention",
}


def _tf32_key():
    matmul = torch.backends.cuda.matmul
    return (
        ("fp32_precision", "tf32", "ieee")
        if hasattr(matmul, "fp32_precision")
        else ("allow_tf32", True, False)
    )


@pytest.fixture
def restore_tf32():
    """Whatever a test does to the process's TF32 setting is undone after it."""
    key = _tf32_key()[0]
    previous = getattr(torch.backends.cuda.matmul, key)
    yield
    setattr(torch.backends.cuda.matmul, key, previous)


def set_tf32(enabled: bool) -> None:
    key, on, off = _tf32_key()
    setattr(torch.backends.cuda.matmul, key, on if enabled else off)


def float32_matmul_error() -> float:
    """Relative error of a 1024^3 float32 matmul on the GPU against float64: ~1e-7 in IEEE float32,
    ~1e-4 with TF32 (10 mantissa bits)."""
    generator = torch.Generator().manual_seed(0)
    a, b = (torch.randn(1024, 1024, generator=generator) for _ in range(2))
    exact = a.double() @ b.double()
    product = (a.cuda() @ b.cuda()).cpu().double()
    return float((product - exact).abs().max() / exact.abs().max())


@pytest.mark.parametrize("tf32", [False, True], ids=["ieee", "tf32-on"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("loss", ["clip", "siglip"])
def test_losses_on_cuda_keep_float32_math(loss, dtype, tf32, restore_tf32):
    set_tf32(tf32)  # the losses' own matmuls stay IEEE float32 either way
    image, text = (f.to(dtype) for f in features(batch=256, dim=512))
    scale, bias = START[loss]
    bias = -3.0 if bias is None else bias
    ours = value_and_grads(LOSSES[loss](init_logit_scale=0.0), image.cuda(), text.cuda(), scale, bias)
    # The reference sees exactly the values the loss was given, in float64 on the CPU.
    reference = value_and_grads(REFERENCE[loss], image.double(), text.double(), scale, bias)

    torch.testing.assert_close(ours[0].cpu().double(), reference[0], rtol=1e-5, atol=0)
    for name, actual, expected in zip(["image", "text"], ours[1:3], reference[1:3], strict=True):
        assert actual.dtype == dtype, name  # gradients come back in the features' dtype
        # float32: float32 agreement; bf16: the float32 gradient rounded once (half an ulp: 2^-8 of it).
        rtol = 1e-5 if dtype == torch.float32 else 2**-8
        torch.testing.assert_close(
            actual.cpu().double(), expected, rtol=rtol, atol=1e-6 * float(expected.abs().max()), msg=name
        )
    for actual, expected in zip(ours[3:], reference[3:], strict=True):  # scale and bias: float32
        torch.testing.assert_close(actual.double(), expected, rtol=1e-5, atol=1e-6)


def test_trainer_command_trains_tiny_on_cuda_in_bf16_with_compile(tmp_path):
    out = tmp_path / "run"
    command = [sys.executable, "-m", "clipkit.train", "model=tiny", *SMALL_DATA, f"output_dir={out}"]
    command += ["train.steps=4", "train.log_every=1", "train.precision=bf16", "train.compile=true"]
    result = subprocess.run(
        command, cwd=REPO_ROOT, env=subprocess_env(), capture_output=True, text=True, timeout=600
    )
    assert result.returncode == 0, result.stderr[-3000:]
    logged = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    losses = [record["loss"] for record in logged if "loss" in record]
    assert len(losses) == 4 and all(isinstance(v, float) and v == v and abs(v) < 1e3 for v in losses)
    model, _, _ = open_clip.create_model_and_transforms(f"local-dir:{out / 'model'}")
    assert sum(p.numel() for p in model.parameters()) > 0


@pytest.fixture
def trainer(tmp_path, restore_tf32):
    """An fp32 Trainer for `tiny` on this machine (the GPU), closed after the test."""
    from clipkit.train import Trainer

    AcceleratorState._reset_state(True)
    config = compose_config(
        "model=tiny", *SMALL_DATA, f"output_dir={tmp_path / 'run'}", "train.steps=2", "train.precision=fp32"
    )
    trainer = Trainer(config)
    yield trainer
    trainer.close()
    AcceleratorState._reset_state(True)


def test_trainer_runs_on_the_gpu_with_fused_adamw(trainer):
    assert trainer.accelerator.device.type == "cuda"
    assert all(p.device.type == "cuda" for p in trainer.model.parameters())
    optimizer = getattr(trainer.optimizer, "optimizer", trainer.optimizer)  # Accelerate's wrapper
    assert optimizer.defaults.get("fused") is True
    images, tokens = next(iter(trainer.stream))
    metrics = trainer.step([(images, tokens)])
    assert metrics["loss"] == metrics["loss"]  # finite, not NaN
    assert torch.cuda.max_memory_allocated() > 0


def test_fp32_training_runs_its_matmuls_in_tf32(trainer):
    # Issue 11: TF32 on Ampere+ by default when training in fp32 (a config key turns it off).
    assert float32_matmul_error() > 1e-5, "float32 matmuls are IEEE: TF32 is off"


def test_attention_runs_fused_kernels(restore_tf32):
    model = build_model("vit-b-16").model.cuda().train()
    images = torch.randn(2, 3, 224, 224, device="cuda")
    tokens = torch.randint(1, 49407, (2, 77), device="cuda")
    ops = set(bench_gpu.attention_ops(model, images, tokens))
    assert "aten._softmax" not in ops, ops  # no unfused attention anywhere
    assert ops & FUSED_ATTENTION, ops
    vision = set(bench_gpu.attention_ops(model.visual, images))  # no mask: the flash kernel applies
    assert vision & {"aten._scaled_dot_product_flash_attention", "aten._scaled_dot_product_cudnn_attention"}
