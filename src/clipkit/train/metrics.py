"""Where metrics go: metrics.jsonl always, plus the `logger` group's object (built from its `_target_`, as the
loss is): NullLogger (`logger=none`) or WandbLogger (`logger=wandb`)."""

from __future__ import annotations

import json
import math
import uuid
from pathlib import Path
from typing import Any, Protocol

from clipkit.redaction import redact

METRICS_NAME = "metrics.jsonl"


class Logger(Protocol):
    """What the `logger` group builds: started once by the main process, then given every logged record."""

    def start(self, output_dir: Path, run_config: dict[str, Any]) -> None: ...

    def log(self, step: int, record: dict[str, Any]) -> None: ...

    def finish(self) -> None: ...


class NullLogger:
    """`logger=none`: metrics.jsonl and the console only."""

    def start(self, output_dir: Path, run_config: dict[str, Any]) -> None:
        pass

    def log(self, step: int, record: dict[str, Any]) -> None:
        pass

    def finish(self) -> None:
        pass


class WandbLogger:
    """`logger=wandb`: Weights & Biases, offline by default so it works without an account (`wandb sync`
    uploads later). One wandb run per output_dir, so a resumed run continues the same wandb run."""

    def __init__(
        self,
        *,
        mode: str = "offline",
        project: str = "clipkit",
        entity: str | None = None,
        run_name: str | None = None,
    ):
        self.mode = mode  # offline | online | disabled
        self.project, self.entity, self.run_name = project, entity, run_name
        self._run = None

    def start(self, output_dir: Path, run_config: dict[str, Any]) -> None:
        import wandb  # only when chosen: an optional dependency

        self._run = wandb.init(
            project=self.project,
            entity=self.entity,
            name=self.run_name,
            mode=self.mode,
            dir=str(output_dir),
            config=run_config,
            resume="allow",
            id=_wandb_id(output_dir),
        )

    def log(self, step: int, record: dict[str, Any]) -> None:
        # Numbers only: wandb plots them; null (mfu on a CPU) and text ("nan") are left out.
        self._run.log({k: v for k, v in record.items() if isinstance(v, int | float)}, step=step)

    def finish(self) -> None:
        if self._run is not None:
            self._run.finish()


class MetricsLogger:
    """Main-process sink for metric dicts: one JSON object per line in metrics.jsonl, flushed as written, and
    the same record to `logger`."""

    def __init__(self, output_dir: Path, logger: Logger, *, run_config: dict[str, Any], resume_step: int):
        self.path = Path(output_dir) / METRICS_NAME
        _truncate_after(self.path, resume_step)  # steps after the checkpoint are about to be redone
        self._file = self.path.open("a", encoding="utf-8")
        self._logger = logger
        logger.start(Path(output_dir), redact(run_config))  # no credentials in wandb's copy of the config

    def log(self, step: int, metrics: dict[str, Any]) -> None:
        record = {"step": step, **{k: _plain(v) for k, v in metrics.items()}}
        self._file.write(json.dumps(redact(record)) + "\n")
        self._file.flush()
        self._logger.log(step, record)

    def close(self) -> None:
        self._file.close()
        self._logger.finish()


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
