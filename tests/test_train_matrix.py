"""The configurations GPU users run, against DDP: {DDP, FSDP2 FULL_SHARD, FSDP2 SHARD_GRAD_OP} x {fp32, bf16} x
{CLIP, SigLIP} x accumulation {1, 2}, with patch dropout and an EMA on; gradient checkpointing (with
clipping) and LiT's lock_image each on one group. All 24 runs are short Trainers one after another in ONE
2-process launch (tests/train_matrix.py), so CI pays for one process start, not 24.

Tolerances, sharded vs DDP at the same precision (3 steps, AdamW at lr 1e-3). With 2 processes a gradient
reduction is one addition of two numbers, which does not depend on order, so reduce-scatter (FSDP) and
all-reduce (DDP) agree bitwise and most rows are exactly equal. What differs is the global gradient norm: a
sum of squares over shards instead of over whole tensors, equal to float32 rounding (~1e-7 relative); with
clipping (optim.grad_clip_norm) it scales the gradients, so the weights then differ by float32 rounding.
- fp32: float32 rounding carried through AdamW (which divides each gradient by its own running size):
  weights to 1e-5 (mean 1e-6), losses and the gradient norm to 1e-5 relative.
- bf16: the towers compute in bf16 under autocast (8 bits of mantissa). A float32-rounding difference in a
  weight can flip the bf16 rounding of an activation (relative 2^-8 ~ 4e-3) in the next forward, and AdamW
  turns a changed gradient of tiny size into a full-size step (lr), so a few weights may differ by up to one
  AdamW step (2 lr) per step taken: weights to 3 x 2 x lr = 6e-3 (the mean to 1e-5), losses to 1e-3
  relative, the gradient norm to 1e-2 relative.
- evaluation metrics (zero-shot accuracy, retrieval recall over 40 held-out images) count discrete hits:
  equal in fp32 (to 1e-6); in bf16 at most 2 of 40 images may change rank (0.05).
Seen on a 2-core CPU: every fp32 row and every bf16 row without clipping bitwise equal to DDP; the clipped
bf16 SigLIP rows: weights 2.9e-4 (mean 2.5e-7), loss 4.3e-4 relative (step 3), gradient norm 2.6e-3
relative, one of 40 held-out images (0.025).
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import open_clip
import pytest
import torch
from safetensors.torch import load_file

from conftest import REPO_ROOT, subprocess_env

COMMON = (
    "model=tiny",
    "data=synthetic",
    "data.generate.train_samples=2560",
    "data.generate.test_samples=40",
    "data.generate.image_size=32",
    "data.workers=0",
    "data.shuffle_buffer=16",
    "data.batch_size=8",
    "+model.vision_cfg.patch_dropout=0.5",
    "train.ema_decay=0.7",
    "train.steps=3",
    "train.log_every=1",
    "train.checkpoint_every=1000",
    "train.keep_checkpoints=1",
    "optim.warmup_steps=1",
    "optim.lr=1e-3",
    "optim.schedule=constant",
)
# precision -> (weights max abs, weights mean abs, loss and gradient norm relative, evaluation metric abs)
TOLERANCE = {
    "fp32": (1e-5, 1e-6, 1e-5, 1e-6),
    "bf16": (6e-3, 1e-5, 1e-3, 0.05),
}
GRAD_NORM_TOLERANCE = {"fp32": 1e-5, "bf16": 1e-2}  # relative


@pytest.fixture(scope="module")
def matrix(tmp_path_factory) -> tuple[Path, list[dict]]:
    out = tmp_path_factory.mktemp("matrix")
    result = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
         str(REPO_ROOT / "tests" / "train_matrix.py"), str(out), *COMMON],
        cwd=out, env=subprocess_env(OMP_NUM_THREADS="1"), capture_output=True, text=True, timeout=1500,
    )  # fmt: skip
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-5000:]
    return out, json.loads((out / "matrix.json").read_text())


def records(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def final_metrics(run: Path) -> dict[str, float]:
    """The final evaluations (the EMA's and raw/*), merged."""
    evals = [r for r in records(run) if any("/" in k for k in r)]
    return {k: v for r in evals if r["step"] == evals[-1]["step"] for k, v in r.items() if "/" in k}


def weight_diffs(a: Path, b: Path) -> tuple[float, float]:
    """(max, mean) absolute difference over every weight of two exported models."""
    x, y = (load_file(str(p / "open_clip_model.safetensors")) for p in (a, b))
    assert x.keys() == y.keys()
    diffs = torch.cat([(x[k].float() - y[k].float()).abs().flatten() for k in x])
    return diffs.max().item(), diffs.mean().item()


def comparison(out: Path, row: dict, reference: dict) -> dict[str, float]:
    """How far a sharded row is from the DDP row of its group."""
    run, ddp = out / row["name"], out / reference["name"]
    found = {}
    for model_dir in ("model", "model-raw"):  # the EMA, the optimizer's last weights
        found[f"{model_dir} max"], found[f"{model_dir} mean"] = weight_diffs(run / model_dir, ddp / model_dir)
    steps = [[r for r in records(p) if "loss" in r] for p in (run, ddp)]
    assert [r["step"] for r in steps[0]] == [r["step"] for r in steps[1]] == [1, 2, 3]
    found["loss"] = max(abs(a["loss"] / b["loss"] - 1) for a, b in zip(*steps, strict=True))
    # The global gradient norm (over all shards), relative: it is large at the first step.
    found["grad_norm"] = max(abs(a["grad_norm"] / b["grad_norm"] - 1) for a, b in zip(*steps, strict=True))
    metrics = [final_metrics(p) for p in (run, ddp)]
    assert (
        metrics[0].keys() == metrics[1].keys()
        and "zeroshot/acc1" in metrics[0]
        and "raw/zeroshot/acc1" in metrics[0]
    )
    found["metrics"] = max(abs(metrics[0][k] - metrics[1][k]) for k in metrics[0])
    return found


@pytest.mark.slow
def test_each_trainer_in_one_process_gets_the_plan_its_config_asks_for(matrix):
    _, rows = matrix
    assert len(rows) == 24
    assert [r["chosen_plan"] for r in rows] == [r["expected_plan"] for r in rows]
    assert {r["chosen_plan"] for r in rows} == {"DDP", "FSDP2 FULL_SHARD", "FSDP2 SHARD_GRAD_OP"}


@pytest.mark.slow
@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_sharded_runs_match_ddp_of_the_same_precision(matrix, precision):
    out, rows = matrix
    reference = {r["group"]: r for r in rows if r["plan"] == "ddp"}
    max_weights, mean_weights, loss_tolerance, metric_tolerance = TOLERANCE[precision]
    seen = {}
    for row in rows:
        if row["plan"] == "ddp" or row["precision"] != precision:
            continue
        assert (out / row["name"] / "checkpoints" / "step_00000003" / "sharded" / ".metadata").is_file()
        found = seen[row["name"]] = comparison(out, row, reference[row["group"]])
        for model_dir in ("model", "model-raw"):
            assert found[f"{model_dir} max"] <= max_weights, (row["name"], found)
            assert found[f"{model_dir} mean"] <= mean_weights, (row["name"], found)
        assert found["loss"] <= loss_tolerance, (row["name"], found)
        assert found["grad_norm"] <= GRAD_NORM_TOLERANCE[precision], (row["name"], found)
        assert found["metrics"] <= metric_tolerance + 1e-9, (row["name"], found)
    assert len(seen) == 8
    print(
        json.dumps(
            {"precision": precision, **{k: max(s[k] for s in seen.values()) for k in seen[next(iter(seen))]}}
        )
    )


@pytest.mark.slow
def test_the_runs_trained_and_their_emas_differ_from_the_last_weights(matrix):
    """The comparison above is not between untrained models: every run moved its weights and its EMA."""
    out, rows = matrix
    for row in rows:
        run = out / row["name"]
        ema_vs_raw, _ = weight_diffs(run / "model", run / "model-raw")
        assert ema_vs_raw > 1e-4, row["name"]
        assert all(r["nonfinite_skips"] == 0 for r in records(run) if "loss" in r), row["name"]


@pytest.mark.slow
def test_sharded_runs_evaluate_during_training_and_export_open_clip_models(matrix):
    out, rows = matrix
    # bf16 SigLIP with accumulation, gradient checkpointing and clipping evaluates at step 2 as well.
    for plan in ("ddp", "full", "grad_op"):
        evals = [r["step"] for r in records(out / f"{plan}-bf16-siglip-accum2") if "zeroshot/acc1" in r]
        assert evals == [2, 3], plan
    # A sharded SigLIP export holds open_clip's 0-d logit parameters and loads in open_clip as trained.
    run = out / "full-bf16-siglip-accum2" / "model"
    model, _, _ = open_clip.create_model_and_transforms(f"local-dir:{run}")
    exported = load_file(str(run / "open_clip_model.safetensors"))
    assert model.logit_bias.shape == torch.Size([])
    assert all(torch.equal(tensor, exported[name]) for name, tensor in model.state_dict().items())
