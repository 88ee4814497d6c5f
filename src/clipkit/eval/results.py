"""The benchmark's results for a person: intervals, comparisons, a table, results.{md,csv,json}, pictures.

Every metric gets a seeded percentile bootstrap interval from the per-sample scores the run stored;
every model after the first is compared with the first on the same samples (paired bootstrap interval
of the difference; McNemar's exact test for top-1 accuracies), and a difference whose interval
excludes 0 is marked `*`. The suite average (the mean of each (dataset, task)'s headline metric) has
its interval too, and is compared the same way.
"""

from __future__ import annotations

import csv
import io
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from clipkit.eval.benchmark import ModelEntry, read_raw, read_sample_scores
from clipkit.eval.suite import Suite
from clipkit.eval.uncertainty import (
    Interval,
    bootstrap_interval,
    mean_interval,
    paired_comparison,
    percentile_interval,
)
from clipkit.files import write_text_atomic

# The number a table shows per task (all metrics go to the files).
HEADLINE = {
    "zeroshot_classification": "acc1",
    "zeroshot_retrieval": "image_retrieval_recall@1",
    "linear_probe": "lp_acc1",
}
SHOWN_METRICS = {
    "zeroshot_classification": ("acc1", "acc5", "mean_per_class_recall"),
    "zeroshot_retrieval": (
        "image_retrieval_recall@1",
        "text_retrieval_recall@1",
        "image_retrieval_recall@5",
        "text_retrieval_recall@5",
    ),  # fmt: skip
}


def headline_metric(task: str) -> str:
    return HEADLINE.get(task, "lp_acc1")


@dataclass(kw_only=True)
class Row:
    dataset: str
    task: str
    metric: str
    cells: list[Interval | None]  # one per model
    comparisons: list[dict[str, Any] | None] = field(default_factory=list)  # model i vs model 0 (i >= 1)


@dataclass(kw_only=True)
class Results:
    suite: Suite
    models: list[ModelEntry]
    rows: list[Row]
    records: dict[tuple[str, str], dict[str, Any]]  # (model slug, dataset) -> raw record
    average: list[Interval | None]
    average_comparisons: list[dict[str, Any] | None]


def collect_results(models: list[ModelEntry], suite: Suite, out_dir: Path) -> Results:
    """Read every (model, dataset) result and compute intervals and comparisons (seeded: reproducible)."""
    resamples, seed = suite.resamples, suite.seed
    raw = {(m.slug, d.name): read_raw(out_dir, m, d) for m in models for d in suite.datasets}
    records = {key: record for key, (record, _) in raw.items()}
    rows: list[Row] = []
    headline_scores: dict[str, list] = {m.slug: [] for m in models}
    for d_index, dataset in enumerate(suite.datasets):
        for task in dataset.tasks:
            first_record, first_tensors = raw[(models[0].slug, dataset.name)]
            # The metrics with per-sample scores (not the probe's settings: weight_decay, lr, ...).
            metric_names = [
                m for m in first_record["tasks"][task.name] if f"{task.name}/{m}/numerator" in first_tensors
            ]
            for metric in metric_names:
                row = Row(dataset=dataset.name, task=task.name, metric=metric, cells=[])
                row_seed = seed + 1000 * d_index
                per_model = [
                    read_sample_scores(raw[(m.slug, dataset.name)][1], task.name, metric) for m in models
                ]
                for scores in per_model:
                    row.cells.append(None if scores is None else
                                     bootstrap_interval(scores, resamples=resamples, seed=row_seed))  # fmt: skip
                base = per_model[0]
                for m_index, scores in enumerate(per_model[1:], start=1):
                    row.comparisons.append(_compare(raw, models, dataset.name, task.name, metric, base, scores,
                                                    m_index, resamples=resamples, seed=row_seed))  # fmt: skip
                if metric == headline_metric(task.name):
                    for model, scores in zip(models, per_model, strict=True):
                        headline_scores[model.slug].append((scores, row_seed))
                rows.append(row)
    average, average_comparisons, means = [], [], []
    for model in models:
        per_dataset = headline_scores[model.slug]
        if not per_dataset or any(s is None for s, _ in per_dataset):
            average.append(None)
            means.append(None)
            continue
        interval, replicate_means = mean_interval(per_dataset, resamples=resamples)
        average.append(interval)
        means.append(replicate_means)
    for m_index in range(1, len(models)):
        if means[0] is None or means[m_index] is None:
            average_comparisons.append(None)
            continue
        differences = means[m_index] - means[0]
        interval = percentile_interval(average[m_index].value - average[0].value, differences)
        one_side = min((differences <= 0).double().mean().item(), (differences >= 0).double().mean().item())
        average_comparisons.append({"difference": interval.as_dict(), "p_value": min(1.0, 2 * one_side),
                                    "test": "paired_bootstrap",
                                    "significant": not interval.low <= 0 <= interval.high})  # fmt: skip
    return Results(suite=suite, models=models, rows=rows, records=records, average=average,
                   average_comparisons=average_comparisons)  # fmt: skip


def _compare(raw, models, dataset, task, metric, base, scores, m_index, *, resamples, seed):
    if base is None or scores is None:
        return None
    tensors_a, tensors_b = raw[(models[0].slug, dataset)][1], raw[(models[m_index].slug, dataset)][1]
    if not _same_samples(tensors_a["indices"], tensors_b["indices"]):
        return None  # different images could be decoded: no paired comparison
    correct_a = tensors_a.get(f"{task}/{metric}/correct")
    correct_b = tensors_b.get(f"{task}/{metric}/correct")
    comparison = paired_comparison(base, scores, resamples=resamples, seed=seed, correct_a=correct_a,
                                   correct_b=correct_b)  # fmt: skip
    return comparison.as_dict()


def _same_samples(a, b) -> bool:
    return a.shape == b.shape and bool((a == b).all())


# -- text outputs ---------------------------------------------------------------------------------


def _cell(interval: Interval | None, comparison: dict | None = None) -> str:
    if interval is None:
        return "-"
    text = f"{100 * interval.value:5.1f} [{100 * interval.low:.1f}, {100 * interval.high:.1f}]"
    if comparison is not None:
        diff = comparison["difference"]["value"]
        text += f" ({100 * diff:+.1f}{'*' if comparison['significant'] else ''})"
    return text


def table_rows(results: Results, *, headline_only: bool) -> list[list[str]]:
    rows = []
    for row in results.rows:
        shown = SHOWN_METRICS.get(row.task, ("lp_acc1", "lp_mean_per_class_recall"))
        if headline_only and row.metric != headline_metric(row.task):
            continue
        if not headline_only and row.metric not in shown:
            continue
        comparisons = [None, *row.comparisons]
        rows.append([row.dataset, row.task, row.metric,
                     *(_cell(cell, comparisons[i]) for i, cell in enumerate(row.cells))])  # fmt: skip
    comparisons = [None, *results.average_comparisons]
    rows.append(["suite average", "(headline metrics)", "mean",
                 *(_cell(cell, comparisons[i]) for i, cell in enumerate(results.average))])  # fmt: skip
    return rows


def format_table(results: Results) -> str:
    """The terminal table: headline metric per (dataset, task), % with 95% intervals, diffs vs model 1."""
    header = ["dataset", "task", "metric", *(m.label for m in results.models)]
    rows = table_rows(results, headline_only=True)
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]
    lines = ["  ".join(str(c).ljust(w) for c, w in zip(header, widths, strict=True)).rstrip()]
    lines.append("  ".join("-" * w for w in widths))
    lines += ["  ".join(str(c).ljust(w) for c, w in zip(r, widths, strict=True)).rstrip() for r in rows]
    lines.append(_legend(results))
    return "\n".join(lines)


def _legend(results: Results) -> str:
    note = f"% with 95% bootstrap intervals ({results.suite.resamples} resamples, seed {results.suite.seed})"
    if len(results.models) > 1:
        note += (f"; (+x) difference from {results.models[0].label}, * = significant at 5% "
                 "(paired: the difference's 95% interval excludes 0)")  # fmt: skip
    return note


def format_markdown(results: Results) -> str:
    header = ["dataset", "task", "metric", *(m.label for m in results.models)]
    lines = [f"# Benchmark: {results.suite.name}", "", _legend(results) + ".", ""]
    lines.append("| " + " | ".join(header) + " |")
    lines.append("|" + "---|" * len(header))
    for row in table_rows(results, headline_only=False):
        lines.append("| " + " | ".join(row) + " |")
    lines += ["", "Models:", ""]
    for model in results.models:
        lines.append(
            f"- {model.label}: `{model.source}`"
            + (f" (pretrained `{model.pretrained}`)" if model.pretrained else "")
        )
    skipped = [(key, r["skipped_images"], r["bad_shards"]) for key, r in results.records.items()
               if r["skipped_images"] or r["bad_shards"]]  # fmt: skip
    for (slug, dataset), count, bad in skipped:
        lines.append(f"- {dataset} ({slug}): {count} undecodable images skipped, {len(bad)} damaged shards")
    return "\n".join(lines) + "\n"


def format_csv(results: Results) -> str:
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(["model", "dataset", "task", "metric", "value", "low", "high", "diff_vs_first", "diff_low",
                     "diff_high", "p_value", "significant"])  # fmt: skip
    for row in results.rows:
        comparisons = [None, *row.comparisons]
        for model, cell, comparison in zip(results.models, row.cells, comparisons, strict=True):
            if cell is None:
                continue
            diff = comparison["difference"] if comparison else {}
            writer.writerow([model.label, row.dataset, row.task, row.metric, cell.value, cell.low, cell.high,
                             diff.get("value", ""), diff.get("low", ""), diff.get("high", ""),
                             comparison["p_value"] if comparison else "",
                             comparison["significant"] if comparison else ""])  # fmt: skip
    return buffer.getvalue()


def results_json(results: Results) -> dict[str, Any]:
    """CLIP_benchmark's record per (model, dataset, task) (dataset, model, pretrained, task, metrics),
    plus `intervals`, `comparison` (vs the first model) and the suite average."""
    entries = []
    intervals = {(r.dataset, r.task, r.metric): r for r in results.rows}
    for m_index, model in enumerate(results.models):
        for dataset in results.suite.datasets:
            record = results.records[(model.slug, dataset.name)]
            for task in dataset.tasks:
                metrics = record["tasks"][task.name]
                entry = {
                    "dataset": dataset.name, "model": model.source, "pretrained": model.pretrained,
                    "task": task.name, "metrics": metrics, "label": model.label, "step": model.step,
                    "num_images": record["num_images"], "skipped_images": record["skipped_images"],
                    "bad_shards": record["bad_shards"], "intervals": {}, "comparison": {},
                }  # fmt: skip
                for metric in metrics:
                    row = intervals.get((dataset.name, task.name, metric))
                    if row is None or row.cells[m_index] is None:
                        continue
                    entry["intervals"][metric] = row.cells[m_index].as_dict()
                    if m_index and row.comparisons[m_index - 1] is not None:
                        entry["comparison"][metric] = row.comparisons[m_index - 1]
                entries.append(entry)
    average = [
        {"model": m.source, "label": m.label, **(a.as_dict() if a else {}),
         "comparison": results.average_comparisons[i - 1] if i else None}
        for i, (m, a) in enumerate(zip(results.models, results.average, strict=True))
    ]  # fmt: skip
    return {"suite": results.suite.name, "resamples": results.suite.resamples, "seed": results.suite.seed,
            "confidence": 0.95, "results": entries, "suite_average": average}  # fmt: skip


def write_outputs(results: Results, out_dir: Path) -> list[Path]:
    """results.md, results.csv, results.json and the pictures, each written whole (temp name, renamed)."""
    from clipkit.eval.plot import plot_benchmark_bars, plot_metric_vs_step

    out_dir = Path(out_dir)
    written = []
    for name, text in (("results.md", format_markdown(results)), ("results.csv", format_csv(results)),
                       ("results.json", json.dumps(results_json(results), indent=2) + "\n")):  # fmt: skip
        write_text_atomic(out_dir / name, text)
        written.append(out_dir / name)
    bars = [(row.dataset, row.task, row.metric, row.cells) for row in results.rows
            if row.metric == headline_metric(row.task)]  # fmt: skip
    written.append(plot_benchmark_bars(bars, [m.label for m in results.models], out_dir / "bars.png",
                                       title=f"{results.suite.name}: headline metric, 95% intervals"))  # fmt: skip
    stepped = [(i, m) for i, m in enumerate(results.models) if m.step is not None]
    if len(stepped) > 1:
        series = {}
        for row in results.rows:
            if row.metric == headline_metric(row.task):
                series[f"{row.dataset} {row.task}"] = [
                    (m.step, row.cells[i]) for i, m in stepped if row.cells[i]
                ]
        written.append(plot_metric_vs_step(series, out_dir / "steps.png"))
    return written
