"""Pictures of a model's results: a confusion matrix, training curves, the top images for text queries.

matplotlib is imported only when a picture is asked for; every file is written under a temporary name
and renamed when complete.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any


def plot_confusion_matrix(
    confusion: Sequence[Sequence[int]], classnames: Sequence[str], path: str | Path, *, title: str = ""
) -> Path:
    """Row-normalised confusion matrix (rows: true class, columns: predicted) written to `path`.

    The format follows the suffix (.png, .pdf, .svg); the file is written under a temporary name and
    renamed when complete.
    """
    import numpy as np

    plt = _pyplot()
    path = Path(path)
    counts = np.asarray(confusion, dtype=np.float64)
    rates = counts / np.maximum(counts.sum(axis=1, keepdims=True), 1)
    num_classes = len(classnames)
    size = min(4 + 0.35 * num_classes, 40)
    fig, ax = plt.subplots(figsize=(size, size))
    image = ax.imshow(rates, cmap="Blues", vmin=0, vmax=1)
    fig.colorbar(image, ax=ax, fraction=0.046, pad=0.04, label="fraction of the true class")
    if num_classes <= 60:  # beyond that, tick labels are unreadable
        ax.set_xticks(range(num_classes), classnames, rotation=90)
        ax.set_yticks(range(num_classes), classnames)
    if num_classes <= 20:
        for i in range(num_classes):
            for j in range(num_classes):
                if counts[i, j]:
                    color = "white" if rates[i, j] > 0.5 else "black"
                    ax.text(j, i, int(counts[i, j]), ha="center", va="center", color=color, fontsize=8)
    ax.set_xlabel("predicted class")
    ax.set_ylabel("true class")
    if title:
        ax.set_title(title)
    fig.tight_layout()
    return _save(fig, path)


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")  # files only; never needs a display
    import matplotlib.pyplot as plt

    return plt


def _save(fig, path: Path) -> Path:
    plt = _pyplot()
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.stem}.", suffix=path.suffix, dir=path.parent)
    os.close(fd)
    try:
        fig.savefig(tmp, dpi=100)
        os.replace(tmp, path)
    finally:
        plt.close(fig)
        Path(tmp).unlink(missing_ok=True)
    return path


def plot_training_curves(records: Sequence[Mapping[str, Any]], path: str | Path) -> Path:
    """Loss (and learning rate) against step, and every evaluation metric against step, from the
    records of a run's metrics.jsonl ({"step": int, "loss": float, "zeroshot/acc1": float, ...})."""
    plt = _pyplot()
    path = Path(path)
    steps = [r["step"] for r in records if "loss" in r]
    losses = [r["loss"] for r in records if "loss" in r]
    metric_names = sorted(
        {
            k
            for r in records
            for k, v in r.items()
            if "/" in k and isinstance(v, float) and "recall@5" not in k
        }
    )
    fig, (loss_ax, metric_ax) = plt.subplots(1, 2, figsize=(11, 4))
    loss_ax.plot(steps, losses, color="tab:blue")
    loss_ax.set_xlabel("step")
    loss_ax.set_ylabel("training loss")
    loss_ax.set_title("loss")
    loss_ax.grid(alpha=0.3)
    for name in metric_names:
        points = [(r["step"], r[name]) for r in records if isinstance(r.get(name), float)]
        marker = "o" if len(points) < 20 else None
        metric_ax.plot(*zip(*points, strict=True), marker=marker, label=name)
    metric_ax.set_xlabel("step")
    metric_ax.set_ylim(0, 1)
    metric_ax.set_title("evaluation")
    metric_ax.grid(alpha=0.3)
    if metric_names:
        metric_ax.legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    return _save(fig, path)


def plot_top_images(
    queries: Sequence[str],
    images: Sequence[Sequence[Any]],
    correct: Sequence[Sequence[bool]],
    path: str | Path,
    *,
    title: str = "",
) -> Path:
    """One row per text query with its best-scoring images, left to right; each image is an (H, W, 3)
    array in [0, 1]. A green frame marks an image of the queried class, a red one any other."""
    plt = _pyplot()
    path = Path(path)
    rows, columns = len(queries), max((len(row) for row in images), default=1)
    fig, axes = plt.subplots(rows, columns, figsize=(1.2 * columns + 2, 1.25 * rows + 0.4), squeeze=False)
    for r, (query, row_images, row_correct) in enumerate(zip(queries, images, correct, strict=True)):
        for c in range(columns):
            ax = axes[r][c]
            ax.set_xticks([])
            ax.set_yticks([])
            if c >= len(row_images):
                ax.axis("off")
                continue
            ax.imshow(row_images[c])
            for spine in ax.spines.values():
                spine.set_edgecolor("tab:green" if row_correct[c] else "tab:red")
                spine.set_linewidth(3)
        axes[r][0].set_ylabel(query, rotation=0, ha="right", va="center", fontsize=9)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    return _save(fig, path)


def plot_benchmark_bars(
    rows: Sequence[tuple[str, str, str, Sequence[Any]]],
    models: Sequence[str],
    path: str | Path,
    *,
    title: str = "",
) -> Path:
    """One group of bars per (dataset, task), one bar per model, with its 95% interval as an error bar.

    `rows`: (dataset, task, metric, intervals per model: objects with value / low / high, or None)."""
    import numpy as np

    plt = _pyplot()
    path = Path(path)
    width = 0.8 / max(len(models), 1)
    fig, ax = plt.subplots(figsize=(max(6, 1.3 * len(rows) * max(1, len(models) / 2) + 2), 4.5))
    positions = np.arange(len(rows))
    for m, model in enumerate(models):
        cells = [row[3][m] for row in rows]
        values = [100 * c.value if c else np.nan for c in cells]
        errors = [
            [100 * (c.value - c.low) if c else 0 for c in cells],
            [100 * (c.high - c.value) if c else 0 for c in cells],
        ]
        offset = (m - (len(models) - 1) / 2) * width
        ax.bar(positions + offset, values, width, yerr=errors, capsize=3, label=model)
    ax.set_xticks(positions, [f"{d}\n{t.replace('zeroshot_', 'zs ').replace('linear_probe', 'lp')}\n{metric}"
                              for d, t, metric, _ in rows], fontsize=8)  # fmt: skip
    ax.set_ylabel("%")
    ax.set_ylim(0, 100)
    ax.grid(axis="y", alpha=0.3)
    ax.legend(fontsize=8, loc="upper right")
    if title:
        ax.set_title(title)
    fig.tight_layout()
    return _save(fig, path)


def plot_metric_vs_step(series: Mapping[str, Sequence[tuple[int, Any]]], path: str | Path) -> Path:
    """Each (dataset, task)'s headline metric against the checkpoint's step, with its 95% interval as a band."""
    plt = _pyplot()
    path = Path(path)
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for name, points in series.items():
        points = sorted(points, key=lambda p: p[0])
        steps = [p[0] for p in points]
        ax.plot(steps, [100 * p[1].value for p in points], marker="o", label=name)
        ax.fill_between(steps, [100 * p[1].low for p in points], [100 * p[1].high for p in points], alpha=0.2)
    ax.set_xlabel("training step")
    ax.set_ylabel("%")
    ax.set_ylim(0, 100)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    ax.set_title("headline metric per checkpoint (bands: 95% intervals)")
    fig.tight_layout()
    return _save(fig, path)
