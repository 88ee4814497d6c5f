"""WiSE-FT at the end of a run: the start weights are exported when the run first starts (model-start/),
and at the end (1 - alpha) * start + alpha * final is evaluated and exported as model-wise-ft/."""

from __future__ import annotations

from pathlib import Path

import torch

from clipkit.models import ModelBundle, export_model, read_state_dict
from clipkit.models.export import WEIGHTS_NAME
from clipkit.models.merge import interpolate_state_dicts

START_MODEL_DIR = "model-start"
WISE_FT_MODEL_DIR = "model-wise-ft"


def export_start_model(bundle: ModelBundle, output_dir: Path) -> None:
    """The weights training starts from; a resumed run keeps the first start's copy."""
    if not (output_dir / START_MODEL_DIR / WEIGHTS_NAME).is_file():
        export_model(bundle, output_dir / START_MODEL_DIR, overwrite=True)


def wise_ft_state_dict(output_dir: Path, alpha: float) -> dict[str, torch.Tensor]:
    """Interpolate the exported start and final models (read from disk, so every process sees full tensors)."""
    start = read_state_dict(output_dir / START_MODEL_DIR / WEIGHTS_NAME)
    final = read_state_dict(output_dir / "model" / WEIGHTS_NAME)
    return interpolate_state_dicts(start, final, alpha, names=("start", "final"))
