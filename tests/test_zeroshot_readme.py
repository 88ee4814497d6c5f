"""The README's "Zero-shot evaluation" commands and Python example run as written, on generated data."""

from __future__ import annotations

import json
import re
import shlex
import subprocess
import sys

import pytest

from clipkit.models import build_model, export_model
from conftest import REPO_ROOT, subprocess_env
from test_eval_datasets import labels_for, make_images, write_captioned_shards, write_clip_benchmark_dir


def readme_section() -> str:
    readme = (REPO_ROOT / "README.md").read_text()
    return readme.split("## Zero-shot evaluation", 1)[1].split("\n## ", 1)[0]


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    """What the commands name: the Quickstart's export, a CLIP_benchmark set, captioned shards, photos."""
    root = tmp_path_factory.mktemp("readme")
    export_model(build_model("tiny"), root / "runs" / "tiny-export")
    names = ["red square", "green circle", "blue triangle"]
    write_clip_benchmark_dir(
        root / "data" / "shapes-wds", make_images(12, seed=41), labels=labels_for(12, 3), classnames=names
    )
    write_captioned_shards(
        root / "data" / "captions", make_images(6, seed=42), [[f"shape {i}"] for i in range(6)]
    )
    (root / "photos").mkdir()
    for i, image in enumerate(make_images(2, seed=43)):
        image.save(root / "photos" / f"photo{i}.jpg")
    return root


@pytest.mark.slow  # three command-line runs, each importing torch and open_clip
def test_readme_commands_run(workdir):
    block = re.search(r"```bash\n(.*?)```", readme_section(), re.S).group(1)
    commands = [line for line in block.splitlines() if line.strip()]
    assert [c.split()[:2] for c in commands] == [["clipkit", "zeroshot"]] * 2 + [["clipkit", "classify"]]
    for command in commands:
        result = subprocess.run(
            [sys.executable, "-m", "clipkit", *shlex.split(command)[1:]],
            cwd=workdir,
            env=subprocess_env(CLIPKIT_CACHE=str(workdir / "cache")),
            capture_output=True,
            text=True,
            timeout=600,
        )
        assert result.returncode == 0, (command, result.stderr[-2000:])
    results = json.loads((workdir / "results.json").read_text())
    assert sorted(results["metrics"]) == ["acc1", "mean_per_class_recall"]  # 3 classes: no acc5
    assert (workdir / "confusion.png").stat().st_size > 0


def test_readme_python_example_runs(workdir, monkeypatch, capsys):
    code = re.search(r"```python\n(.*?)```", readme_section(), re.S).group(1)
    monkeypatch.chdir(workdir)
    exec(compile(code, "README.md", "exec"), {})
    acc1, skipped = capsys.readouterr().out.split()
    assert 0.0 <= float(acc1) <= 1.0 and skipped == "0"
