"""Evaluations listed in the training config: two `train.eval` entries logged as eval/NAME/..., each at its
own frequency, the shorthands (data.zeroshot_dataset, data.val_shards) still logged under their old keys,
and train.keep_best keeping the best model as model-best/."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from clipkit.data import DataConfig
from clipkit.errors import ClipkitError
from clipkit.train.evaluation import Evaluations
from conftest import REPO_ROOT, subprocess_env


@pytest.mark.slow
def test_two_eval_entries_are_logged_and_the_best_model_is_kept(tmp_path):
    digits = (
        Path(os.environ["CLIPKIT_CACHE"])
        / "datasets"
        / "digits-seed0-32px-test0.3-train1.0-noise0.0-captions1"
    )
    run_dir = tmp_path / "run"
    entries = (
        f"[{{type:zeroshot,dataset:'{digits}',name:zs}},"
        f"{{type:linear_probe,dataset:'{digits}',name:lp,every:4}}]"
    )
    result = subprocess.run(
        [sys.executable, "-m", "clipkit.train", "experiment=digits", "train.steps=4", "train.eval_every=2",
         "train.log_every=2", "train.checkpoint_every=100", f"output_dir={run_dir}",
         f"data.generate.dir={digits}", f"++train.eval={entries}", "++train.keep_best=eval/zs/acc1"],
        cwd=REPO_ROOT, env=subprocess_env(), capture_output=True, text=True, timeout=1800,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    zs_steps = [r["step"] for r in records if "eval/zs/acc1" in r]
    lp_steps = [r["step"] for r in records if "eval/lp/acc1" in r]
    assert zs_steps == [2, 4] and lp_steps == [4]  # every train.eval_every; lp every 4 (and the end)
    final = [r for r in records if "eval/lp/acc1" in r][-1]
    for key in ("zeroshot/acc1", "retrieval/image_retrieval_recall@1", "eval/zs/mean_per_class_recall",
                "eval/lp/acc1", "eval/lp/mean_per_class_recall"):  # fmt: skip
        assert 0.0 <= final[key] <= 1.0, key
    # The shorthand and the entry evaluate the same dataset the same way.
    assert final["zeroshot/acc1"] == final["eval/zs/acc1"]
    assert (run_dir / "model-best" / "open_clip_config.json").is_file()


def test_eval_entries_are_checked_with_one_line_errors():
    data = DataConfig()
    with pytest.raises(ClipkitError, match=r"train.eval\[0\].type='probe' is not one of"):
        Evaluations.from_config([{"type": "probe", "dataset": "x"}], data)
    with pytest.raises(ClipkitError, match=r"train.eval\[0\] has no dataset"):
        Evaluations.from_config([{"type": "zeroshot"}], data)
    with pytest.raises(ClipkitError, match="name 'a' is used twice"):
        Evaluations.from_config([{"type": "zeroshot", "dataset": "x", "name": "a"}] * 2, data)
    with pytest.raises(ClipkitError, match="train.keep_best=eval/b/acc1 names no evaluation"):
        Evaluations.from_config(
            [{"type": "zeroshot", "dataset": "x", "name": "a"}], data, keep_best="eval/b/acc1"
        )
    evals = Evaluations.from_config(
        [
            {"type": "zeroshot", "dataset": "x", "name": "a"},
            {"type": "retrieval", "dataset": "y", "every": 3},
        ],
        data,
        eval_every=2,
        keep_best="eval/a/acc1",
    )
    assert [evals.due(step) for step in range(1, 7)] == [False, True, True, True, False, True]
    assert evals.improved({"eval/a/acc1": 0.5}) and not evals.improved({"eval/a/acc1": 0.4})
    assert evals.improved({"eval/a/acc1": 0.6}) and not evals.improved({"other": 1.0})
