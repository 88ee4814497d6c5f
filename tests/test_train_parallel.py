"""The parallelism plan, in one process: chosen from the config and the launch environment handed in (no
process-wide state), the order of the changes to forward, fp16 refused under FSDP, train.precision=auto.
The 2-process DDP / FSDP2 matrix is test_train_matrix.py."""

from __future__ import annotations

import os

import pytest
import torch
from accelerate.state import AcceleratorState
from omegaconf import OmegaConf

from clipkit.errors import ClipkitError
from clipkit.models import build_model
from clipkit.train import Trainer, run
from clipkit.train.loop import resolve_precision
from clipkit.train.parallel import DDPPlan, FSDPPlan, _install_forward, build_plan
from test_configs import compose_config

FSDP_LAUNCH = {"ACCELERATE_USE_FSDP": "true", "FSDP_VERSION": "2", "FSDP_RESHARD_AFTER_FORWARD": "false"}
SMALL = (
    "model=tiny",
    "data=synthetic",
    "data.generate.train_samples=256",
    "data.generate.test_samples=40",
    "data.generate.image_size=32",
    "data.batch_size=8",
    "data.workers=0",
    "data.zeroshot_dataset=null",
    "data.val_shards=null",
    "train.steps=1",
)


@pytest.fixture(autouse=True)
def _fresh_accelerate_state():
    AcceleratorState._reset_state(True)
    yield
    AcceleratorState._reset_state(True)


def test_the_plan_follows_the_config_and_the_launch_environment_handed_in():
    assert isinstance(build_plan("auto", "fp32", {}), DDPPlan)
    plan = build_plan("auto", "bf16", FSDP_LAUNCH)
    assert isinstance(plan, FSDPPlan) and plan.name == "FSDP2 SHARD_GRAD_OP"
    assert build_plan("full", "fp32", {}).name == "FSDP2 FULL_SHARD"
    assert isinstance(build_plan("none", "fp32", FSDP_LAUNCH), DDPPlan)


@pytest.mark.parametrize(("sharding", "launch"), [("full", {}), ("auto", FSDP_LAUNCH)])
def test_fp16_under_fsdp_is_refused_at_start_in_one_line(tmp_path, sharding, launch):
    cfg = compose_config(
        *SMALL, "train.precision=fp16", f"train.sharding={sharding}", f"output_dir={tmp_path / 'r'}"
    )
    with pytest.raises(ClipkitError) as refused:
        run(cfg, launch_env=launch)
    message = str(refused.value)
    assert "train.precision=fp16" in message and "train.precision=bf16" in message and "\n" not in message
    assert not (tmp_path / "r").exists()  # refused before anything was written


def test_two_trainers_in_one_process_each_get_what_their_config_says(tmp_path):
    """One after another (Accelerate's settings are per process): the first Trainer's precision leaves
    nothing behind that the second one inherits, and neither writes the process environment."""
    environ = dict(os.environ)
    got = []
    for precision in ("bf16", "fp32"):
        cfg = compose_config(*SMALL, f"train.precision={precision}", f"output_dir={tmp_path / precision}")
        trainer = Trainer(cfg, launch_env={})
        images, tokens = trainer.to_device(*next(iter(trainer.stream)))  # as a step gets them
        features = trainer.model(images[:2], tokens[:2])[0]
        got.append((trainer.plan.name, trainer.accelerator.mixed_precision, features.dtype))
        trainer.close(keep_process_group=True)
    assert got == [("DDP", "bf16", torch.bfloat16), ("DDP", "no", torch.float32)]
    assert dict(os.environ) == environ


def test_forward_changes_compose_in_one_order_autocast_then_copies_of_returned_parameters():
    """The bf16 SigLIP crash under FSDP: autocast was installed after the copy of the returned logit_bias and
    rebuilt forward from the class, dropping the copy, so the loss read a parameter FSDP had freed. Here
    both changes must hold at once, whichever is asked."""
    model = build_model("tiny", init_logit_scale=2.3, init_logit_bias=-10.0).model
    images, tokens = torch.rand(2, 3, 32, 32), torch.randint(0, 100, (2, 16))  # tiny: 32 px, 16 tokens
    _install_forward(
        model, autocast=torch.autocast("cpu", dtype=torch.bfloat16), copy_returned_parameters=True
    )
    image_features, text_features, logit_scale, logit_bias = model(images, tokens)
    assert image_features.dtype == text_features.dtype == torch.bfloat16  # autocast, outputs not upcast
    assert not isinstance(logit_bias, torch.nn.Parameter) and logit_bias.item() == -10.0  # a copy
    logit_bias.backward()
    assert model.logit_bias.grad.item() == 1.0  # gradients reach the parameter through the copy
    # Installing again starts from the class's forward: no wrapper stacks on a previous one.
    _install_forward(model, autocast=None, copy_returned_parameters=False)
    assert model(images, tokens)[3] is model.logit_bias
    assert model(images, tokens)[0].dtype == torch.float32


def test_precision_auto_is_fp32_on_a_cpu_and_written_to_config_yaml(tmp_path, caplog):
    assert resolve_precision("bf16") == "bf16"
    assert resolve_precision("auto") == (
        "bf16" if torch.cuda.is_available() and torch.cuda.is_bf16_supported() else "fp32"
    )
    cfg = compose_config(*SMALL, f"output_dir={tmp_path / 'r'}")
    assert cfg.train.precision == "auto"  # the default
    with caplog.at_level("INFO", logger="clipkit.train"):
        trainer = Trainer(cfg, launch_env={})
        trainer.close()
    chosen = resolve_precision("auto")
    assert cfg.train.precision == "auto"  # the caller's config is left as it was
    assert OmegaConf.load(tmp_path / "r" / "config.yaml").train.precision == chosen
    assert [r.getMessage() for r in caplog.records if "precision=auto" in r.getMessage()] == [
        f"train.precision=auto: {chosen} on this machine (set train.precision to choose)"
    ]
