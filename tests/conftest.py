"""Shared test setup: no network, no wandb account, and subprocesses that import this checkout."""

from __future__ import annotations

import atexit
import dataclasses
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
from filelock import FileLock

REPO_ROOT = Path(__file__).resolve().parents[1]

# Nothing may be downloaded at test time.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("WANDB_SILENT", "true")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# pytest-xdist runs the suite on several workers (pyproject's addopts): each, and each process it starts,
# takes its share of the cores rather than all of them, so two trainings do not fight over every core.
if os.environ.get("PYTEST_XDIST_WORKER_COUNT") and "OMP_NUM_THREADS" not in os.environ:
    _share = max(1, (os.cpu_count() or 1) // int(os.environ["PYTEST_XDIST_WORKER_COUNT"]))
    os.environ["OMP_NUM_THREADS"] = str(_share)
    if "torch" in sys.modules:
        sys.modules["torch"].set_num_threads(_share)
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


def quickstart_commands() -> list[str]:
    """The README's Quickstart: the two commands a newcomer pastes."""
    readme = (REPO_ROOT / "README.md").read_text()
    section = readme.split("## Quickstart", 1)[1]
    block = re.search(r"```bash\n(.*?)```", section, re.S).group(1)
    return [line for line in block.splitlines() if line.strip()]


@dataclasses.dataclass(frozen=True)
class QuickstartRun:
    workdir: Path  # the folder the job ran in, as a newcomer's checkout
    cache: Path  # its CLIPKIT_CACHE (a newcomer's ~/.cache/clipkit)
    returncode: int
    stdout: str
    stderr: str


@dataclasses.dataclass(frozen=True)
class DigitsRun:
    run_dir: Path  # a finished clipkit run: build_model(run_dir) loads RUN/model/
    data_dir: Path  # the digits dataset it trained on: train/, test/ (shards), classnames.txt


def _shared_basetemp(tmp_path_factory) -> Path:
    """A folder every pytest-xdist worker of this test run sees (the workers' common parent)."""
    base = tmp_path_factory.getbasetemp()
    return base.parent if os.environ.get("PYTEST_XDIST_WORKER") else base


@pytest.fixture(scope="session")
def quickstart_run(tmp_path_factory) -> QuickstartRun:
    """The README's main job (`clipkit train experiment=quickstart`), run as typed in a fresh folder, once per
    test run: the first worker that needs it trains, the others wait for it and read what it left."""
    shared = _shared_basetemp(tmp_path_factory)
    root = shared / "quickstart-run"
    record = root / "result.json"
    with FileLock(str(shared / "quickstart-run.lock")):
        if not record.is_file():
            shutil.rmtree(root, ignore_errors=True)
            (root / "work").mkdir(parents=True)
            job = quickstart_commands()[0].split(" && ")[-1]
            argv = shlex.split(job)
            assert argv[:2] == ["clipkit", "train"], job
            result = subprocess.run(
                [sys.executable, "-m", "clipkit", *argv[1:]], cwd=root / "work",
                env=subprocess_env(CLIPKIT_CACHE=str(root / "cache")), capture_output=True, text=True,
                timeout=3600,
            )  # fmt: skip
            done = {"returncode": result.returncode, "stdout": result.stdout, "stderr": result.stderr}
            record.with_suffix(".tmp").write_text(json.dumps(done))
            record.with_suffix(".tmp").replace(record)
    done = json.loads(record.read_text())
    return QuickstartRun(workdir=root / "work", cache=root / "cache", **done)


@pytest.fixture(scope="session")
def digits_run(quickstart_run) -> DigitsRun:
    """A finished `tiny` run on the digits (the Quickstart's, 450 steps) and the digits it trained on; the tests
    that use it are slow, and it is trained once per test run."""
    assert quickstart_run.returncode == 0, quickstart_run.stderr[-3000:]
    data_dirs = sorted((quickstart_run.cache / "datasets").glob("digits-*"))
    assert len(data_dirs) == 1, data_dirs
    return DigitsRun(run_dir=quickstart_run.workdir / "runs" / "quickstart", data_dir=data_dirs[0])
