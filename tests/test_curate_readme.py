"""The README's Curation commands run as typed: score the Quickstart's digits with its model, keep the better
half, train on it (until the first logged steps: the full run is the Quickstart's own test)."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time

import pytest

from conftest import REPO_ROOT, subprocess_env


def commands() -> list[str]:
    readme = (REPO_ROOT / "README.md").read_text()
    section = readme.split("\n## Curation\n", 1)[1].split("\n## ", 1)[0]
    (block,) = re.findall(r"```bash\n(.*?)```", section, re.S)
    return [line for line in block.splitlines() if line.strip()]


def test_the_commands_are_score_filter_train():
    score, filter_, train = commands()
    assert score.startswith("clipkit score --model runs/quickstart ")
    assert filter_.startswith("clipkit filter ") and "--top-fraction 0.5" in filter_
    assert train.startswith("clipkit train experiment=quickstart data.keep_keys=")


@pytest.mark.slow  # the digits run, then three commands that each import torch
def test_readme_curation_commands_run_as_typed(tmp_path, digits_run):
    # What the Quickstart leaves behind: its run and the generated digits in the default cache (HOME here).
    datasets = tmp_path / ".cache" / "clipkit" / "datasets"
    datasets.mkdir(parents=True)
    (datasets / "digits-seed0-32px-test0.3-train1.0-noise0.0-captions1").symlink_to(digits_run.data_dir)
    (tmp_path / "runs").mkdir()
    (tmp_path / "runs" / "quickstart").symlink_to(digits_run.run_dir)
    env = subprocess_env(HOME=str(tmp_path), PATH=f"{os.path.dirname(sys.executable)}:{os.environ['PATH']}")
    env.pop("CLIPKIT_CACHE")
    score, filter_, train = commands()
    for command in (score, filter_):
        result = subprocess.run(
            ["bash", "-c", command], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=900
        )
        assert result.returncode == 0, f"{command}\n{result.stderr[-2000:]}"
    kept = (tmp_path / "digits-keep.txt").read_text().splitlines()
    summary = json.loads((tmp_path / "digits-keep.txt.summary" / "summary.json").read_text())
    assert len(kept) == summary["kept"] and summary["samples"] == 1258
    assert len(kept) == 629  # the top half of 1,258
    assert (tmp_path / "digits-keep.txt.summary" / "scores.png").is_file()

    run_dir = tmp_path / "runs" / "quickstart-curated"
    process = subprocess.Popen(
        ["bash", "-c", f"exec {train}"],
        cwd=tmp_path,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )
    deadline = time.monotonic() + 900
    metrics = run_dir / "metrics.jsonl"
    while process.poll() is None and time.monotonic() < deadline:
        if metrics.is_file() and any('"step"' in line for line in metrics.read_text().splitlines()):
            break
        time.sleep(2)
    process.send_signal(signal.SIGTERM)  # checkpoints and stops, as a preempted run does
    output = process.communicate(timeout=600)[0].decode(errors="replace")
    assert metrics.is_file(), output[-3000:]
    assert "data.keep_keys" not in output or "error" not in output, output[-3000:]
    assert "keep_keys: digits-keep.txt" in (run_dir / "config.yaml").read_text()
