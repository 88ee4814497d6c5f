"""The README's Quickstart is what CI runs and what a newcomer runs; keep it true."""

from __future__ import annotations

import re
import shlex
import subprocess
import sys

import pytest

from conftest import REPO_ROOT, quickstart_commands, subprocess_env

INSTALL_PREFIX = "python3 -m venv .venv && . .venv/bin/activate && "


def test_quickstart_is_exactly_two_commands_that_install_first():
    commands = quickstart_commands()
    assert len(commands) == 2
    # Both install the pinned versions (what CI tests and the Docker image ships), not the index of the day.
    assert commands[0].startswith(INSTALL_PREFIX + "pip install -c requirements/lock.txt -e . && ")
    assert commands[1].startswith(INSTALL_PREFIX + 'pip install -c requirements/lock-dev.txt -e ".[dev]" && ')


def test_ci_runs_the_readme_test_command():
    ci = (REPO_ROOT / ".ci" / "run").read_text()
    ci_command = re.search(r"^TEST_COMMAND='(.*)'$", ci, re.M).group(1)
    assert ci_command == quickstart_commands()[1]
    assert 'eval "$TEST_COMMAND"' in ci


@pytest.mark.slow
def test_quickstart_main_job_trains_a_model_that_plainly_works(quickstart_run):
    # The install is what the fresh-machine check covers; the job itself runs as the README writes it, in a
    # fresh folder (the quickstart_run fixture, shared with the tests that need a trained digits model).
    assert quickstart_run.returncode == 0, quickstart_run.stderr[-3000:]
    workdir = quickstart_run.workdir
    out = quickstart_run.stdout
    acc1 = float(re.search(r"^zeroshot/acc1: ([0-9.]+)$", out, re.M).group(1))
    assert acc1 >= 0.90  # 10 digit classes: chance is 0.10
    # Text-to-image: a caption's own image first among 539 (chance ~0.002; captions name only the digit,
    # so ~54 images fit each one and ~0.02 is the most possible), and class prompts find their digit.
    recall1 = float(re.search(r"^retrieval/image_retrieval_recall@1: ([0-9.]+)$", out, re.M).group(1))
    assert recall1 >= 5 / 539
    precision = float(re.search(r"one prompt per class: ([0-9.]+)% of the top", out).group(1))
    assert precision >= 80
    assert re.search(r"^Trained 450 steps \(28,800 image-text pairs\) in \d+m\d\ds\.$", out, re.M)
    run = workdir / "runs" / "quickstart"
    assert "model: runs/quickstart/model" in out
    assert (run / "model" / "open_clip_model.safetensors").is_file()
    for picture in ("curves.png", "confusion_matrix.png", "top_images.png"):
        assert (run / "pictures" / picture).stat().st_size > 10_000
    # The next commands it prints run as printed (the server is the retrieval tests' to check).
    next_commands = out.split("Next, try:\n", 1)[1].splitlines()
    classify, index = (shlex.split(line) for line in next_commands[:2])
    assert classify[:2] == ["clipkit", "classify"] and index[:3] == ["clipkit", "index", "build"]
    for command in (classify, index):
        done = subprocess.run(
            [sys.executable, "-m", "clipkit", *command[1:]], cwd=workdir,
            env=subprocess_env(CLIPKIT_CACHE=str(quickstart_run.cache)),
            capture_output=True, text=True, timeout=900,
        )  # fmt: skip
        assert done.returncode == 0, done.stderr[-3000:]
    assert next_commands[2].startswith("  clipkit serve --index runs/quickstart/index")
