"""Reading finished (or unfinished) run directories back: their config.yaml and metrics.jsonl, as the Trainer
writes them (clipkit.train.loop, clipkit.train.metrics), for `clipkit runs compare` and a sweep's objective."""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from clipkit.errors import ClipkitError
from clipkit.train.metrics import METRICS_NAME

CONFIG_NAME = "config.yaml"
IGNORED_KEYS = ("output_dir",)  # where a run is, not how it was trained
# Counters the evaluators log beside their metrics: not results to compare.
_EVAL_COUNTERS = ("skipped_images", "bad_shards")


@dataclass
class Run:
    run_dir: Path
    config: dict[str, Any]  # flattened: {"optim.lr": 0.001, ...}
    history: list[dict[str, Any]] | None  # metrics.jsonl's records in order; None: no metrics.jsonl yet

    @property
    def note(self) -> str | None:
        if self.history is None:
            return f"no {METRICS_NAME} (not started, or crashed before the first log step)"
        return None

    def final_metrics(self) -> dict[str, Any]:
        """Each metric's last logged value (a resumed run's records after its checkpoint were truncated)."""
        final: dict[str, Any] = {}
        for record in self.history or []:
            final.update({k: v for k, v in record.items() if k != "step"})
        return final

    def eval_metric_names(self) -> list[str]:
        """The evaluations' metric names (records without a training loss), counters left out."""
        names: dict[str, None] = {}
        for record in self.history or []:
            if "loss" not in record:
                names.update(
                    {k: None for k in record if k != "step" and k.rsplit("/", 1)[-1] not in _EVAL_COUNTERS}
                )
        return list(names)

    def series(self, metric: str) -> tuple[list[int], list[float]]:
        """(steps, values) of one metric, numbers only."""
        points = [
            (r["step"], float(r[metric]))
            for r in self.history or []
            if isinstance(r.get(metric), int | float) and not isinstance(r.get(metric), bool)
        ]
        return [s for s, _ in points], [v for _, v in points]


def read_run(run_dir: str | Path) -> Run:
    """One run directory; a directory without config.yaml is refused (it is not a run)."""
    run_dir = Path(run_dir)
    config_path = run_dir / CONFIG_NAME
    if not config_path.is_file():
        raise ClipkitError(
            f"{run_dir} is not a clipkit run directory (no {CONFIG_NAME}); pass run directories"
        )
    try:
        config = yaml.safe_load(config_path.read_text(encoding="utf-8"))  # safe_load: no tags run code
    except yaml.YAMLError as e:
        raise ClipkitError(f"{config_path} is not valid YAML ({e}); is it a clipkit run's config?") from None
    if not isinstance(config, dict):
        raise ClipkitError(f"{config_path} is not a mapping of settings; is it a clipkit run's config?")
    metrics_path = run_dir / METRICS_NAME
    history = _read_history(metrics_path) if metrics_path.is_file() else None
    return Run(run_dir=run_dir, config=flatten(config), history=history)


def find_runs(path: str | Path) -> list[Path]:
    """The run directories `path` names: itself if it is a run, else the runs directly inside it (a sweep's
    directory: <output_dir>/<job number>_<overrides>/); neither is refused."""
    path = Path(path)
    if (path / CONFIG_NAME).is_file():
        return [path]
    inside = (
        sorted(child for child in path.iterdir() if (child / CONFIG_NAME).is_file()) if path.is_dir() else []
    )
    if not inside:
        raise ClipkitError(
            f"{path} is not a clipkit run directory (no {CONFIG_NAME}) nor a sweep's (no runs inside); "
            "pass run directories"
        )
    return inside


def _read_history(path: Path) -> list[dict[str, Any]]:
    records = []
    lines = path.read_text(encoding="utf-8").splitlines()
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            # The last line of a run killed while writing it may be cut short; any other is damage.
            if number == len(lines):
                break
            raise ClipkitError(f"{path}: line {number} is not JSON; is the file damaged?") from None
        if isinstance(record, dict) and isinstance(record.get("step"), int):
            records.append(record)
    return records


def flatten(config: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """{"optim": {"lr": 1e-3}} -> {"optim.lr": 1e-3}; lists stay values."""
    flat: dict[str, Any] = {}
    for key, value in config.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict) and value:
            flat.update(flatten(value, prefix=name + "."))
        else:
            flat[name] = value
    return flat


def differing_keys(runs: Sequence[Run]) -> list[str]:
    """The config keys whose values differ between runs (output_dir left out). A key of an object built from
    a `_target_` (loss.init_logit_bias) that only differs with the `_target_` (loss=clip vs loss=siglip: each
    loss's own default) is shown by the `_target_`; it is listed when runs with the same `_target_` differ."""
    keys = sorted({key for run in runs for key in run.config} - set(IGNORED_KEYS))
    found = []
    for key in keys:
        parent = key.rsplit(".", 1)[0] if "." in key else ""
        target_key = f"{parent}._target_" if parent else "_target_"
        if key != target_key and any(target_key in run.config for run in runs):
            groups: dict[str, set[str]] = {}
            for run in runs:
                groups.setdefault(_key_of(run.config.get(target_key)), set()).add(
                    _key_of(run.config.get(key))
                )
            if any(len(values) > 1 for values in groups.values()):
                found.append(key)
        elif len({_key_of(run.config.get(key)) for run in runs}) > 1:
            found.append(key)
    return found


def _key_of(value: Any) -> str:
    return json.dumps(value, sort_keys=True, default=str)


def final_metric(run_dir: str | Path, metric: str) -> float:
    """The last logged value of `metric` in a run's metrics.jsonl (a sweep's objective)."""
    run = read_run(run_dir)
    final = run.final_metrics()
    if metric not in final:
        raise ClipkitError(
            f"metric {metric!r} was never logged in {Path(run_dir) / METRICS_NAME}; logged: {sorted(final)}"
        )
    value = final[metric]
    return float(value) if isinstance(value, int | float) else math.nan  # "nan"/"inf" are logged as text
