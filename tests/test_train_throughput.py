"""FLOPs per sample, TFLOP/s and MFU (clipkit.train.throughput) against hand counts, and in metrics.jsonl."""

from __future__ import annotations

import json

import pytest
import torch
from accelerate.state import AcceleratorState

from clipkit.models import ModelConfig, build_model
from clipkit.train import run
from clipkit.train.throughput import Throughput, example_inputs, peak_flops, training_flops_per_sample
from test_configs import compose_config

TINY = dict(  # conf/model/tiny.yaml
    image_size=32, patch_size=4, vision_width=128, vision_layers=4,
    context_length=16, text_width=128, text_layers=4, embed_dim=128,
)  # fmt: skip
TINY_CFG = dict(
    name="tiny", embed_dim=128,
    vision_cfg=dict(image_size=32, patch_size=4, layers=4, width=128, head_width=32),
    text_cfg=dict(context_length=16, vocab_size=49408, width=128, heads=4, layers=4),
)  # fmt: skip


def transformer_flops(tokens: int, width: int, layers: int) -> int:
    """2 x multiply-adds of one forward through `layers` blocks (MLP ratio 4): q, k, v and output projections
    8 n w^2, MLP 16 n w^2, attention scores and weighted sum 4 n^2 w."""
    return layers * (24 * tokens * width * width + 4 * tokens * tokens * width)


def analytic_tower_flops(
    *, image_size, patch_size, vision_width, vision_layers, context_length, text_width, text_layers, embed_dim,
    kept_patches=None,
) -> tuple[int, int, int]:  # fmt: skip
    """Forward FLOPs per sample of an open_clip ViT + text transformer: (patch embedding, rest of the image
    tower, text tower). Norms, softmax and activations are not matmuls and are not counted (nor by torch's
    counter); the token embedding is a lookup."""
    patches = (image_size // patch_size) ** 2
    patch_embed = 2 * (3 * patch_size * patch_size) * vision_width * patches
    tokens = 1 + (patches if kept_patches is None else kept_patches)  # + the class token
    vision = transformer_flops(tokens, vision_width, vision_layers) + 2 * vision_width * embed_dim
    text = transformer_flops(context_length, text_width, text_layers) + 2 * text_width * embed_dim
    return patch_embed, vision, text


def analytic_forward_flops(**sizes) -> int:
    return sum(analytic_tower_flops(**sizes))


def analytic_training_flops(**sizes) -> int:
    """Forward + backward: each matmul's backward is two matmuls of its size (gradients of its input and of
    its weight), except the patch embedding, whose input (the images) needs no gradient."""
    patch_embed, vision, text = analytic_tower_flops(**sizes)
    return 2 * patch_embed + 3 * vision + 3 * text


def tiny(**vision_cfg):
    cfg = ModelConfig.from_dict({**TINY_CFG, "vision_cfg": {**TINY_CFG["vision_cfg"], **vision_cfg}})
    return build_model(cfg)


def test_training_flops_are_the_hand_count_of_forward_and_backward():
    bundle = tiny()
    counted = training_flops_per_sample(bundle.model, *example_inputs(bundle))
    assert counted == analytic_training_flops(**TINY)
    # Per sample: a batch of 3 counts 3x the FLOPs and reports the same figure.
    images, tokens = example_inputs(bundle)
    assert (
        training_flops_per_sample(bundle.model, images.expand(3, -1, -1, -1), tokens.expand(3, -1)) == counted
    )


def test_a_frozen_image_tower_is_counted_forward_only():
    # Why forward + backward is counted and not 3 x forward: LiT (train.lock_image) has no image backward.
    bundle = tiny()
    bundle.model.lock_image_tower(unlocked_groups=0)
    patch_embed, vision, text = analytic_tower_flops(**TINY)
    assert training_flops_per_sample(bundle.model, *example_inputs(bundle)) == patch_embed + vision + 3 * text


def test_patch_dropout_counts_the_kept_patches_and_draws_no_random_numbers():
    bundle = tiny(patch_dropout=0.5)
    state = torch.get_rng_state()
    counted = training_flops_per_sample(bundle.model, *example_inputs(bundle))
    assert torch.equal(torch.get_rng_state(), state)  # the run's random stream is untouched
    assert counted == analytic_training_flops(**TINY, kept_patches=32)  # int(64 x 0.5)


def test_counting_leaves_the_model_as_it_was():
    bundle = tiny()
    model = bundle.model.eval()
    model.set_grad_checkpointing(True)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    # Recomputation in backward is not model FLOPs: the count is the same with grad checkpointing on.
    assert training_flops_per_sample(model, *example_inputs(bundle)) == analytic_training_flops(**TINY)
    assert not model.training and model.visual.transformer.grad_checkpointing
    assert all(p.grad is None and p.device.type == "cpu" for p in model.parameters())
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())


def test_vit_b_16_count_is_the_analytic_count():
    # Meta tensors: ViT-B-16 at 224 px counts in milliseconds without its 150 M parameters' arithmetic.
    bundle = build_model("vit-b-16")
    sizes = dict(
        image_size=224, patch_size=16, vision_width=768, vision_layers=12,
        context_length=77, text_width=512, text_layers=12, embed_dim=512,
    )  # fmt: skip
    assert training_flops_per_sample(bundle.model, *example_inputs(bundle)) == analytic_training_flops(
        **sizes
    )


@pytest.mark.parametrize(
    ("name", "precision", "tf32", "expected"),
    [
        ("NVIDIA H200", "bf16", True, 989.4e12),
        ("NVIDIA H100 80GB HBM3", "bf16", True, 989.4e12),
        ("NVIDIA H100 PCIe", "fp16", True, 756.5e12),
        ("NVIDIA A100-SXM4-80GB", "fp32", True, 156e12),  # TF32 tensor cores
        ("NVIDIA A100-PCIE-40GB", "fp32", False, 19.5e12),  # IEEE float32
        ("NVIDIA L4", "bf16", True, 121e12),
        ("NVIDIA A10", "bf16", True, 125e12),
        ("NVIDIA A10G", "bf16", True, None),  # no data sheet figure: MFU is null, not a guess
        ("NVIDIA GeForce RTX 2080", "bf16", True, None),
        (None, "fp32", True, None),  # CPU
    ],
)
def test_peak_flops_by_device_name(name, precision, tf32, expected):
    assert peak_flops(name, precision, tf32=tf32) == expected


def test_tflops_and_mfu_are_per_device():
    throughput = Throughput(flops_per_sample=10**9, peak_flops=1e12, processes=2)
    # 1000 samples/s over 2 devices: 500 x 1 GFLOP = 0.5 TFLOP/s each, half of the 1 TFLOP/s peak.
    assert throughput.metrics(1000.0) == {"samples_per_s": 1000.0, "tflops": 0.5, "mfu": 0.5}
    unknown = Throughput(flops_per_sample=10**9, peak_flops=None, processes=1)
    assert unknown.metrics(1000.0) == {"samples_per_s": 1000.0, "tflops": 1.0, "mfu": None}


def test_metrics_jsonl_carries_tflops_and_a_null_mfu_on_cpu(tmp_path):
    AcceleratorState._reset_state(True)
    out = tmp_path / "run"
    data = ("data=synthetic", "data.generate.train_samples=64", "data.generate.test_samples=20",
            "data.generate.image_size=32", "data.batch_size=8", "data.workers=0", "data.val_shards=null",
            "data.zeroshot_dataset=null")  # fmt: skip
    try:
        run(compose_config("model=tiny", *data, f"output_dir={out}", "train.steps=2", "train.log_every=1"))
    finally:
        AcceleratorState._reset_state(True)
    records = [r for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines()) if "loss" in r]
    assert len(records) == 2
    flops = analytic_training_flops(**TINY)
    for record in records:
        assert record["mfu"] is None  # no peak is known for a CPU
        assert record["tflops"] == pytest.approx(flops * record["samples_per_s"] / 1e12, rel=1e-9)
