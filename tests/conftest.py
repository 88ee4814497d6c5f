"""Shared test setup: no network, no wandb account, and subprocesses that import this checkout."""

from __future__ import annotations

import atexit
import dataclasses
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]

# Nothing may be downloaded at test time.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("WANDB_SILENT", "true")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# Generated datasets and cached classifiers go to a temporary directory, never the user's ~/.cache.
if "CLIPKIT_CACHE" not in os.environ:
    os.environ["CLIPKIT_CACHE"] = tempfile.mkdtemp(prefix="clipkit-test-cache-")
    atexit.register(shutil.rmtree, os.environ["CLIPKIT_CACHE"], ignore_errors=True)


def subprocess_env(**extra: str) -> dict[str, str]:
    """Environment for a child Python that imports clipkit from this checkout's src/."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(REPO_ROOT / "src"), env.get("PYTHONPATH", "")]).rstrip(
        os.pathsep
    )
    env.update(extra)
    return env


def run_clipkit(
    *args: str, cwd: Path | None = None, timeout: float = 600, **env: str
) -> subprocess.CompletedProcess:
    """Run `python -m clipkit ARGS` as a user would, capturing its output."""
    return subprocess.run(
        [sys.executable, "-m", "clipkit", *args],
        cwd=cwd or REPO_ROOT,
        env=subprocess_env(**env),
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def require_program(name: str, debian_package: str) -> str:
    """The path of a system program a test drives. Missing: a skip on a developer's machine, a failure in CI
    (`.ci/run` sets CLIPKIT_CI=1 and installs it), so a broken CI install cannot pass unnoticed."""
    path = shutil.which(name)
    if path is None:
        message = f"{name} is not installed (Debian: apt-get install {debian_package}); .ci/run installs it"
        if os.environ.get("CLIPKIT_CI"):
            pytest.fail(message)
        pytest.skip(message)
    return path


@pytest.fixture(scope="session")
def repo_root() -> Path:
    return REPO_ROOT


@dataclasses.dataclass(frozen=True)
class DigitsRun:
    run_dir: Path  # a finished clipkit run: build_model(run_dir) loads RUN/model/
    data_dir: Path  # the digits dataset it trained on: train/, test/ (shards), classnames.txt


DIGITS_TRAIN_STEPS = 300


@pytest.fixture(scope="session")
def digits_run(tmp_path_factory) -> DigitsRun:
    """A short `experiment=digits` training run, trained once per test session (tests using it are slow)."""
    root = tmp_path_factory.mktemp("digits-run")
    result = subprocess.run(
        [sys.executable, "-m", "clipkit.train", "experiment=digits", f"train.steps={DIGITS_TRAIN_STEPS}",
         "train.eval_every=0", "train.checkpoint_every=100000", f"output_dir={root / 'run'}",
         f"data.generate.dir={root / 'data'}"],
        cwd=REPO_ROOT, env=subprocess_env(), capture_output=True, text=True, timeout=3600,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    return DigitsRun(run_dir=root / "run", data_dir=root / "data")
