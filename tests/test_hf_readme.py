"""The README's "Hugging Face transformers" commands and Python example run as written."""

from __future__ import annotations

import re
import shlex
import subprocess
import sys

import pytest

from clipkit.models import build_model, export_model
from clipkit.models.hf_export import export_transformers
from conftest import REPO_ROOT, subprocess_env
from test_eval_datasets import labels_for, make_images, write_clip_benchmark_dir
from test_hf_interop import _hf_cache

pytest.importorskip("transformers")


def readme_section() -> str:
    readme = (REPO_ROOT / "README.md").read_text()
    return readme.split("### Hugging Face transformers", 1)[1].split("\n## ", 1)[0].split("\n### ", 1)[0]


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    """What the commands name: an exported run, photos, a dataset, and a Hugging Face cache holding a
    (tiny, made-here) transformers CLIP checkpoint under the name the README uses."""
    root = tmp_path_factory.mktemp("hf-readme")
    bundle = build_model("tiny")
    export_model(bundle, root / "runs" / "tiny-export")
    export_transformers(bundle, root / "checkpoint")
    _hf_cache(root / "hf-home", "openai/clip-vit-base-patch32", root / "checkpoint")
    (root / "photos").mkdir()
    for i, image in enumerate(make_images(2, seed=5, size=(32, 32))):
        image.save(root / "photos" / f"photo{i}.jpg")
    write_clip_benchmark_dir(
        root / "data" / "shapes-wds", make_images(6, seed=6), labels=labels_for(6, 2), classnames=["a", "b"]
    )
    return root


@pytest.mark.slow  # three command-line runs, each importing torch, open_clip and transformers
def test_readme_commands_run(workdir):
    block = re.search(r"```bash\n(.*?)```", readme_section(), re.S).group(1)
    commands = [line for line in block.splitlines() if line.strip()]
    assert [c.split()[:2] for c in commands] == [
        ["clipkit", "export"], ["clipkit", "classify"], ["clipkit", "zeroshot"]
    ]  # fmt: skip
    env = subprocess_env(
        CLIPKIT_CACHE=str(workdir / "cache"), HF_HOME=str(workdir / "hf-home"), HF_HUB_OFFLINE="1"
    )
    for command in commands:
        result = subprocess.run(
            [sys.executable, "-m", "clipkit", *shlex.split(command)[1:]],
            cwd=workdir, env=env, capture_output=True, text=True, timeout=600,
        )  # fmt: skip
        assert result.returncode == 0, (command, result.stderr[-2000:])
    assert (workdir / "exported-hf" / "model.safetensors").is_file()


def test_readme_python_example_runs(workdir, monkeypatch, capsys):
    if not (workdir / "exported-hf").is_dir():  # the commands' export, when that test did not run
        export_transformers(build_model(str(workdir / "runs" / "tiny-export")), workdir / "exported-hf")
    code = re.search(r"```python\n(.*?)```", readme_section(), re.S).group(1)
    monkeypatch.chdir(workdir)
    exec(compile(code, "README.md", "exec"), {})
    out = capsys.readouterr().out
    assert "'label': 'red square'" in out and "'label': 'green circle'" in out
