"""Exact gradient accumulation: k micro-batches of b give the gradient of one batch of k*b."""

from __future__ import annotations

import pytest
import torch
from accelerate import Accelerator
from accelerate.state import AcceleratorState
from hydra.utils import instantiate

from clipkit.models import build_model
from clipkit.train.config import OptimConfig
from clipkit.train.optim import build_optimizer, is_decayed, lr_factor
from clipkit.train.step import contrastive_backward
from test_configs import compose_config


@pytest.fixture
def accelerator():
    AcceleratorState._reset_state(True)
    yield Accelerator(cpu=True)
    AcceleratorState._reset_state(True)


def _gradients(model, loss_fn, micro_batches, accelerator):
    model.zero_grad(set_to_none=True)
    loss = contrastive_backward(model, loss_fn, micro_batches, accelerator)
    return loss, {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("loss_name", ["clip", "siglip"])
def test_accumulation_equals_one_big_batch(loss_name, accelerator):
    cfg = compose_config(f"loss={loss_name}")
    loss_fn = instantiate(cfg.loss)
    torch.manual_seed(0)
    bundle = build_model(
        "tiny", init_logit_scale=loss_fn.init_logit_scale, init_logit_bias=loss_fn.init_logit_bias
    )
    model = accelerator.prepare(bundle.model)
    model.train()
    b, k = 8, 4
    images = torch.randn(k * b, 3, 32, 32)
    tokens = torch.randint(1, 49000, (k * b, 16))

    full_loss, full = _gradients(model, loss_fn, [(images, tokens)], accelerator)
    chunks = list(zip(images.split(b), tokens.split(b), strict=True))
    accum_loss, accumulated = _gradients(model, loss_fn, chunks, accelerator)

    torch.testing.assert_close(accum_loss, full_loss, rtol=0, atol=1e-6)
    assert full.keys() == accumulated.keys() and "logit_scale" in full
    for name in full:
        diff = (accumulated[name] - full[name]).abs().max().item()
        assert diff <= 1e-5, f"{name}: max |diff| {diff:.2e}"
    if loss_name == "clip":
        # The pool of negatives is k*b, not b: naive accumulation gives another gradient. (SigLIP at its
        # initial bias of -10 barely weighs its negatives, so there the difference is too small to show.)
        model.zero_grad(set_to_none=True)
        for chunk in chunks:
            contrastive_backward(model, loss_fn, [chunk], accelerator)
        naive = model.text_projection.grad / k
        assert (naive - full["text_projection"]).abs().max() > 100 * 1e-5


def test_weight_decay_skips_biases_norms_position_embeddings_and_logits():
    model = build_model("tiny").model
    decayed = {name for name, p in model.named_parameters() if is_decayed(name, p)}
    assert "visual.conv1.weight" in decayed and "token_embedding.weight" in decayed
    assert "transformer.resblocks.0.attn.in_proj_weight" in decayed
    for name in (
        "logit_scale",
        "positional_embedding",
        "visual.positional_embedding",
        "visual.class_embedding",
        "ln_final.weight",
        "ln_final.bias",
        "transformer.resblocks.0.attn.in_proj_bias",
    ):
        assert name not in decayed, name


def test_schedule_warms_up_then_follows_cosine_or_constant():
    factors = [lr_factor(s, warmup_steps=10, total_steps=110, schedule="cosine") for s in range(110)]
    assert factors[0] == pytest.approx(0.1) and factors[9] == pytest.approx(1.0)
    assert factors[10] == pytest.approx(1.0) and factors[60] == pytest.approx(0.5) and factors[109] < 0.001
    assert all(a >= b for a, b in zip(factors[10:], factors[11:], strict=False))
    assert lr_factor(100, warmup_steps=10, total_steps=110, schedule="constant") == 1.0


def test_fused_adamw_makes_the_same_updates_as_the_per_parameter_loop():
    torch.manual_seed(0)
    reference = build_model("tiny").model
    fused = build_model("tiny").model
    fused.load_state_dict(reference.state_dict())
    optimizers = [
        build_optimizer(model, OptimConfig(lr=1e-3, fused=flag))
        for model, flag in ((reference, False), (fused, True))
    ]
    assert optimizers[1].defaults["fused"] and not optimizers[0].defaults.get("fused")
    for _ in range(3):
        grads = {name: torch.randn_like(p) for name, p in reference.named_parameters()}
        for model, optimizer in zip((reference, fused), optimizers, strict=True):
            for name, p in model.named_parameters():
                p.grad = grads[name].clone()
            optimizer.step()
    for (name, a), b in zip(reference.state_dict().items(), fused.state_dict().values(), strict=True):
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-6, msg=name)
