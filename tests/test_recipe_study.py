"""scripts/recipe_study.py names config keys by string: every run of the study composes (a renamed knob fails
here, not an hour into the study)."""

from __future__ import annotations

import importlib.util
import subprocess
import sys

from clipkit.train.schema import compose_config
from conftest import REPO_ROOT


def load_study():
    spec = importlib.util.spec_from_file_location("recipe_study", REPO_ROOT / "scripts" / "recipe_study.py")
    module = importlib.util.module_from_spec(spec)
    sys.path.insert(0, str(REPO_ROOT / "scripts"))
    try:
        spec.loader.exec_module(module)
    finally:
        sys.path.remove(str(REPO_ROOT / "scripts"))
    return module


def test_every_study_run_composes_with_its_knob_set():
    study = load_study()
    variants = study.variants("knobs")
    assert {"clip-default", "siglip-default", "clip+label-smoothing-0.1", "siglip+bias-auto"} <= set(variants)
    for dataset in study.DATASETS.values():
        for name, overrides in variants.items():
            cfg = compose_config(*study.BUDGET, *dataset, *overrides, "train.seed=1")
            assert cfg.train.steps == study.steps_of((*study.BUDGET, *overrides)), name
    smoothing = compose_config(*study.BUDGET, *variants["clip+label-smoothing-0.1"])
    assert smoothing.loss.label_smoothing == 0.1
    templates = compose_config(*study.BUDGET, *variants["clip+templates"])
    assert list(templates.data.caption_templates) == ["a photo of {}", "{}", "an image of {}"]


def test_list_prints_every_run_without_running_one(tmp_path):
    result = subprocess.run(
        [sys.executable, str(REPO_ROOT / "scripts" / "recipe_study.py"), "--list", "--variants", "core",
         "--seeds", "2", "--work", str(tmp_path)],
        capture_output=True, text=True, check=True,
    )  # fmt: skip
    lines = result.stdout.splitlines()
    assert len(lines) == 2 * 2 * 2  # datasets x (clip, siglip defaults) x seeds, no recipe shipped yet
    assert not any(tmp_path.iterdir())
