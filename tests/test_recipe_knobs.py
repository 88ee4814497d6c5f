"""The small- and medium-batch knobs: SigLIP's bias from the global batch, CLIP's label smoothing, the
schedules (against open_clip_train's own scheduler functions) and batch-size lr scaling."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from omegaconf import OmegaConf
from open_clip_train import scheduler as open_clip_scheduler
from safetensors.torch import save_file

from clipkit.errors import ClipkitError
from clipkit.losses import ClipLoss, SigLipLoss, auto_init_logit_bias
from clipkit.models import build_model
from clipkit.train import Trainer, run
from clipkit.train.config import OptimConfig, TrainConfig
from clipkit.train.optim import build_optimizer, build_scheduler, lr_factor, resolve_optim_config
from test_configs import compose_config
from test_losses import assert_all_close, features, value_and_grads
from test_train import _fresh_accelerate_state, small_config  # noqa: F401 (the fixture resets Accelerate)


# -- label smoothing (2 processes vs 1: tests/test_losses_distributed.py) ---------------------------------------------------------------------------------
def reference_smoothed_clip_loss(image, text, scale, bias, *, eps):
    """CLIP's loss with label smoothing written out: each row's target is 1 - eps on its pair plus eps / N
    on every one of its N entries; mean over rows, both directions averaged."""
    logits = scale * image @ text.T + (0.0 if bias is None else bias)  # (N, N)
    n = len(image)
    target = (1 - eps) * torch.eye(n, dtype=logits.dtype) + eps / n  # (N, N)
    image_to_text = -(target * torch.log_softmax(logits, dim=1)).sum(dim=1).mean()
    text_to_image = -(target * torch.log_softmax(logits, dim=0)).sum(dim=0).mean()
    return (image_to_text + text_to_image) / 2


@pytest.mark.parametrize("eps", [0.0, 0.1, 0.5])
def test_label_smoothing_matches_a_float64_reference(eps):
    image, text = features()  # float64: the loss then computes in float64
    ours = value_and_grads(ClipLoss(label_smoothing=eps), image, text, 14.0, None)
    theirs = value_and_grads(
        lambda *args: reference_smoothed_clip_loss(*args, eps=eps), image, text, 14.0, None
    )
    assert_all_close(ours, theirs, rtol=1e-10)
    if eps:  # smoothing changes the loss
        plain = value_and_grads(ClipLoss(), image, text, 14.0, None)[0]
        assert abs(float(ours[0] - plain)) > 1e-3


def test_label_smoothing_matches_torch_cross_entropy_on_one_process():
    image, text = (f.float() for f in features())
    loss = ClipLoss(label_smoothing=0.1)(image, text, 20.0)
    logits = 20.0 * image @ text.T  # (N, N)
    labels = torch.arange(len(image))
    expected = (
        F.cross_entropy(logits, labels, label_smoothing=0.1)
        + F.cross_entropy(logits.T, labels, label_smoothing=0.1)
    ) / 2
    torch.testing.assert_close(loss, expected, rtol=1e-6, atol=0)


@pytest.mark.parametrize(
    ("build", "message"),
    [
        (lambda: SigLipLoss(label_smoothing=0.1), r"SigLipLoss: label_smoothing=0.1 is for the softmax loss"),
        (lambda: ClipLoss(label_smoothing=1.0), r"ClipLoss: label_smoothing=1.0 must be in \[0, 1\)"),
        (lambda: ClipLoss(label_smoothing=-0.1), r"label_smoothing=-0.1 must be in"),
        (lambda: ClipLoss(init_logit_bias="auto", global_batch=64), r"ClipLoss: init_logit_bias=auto is for"),
        (lambda: SigLipLoss(init_logit_bias="auto"), r"SigLipLoss: init_logit_bias=auto needs global_batch"),
        (
            lambda: SigLipLoss(init_logit_bias="big"),
            r"init_logit_bias='big' must be a number, null or 'auto'",
        ),
        (lambda: SigLipLoss(init_logit_bias="auto", global_batch=0), r"global_batch=0 must be at least 1"),
    ],
)
def test_bad_loss_settings_fail_in_one_line_naming_the_key(build, message):
    with pytest.raises(ClipkitError, match=message) as error:
        build()
    assert "\n" not in str(error.value)


# -- SigLIP's bias from the global batch ----------------------------------------------------------------
def test_auto_bias_is_minus_log_of_the_global_batch():
    assert SigLipLoss(init_logit_bias="auto", global_batch=64).init_logit_bias == pytest.approx(-math.log(64))
    assert auto_init_logit_bias(32768) == pytest.approx(-10.397, abs=1e-3)  # near the paper's -10 at 32k
    # With scale x cosine ~ 0 at the start, sigmoid(bias) is the share of positives in a row: 1 / N.
    assert torch.sigmoid(torch.tensor(auto_init_logit_bias(64))).item() == pytest.approx(1 / 65)


def test_trainer_resolves_auto_from_batch_processes_and_accumulation_and_records_it(tmp_path, caplog):
    out = tmp_path / "run"
    cfg = small_config(out, "loss=siglip", "loss.init_logit_bias=auto", "train.accum_steps=3")
    with caplog.at_level("INFO", logger="clipkit.train"):
        trainer = Trainer(cfg)
    try:
        assert "loss.init_logit_bias=auto: -3.17805 = -log(global batch 24 = data.batch_size x" in caplog.text
        expected = -math.log(8 * 1 * 3)  # data.batch_size 8 x 1 process x 3 micro-batches
        assert trainer.loss_fn.init_logit_bias == pytest.approx(expected)
        assert trainer.unwrapped.logit_bias.item() == pytest.approx(expected)
        assert OmegaConf.load(out / "config.yaml").loss.init_logit_bias == pytest.approx(expected)
        assert cfg.loss.init_logit_bias == "auto"  # the caller's config is left as it was
    finally:
        trainer.close()


def test_a_model_configs_own_bias_and_pretrained_weights_win_over_auto(tmp_path):
    auto = auto_init_logit_bias(64)
    own = compose_config("model=tiny", "+model.init_logit_bias=-2.5").model
    assert build_model(OmegaConf.to_container(own), init_logit_bias=auto).model.logit_bias.item() == -2.5
    trained = build_model("tiny", init_logit_scale=math.log(10), init_logit_bias=-3.25).model
    weights = tmp_path / "weights.safetensors"
    save_file({k: v.contiguous() for k, v in trained.state_dict().items()}, str(weights))
    loaded = build_model("tiny", pretrained=weights, init_logit_scale=math.log(10), init_logit_bias=auto)
    assert loaded.model.logit_bias.item() == -3.25


# -- schedules --------------------------------------------------------------------------------------------
def open_clip_lrs(schedule: str, *, base_lr, warmup, steps, cooldown=0, end_lr=0.0) -> list[float]:
    """open_clip_train's scheduler (the function its trainer calls before each step) at every step."""
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=base_lr)
    if schedule == "cosine":
        adjust = open_clip_scheduler.cosine_lr(optimizer, base_lr, warmup, steps)
    elif schedule == "constant":
        adjust = open_clip_scheduler.const_lr(optimizer, base_lr, warmup, steps)
    else:
        adjust = open_clip_scheduler.const_lr_cooldown(
            optimizer, base_lr, warmup, steps, cooldown, cooldown_power=1.0, cooldown_end_lr=end_lr
        )
    return [adjust(step) for step in range(steps)]


def clipkit_lrs(config: OptimConfig, steps: int) -> list[float]:
    """The lr of the optimizer's param group at each step of a run built as the trainer builds it."""
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=config.lr)
    scheduler = build_scheduler(optimizer, config, steps)
    lrs = []
    for _ in range(steps):
        lrs.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    return lrs


@pytest.mark.parametrize(
    ("schedule", "warmup", "steps", "cooldown_fraction"),
    [
        ("cosine", 10, 60, 0.2),
        ("cosine", 0, 30, 0.2),
        ("constant", 7, 30, 0.2),
        ("constant_cooldown", 10, 60, 0.2),
        ("constant_cooldown", 0, 40, 0.5),
        ("constant_cooldown", 5, 40, 1.0),  # the cooldown starts at step 0, warmup wins over it
    ],
)
def test_schedules_follow_open_clips_formulas_at_every_step(schedule, warmup, steps, cooldown_fraction):
    config = OptimConfig(lr=2e-3, warmup_steps=warmup, schedule=schedule, cooldown_fraction=cooldown_fraction)
    expected = open_clip_lrs(
        schedule, base_lr=2e-3, warmup=warmup, steps=steps, cooldown=round(cooldown_fraction * steps)
    )
    assert clipkit_lrs(config, steps) == pytest.approx(expected, rel=1e-12, abs=1e-15)


@pytest.mark.parametrize("schedule", ["cosine", "constant_cooldown"])
def test_min_lr_ratio_is_open_clips_end_lr(schedule):
    steps, ratio = 50, 0.1
    config = OptimConfig(
        lr=1e-3, warmup_steps=5, schedule=schedule, min_lr_ratio=ratio, cooldown_fraction=0.4
    )
    ours = clipkit_lrs(config, steps)
    if schedule == "constant_cooldown":  # open_clip's cooldown_end_lr
        expected = open_clip_lrs(
            schedule, base_lr=1e-3, warmup=5, steps=steps, cooldown=20, end_lr=ratio * 1e-3
        )
    else:  # open_clip's cosine decays to 0: the same curve lifted to ratio x lr
        zero_end = open_clip_lrs(schedule, base_lr=1e-3, warmup=5, steps=steps)
        expected = [lr if step < 5 else ratio * 1e-3 + (1 - ratio) * lr for step, lr in enumerate(zero_end)]
    assert ours == pytest.approx(expected, rel=1e-12)
    assert min(ours[5:]) >= ratio * 1e-3 * (1 - 1e-12)


def test_schedule_edge_cases():
    # No cooldown: constant_cooldown is constant.
    no_cooldown = OptimConfig(lr=1.0, warmup_steps=3, schedule="constant_cooldown", cooldown_fraction=0.0)
    assert clipkit_lrs(no_cooldown, 20) == clipkit_lrs(
        OptimConfig(lr=1.0, warmup_steps=3, schedule="constant"), 20
    )
    # Fewer steps than warmup: the run is all warmup, still rising at its last step.
    for schedule in ("cosine", "constant", "constant_cooldown"):
        lrs = clipkit_lrs(OptimConfig(lr=1.0, warmup_steps=10, schedule=schedule), 4)
        assert lrs == pytest.approx([0.1, 0.2, 0.3, 0.4])
    # Past the last step the rate stays at its end value (open_clip's formulas would divide by zero or turn up).
    common = {"warmup_steps": 2, "total_steps": 10, "min_lr_ratio": 0.25}
    assert lr_factor(15, schedule="cosine", **common) == pytest.approx(0.25)
    assert lr_factor(15, schedule="constant_cooldown", cooldown_steps=4, **common) == pytest.approx(0.25)
    assert lr_factor(15, schedule="constant_cooldown", cooldown_steps=0, **common) == 1.0
    assert (
        lr_factor(10, warmup_steps=10, total_steps=10, schedule="cosine") == 1.0
    )  # all warmup, no decay left


def test_warmup_fraction_wins_over_warmup_steps_and_is_resolved():
    config = OptimConfig(lr=1.0, warmup_steps=100, warmup_fraction=0.1, schedule="constant")
    resolved = resolve_optim_config(config, global_batch=64, total_steps=55)
    assert (resolved.warmup_steps, resolved.warmup_fraction) == (round(5.5), None)  # 6: round half to even
    assert clipkit_lrs(config, 55) == clipkit_lrs(resolved, 55)
    assert clipkit_lrs(config, 55)[:7] == pytest.approx([1 / 6, 2 / 6, 3 / 6, 4 / 6, 5 / 6, 1.0, 1.0])


@pytest.mark.parametrize(
    ("key", "value"),
    [
        ("schedule", "linear"),
        ("min_lr_ratio", 1.5),
        ("min_lr_ratio", -0.1),
        ("cooldown_fraction", 2.0),
        ("warmup_fraction", 1.5),
        ("warmup_steps", -1),
        ("lr_scaling", "square"),
        ("lr_base_batch", 0),
    ],
)
def test_bad_optim_values_fail_in_one_line_naming_the_key(key, value):
    with pytest.raises(ClipkitError, match=rf"optim\.{key}=") as error:
        OptimConfig(**{key: value})
    assert "\n" not in str(error.value)


# -- lr scaling with the global batch ---------------------------------------------------------------------
@pytest.mark.parametrize(("rule", "factor"), [("none", 1.0), ("linear", 64 / 256), ("sqrt", 0.5)])
def test_lr_scaling_sets_every_groups_lr(rule, factor, caplog):
    config = OptimConfig(lr=1e-3, image_lr=4e-4, lr_scaling=rule, fused=False)
    with caplog.at_level("INFO", logger="clipkit.train.optim"):
        resolved = resolve_optim_config(config, global_batch=64, total_steps=10)
    model = build_model("tiny").model
    by_lr = sorted({group["lr"] for group in build_optimizer(model, resolved).param_groups})
    assert by_lr == pytest.approx([4e-4 * factor, 1e-3 * factor])  # base (text, logit parameters) and image
    if rule == "linear":
        assert "optim.lr 0.001 scaled linear for global batch 64 / 256 -> 0.00025" in caplog.text
    assert (rule == "none") == ("scaled" not in caplog.text)


def test_trainer_scales_the_lr_for_its_global_batch(tmp_path):
    cfg = small_config(
        tmp_path / "run", "optim.lr_scaling=linear", "optim.lr_base_batch=4", "train.accum_steps=2"
    )
    trainer = Trainer(cfg)
    try:  # 1e-3 x (8 per batch x 2 micro-batches) / 4
        initial = [
            group["initial_lr"] for group in trainer.optimizer.param_groups
        ]  # before the warmup factor
        assert initial == pytest.approx([4e-3] * len(initial))
    finally:
        trainer.close()


# -- patch dropout with unmasked tuning (FLIP) ------------------------------------------------------------
def test_unmasked_tuning_trains_the_last_steps_on_whole_images(tmp_path):
    from test_train import assert_same_weights, final_weights, metrics

    def train(name: str, *overrides: str) -> tuple[list[float], dict[str, torch.Tensor]]:
        out = tmp_path / name
        run(small_config(out, "data.zeroshot_dataset=null", "data.val_shards=null", *overrides))
        return [r["loss"] for r in metrics(out) if "loss" in r], final_weights(out)

    masked = ("+model.vision_cfg.patch_dropout=0.5",)
    whole_losses, whole = train("whole")  # no patch dropout at all
    unmasked_losses, unmasked = train("unmasked", *masked, "train.unmasked_fraction=1.0")
    dropout_losses, _ = train("dropout", *masked)
    half_losses, _ = train("half", *masked, "train.unmasked_fraction=0.5")
    # Unmasked from the first step is training without patch dropout, bit for bit.
    assert unmasked_losses == whole_losses
    assert_same_weights(unmasked, whole, atol=0.0)
    # Half unmasked: the first 3 of the 6 steps are the patch-dropout run's, the last 3 are not.
    assert dropout_losses != whole_losses
    assert half_losses[:3] == dropout_losses[:3]
    assert all(a != b for a, b in zip(half_losses[3:], dropout_losses[3:], strict=True))


def test_unmasked_fraction_out_of_range_fails_naming_the_key():
    with pytest.raises(ClipkitError, match=r"train.unmasked_fraction=1.5 must be in \[0, 1\]"):
        TrainConfig(unmasked_fraction=1.5)


def test_unmasked_fraction_without_patch_dropout_fails_naming_both_keys(tmp_path):
    with pytest.raises(
        ClipkitError, match=r"train.unmasked_fraction=0.2 .* \+\+model.vision_cfg.patch_dropout"
    ):
        run(small_config(tmp_path / "run", "train.unmasked_fraction=0.2"))
