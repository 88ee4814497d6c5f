"""Compare training runs: `clipkit runs compare runs/*` prints one row per run with the settings that differ
between the runs and each run's final metrics (the last logged value of the loss and of every evaluation).

Examples: `clipkit runs compare runs/multirun/2026-01-01_12-00-00/*`, `clipkit runs compare A B --metric
zeroshot/acc1 --sort zeroshot/acc1 --descending`, `... --json` (one JSON object per run), `... --plot
curves.png` (the first --metric, default the loss, against the step, one line per run).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import Any

from clipkit.errors import ClipkitError


def add_arguments(parser: argparse.ArgumentParser) -> None:
    commands = parser.add_subparsers(dest="runs_command", metavar="COMMAND", required=True)
    compare = commands.add_parser(
        "compare", help="settings that differ and final metrics, one row per run", description=__doc__.strip()
    )
    compare.add_argument(
        "run_dirs",
        nargs="+",
        type=Path,
        help="run directories (each with config.yaml), or a sweep's directory",
    )
    compare.add_argument(
        "--metric",
        action="append",
        default=None,
        help="a metric to show (repeatable; default: loss and every evaluation metric), e.g. zeroshot/acc1",
    )
    compare.add_argument("--sort", help="sort the rows by this metric or setting (runs without it last)")
    compare.add_argument("--descending", action="store_true", help="with --sort: largest first")
    compare.add_argument("--json", action="store_true", help="one JSON object per run instead of a table")
    compare.add_argument(
        "--plot", type=Path, help="also plot the first metric against the step into this PNG"
    )


def run(args: argparse.Namespace) -> int:
    from clipkit.train.runs import differing_keys, find_runs, read_run

    run_dirs = []
    for path in args.run_dirs:
        if not path.exists():
            raise ClipkitError(f"{path} does not exist; pass run directories")
        if path.is_dir():
            run_dirs += find_runs(path)  # a run, or a sweep's directory of runs
        else:  # e.g. a sweep's multirun.yaml that `runs/sweep/*` also matches
            print(f"clipkit runs compare: skipping {path} (a file, not a run directory)", file=sys.stderr)
    runs = [read_run(path) for path in run_dirs]
    if not runs:
        raise ClipkitError("no run directories given; pass run directories, e.g. runs/*")
    keys = differing_keys(runs)
    metrics = args.metric or _default_metrics(runs)
    rows = [_row(run, keys, metrics) for run in runs]
    if args.sort:
        rows = _sorted(rows, args.sort, descending=args.descending)
    if args.json:
        for row in rows:
            print(json.dumps(row))
    else:
        print(_table(rows, keys, metrics))
    if args.plot:
        _plot(runs, keys, metrics[0], args.plot)
        print(f"plot: {args.plot}")
    return 0


def _default_metrics(runs) -> list[str]:
    names: dict[str, None] = {"loss": None}
    for run in runs:
        names.update({name: None for name in run.eval_metric_names()})
    return list(names)


def _row(run, keys: list[str], metrics: list[str]) -> dict[str, Any]:
    final = run.final_metrics()
    return {
        "run": str(run.run_dir),
        "config": {key: run.config.get(key) for key in keys},
        "metrics": {name: final.get(name) for name in metrics},
        "note": run.note,
    }


def _sorted(rows: list[dict[str, Any]], key: str, *, descending: bool) -> list[dict[str, Any]]:
    def value(row):
        return row["metrics"].get(key, row["config"].get(key))

    if not any(key in row["metrics"] or key in row["config"] for row in rows):
        raise ClipkitError(
            f"--sort {key}: neither a shown metric nor a setting that differs between the runs"
        )
    present = [row for row in rows if isinstance(value(row), int | float)]
    missing = [row for row in rows if not isinstance(value(row), int | float)]
    return sorted(present, key=value, reverse=descending) + missing


def _format(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    return "-" if value is None else str(value)


def _table(rows: list[dict[str, Any]], keys: list[str], metrics: list[str]) -> str:
    header = ["run", *keys, *metrics]
    lines = [
        [
            row["run"],
            *(_format(v) for v in row["config"].values()),
            *(_format(v) for v in row["metrics"].values()),
        ]
        + ([f"# {row['note']}"] if row["note"] else [])
        for row in rows
    ]
    widths = [max(len(line[i]) for line in [header, *lines] if i < len(line)) for i in range(len(header))]
    return "\n".join(
        "  ".join(cell.ljust(w) for cell, w in zip(line, widths + [0], strict=False)).rstrip()
        for line in [header, *lines]
    )


def _plot(runs, keys: list[str], metric: str, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")  # files only; no display needed
    import matplotlib.pyplot as plt

    if not any(run.series(metric)[0] for run in runs):
        raise ClipkitError(f"--plot: no run logged {metric!r}; choose one with --metric")
    figure, axes = plt.subplots(figsize=(7, 4.5))
    for run in runs:
        steps, values = run.series(metric)
        if steps:
            label = ", ".join(f"{key}={_format(run.config.get(key))}" for key in keys) or str(run.run_dir)
            axes.plot(steps, values, marker="o" if len(steps) < 20 else None, label=label)
    axes.set_xlabel("step")
    axes.set_ylabel(metric)
    axes.legend(fontsize="small")
    figure.tight_layout()
    suffix = path.suffix or ".png"
    partial = path.with_name(f".{path.name}.partial{suffix}")  # written whole, then renamed
    figure.savefig(partial)
    plt.close(figure)
    os.replace(partial, path)
