"""Training runs: outputs, resume equality, atomic checkpoints, preemption, non-finite steps, bad data."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import open_clip
import pytest
import torch
from accelerate.state import AcceleratorState
from safetensors.torch import load_file

import clipkit.train.checkpoint as checkpoint_module
from clipkit.errors import ClipkitError
from clipkit.train import Trainer, run
from clipkit.train.checkpoint import list_checkpoints
from conftest import REPO_ROOT, subprocess_env
from test_configs import compose_config

# Small, fast runs: the tiny model on a small generated dataset, one process, no workers.
SMALL_DATA = (
    "data=synthetic",
    "data.generate.train_samples=256",
    "data.generate.test_samples=40",
    "data.generate.image_size=32",
    "data.batch_size=8",
    "data.workers=0",
    "data.shuffle_buffer=16",
)


@pytest.fixture(autouse=True)
def _fresh_accelerate_state():
    # Accelerate keeps its state in a process-wide singleton; each run here starts its own.
    AcceleratorState._reset_state(True)
    yield
    AcceleratorState._reset_state(True)


def small_config(output_dir: Path, *overrides: str):
    return compose_config(
        "model=tiny",
        *SMALL_DATA,
        f"output_dir={output_dir}",
        "train.steps=6",
        "train.log_every=1",
        "train.checkpoint_every=3",
        "optim.warmup_steps=2",
        "optim.lr=1e-3",
        *overrides,
    )


def final_weights(output_dir: Path) -> dict[str, torch.Tensor]:
    return load_file(str(output_dir / "model" / "open_clip_model.safetensors"))


def assert_same_weights(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor], atol: float) -> None:
    assert a.keys() == b.keys()
    worst = max((a[k].float() - b[k].float()).abs().max().item() for k in a)
    assert worst <= atol, f"max |diff| {worst:.3e} > {atol:.0e}"


def metrics(output_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (output_dir / "metrics.jsonl").read_text().splitlines()]


_ORIGINAL_STEP = Trainer.step


def record_batches(monkeypatch) -> list[list[str]]:
    """Wrap Trainer.step to record which samples each step saw (by their shard keys)."""
    seen: list[list[str]] = []

    def step(self, micro_batches):
        seen.append(list(self.stream.last_keys))
        return _ORIGINAL_STEP(self, micro_batches)

    monkeypatch.setattr(Trainer, "step", step)
    return seen


def test_run_writes_config_metrics_checkpoints_and_open_clip_model(tmp_path):
    out = tmp_path / "run"
    run(small_config(out))
    assert (out / "config.yaml").is_file()
    records = metrics(out)
    assert [r["step"] for r in records if "loss" in r] == [1, 2, 3, 4, 5, 6]
    assert all(k in records[0] for k in ("loss", "lr", "logit_scale", "samples_per_s", "bad_samples"))
    assert [p.name for p in list_checkpoints(out)] == ["step_00000003", "step_00000006"]
    # The final model loads in open_clip itself.
    model, _, _ = open_clip.create_model_and_transforms(f"local-dir:{out / 'model'}")
    assert_same_weights({k: v for k, v in model.state_dict().items()}, final_weights(out), atol=0)
    # The logit scale started at ln(1/0.07) (loss=clip) and moved.
    assert (
        records[0]["logit_scale"] != pytest.approx(1 / 0.07, abs=1e-6)
        or records[-1]["logit_scale"] != 1 / 0.07
    )


def test_stop_and_resume_gives_the_same_weights_and_data_order(tmp_path, monkeypatch):
    straight = tmp_path / "straight"
    seen_straight = record_batches(monkeypatch)
    run(small_config(straight))

    # Crash during step 5 (after the step-3 checkpoint), then resume.
    crashed = tmp_path / "crashed"
    seen_crashed = record_batches(monkeypatch)
    wrapped = Trainer.step

    def crash_on_fifth(self, micro_batches):
        if self.state.step == 4:
            raise RuntimeError("simulated crash")
        return wrapped(self, micro_batches)

    monkeypatch.setattr(Trainer, "step", crash_on_fifth)
    with pytest.raises(RuntimeError, match="simulated crash"):
        run(small_config(crashed))
    AcceleratorState._reset_state(True)
    seen_resumed = record_batches(monkeypatch)
    run(small_config(crashed, "train.resume=auto"))

    assert seen_crashed[:4] == seen_straight[:4]
    assert seen_resumed == seen_straight[3:]  # steps 4..6: the samples the crash had not trained on yet
    assert_same_weights(final_weights(crashed), final_weights(straight), atol=1e-6)
    assert [r["step"] for r in metrics(crashed) if "loss" in r] == [1, 2, 3, 4, 5, 6]


def test_a_crash_during_save_leaves_the_last_complete_checkpoint(tmp_path, monkeypatch):
    out = tmp_path / "run"
    original_save = checkpoint_module._write_json

    def die_while_saving_step_6(path, value):
        if path.name == "trainer_state.json" and value["run"]["step"] == 6:
            raise KeyboardInterrupt("killed mid-save")
        return original_save(path, value)

    monkeypatch.setattr(checkpoint_module, "_write_json", die_while_saving_step_6)
    with pytest.raises(KeyboardInterrupt):
        run(small_config(out))
    monkeypatch.setattr(checkpoint_module, "_write_json", original_save)
    assert [p.name for p in list_checkpoints(out)] == ["step_00000003"]  # the half-written one is not listed
    assert (out / "checkpoints" / ".tmp-step_00000006").is_dir()
    AcceleratorState._reset_state(True)
    run(small_config(out, "train.resume=auto"))
    assert [p.name for p in list_checkpoints(out)] == ["step_00000003", "step_00000006"]
    assert not (out / "checkpoints" / ".tmp-step_00000006").exists()


def test_nonfinite_loss_skips_the_step_and_too_many_abort(tmp_path, monkeypatch):
    from clipkit.losses import ClipLoss

    original = ClipLoss.forward
    calls = {"n": 0}

    def nan_on_calls_2_and_3(self, *args, **kwargs):
        calls["n"] += 1
        loss = original(self, *args, **kwargs)
        return loss * float("nan") if calls["n"] in (2, 3) else loss

    monkeypatch.setattr(ClipLoss, "forward", nan_on_calls_2_and_3)
    out = tmp_path / "skips"
    run(small_config(out))
    records = [r for r in metrics(out) if "loss" in r]
    assert [r["nonfinite_skips"] for r in records] == [0, 1, 2, 2, 2, 2]
    assert all(torch.isfinite(v).all() for v in final_weights(out).values())

    monkeypatch.setattr(ClipLoss, "forward", lambda self, *a, **k: original(self, *a, **k) * float("nan"))
    AcceleratorState._reset_state(True)
    with pytest.raises(ClipkitError, match=r"3 non-finite steps in a row up to step 3.*lower optim.lr"):
        run(small_config(tmp_path / "diverged", "train.max_nonfinite_steps=3"))


def test_unknown_config_key_and_choice_fail_before_training(tmp_path):
    def train(*overrides):
        return subprocess.run(
            [sys.executable, "-m", "clipkit.train", f"output_dir={tmp_path / 'x'}", *overrides],
            cwd=tmp_path,
            env=subprocess_env(),
            capture_output=True,
            text=True,
            timeout=300,
        )

    result = train("train.stpes=5")
    assert result.returncode != 0 and "Key 'stpes' not in 'TrainConfig'" in result.stderr  # the schema
    result = train("model=tinyy")
    assert result.returncode != 0
    assert "Could not find 'model/tinyy'" in result.stderr and "tiny" in result.stderr
    result = train("+data.batchsize=4")
    assert result.returncode == 2 and "unknown key(s) ['batchsize']" in result.stderr
    assert not (tmp_path / "x" / "checkpoints").exists()


@pytest.mark.slow
def test_sigterm_checkpoints_and_resume_matches_an_uninterrupted_run(tmp_path):
    args = [
        *SMALL_DATA,
        "train.steps=30",
        "train.log_every=1",
        "train.checkpoint_every=100",
        "optim.warmup_steps=2",
        "model=tiny",
    ]
    env = subprocess_env()

    def start(out: Path | None, *extra: str) -> subprocess.Popen:
        output_dir = [f"output_dir={out}"] if out is not None else []
        return subprocess.Popen(
            [sys.executable, "-m", "clipkit.train", *args, *output_dir, *extra],
            cwd=tmp_path,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )

    straight = tmp_path / "straight"
    assert start(straight).wait(timeout=600) == 0

    # No output_dir: the default one is derived from the settings, so the same command finds it again.
    process = start(None)
    runs_dir = tmp_path / "runs"
    deadline = time.time() + 300
    preempted = None
    while time.time() < deadline:
        found = list(runs_dir.glob("tiny-*/metrics.jsonl")) if runs_dir.is_dir() else []
        if found and len(metrics(found[0].parent)) >= 5:
            preempted = found[0].parent
            break
        time.sleep(0.05)
    assert preempted is not None
    process.send_signal(signal.SIGTERM)
    output, _ = process.communicate(timeout=300)
    assert process.returncode == 0, output[-2000:]
    stopped_at = metrics(preempted)[-1]["step"]
    assert 5 <= stopped_at < 30 and "stopped by SIGTERM" in output
    assert [p.name for p in list_checkpoints(preempted)] == [f"step_{stopped_at:08d}"]

    rerun = start(None)  # the same command; train.resume=auto is the default
    output, _ = rerun.communicate(timeout=600)
    assert rerun.returncode == 0, output[-2000:]
    assert f"resumed from {preempted.relative_to(tmp_path)}" in output
    assert_same_weights(final_weights(preempted), final_weights(straight), atol=1e-6)


@pytest.mark.slow
def test_two_processes_equal_one_process_of_the_same_global_batch(tmp_path):
    """2 processes x batch b and 1 process x batch 2b see the same samples per step and end equal."""
    env = subprocess_env()
    # The digits train split is one shard: with no sample shuffling, its samples are dealt to the readers
    # in turn, so both layouts build the same global batches (and pixels depend only on seed and key).
    common = [
        "model=tiny",
        "data=digits",
        "data.shuffle_buffer=0",
        "data.workers=0",
        "train.steps=5",
        "train.log_every=1",
        "optim.warmup_steps=1",
        "optim.lr=1e-4",
        "data.zeroshot_dataset=null",
        "data.val_shards=null",
    ]
    two = tmp_path / "two"
    launch = [
        sys.executable,
        "-m",
        "accelerate.commands.launch",
        "--config_file",
        str(REPO_ROOT / "conf" / "accelerate" / "cpu-2proc.yaml"),
        "-m",
        "clipkit.train",
    ]
    result = subprocess.run(
        [*launch, *common, "data.batch_size=4", f"output_dir={two}"],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    one = tmp_path / "one"
    result = subprocess.run(
        [sys.executable, "-m", "clipkit.train", *common, "data.batch_size=8", f"output_dir={one}"],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    losses_two = [r["loss"] for r in metrics(two) if "loss" in r]
    losses_one = [r["loss"] for r in metrics(one) if "loss" in r]
    assert losses_two == pytest.approx(losses_one, abs=1e-5)
    assert_same_weights(final_weights(two), final_weights(one), atol=1e-5)


def test_a_run_with_a_corrupt_shard_finishes_and_counts_what_it_skipped(tmp_path):
    from shard_helpers import png_bytes, write_samples, write_shards

    data = tmp_path / "data"
    write_shards(data, num_shards=2, per_shard=12, prefix="g")
    bad = [{"__key__": f"b{i:02d}", "png": png_bytes(i), "txt": f"caption {i}"} for i in range(6)]
    bad[0]["png"] = b"not an image"
    bad[1]["png"] = png_bytes(1)[:30]  # truncated image
    del bad[2]["txt"]
    write_samples(data / "bad.tar", bad)
    (data / "cut.tar").write_bytes((data / "g00000.tar").read_bytes()[:2500])  # a truncated tar
    out = tmp_path / "run"
    run(
        compose_config(
            "model=tiny",
            "data=shards",
            f"data.train_shards={data}",
            "data.val_shards=null",
            "data.zeroshot_dataset=null",
            "data.batch_size=8",
            "data.workers=0",
            "data.shuffle_buffer=0",
            "train.steps=8",
            "train.log_every=1",
            f"output_dir={out}",
        )
    )
    last = [r for r in metrics(out) if "loss" in r][-1]
    assert last["step"] == 8 and last["bad_samples"] >= 3  # 3 bad samples per pass over bad.tar
    assert (out / "model" / "open_clip_model.safetensors").is_file()


def test_lit_freezes_the_image_tower_and_grad_checkpointing_changes_nothing(tmp_path):
    from accelerate.utils import set_seed

    from clipkit.models import build_model

    plain, checkpointed, locked = tmp_path / "plain", tmp_path / "ckpt", tmp_path / "lit"
    run(small_config(plain, "train.steps=3", "data.zeroshot_dataset=null", "data.val_shards=null"))
    AcceleratorState._reset_state(True)
    run(
        small_config(
            checkpointed,
            "train.steps=3",
            "train.grad_checkpointing=true",
            "data.zeroshot_dataset=null",
            "data.val_shards=null",
        )
    )
    assert_same_weights(final_weights(checkpointed), final_weights(plain), atol=1e-6)

    AcceleratorState._reset_state(True)
    run(
        small_config(
            locked,
            "train.steps=3",
            "train.lock_image=true",
            "data.zeroshot_dataset=null",
            "data.val_shards=null",
        )
    )
    set_seed(0)  # the run's seed: the same initial weights
    initial = build_model("tiny", init_logit_scale=2.659260036932778).model.state_dict()
    trained = final_weights(locked)
    assert all(torch.equal(trained[k], initial[k]) for k in trained if k.startswith("visual."))
    assert not torch.equal(trained["text_projection"], initial["text_projection"])


@pytest.mark.parametrize("accum_steps", [1, 2])
def test_bf16_features_reach_the_loss_in_bf16_with_and_without_accumulation(
    tmp_path, monkeypatch, accum_steps
):
    # What the loss gets is what crosses its all-gather / ring exchange between processes: the towers' bf16
    # features (half the bytes), not float32 copies (Accelerate's prepare converts outputs to float32).
    from clipkit.losses.base import ContrastiveLoss

    received, forward = [], ContrastiveLoss.forward

    def recording_forward(self, image_features, text_features, *args, **kwargs):
        received.append((image_features.dtype, text_features.dtype))
        return forward(self, image_features, text_features, *args, **kwargs)

    monkeypatch.setattr(ContrastiveLoss, "forward", recording_forward)
    out = tmp_path / "flip"
    run(
        small_config(
            out,
            "train.steps=3",
            f"train.accum_steps={accum_steps}",
            "train.precision=bf16",
            "+model.vision_cfg.patch_dropout=0.5",
            "data.zeroshot_dataset=null",
            "data.val_shards=null",
        )
    )
    assert received and set(received) == {(torch.bfloat16, torch.bfloat16)}
    records = [r for r in metrics(out) if "loss" in r]
    assert len(records) == 3 and all(r["nonfinite_skips"] == 0 for r in records)
    assert all(0 < r["loss"] < 10 for r in records)  # ln(8) = 2.08 at the start
    assert records[-1]["samples"] == 3 * accum_steps * 8


def test_wandb_logger_writes_an_offline_run(tmp_path):
    out = tmp_path / "run"
    run(
        small_config(
            out, "logger=wandb", "train.steps=2", "data.zeroshot_dataset=null", "data.val_shards=null"
        )
    )
    runs = list((out / "wandb").glob("offline-run-*/run-*.wandb"))
    assert len(runs) == 1 and runs[0].stat().st_size > 0
    assert (out / "wandb_run_id.txt").read_text().strip() in runs[0].name
