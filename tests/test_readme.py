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
    assert all(c.startswith(INSTALL_PREFIX + "pip install -e ") for c in commands)


def test_ci_runs_the_readme_test_command():
    ci = (REPO_ROOT / ".ci" / "run").read_text()
    ci_command = re.search(r"^TEST_COMMAND='(.*)'$", ci, re.M).group(1)
    assert ci_command == quickstart_commands()[1]
    assert 'eval "$TEST_COMMAND"' in ci


@pytest.mark.slow
def test_quickstart_main_job_trains_far_above_chance(tmp_path):
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
        timeout=1800,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    acc1 = float(re.search(r"^zeroshot/acc1: ([0-9.]+)$", result.stdout, re.M).group(1))
    assert acc1 >= 0.25  # 20 classes: chance is 0.05
    model_line = result.stdout.strip().splitlines()[-1]
    assert model_line.startswith("model: runs/quickstart/model")
    assert (tmp_path / "runs" / "quickstart" / "model" / "open_clip_model.safetensors").is_file()
