"""Multi-process training on CPU (gloo): FSDP2 against DDP (EMA and WiSE-FT included), accumulation,
per-process randomness, exact resume across process counts, and the launch configs clipkit refuses.

The 2-process runs are slow on a small machine, so runs are shared between assertions (module fixtures)
and kept to the tiny model, a few steps, no data workers.
"""

from __future__ import annotations

import json
import subprocess
import sys
import warnings
from pathlib import Path

import open_clip
import pytest
import torch
from accelerate.state import AcceleratorState
from safetensors.torch import load_file

from clipkit.errors import ClipkitError
from clipkit.train import run
from clipkit.train.parallel import Sharding, resolve_sharding
from conftest import REPO_ROOT, run_clipkit, subprocess_env
from test_configs import compose_config

ACCELERATE = REPO_ROOT / "conf" / "accelerate"
COMMON = (
    "model=tiny",
    "data=synthetic",
    # Three shards: each process reads whole shards, so its samples, in order, do not depend on the batch
    # size (with fewer shards than processes the stream deals out blocks of batch_size samples instead).
    "data.generate.train_samples=2560",
    "data.generate.test_samples=40",
    "data.generate.image_size=32",
    "data.workers=0",
    "data.shuffle_buffer=16",
    "train.log_every=1",
    "train.checkpoint_every=3",
    "optim.warmup_steps=2",
    "optim.lr=1e-3",
    # lr does not depend on train.steps, so a run stopped at step 3 and continued to 6 follows the same path
    "optim.schedule=constant",
)
# The setting: accumulation over 2 micro-batches, half the patches dropped.
ACCUM_PD = ("data.batch_size=8", "train.accum_steps=2", "+model.vision_cfg.patch_dropout=0.5")
NO_EVAL = ("data.zeroshot_dataset=null", "data.val_shards=null")
# Fine-tuning features every FSDP-vs-DDP run carries: an EMA (low decay, so 6 steps move it well away from
# both the start and the last weights) and, on CLIP, WiSE-FT.
EMA = ("train.ema_decay=0.7",)
WISE_FT = ("train.wise_ft_alpha=0.5",)


def clip_run(steps: int) -> tuple[str, ...]:
    """The settings of the CLIP runs below (FSDP2 and DDP), up to `steps`."""
    return ("loss=clip", f"train.steps={steps}", *ACCUM_PD, *EMA, *WISE_FT)


def train(
    out: Path,
    *overrides: str,
    processes: str | None = "cpu-2proc",
    num_processes: int | None = None,
    cwd: Path | None = None,
) -> str:
    """Run `[accelerate launch --config_file conf/accelerate/PROCESSES.yaml [--num_processes N]] -m
    clipkit.train` to the end."""
    launch = [sys.executable, "-m", "clipkit.train"]
    if processes is not None:
        config = ACCELERATE / f"{processes}.yaml"
        count = [] if num_processes is None else ["--num_processes", str(num_processes)]
        launch = [
            sys.executable,
            "-m",
            "accelerate.commands.launch",
            "--config_file",
            str(config),
            *count,
            "-m",
            "clipkit.train",
        ]
    result = subprocess.run(
        [*launch, *COMMON, *overrides, f"output_dir={out}"],
        cwd=cwd or out.parent,
        env=subprocess_env(),
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-4000:]
    return result.stdout + result.stderr


def weights(out: Path, model_dir: str = "model") -> dict[str, torch.Tensor]:
    return load_file(str(out / model_dir / "open_clip_model.safetensors"))


def max_diff(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    assert a.keys() == b.keys()
    return max((a[k].float() - b[k].float()).abs().max().item() for k in a)


def records(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def eval_metrics(out: Path) -> dict[str, float]:
    """The final evaluations (with an EMA: raw/*, the EMA's, wise_ft/*), merged."""
    evals = [r for r in records(out) if any("/" in k for k in r)]
    return {k: v for r in evals if r["step"] == evals[-1]["step"] for k, v in r.items() if "/" in k}


def saved_state(checkpoint: Path) -> dict[str, torch.Tensor]:
    """Everything a checkpoint holds that must come back exactly, as whole tensors: under FSDP the
    torch.distributed.checkpoint directory (model.*, optimizer.*, ema.*) read in this one process, under
    DDP Accelerate's model and optimizer files and the EMA file."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata

    from clipkit.models.sharded import SafeFileSystemReader

    state: dict[str, torch.Tensor] = {}
    if (checkpoint / "sharded").is_dir():
        reader = SafeFileSystemReader(str(checkpoint / "sharded"))
        for name, meta in reader.read_metadata().state_dict_metadata.items():
            if isinstance(meta, TensorStorageMetadata):
                state[name] = torch.empty(meta.size, dtype=meta.properties.dtype)
        with warnings.catch_warnings():  # "assuming the intent is to load in a single process": it is
            warnings.filterwarnings("ignore", message="torch.distributed is disabled")
            dcp.load(state, storage_reader=reader, no_dist=True)
    else:
        state.update({f"model.{k}": v for k, v in load_file(str(checkpoint / "model.safetensors")).items()})
        state.update({f"ema.{k}": v for k, v in load_file(str(checkpoint / "ema.safetensors")).items()})
        optimizer = torch.load(checkpoint / "optimizer.bin", weights_only=True)
        for index, values in optimizer["state"].items():
            state.update({f"optimizer.{index}.{k}": torch.as_tensor(v) for k, v in values.items()})
    return state


def assert_same_state(resaved: Path, saved: Path) -> None:
    """`resaved` (the checkpoint a resumed run wrote before its first step) holds exactly `saved`."""
    mine, theirs = saved_state(resaved), saved_state(saved)
    assert mine.keys() == theirs.keys()
    assert any(k.startswith("ema.") for k in mine) and any(k.endswith("exp_avg_sq") for k in mine)
    for key in mine:
        assert torch.equal(mine[key], theirs[key]), key
    scheduler = [torch.load(c / "scheduler.bin", weights_only=True) for c in (resaved, saved)]
    assert scheduler[0] == scheduler[1] and scheduler[0]["last_epoch"] == 3


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict[str, Path]:
    """FSDP2 (launched with cpu-fsdp.yaml) and DDP, 2 processes each, CLIP, 6 steps, same data and seed,
    with an EMA and WiSE-FT; the checkpoints the resume tests below start from. (SigLIP, SHARD_GRAD_OP,
    bf16, clipping, gradient checkpointing and evaluation during training: test_train_matrix.py.)"""
    root = tmp_path_factory.mktemp("fsdp_vs_ddp")
    outs = {}
    for name, processes in (("fsdp", "cpu-fsdp"), ("ddp", "cpu-2proc")):
        out = root / f"{name}-clip"
        log = train(out, *clip_run(6), processes=processes)
        if name == "fsdp":
            assert "FSDP2 FULL_SHARD over 8 transformer blocks" in log
        outs[f"{name}-clip"] = out
    return outs


@pytest.mark.slow
def test_fsdp_trains_the_same_weights_and_metrics_as_ddp(runs):
    fsdp, ddp = runs["fsdp-clip"], runs["ddp-clip"]
    assert (fsdp / "checkpoints" / "step_00000006" / "sharded" / ".metadata").is_file()  # it did shard
    # model/ is the EMA (sharded like the parameters under FSDP), model-raw/ the optimizer's last weights.
    for model_dir in ("model", "model-raw", "model-wise-ft"):
        assert max_diff(weights(fsdp, model_dir), weights(ddp, model_dir)) <= 1e-5, model_dir
    assert max_diff(weights(fsdp), weights(fsdp, "model-raw")) > 1e-3  # the EMA is not the last weights
    losses = [r["loss"] for r in records(fsdp) if "loss" in r]
    assert losses == pytest.approx([r["loss"] for r in records(ddp) if "loss" in r], abs=1e-5)
    assert len(losses) == 6
    # The gradient norm is the global one, not a shard's.
    norms = [r["grad_norm"] for r in records(fsdp) if "loss" in r]
    assert norms == pytest.approx([r["grad_norm"] for r in records(ddp) if "loss" in r], rel=1e-4)
    fsdp_evals = [r for r in records(fsdp) if "zeroshot/acc1" in r]
    assert [r["step"] for r in fsdp_evals] == [6]
    fsdp_metrics, ddp_metrics = eval_metrics(fsdp), eval_metrics(ddp)
    assert "zeroshot/acc1" in fsdp_metrics and "retrieval/text_retrieval_recall@1" in fsdp_metrics
    assert "raw/zeroshot/acc1" in fsdp_metrics
    assert "wise_ft/zeroshot/acc1" in fsdp_metrics
    assert fsdp_metrics == pytest.approx(ddp_metrics, abs=1e-6)
    # The export loads in open_clip and holds the trained weights.
    model, _, _ = open_clip.create_model_and_transforms(f"local-dir:{fsdp / 'model'}")
    exported = weights(fsdp)
    for name, tensor in model.state_dict().items():
        assert torch.equal(tensor, exported[name]), name


@pytest.mark.slow
def test_clipkit_export_reads_a_sharded_checkpoint(runs, tmp_path):
    fsdp = runs["fsdp-clip"]
    result = run_clipkit("export", str(fsdp / "checkpoints" / "step_00000006"), "--out", str(tmp_path / "x"))
    assert result.returncode == 0, result.stderr[-2000:]
    exported = load_file(str(tmp_path / "x" / "open_clip_model.safetensors"))
    assert max_diff(weights(fsdp, "model-raw"), exported) == 0.0  # the trained weights, not the EMA
    assert "add --ema for the EMA" in result.stdout
    open_clip.create_model_and_transforms(f"local-dir:{tmp_path / 'x'}")
    # --ema: the EMA's shards, gathered: what the run exported as its final model/.
    result = run_clipkit(
        "export", str(fsdp / "checkpoints" / "step_00000006"), "--ema", "--out", str(tmp_path / "e")
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert (
        max_diff(weights(fsdp, "model"), load_file(str(tmp_path / "e" / "open_clip_model.safetensors")))
        == 0.0
    )


@pytest.mark.slow
def test_fsdp_stop_and_resume_equals_the_uninterrupted_run(runs, tmp_path):
    out = tmp_path / "resumed"
    train(out, *clip_run(3), *NO_EVAL, processes="cpu-fsdp")
    log = train(out, *clip_run(6), processes="cpu-fsdp")
    assert "resumed from" in log and "step_00000003" in log
    for model_dir in ("model", "model-raw"):  # the EMA came back from the sharded checkpoint too
        assert max_diff(weights(out, model_dir), weights(runs["fsdp-clip"], model_dir)) <= 1e-6, model_dir


@pytest.mark.slow
def test_accumulation_with_patch_dropout_equals_one_batch_of_twice_the_size(runs, tmp_path):
    """2-process DDP: 2 micro-batches of 8 (GradCache replay of the masks) == one batch of 16."""
    out = tmp_path / "big"
    train(out, "loss=clip", "train.steps=6", "data.batch_size=16", "+model.vision_cfg.patch_dropout=0.5")
    accumulated = [r["loss"] for r in records(runs["ddp-clip"]) if "loss" in r]
    assert [r["loss"] for r in records(out) if "loss" in r] == pytest.approx(accumulated, abs=1e-6)
    # Summation order differs (two matmuls of 8 vs one of 16); AdamW at lr 1e-3 divides tiny gradients by
    # their own size, so the weights carry ~1e-5 of that. Other masks than the first pass's give ~1e-2.
    assert max_diff(weights(out), weights(runs["ddp-clip"], "model-raw")) <= 5e-5


@pytest.mark.slow
def test_processes_draw_different_patch_dropout_masks(tmp_path):
    out = tmp_path / "masks.json"
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "accelerate.commands.launch",
            "--config_file",
            str(ACCELERATE / "cpu-2proc.yaml"),
            str(REPO_ROOT / "tests" / "draw_patch_dropout_masks.py"),
            str(out),
            *COMMON,
            *ACCUM_PD,
            f"output_dir={tmp_path / 'run'}",
        ],
        cwd=tmp_path,
        env=subprocess_env(),
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    rank0, rank1 = json.loads(out.read_text())
    assert len(rank0[0]) == 1 + 32  # the class token and half of the 64 patches
    assert rank0 != rank1


def assert_ema_took_one_step(out: Path, saved: dict[str, torch.Tensor]) -> None:
    """`out` ran one step after resuming `saved`: its model/ is 0.7 x the saved EMA + 0.3 x model-raw/."""
    raw, ema = weights(out, "model-raw"), weights(out)
    for name, value in raw.items():
        expected = 0.7 * saved["ema." + name].reshape(value.shape) + 0.3 * value
        assert torch.allclose(ema[name], expected, atol=1e-6, rtol=0), name


@pytest.mark.slow
def test_fsdp_checkpoint_resumes_exactly_on_one_process_and_back_on_two(runs, tmp_path):
    """2 -> 1 -> 2 processes under FSDP2: each resume at step 3 writes back exactly the state the
    2-process run saved (model, AdamW moments, EMA, scheduler), then a 1-process run trains on."""
    source = runs["fsdp-clip"] / "checkpoints" / "step_00000003"
    one = tmp_path / "one"
    # train.steps=3: the resumed run takes no step, so its checkpoint and exports are what it restored.
    train(one, *clip_run(3), f"train.resume={source}", *NO_EVAL, processes="cpu-fsdp", num_processes=1)
    assert_same_state(one / "checkpoints" / "step_00000003", source)
    saved = saved_state(source)
    for model_dir, prefix in (("model-raw", "model."), ("model", "ema.")):
        for name, value in weights(one, model_dir).items():  # the logit scale: 0-d here, (1,) sharded
            assert torch.equal(value.flatten(), saved[prefix + name].flatten()), (model_dir, name)

    two = tmp_path / "two"
    resume = one / "checkpoints" / "step_00000003"
    train(two, *clip_run(3), f"train.resume={resume}", *NO_EVAL, processes="cpu-fsdp")
    assert_same_state(two / "checkpoints" / "step_00000003", source)

    # One more step on one process, SHARD_GRAD_OP: the restored EMA is updated with the new weights.
    log = train(one, *clip_run(4), "train.sharding=grad_op", *NO_EVAL, processes="cpu-fsdp", num_processes=1)
    assert "FSDP2 SHARD_GRAD_OP" in log and "resumed from" in log
    assert [r["step"] for r in records(one) if "loss" in r] == [4]
    assert_ema_took_one_step(one, saved)


@pytest.mark.slow
def test_ddp_checkpoint_resumes_exactly_on_one_process_and_trains_on_two(runs, tmp_path):
    """2 -> 1 -> 2 processes under DDP: the resume on one process writes back exactly the state the
    2-process run saved; two processes train on from that 1-process checkpoint, each with the saved EMA."""
    source = runs["ddp-clip"] / "checkpoints" / "step_00000003"
    one = tmp_path / "one"
    train(one, *clip_run(3), f"train.resume={source}", *NO_EVAL, processes=None)
    assert_same_state(one / "checkpoints" / "step_00000003", source)
    log = train(one, *clip_run(4), *NO_EVAL)
    assert "resumed from" in log and "restarts at the beginning of epoch" in log
    assert [r["step"] for r in records(one) if "loss" in r] == [4]
    assert_ema_took_one_step(one, saved_state(source))


def test_deepspeed_is_refused_at_start_pointing_to_shard_grad_op(tmp_path, monkeypatch):
    monkeypatch.setenv("ACCELERATE_USE_DEEPSPEED", "true")
    AcceleratorState._reset_state(True)
    with pytest.raises(ClipkitError, match="fsdp-shard-grad-op.yaml"):
        run(compose_config(*COMMON, "train.steps=1", f"output_dir={tmp_path / 'run'}"))
    assert not (tmp_path / "run").exists()
    assert not (ACCELERATE / "deepspeed-zero2.yaml").exists()


def test_sharding_follows_the_launch_config_and_refuses_fsdp1():
    fsdp = {"ACCELERATE_USE_FSDP": "true", "FSDP_VERSION": "2"}
    assert resolve_sharding("auto", {}) is None
    assert resolve_sharding("auto", {**fsdp, "FSDP_RESHARD_AFTER_FORWARD": "true"}) == Sharding(True)
    assert resolve_sharding("auto", {**fsdp, "FSDP_RESHARD_AFTER_FORWARD": "false"}) == Sharding(False)
    assert resolve_sharding("grad_op", {}) == Sharding(False)
    assert resolve_sharding("none", fsdp) is None
    with pytest.raises(ClipkitError, match="fsdp_version: 2"):
        resolve_sharding("auto", {**fsdp, "FSDP_VERSION": "1"})
    with pytest.raises(ClipkitError, match="train.sharding"):
        resolve_sharding("zero3", {})


@pytest.mark.parametrize("name", ["fsdp", "fsdp-shard-grad-op", "cpu-fsdp"])
def test_shipped_fsdp_configs_are_fsdp2(name):
    import yaml

    config = yaml.safe_load((ACCELERATE / f"{name}.yaml").read_text())
    assert config["distributed_type"] == "FSDP" and config["fsdp_config"]["fsdp_version"] == 2
    assert config["fsdp_config"]["fsdp_reshard_after_forward"] is (name != "fsdp-shard-grad-op")


def test_slurm_script_stops_training_on_the_warning_signal_and_requeues(tmp_path):
    """scripts/slurm_train.sh with stand-ins for srun and scontrol: USR1 (Slurm's warning before the time
    limit) reaches training as SIGTERM, and the job is requeued after training exits."""
    import os
    import signal
    import time

    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    calls, stopped = tmp_path / "scontrol.log", tmp_path / "stopped"
    (bin_dir / "srun").write_text(
        f"#!/usr/bin/env bash\ntrap 'echo \"$*\" > {stopped}; exit 0' TERM\nwhile true; do sleep 0.1; done\n"
    )
    (bin_dir / "scontrol").write_text(
        f'#!/usr/bin/env bash\necho "$@" >> {calls}\n[ "$1" = show ] && echo node1\nexit 0\n'
    )
    for stub in bin_dir.iterdir():
        stub.chmod(0o755)
    env = {**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}", "SLURM_JOB_ID": "42"}
    env.update(SLURM_JOB_NODELIST="node1", SLURM_NNODES="1", GPUS_PER_NODE="1")
    script = subprocess.Popen(
        ["bash", str(REPO_ROOT / "scripts" / "slurm_train.sh"), "experiment=quickstart"],
        cwd=REPO_ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    time.sleep(1.0)
    script.send_signal(signal.SIGUSR1)
    output, _ = script.communicate(timeout=60)
    assert script.returncode == 0, output
    assert "-m clipkit.train experiment=quickstart" in stopped.read_text()  # training got SIGTERM
    assert calls.read_text().splitlines()[-1] == "requeue 42"


def test_default_output_dir_is_the_same_for_the_same_command():
    from clipkit.train.loop import default_output_dir

    first = default_output_dir(compose_config("model=tiny", "train.steps=5"))
    assert first == default_output_dir(compose_config("model=tiny", "train.steps=5"))
    assert first == default_output_dir(compose_config("model=tiny", "train.steps=5", "train.resume=none"))
    assert first != default_output_dir(compose_config("model=tiny", "train.steps=6"))
    assert first.parent == Path("runs") and first.name.startswith("tiny-")


def test_a_sharded_checkpoint_index_that_would_run_code_is_refused(tmp_path):
    import pickle

    from clipkit.models.sharded import read_sharded_model

    class RunsCode:
        def __reduce__(self):
            return (print, ("this must not run",))

    (tmp_path / ".metadata").write_bytes(pickle.dumps(RunsCode()))
    with pytest.raises(ClipkitError, match="refusing to load it"):
        read_sharded_model(tmp_path)
