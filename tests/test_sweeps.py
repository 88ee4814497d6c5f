"""Hydra sweeps (`clipkit train -m`): each job in its own output_dir with nothing carried over from the job
before it, a failed job reported while the sweep goes on, and `clipkit runs compare` over the result. The
README's Sweeps commands are the ones run here, as typed."""

from __future__ import annotations

import json
import re
import shlex
import shutil
import subprocess
import sys

import pytest
import yaml

from clipkit.cli.main import main as clipkit_main
from clipkit.errors import ClipkitError
from clipkit.train.app import name_jobs_by_swept_keys, path_safe
from clipkit.train.runs import Run, differing_keys, final_metric, flatten, read_run
from conftest import REPO_ROOT, run_clipkit, subprocess_env

# Each job's directory: runs/digits (the recipe's output_dir) / <job number>_<the swept overrides>.
JOB_DIRS = {
    "0_loss=clip,optim.lr=0.0005": ("clipkit.losses.ClipLoss", 5e-4),
    "1_loss=siglip,optim.lr=0.0005": ("clipkit.losses.SigLipLoss", 5e-4),
    "2_loss=clip,optim.lr=0.001": ("clipkit.losses.ClipLoss", 1e-3),
    "3_loss=siglip,optim.lr=0.001": ("clipkit.losses.SigLipLoss", 1e-3),
}
# What every job shares: the digits recipe, two steps, no evaluation (seconds, not minutes).
SMALL = "experiment=digits train.steps=2 data.zeroshot_dataset=null data.val_shards=null"


def readme_commands() -> list[str]:
    readme = (REPO_ROOT / "README.md").read_text()
    section = re.split(r"\n##+ ", readme.split("\n### Sweeps\n", 1)[1], maxsplit=1)[0]
    (block,) = re.findall(r"```bash\n(.*?)```", section, re.S)
    return [line for line in block.splitlines() if line.strip()]


def run_command(command: str, cwd) -> subprocess.CompletedProcess:
    """A README line as a user types it (`clipkit ...` is this checkout's `python -m clipkit ...`)."""
    words = shlex.split(command)
    assert words[0] == "clipkit"
    return run_clipkit(*words[1:], cwd=cwd, timeout=900)


def metrics_of(run_dir) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def sweep(tmp_path_factory):
    """The README's 2x2 sweep, run as typed in an empty directory: (that directory, the command's result)."""
    root = tmp_path_factory.mktemp("sweep")
    train_command = readme_commands()[0]
    assert train_command == f"clipkit train -m optim.lr=5e-4,1e-3 loss=clip,siglip {SMALL}"
    result = run_command(train_command, cwd=root)
    assert result.returncode == 0, result.stderr[-3000:]
    return root, result


@pytest.mark.slow  # four short training jobs and one more run, each ~10-30 s on 2 cores
def test_a_2x2_sweep_runs_each_job_in_its_own_dir_with_nothing_carried_over(sweep, tmp_path):
    root, result = sweep
    base = root / "runs" / "digits"  # experiment=digits's output_dir holds the sweep
    assert sorted(p.name for p in base.iterdir() if p.is_dir()) == sorted(JOB_DIRS)
    for name, (target, lr) in JOB_DIRS.items():
        config = yaml.safe_load((base / name / "config.yaml").read_text())
        assert (config["loss"]["_target_"], config["optim"]["lr"]) == (target, lr)
        assert config["output_dir"] == f"runs/digits/{name}"
        assert [r["step"] for r in metrics_of(base / name) if "loss" in r] == [
            2
        ]  # log_every 50: the last step
        assert (base / name / "model" / "open_clip_model.safetensors").is_file()
    assert "resumed" not in result.stderr + result.stdout  # the issue: job #1 resumed job #0's checkpoint
    # Nothing carried over (seed, RNG, precision, optimizer state): the last job equals the same run alone.
    alone = run_clipkit(
        "train",
        *shlex.split(SMALL),
        "loss=siglip",
        "optim.lr=1e-3",
        "output_dir=alone",
        cwd=tmp_path,
        timeout=900,
    )
    assert alone.returncode == 0, alone.stderr[-3000:]
    swept = metrics_of(base / "3_loss=siglip,optim.lr=0.001")
    for key in ("loss", "grad_norm", "logit_scale", "logit_bias", "lr"):
        assert swept[-1][key] == metrics_of(tmp_path / "alone")[-1][key], key


@pytest.mark.slow  # the sweep fixture
def test_runs_compare_shows_the_sweep(sweep, capsys):
    root, _ = sweep
    base = root / "runs" / "digits"
    runs = [read_run(base / name) for name in JOB_DIRS]
    assert differing_keys(runs) == [
        "loss._target_",
        "optim.lr",
    ]  # each loss's own defaults follow its _target_

    compare_command = readme_commands()[1]
    assert compare_command == "clipkit runs compare runs/digits/* --plot runs/digits/loss.png"
    result = subprocess.run(
        ["bash", "-c", compare_command.replace("clipkit", f"{shlex.quote(sys.executable)} -m clipkit", 1)],
        cwd=root,
        env=subprocess_env(),
        capture_output=True,
        text=True,
        timeout=300,
    )  # fmt: skip  (bash: the glob expands as in a user's shell; it also matches the sweep's multirun.yaml)
    assert result.returncode == 0, result.stderr
    header, *rows = result.stdout.splitlines()[:5]
    assert header.split() == ["run", "loss._target_", "optim.lr", "loss"]
    for row, (name, (target, lr)) in zip(rows, JOB_DIRS.items(), strict=True):
        loss = [r["loss"] for r in metrics_of(base / name) if "loss" in r][-1]
        assert row.split() == [f"runs/digits/{name}", target, f"{lr:.4g}", f"{loss:.4g}"]
    assert (base / "loss.png").stat().st_size > 0

    # --json, sorted by the loss, largest first: the same values, unrounded.
    assert (
        clipkit_main(
            ["runs", "compare", *map(str, base.glob("?_*")), "--json", "--sort", "loss", "--descending"]
        )
        == 0
    )
    lines = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    losses = [line["metrics"]["loss"] for line in lines]
    assert losses == sorted(losses, reverse=True)
    for line in lines:
        name = line["run"].rsplit("/", 1)[1]
        assert line["config"] == dict(zip(["loss._target_", "optim.lr"], JOB_DIRS[name], strict=True))
        assert line["metrics"]["loss"] == [r["loss"] for r in metrics_of(base / name) if "loss" in r][-1]
        assert final_metric(base / name, "loss") == line["metrics"]["loss"]  # a sweep's objective


@pytest.mark.slow  # the sweep fixture
def test_runs_compare_notes_a_run_without_metrics_and_refuses_a_dir_without_runs(sweep, tmp_path, capsys):
    root, _ = sweep
    base = root / "runs" / "digits"
    unstarted = tmp_path / "unstarted"
    unstarted.mkdir()
    shutil.copy(base / "0_loss=clip,optim.lr=0.0005" / "config.yaml", unstarted / "config.yaml")
    assert clipkit_main(["runs", "compare", str(base / "3_loss=siglip,optim.lr=0.001"), str(unstarted)]) == 0
    out = capsys.readouterr().out
    assert "no metrics.jsonl (not started" in out.splitlines()[2]
    empty = tmp_path / "empty"
    empty.mkdir()
    assert clipkit_main(["runs", "compare", str(base / "3_loss=siglip,optim.lr=0.001"), str(empty)]) == 2
    assert capsys.readouterr().err.strip() == (
        f"clipkit runs: error: {empty} is not a clipkit run directory (no config.yaml) nor a sweep's (no runs "
        "inside); pass run directories"
    )
    # A sweep's directory stands for its runs.
    assert clipkit_main(["runs", "compare", str(base), "--json"]) == 0
    assert [json.loads(line)["run"] for line in capsys.readouterr().out.splitlines()] == [
        str(base / name) for name in JOB_DIRS
    ]
    with pytest.raises(ClipkitError, match="'zeroshot/acc1' was never logged"):
        final_metric(base / "3_loss=siglip,optim.lr=0.001", "zeroshot/acc1")


@pytest.mark.slow  # two short training jobs
def test_optuna_gets_each_jobs_objective(tmp_path):
    # The [sweep] extra; CI's environment does not have it (checked by hand in a throw-away venv).
    pytest.importorskip("hydra_plugins.hydra_optuna_sweeper", reason="pip install 'clipkit[sweep]'")
    result = run_clipkit(
        "train", "-m", "hydra/sweeper=optuna", "hydra.sweeper.direction=minimize", "hydra.sweeper.n_trials=2",
        "optim.lr=tag(log,interval(1e-4,3e-3))", "train.objective=loss", *shlex.split(SMALL), "output_dir=sweep",
        cwd=tmp_path, timeout=900,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    jobs = sorted(p for p in (tmp_path / "sweep").iterdir() if p.is_dir())
    assert [p.name.split("_", 1)[1].split("=")[0] for p in jobs] == ["optim.lr", "optim.lr"]
    final_losses = {p: [r["loss"] for r in metrics_of(p) if "loss" in r][-1] for p in jobs}
    best = yaml.safe_load((tmp_path / "sweep" / "optimization_results.yaml").read_text())
    assert best["best_value"] == min(final_losses.values())
    best_job = min(final_losses, key=final_losses.get)
    assert (
        best["best_params"]["optim.lr"]
        == yaml.safe_load((best_job / "config.yaml").read_text())["optim"]["lr"]
    )


def test_a_failed_job_is_reported_and_the_sweep_goes_on(tmp_path):
    # Both jobs fail at once (before any data or model): -m reaches Hydra, and job #1 runs after #0 failed.
    # No output_dir: the sweep's base is runs/multirun/<date>_<time>.
    result = run_clipkit("train", "-m", "train.precision=bogus,worse", cwd=tmp_path)
    assert result.returncode == 1, result.stderr
    for number, value in enumerate(("bogus", "worse")):
        line = f"clipkit train: job #{number} (train.precision={value}) failed: train.precision='{value}' is not one of"
        assert line in result.stderr
    assert result.stderr.strip().splitlines()[-1] == (
        "clipkit train: 2 job(s) failed: job #0 (train.precision=bogus); job #1 (train.precision=worse)"
    )
    (base,) = (tmp_path / "runs" / "multirun").iterdir()
    assert re.fullmatch(r"\d{4}-\d\d-\d\d_\d\d-\d\d-\d\d", base.name)
    assert sorted(p.name for p in base.iterdir()) == [
        "0_train.precision=bogus", "1_train.precision=worse", "multirun.yaml"
    ]  # fmt: skip


def test_job_dirs_are_named_by_the_swept_overrides_only():
    assert name_jobs_by_swept_keys(["optim.lr=1e-3,2e-3", "experiment=digits", "train.steps=2", "loss=clip,siglip"]) == [
        "optim.lr=1e-3,2e-3", "experiment=digits", "train.steps=2", "loss=clip,siglip",
        "hydra.job.config.override_dirname.exclude_keys=['experiment','output_dir','train.steps']",
    ]  # fmt: skip
    own = ["optim.lr=1e-3,2e-3", "hydra.job.config.override_dirname.exclude_keys=[]"]
    assert name_jobs_by_swept_keys(own) == own  # the user's choice stands
    assert path_safe("data.train_shards=/data/{0..9}.tar") == "data.train_shards=_data_{0..9}.tar"
    long = path_safe("x=" + "a" * 300)
    assert len(long) <= 200 and long != path_safe("x=" + "a" * 301)


def test_differing_keys_show_a_targets_defaults_only_when_they_vary_within_it(tmp_path):
    def run(lr, target, bias):
        config = {
            "optim": {"lr": lr},
            "loss": {"_target_": target, "init_logit_bias": bias},
            "output_dir": str(lr),
        }
        return Run(run_dir=tmp_path, config=flatten(config), history=None)

    same_defaults = [run(1, "Clip", None), run(1, "SigLip", -10.0), run(2, "SigLip", -10.0)]
    assert differing_keys(same_defaults) == ["loss._target_", "optim.lr"]
    swept_bias = [*same_defaults, run(2, "SigLip", -5.0)]
    assert differing_keys(swept_bias) == ["loss._target_", "loss.init_logit_bias", "optim.lr"]
