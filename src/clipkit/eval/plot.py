"""Draw a confusion matrix to an image file (matplotlib, imported only when a plot is asked for)."""

from __future__ import annotations

import os
import tempfile
from collections.abc import Sequence
from pathlib import Path


def plot_confusion_matrix(
    confusion: Sequence[Sequence[int]], classnames: Sequence[str], path: str | Path, *, title: str = ""
) -> Path:
    """Row-normalised confusion matrix (rows: true class, columns: predicted) written to `path`.

    The format follows the suffix (.png, .pdf, .svg); the file is written under a temporary name and
    renamed when complete.
    """
    import matplotlib

    matplotlib.use("Agg")  # files only; never needs a display
    import matplotlib.pyplot as plt
    import numpy as np

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
