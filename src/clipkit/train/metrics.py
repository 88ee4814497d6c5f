"""Where metrics go: metrics.jsonl always, Weights & Biases when `logger=wandb`."""

from __future__ import annotations

import json
import math
import uuid
from pathlib import Path
from typing import Any

from clipkit.redaction import redact
from clipkit.train.config import LoggerConfig

METRICS_NAME = "metrics.jsonl"


class MetricsLogger:
    """Main-process sink for metric dicts; one JSON object per line, flushed as written."""

    def __init__(
        self, output_dir: Path, config: LoggerConfig, *, run_config: dict[str, Any], resume_step: int
    ):
        self.path = Path(output_dir) / METRICS_NAME
        _truncate_after(self.path, resume_step)  # steps after the checkpoint are about to be redone
        self._file = self.path.open("a", encoding="utf-8")
        self._wandb_run = None
        if config.name == "wandb":
            import wandb

            self._wandb_run = wandb.init(
                project=config.project,
                entity=config.entity,
                name=config.run_name,
                mode=config.mode,
                dir=str(output_dir),
                config=redact(run_config),
                resume="allow",
                id=_wandb_id(output_dir),
            )

    def log(self, step: int, metrics: dict[str, Any]) -> None:
        record = {"step": step, **{k: _plain(v) for k, v in metrics.items()}}
        self._file.write(json.dumps(redact(record)) + "\n")
        self._file.flush()
        if self._wandb_run is not None:
            self._wandb_run.log({k: v for k, v in record.items() if isinstance(v, int | float)}, step=step)

    def close(self) -> None:
        self._file.close()
        if self._wandb_run is not None:
            self._wandb_run.finish()


def _plain(value):
    if hasattr(value, "item"):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)  # JSON has no NaN/inf; keep them readable
    return value


def _truncate_after(path: Path, step: int) -> None:
    if not path.is_file():
        return
    kept = [
        line
        for line in path.read_text(encoding="utf-8").splitlines()
        if line and json.loads(line)["step"] <= step
    ]
    path.write_text("".join(line + "\n" for line in kept), encoding="utf-8")


def _wandb_id(output_dir: Path) -> str:
    """One wandb run per output_dir, so a resumed run continues the same wandb run."""
    id_file = Path(output_dir) / "wandb_run_id.txt"
    if id_file.is_file():
        return id_file.read_text().strip()
    run_id = uuid.uuid4().hex[:8]  # wandb run ids: lowercase letters and digits
    id_file.write_text(run_id + "\n")
    return run_id
