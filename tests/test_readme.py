"""The README's Quickstart is what CI runs and what a newcomer runs; keep it true."""

from __future__ import annotations

import re
import shlex
import subprocess
import sys

import pytest

from conftest import REPO_ROOT, subprocess_env

INSTALL_PREFIX = "python3 -m venv .venv && . .venv/bin/activate && "


def quickstart_commands() -> list[str]:
    readme = (REPO_ROOT / "README.md").read_text()
    section = readme.split("## Quickstart", 1)[1]
    block = re.search(r"```bash\n(.*?)```", section, re.S).group(1)
    return [line for line in block.splitlines() if line.strip()]


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
def test_quickstart_main_job_trains_a_model_that_plainly_works(tmp_path):
    # The install is what the fresh-machine check covers; here run the job itself, as the README writes it.
    job = quickstart_commands()[0].split(" && ")[-1]
    argv = shlex.split(job)
    assert argv[:2] == ["clipkit", "train"]
    result = subprocess.run(
        [sys.executable, "-m", "clipkit", *argv[1:]],
        cwd=tmp_path,
        env=subprocess_env(),
        capture_output=True,
        text=True,
        timeout=3600,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    out = result.stdout
    acc1 = float(re.search(r"^zeroshot/acc1: ([0-9.]+)$", out, re.M).group(1))
    assert acc1 >= 0.90  # 10 digit classes: chance is 0.10
    # Text-to-image: a caption's own image first among 539 (chance ~0.002; captions name only the digit,
    # so ~54 images fit each one and ~0.02 is the most possible), and class prompts find their digit.
    recall1 = float(re.search(r"^retrieval/image_retrieval_recall@1: ([0-9.]+)$", out, re.M).group(1))
    assert recall1 >= 5 / 539
    precision = float(re.search(r"one prompt per class: ([0-9.]+)% of the top", out).group(1))
    assert precision >= 80
    assert re.search(r"^Trained 450 steps \(28,800 image-text pairs\) in \d+m\d\ds\.$", out, re.M)
    run = tmp_path / "runs" / "quickstart"
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
            [sys.executable, "-m", "clipkit", *command[1:]], cwd=tmp_path, env=subprocess_env(),
            capture_output=True, text=True, timeout=900,
        )  # fmt: skip
        assert done.returncode == 0, done.stderr[-3000:]
    assert next_commands[2].startswith("  clipkit serve --index runs/quickstart/index")
