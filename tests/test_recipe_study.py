"""scripts/recipe_study.py names config keys by string: every run of the study composes (a renamed knob fails
here, not an hour into the study)."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

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
    combos = study.on_default(study.COMBOS)
    assert study.variants(",".join(combos)) == combos  # each is runnable by name
    for name, overrides in combos.items():
        cfg = compose_config(*study.BUDGET, *study.DATASETS["shapes-2k"], *overrides)
        preset = name.split("+")[1]  # every combo names its preset first, or its crop scale (crop0.4)
        if preset.startswith("crop"):
            assert dict(cfg.data.augmentation) == {"scale": [float(preset[4:]), 1.0]}, name
        else:
            assert cfg.data.augmentation == preset, name
        assert cfg.loss._target_.endswith("SigLipLoss" if name.startswith("siglip") else "ClipLoss"), name


def test_each_recipe_is_its_screened_knob_combination():
    study = load_study()
    for loss, combo in study.RECIPE_KNOBS.items():
        for dataset in study.DATASETS.values():
            recipe = compose_config(*study.BUDGET, *dataset, *study.RECIPE[loss])
            knobs = compose_config(*study.BUDGET, *dataset, *study.DEFAULT[loss], *study.COMBOS[combo])
            assert recipe == knobs, (loss, combo)


def test_the_recipes_set_their_knobs_and_leave_model_data_and_budget_to_the_user():
    for recipe, loss, patch_dropout, ema in (("scratch-clip-small", "ClipLoss", 0.1, 0.98),
                                             ("scratch-siglip-small", "SigLipLoss", 0.25, None)):  # fmt: skip
        cfg = compose_config(f"experiment={recipe}", "model=tiny", "data=digits", "data.batch_size=32",
                             "train.steps=7")  # fmt: skip
        assert cfg.loss._target_ == f"clipkit.losses.{loss}"
        assert cfg.data.augmentation == "light"
        assert (cfg.optim.lr, cfg.optim.schedule) == (1e-3, "constant_cooldown")
        assert (cfg.model.vision_cfg.patch_dropout, cfg.train.ema_decay) == (patch_dropout, ema)
        assert (cfg.data.generate.name, cfg.data.batch_size, cfg.train.steps) == ("digits", 32, 7)
        assert cfg.output_dir is None  # a sweep or a second recipe run gets its own directory
    assert compose_config("experiment=scratch-siglip-small").loss.init_logit_bias == "auto"


def test_list_prints_every_run_without_running_one(tmp_path):
    result = subprocess.run(
        [sys.executable, str(REPO_ROOT / "scripts" / "recipe_study.py"), "--list", "--variants", "core",
         "--seeds", "2", "--work", str(tmp_path)],
        capture_output=True, text=True, check=True,
    )  # fmt: skip
    lines = result.stdout.splitlines()
    # datasets x (clip, siglip) x (default, recipe, recipe at half the steps) x seeds
    study = load_study()
    assert len(study.DATASETS) >= 2
    assert len(lines) == len(study.DATASETS) * 2 * 3 * 2
    assert (
        sum("experiment=scratch-siglip-small" in line and "train.steps=300" in line for line in lines)
        == len(study.DATASETS) * 2
    )
    assert not any(tmp_path.iterdir())


def test_raw_weights_of_an_ema_run_are_scored_as_the_run_scores_its_model(tmp_path):
    # With train.ema_decay=0 the average is the final weights, so model/ (the average, scored by the run at its
    # last step) and model-raw/ (scored by the study through `clipkit zeroshot`) must score the same; with
    # patch dropout (scratch-clip-small's), both evaluations see whole images.
    study = load_study()
    data_dir, run_dir = tmp_path / "digits", tmp_path / "run"
    overrides = ("model=tiny", "data=digits", f"data.generate.dir={data_dir}", "data.batch_size=32",
                 "train.steps=6", "train.eval_every=0", "train.checkpoint_every=100000", "train.ema_decay=0.0",
                 "+model.vision_cfg.patch_dropout=0.5", f"output_dir={run_dir}")  # fmt: skip
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "WANDB_MODE": "offline"}
    subprocess.run(
        [sys.executable, "-m", "clipkit.train", *overrides], env=env, check=True, capture_output=True
    )
    logged = study.final_accuracy(run_dir, 6)
    assert logged is not None
    assert study.raw_accuracy(run_dir, data_dir, threads=1) == pytest.approx(logged, abs=1e-9)
    report = json.loads((run_dir / "zeroshot-raw.json").read_text())  # kept: a resumed study reads it back
    assert Path(report["model"]) == run_dir / "model-raw"
    assert study.raw_accuracy(tmp_path / "no-ema", data_dir, threads=1) is None
