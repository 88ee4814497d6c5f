"""`clipkit merge`: weight-space interpolation (WiSE-FT) of two models of one architecture."""

from __future__ import annotations

import shlex
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from clipkit.cli.main import main
from clipkit.models import build_model, export_model
from conftest import REPO_ROOT, run_clipkit
from test_eval_datasets import SMALL_MODEL, export_small_model


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("merge")
    return export_small_model(root / "a", seed=0), export_small_model(root / "b", seed=1)


def weights(directory):
    return load_file(str(directory / "open_clip_model.safetensors"))


@pytest.mark.parametrize("alpha", [0.0, 1.0])
def test_merge_at_alpha_0_and_1_reproduces_the_endpoints_exactly(models, tmp_path, alpha, capsys):
    a, b = models
    out = tmp_path / "merged"
    assert main(["merge", str(a), str(b), "--alpha", str(alpha), "--out", str(out)]) == 0
    merged, endpoint = weights(out), weights(a if alpha == 0 else b)
    assert merged.keys() == endpoint.keys() and all(torch.equal(merged[k], endpoint[k]) for k in merged)
    assert build_model(out).preprocess_cfg == build_model(a).preprocess_cfg
    assert f"(1 - {alpha:g}) * {a}" in capsys.readouterr().out


def test_merge_at_half_is_the_average(models, tmp_path):
    a, b = models
    out = tmp_path / "half"
    assert main(["merge", str(a), str(b), "--out", str(out)]) == 0  # --alpha defaults to 0.5
    merged, wa, wb = weights(out), weights(a), weights(b)
    assert any(not torch.equal(wa[k], wb[k]) for k in wa)
    for key in wa:
        average = (wa[key].double() + wb[key].double()) / 2
        # float32 rounding of the exact average: within one unit in the last place
        torch.testing.assert_close(merged[key], average.float(), rtol=2**-23, atol=1e-12, msg=key)


def test_merge_of_different_architectures_is_one_line_error(models, tmp_path, capsys):
    a, _ = models
    torch.manual_seed(0)
    wider = {**SMALL_MODEL, "embed_dim": 48}
    other = export_model(build_model(wider), tmp_path / "other")
    assert main(["merge", str(a), str(other), "--out", str(tmp_path / "x")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "different architectures" in err[0]
    assert main(["merge", str(a), str(a), "--alpha", "1.5", "--out", str(tmp_path / "y")]) == 2
    assert "--alpha 1.5 must be in [0, 1]" in capsys.readouterr().err
    assert not (tmp_path / "x").exists() and not (tmp_path / "y").exists()


def test_readme_merge_command_runs_as_written(models, tmp_path):
    readme = (REPO_ROOT / "README.md").read_text()
    command = next(line for line in readme.splitlines() if line.startswith("clipkit merge "))
    a, b = models
    (tmp_path / "runs" / "finetune").mkdir(parents=True)
    shutil.copytree(a, tmp_path / "runs" / "finetune" / "model-start")
    shutil.copytree(b, tmp_path / "runs" / "finetune" / "model")
    result = run_clipkit(*shlex.split(command)[1:], cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-2000:]
    out = Path(tmp_path / shlex.split(command)[shlex.split(command).index("--out") + 1])
    merged, wa, wb = weights(out), weights(a), weights(b)
    for key in wa:
        expected = (0.7 * wa[key].double() + 0.3 * wb[key].double()).float()
        torch.testing.assert_close(merged[key], expected, rtol=2**-22, atol=1e-7, msg=key)
