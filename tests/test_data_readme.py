"""The README's Data section: its commands run as written, its configs load."""

from __future__ import annotations

import shlex
import subprocess
import sys

import numpy as np
import pytest
import yaml
from PIL import Image

from clipkit.data import DataConfig
from clipkit.models import build_model
from conftest import REPO_ROOT, run_clipkit, subprocess_env


def data_section() -> str:
    readme = (REPO_ROOT / "README.md").read_text()
    return readme.split("\n## Data\n", 1)[1].split("\n## ", 1)[0]


def blocks(language: str) -> list[str]:
    """The fenced blocks of the section whose fence names `language` ("" for a bare fence), in order."""
    found, current, current_language = [], None, None
    for line in data_section().splitlines():
        if line.startswith("```") and current is None:
            current, current_language = [], line[3:].strip()
        elif line.startswith("```"):
            if current_language == language:
                found.append("\n".join(current) + "\n")
            current = None
        elif current is not None:
            current.append(line)
    return found


def make_inputs(root) -> None:
    """What the README's examples read: a table, a captioned folder, class folders."""
    rng = np.random.default_rng(0)
    rows = ["path,text"]
    for i in range(4):
        Image.fromarray(rng.integers(0, 256, (40, 60, 3), dtype=np.uint8)).save(root / f"t{i}.png")
        rows.append(f"t{i}.png,a table image {i}")
    (root / "captions.csv").write_text("\n".join(rows) + "\n")
    (root / "photos").mkdir()
    for i in range(3):
        Image.fromarray(rng.integers(0, 256, (30, 30, 3), dtype=np.uint8)).save(root / "photos" / f"p{i}.png")
        (root / "photos" / f"p{i}.txt").write_text(f"photo {i}")
    for name in ("cat", "dog"):
        (root / "pets" / name).mkdir(parents=True)
        for i in range(5):
            Image.fromarray(rng.integers(0, 256, (30, 30, 3), dtype=np.uint8)).save(
                root / "pets" / name / f"{i}.jpg"
            )


@pytest.mark.slow
def test_data_section_commands_and_snippets_run(tmp_path):
    make_inputs(tmp_path)
    commands = [line.split("  #")[0].strip() for block in blocks("bash") for line in block.splitlines()]
    commands = [c for c in commands if c and not c.startswith("#")]
    assert any(c.startswith("clipkit tokenizer train") for c in commands)
    for command in commands:
        argv = shlex.split(command)
        assert argv[0] == "clipkit", command
        result = run_clipkit(*argv[1:], cwd=tmp_path)
        assert result.returncode == 0, f"{command}\n{result.stderr[-2000:]}"
    assert (tmp_path / "data" / "pets" / "test" / "nshards.txt").is_file()
    assert (tmp_path / "data" / "shapes-tokenizer" / "spiece.model").is_file()

    (python_block,) = blocks("python")
    result = subprocess.run(
        [sys.executable, "-c", python_block],
        cwd=tmp_path,
        env=subprocess_env(),
        capture_output=True,
        text=True,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert "torch.Size([32, 3, 32, 32]) torch.Size([32, 16])" in result.stdout

    data_config, model_config = blocks("yaml")
    (layout,) = blocks("")
    assert "KEY.cls" in layout
    DataConfig.from_dict(yaml.safe_load(data_config))  # every key is a real key
    model_file = tmp_path / "tiny-shapes.yaml"
    model_file.write_text(
        model_config.replace("data/shapes-tokenizer", str(tmp_path / "data/shapes-tokenizer"))
    )
    bundle = build_model(str(model_file))
    assert bundle.model_cfg["text_cfg"]["vocab_size"] == 40
