"""One-process losses against open_clip's and against float64 re-implementations written here."""

from __future__ import annotations

import contextlib
import functools
import math
import re

import open_clip.loss
import pytest
import torch
import torch.nn.functional as F
from hydra.utils import instantiate
from omegaconf import OmegaConf

from clipkit.configs import config_dir
from clipkit.errors import ClipkitError
from clipkit.losses import ClipLoss, SigLipLoss, accumulate_siglip_chunk_grads, siglip_chunk_loss
from conftest import REPO_ROOT

BATCH, DIM = 48, 32
OURS = {"clip": ClipLoss, "siglip": SigLipLoss}
OPEN_CLIP = {"clip": open_clip.loss.ClipLoss, "siglip": open_clip.loss.SigLipLoss}
START = {"clip": (1 / 0.07, None), "siglip": (10.0, -10.0)}  # (exponentiated scale, bias) at init


def reference_clip_loss(image, text, scale, bias):
    """CLIP's loss written out: mean -log p(matching text | image) and vice versa."""
    logits = scale * image @ text.T + (0.0 if bias is None else bias)
    image_to_text = -torch.log(torch.softmax(logits, dim=1).diagonal()).mean()
    text_to_image = -torch.log(torch.softmax(logits, dim=0).diagonal()).mean()
    return (image_to_text + text_to_image) / 2


def reference_siglip_loss(image, text, scale, bias):
    """SigLIP's loss written out: -sum log sigmoid(label * logit) / batch, labels +1 on the diagonal."""
    logits = scale * image @ text.T + (0.0 if bias is None else bias)
    labels = 2 * torch.eye(len(image), dtype=logits.dtype) - 1
    return -torch.log(torch.sigmoid(labels * logits)).sum() / len(image)


REFERENCE = {"clip": reference_clip_loss, "siglip": reference_siglip_loss}


def features(batch=BATCH, dim=DIM, seed=0):
    """L2-normalised pairs whose texts resemble their images, so positives score higher."""
    generator = torch.Generator().manual_seed(seed)
    image = torch.randn(batch, dim, generator=generator, dtype=torch.float64)
    text = image + 1.5 * torch.randn(batch, dim, generator=generator, dtype=torch.float64)
    return F.normalize(image, dim=-1), F.normalize(text, dim=-1)


def value_and_grads(loss_fn, image, text, scale, bias, forward_context=contextlib.nullcontext):
    """Loss and gradients w.r.t. image and text features, scale and bias, in the inputs' dtypes."""
    leaves = [image.clone().requires_grad_(), text.clone().requires_grad_()]
    # The model's logit parameters stay float32 under mixed precision (float64 for the references).
    dtype = torch.promote_types(image.dtype, torch.float32)
    leaves.append(torch.tensor(scale, dtype=dtype, requires_grad=True))
    leaves.append(None if bias is None else torch.tensor(bias, dtype=dtype, requires_grad=True))
    with forward_context():
        loss = loss_fn(*leaves)
    loss.backward()
    return [loss.detach()] + [None if leaf is None else leaf.grad for leaf in leaves]


def assert_all_close(actual, expected, rtol=1e-5):
    names = ["loss", "image grad", "text grad", "scale grad", "bias grad"]
    for name, a, e in zip(names, actual, expected, strict=True):
        assert (a is None) == (e is None), name
        if a is not None:
            # rtol against the tensor's own magnitude, so that entries near zero do not dominate; the
            # floor is for CLIP's bias gradient, zero but for rounding (softmax ignores a shift).
            atol = max(rtol * 0.1 * float(e.abs().max()), 1e-7)
            torch.testing.assert_close(
                a.double(), e.double(), rtol=rtol, atol=atol, msg=lambda m, name=name: f"{name}: {m}"
            )


@pytest.mark.parametrize("with_bias", [False, True], ids=["no-bias", "bias"])
@pytest.mark.parametrize("loss", ["clip", "siglip"])
def test_equals_open_clip_at_one_process(loss, with_bias):
    image, text = (f.float() for f in features())
    scale, bias = START[loss]
    bias = (bias or -2.0) if with_bias else None
    ours = value_and_grads(OURS[loss](init_logit_scale=0.0), image, text, scale, bias)
    theirs = value_and_grads(OPEN_CLIP[loss](), image, text, scale, bias)
    assert_all_close(ours, theirs)


@pytest.mark.parametrize("loss", ["clip", "siglip"])
def test_float32_equals_a_float64_reimplementation(loss):
    image, text = features()
    scale, bias = START[loss]
    bias = -3.0 if bias is None else bias
    ours = value_and_grads(OURS[loss](init_logit_scale=0.0), image.float(), text.float(), scale, bias)
    reference = value_and_grads(REFERENCE[loss], image, text, scale, bias)
    assert ours[0].dtype == torch.float32
    assert_all_close(ours, reference)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("loss", ["clip", "siglip"])
def test_half_precision_features_get_float32_math(loss, dtype):
    # The reference sees the same rounded features in float64; bf16/fp16 math would miss by ~1e-2.
    image, text = (f.to(dtype) for f in features())
    scale, bias = START[loss]
    ours = value_and_grads(OURS[loss](init_logit_scale=0.0), image, text, scale, bias)
    assert ours[0].dtype == torch.float32
    assert ours[1].dtype == ours[2].dtype == dtype  # gradients come back in the features' dtype
    reference = value_and_grads(REFERENCE[loss], image.double(), text.double(), scale, bias)
    torch.testing.assert_close(ours[0].double(), reference[0], rtol=1e-5, atol=0)
    for ours_grad, reference_grad in zip(ours[1:3], reference[1:3], strict=True):
        # the gradient itself is rounded to the features' dtype on the way out
        torch.testing.assert_close(ours_grad, reference_grad.to(dtype))


@pytest.mark.parametrize("loss", ["clip", "siglip"])
def test_autocast_does_not_lower_the_loss_precision(loss):
    # Under autocast the matmuls would run in bf16; the loss turns it off for its own math. (As
    # PyTorch advises, backward runs outside the autocast region, like Accelerate's does.)
    image, text = (f.float() for f in features())
    scale, bias = START[loss]
    bias = -3.0 if bias is None else bias
    autocast = functools.partial(torch.autocast, "cpu", dtype=torch.bfloat16)
    ours = value_and_grads(OURS[loss](init_logit_scale=0.0), image, text, scale, bias, autocast)
    reference = value_and_grads(REFERENCE[loss], image.double(), text.double(), scale, bias)
    assert_all_close(ours, reference)


@pytest.mark.parametrize(
    "dtype", [torch.float32, torch.bfloat16, torch.float16], ids=["fp32", "bf16", "fp16"]
)
@pytest.mark.parametrize("loss", ["clip", "siglip"])
def test_identical_features_at_scale_100_are_finite(loss, dtype):
    one = F.normalize(torch.randn(1, DIM), dim=-1)
    image = text = one.expand(BATCH, DIM).to(dtype)  # every logit is 100 (+ bias)
    bias = START[loss][1]
    results = value_and_grads(OURS[loss](init_logit_scale=0.0), image, text, 100.0, bias)
    for result in results:
        assert result is None or torch.isfinite(result).all()
    expected = reference_siglip_loss if loss == "siglip" else reference_clip_loss
    reference = expected(image.double(), text.double(), 100.0, bias)
    torch.testing.assert_close(results[0].double(), reference, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("with_positives", [True, False])
@pytest.mark.parametrize("with_bias", [True, False])
def test_siglip_chunk_backward_equals_autograd(with_positives, with_bias):
    image, text = features(batch=16, dim=8, seed=3)
    text = text[torch.randperm(16, generator=torch.Generator().manual_seed(1))]
    scale = torch.tensor(7.0, dtype=torch.float64)
    bias = torch.tensor(-2.0, dtype=torch.float64) if with_bias else None
    leaves = [t if t is None else t.clone().requires_grad_() for t in (image, text, scale, bias)]
    weight = torch.tensor(0.3, dtype=torch.float64)
    (weight * siglip_chunk_loss(*leaves, with_positives=with_positives)).backward()

    # Accumulates into the buffers it is given, on top of what they hold.
    grad_image, grad_text = torch.ones_like(image), torch.full_like(text, 2.0)
    grad_scale, grad_bias = accumulate_siglip_chunk_grads(
        image,
        text,
        scale,
        bias,
        with_positives=with_positives,
        grad_weight=weight,
        grad_image=grad_image,
        grad_text=grad_text,
    )
    expected = [leaf.grad for leaf in leaves[:3]] + [None if bias is None else leaves[3].grad]
    torch.testing.assert_close(grad_image - 1, expected[0], rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(grad_text - 2, expected[1], rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(grad_scale, expected[2], rtol=1e-12, atol=1e-12)
    assert (grad_bias is None) == (bias is None)
    if bias is not None:
        torch.testing.assert_close(grad_bias, expected[3], rtol=1e-12, atol=1e-12)


def saved_for_backward(loss_fn, image, text, scale, bias) -> list[torch.Size]:
    shapes = []

    def pack(tensor):
        shapes.append(tensor.shape)
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        loss_fn(image.requires_grad_(), text.requires_grad_(), torch.tensor(scale), torch.tensor(bias))
    return shapes


def test_siglip_keeps_no_logits_for_backward():
    image, text = (f.float() for f in features(batch=64))
    ours = saved_for_backward(SigLipLoss(init_logit_scale=0.0), image, text, 10.0, -10.0)
    assert max(shape.numel() for shape in ours) == 64 * DIM  # the features, no (b, b) logits
    # open_clip's SigLipLoss keeps the logits: the same check on it fails.
    theirs = saved_for_backward(open_clip.loss.SigLipLoss(), image.detach(), text.detach(), 10.0, -10.0)
    assert max(shape.numel() for shape in theirs) == 64 * 64


@pytest.mark.parametrize(("loss", "expected_class"), [("clip", ClipLoss), ("siglip", SigLipLoss)])
def test_loss_configs_build_the_losses(loss, expected_class):
    cfg = OmegaConf.load(config_dir() / "loss" / f"{loss}.yaml")
    loss_fn = instantiate(cfg)
    assert type(loss_fn) is expected_class
    assert loss_fn.init_logit_scale == cfg.init_logit_scale
    assert loss_fn.init_logit_bias == cfg.init_logit_bias
    assert loss_fn.max_logit_scale == cfg.max_logit_scale
    assert loss_fn.process_layout() == (0, 1)  # no torch.distributed: one process


@pytest.mark.parametrize("with_bias", [False, True], ids=["no-bias", "bias"])
@pytest.mark.parametrize("loss", ["clip", "siglip"])
def test_losses_need_no_arguments_like_open_clips(loss, with_bias):
    image, text = (f.float() for f in features())
    scale, bias = START[loss][0], START[loss][1] if with_bias else None
    ours = value_and_grads(OURS[loss](), image, text, scale, bias)
    theirs = value_and_grads(OPEN_CLIP[loss](), image, text, scale, bias)
    assert_all_close(ours, theirs)
    # Unset, the start values are the published ones (what open_clip's models start from).
    built = OURS[loss]()
    expected_scale, expected_bias = START[loss]
    assert built.init_logit_scale == pytest.approx(math.log(expected_scale))
    assert built.init_logit_bias == expected_bias
    assert built.max_logit_scale is None


def test_scale_above_its_clamp_is_refused():
    with pytest.raises(ClipkitError, match=r"init_logit_scale=5.0 exceeds max_logit_scale=4.6"):
        ClipLoss(init_logit_scale=5.0, max_logit_scale=4.6)


@pytest.mark.parametrize("loss", ["clip", "siglip"])
def test_world_size_without_torch_distributed_is_refused(loss):
    image, text = (f.float() for f in features(batch=4))
    loss_fn = OURS[loss](init_logit_scale=0.0, rank=0, world_size=2)
    with pytest.raises(
        ClipkitError, match=r"world_size=2\) needs torch.distributed: call .*init_process_group"
    ):
        loss_fn(image, text, torch.tensor(10.0), torch.tensor(-10.0))


def test_mismatched_features_are_refused():
    with pytest.raises(ValueError, match=r"\(batch, dim\), got \(4, 8\) and \(5, 8\)"):
        SigLipLoss(init_logit_scale=0.0)(torch.randn(4, 8), torch.randn(5, 8), 10.0, -10.0)


def test_readme_losses_example_runs():
    readme = (REPO_ROOT / "README.md").read_text()
    section = readme.split("## Losses", 1)[1].split("\n## ", 1)[0]
    blocks = re.findall(r"```python\n(.*?)```", section, re.S)
    assert blocks, "README's Losses section shows a Python example"
    namespace: dict = {}
    exec(compile(blocks[0], "README.md (Losses)", "exec"), namespace)
    assert torch.isfinite(namespace["loss"]) and namespace["loss"].ndim == 0
