"""Checkpoints that survive a crash mid-save: written under a temporary name, renamed when complete.

A checkpoint directory `checkpoints/step_XXXXXXXX/` holds Accelerate's state (model, optimizer,
scheduler, loss scaler, every process's RNG; FSDP / DeepSpeed aware, read back with weights_only=True),
`open_clip_config.json` (so `clipkit export` and `build_model` read it as a model directory) and
`trainer_state.json` (step, counters, each process's data-stream position), written last.
Under FSDP, model and optimizer are not Accelerate's: every process writes its shards to `sharded/`
(torch.distributed.checkpoint, tensors only; the EMA's shards too), which any number of processes can
read back. Accelerate's part is per-run (scheduler, scaler) or per-process (RNG states: a process without
its own file keeps its seeded state), so a checkpoint resumes on another number of processes.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

from clipkit.errors import ClipkitError
from clipkit.files import write_text_atomic
from clipkit.models.factory import OPEN_CLIP_CONFIG_NAME

SHARDED_STATE_DIR = "sharded"  # clipkit.models.sharded.SHARDED_STATE_DIR, without its slow import

TRAINER_STATE_NAME = "trainer_state.json"
_STEP_DIR = re.compile(r"^step_(\d{8})$")


def checkpoint_root(output_dir: Path) -> Path:
    return Path(output_dir) / "checkpoints"


def list_checkpoints(output_dir: Path) -> list[Path]:
    """Complete checkpoints, oldest first. Temporary (unfinished) directories are not listed; one moved aside by
    a save that was killed before its replacement was renamed in is put back first."""
    root = checkpoint_root(output_dir)
    if not root.is_dir():
        return []
    _recover_set_aside(root)
    found = [p for p in root.iterdir() if _STEP_DIR.match(p.name) and (p / TRAINER_STATE_NAME).is_file()]
    return sorted(found, key=lambda p: p.name)


def resolve_resume(resume: str, output_dir: Path) -> Path | None:
    """The checkpoint `train.resume` asks for: `auto` (newest complete one here, if any), `none`, or a path."""
    if resume == "none":
        return None
    if resume == "auto":
        checkpoints = list_checkpoints(output_dir)
        return checkpoints[-1] if checkpoints else None
    path = Path(resume)
    if not (path / TRAINER_STATE_NAME).is_file():
        raise ClipkitError(
            f"train.resume={resume}: not a complete clipkit checkpoint (no {TRAINER_STATE_NAME}); "
            f"use train.resume=auto or a directory under {checkpoint_root(output_dir)}"
        )
    return path


def save_checkpoint(
    accelerator,
    output_dir: Path,
    step: int,
    *,
    trainer_state: dict[str, Any],
    open_clip_config: dict[str, Any],
    keep: int,
    sharded: tuple[Any, Any, dict] | None = None,
    write_extra: Callable[[Path], None] | None = None,
) -> Path:
    """Save on every process (Accelerate writes per-process RNG states); the main process renames and prunes.
    `sharded` = (model, optimizer, extra tensors) under FSDP. `write_extra(directory)` runs on every process
    before the checkpoint is marked complete (e.g. the EMA under DDP)."""
    root = checkpoint_root(output_dir)
    final = root / f"step_{step:08d}"
    staging = root / f".tmp-step_{step:08d}"
    if accelerator.is_main_process:
        shutil.rmtree(staging, ignore_errors=True)
        staging.mkdir(parents=True)
    accelerator.wait_for_everyone()
    accelerator.save_state(str(staging))
    if sharded is not None:
        from clipkit.train.parallel import save_sharded

        model, optimizer, extra = sharded
        save_sharded(model, optimizer, staging / SHARDED_STATE_DIR, extra)
    if write_extra is not None:
        write_extra(staging)
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        _write_json(staging / OPEN_CLIP_CONFIG_NAME, open_clip_config)
        _fsync_tree(staging)  # every process's files on disk before the marker says they are there
        _write_json(staging / TRAINER_STATE_NAME, trainer_state)  # last: marks the directory complete
        _fsync_dir(staging)
        _replace_checkpoint(staging, final)
        for old in list_checkpoints(output_dir)[:-keep]:
            _remove_checkpoint(old)
    accelerator.wait_for_everyone()
    return final


_SET_ASIDE_PREFIX = ".old-"


def _replace_checkpoint(staging: Path, final: Path) -> None:
    """Rename the complete `staging` to `final`. The same step saved again (e.g. a stop right after a periodic
    save): the old one is moved aside first and deleted only once the new one is in place, so at every moment
    a complete checkpoint of the step is on disk (list_checkpoints puts one back that a kill left aside)."""
    aside = final.with_name(f"{_SET_ASIDE_PREFIX}{final.name}")
    if aside.exists():  # left by an earlier killed save while `final` was in place: not needed
        _remove_checkpoint(aside)
    if final.exists():
        os.replace(final, aside)
        _fsync_dir(final.parent)
    os.replace(staging, final)
    _fsync_dir(final.parent)
    if aside.exists():
        _remove_checkpoint(aside)


def _remove_checkpoint(directory: Path) -> None:
    """The completeness marker goes first, so a kill midway leaves a directory no resume picks."""
    (directory / TRAINER_STATE_NAME).unlink(missing_ok=True)
    _fsync_dir(directory)
    shutil.rmtree(directory, ignore_errors=True)


def _recover_set_aside(root: Path) -> None:
    for aside in root.glob(f"{_SET_ASIDE_PREFIX}step_*"):
        final = root / aside.name[len(_SET_ASIDE_PREFIX) :]
        if not _STEP_DIR.match(final.name) or final.exists() or not (aside / TRAINER_STATE_NAME).is_file():
            continue  # the replacement is in place (the save's own cleanup removes the old one), or incomplete
        with contextlib.suppress(FileNotFoundError):  # every process looks; one puts it back
            os.replace(aside, final)
        _fsync_dir(root)


def _fsync_tree(directory: Path) -> None:
    for parent, _, files in os.walk(directory):
        for name in files:
            fd = os.open(os.path.join(parent, name), os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        _fsync_dir(Path(parent))


def _fsync_dir(directory: Path) -> None:
    """A directory's entries (renames, new files) on disk."""
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def load_checkpoint(
    accelerator, checkpoint: Path, *, sharded: tuple[Any, Any, dict] | None = None
) -> dict[str, Any]:
    """Restore Accelerate's state into the prepared objects (and, under FSDP, the model, optimizer and extra
    tensors of `sharded`, re-split for this run's processes); return the trainer state."""
    trainer_state = json.loads((checkpoint / TRAINER_STATE_NAME).read_text(encoding="utf-8"))
    saved_sharded = bool(trainer_state.get("sharded", False))
    if saved_sharded != (sharded is not None):
        raise ClipkitError(
            f"{checkpoint} was written by a run {'with' if saved_sharded else 'without'} FSDP; resume it with "
            f"the launch config it was trained with, or export it (`clipkit export {checkpoint} --out DIR`) "
            "and start a new run from model.pretrained=DIR"
        )
    if sharded is not None:  # the index is untrusted: refused before any state is restored
        from clipkit.models.sharded import SafeFileSystemReader

        SafeFileSystemReader(str(checkpoint / SHARDED_STATE_DIR)).read_metadata()
    accelerator.load_state(str(checkpoint))
    if sharded is not None:
        from clipkit.train.parallel import load_sharded

        model, optimizer, extra = sharded
        load_sharded(model, optimizer, checkpoint / SHARDED_STATE_DIR, extra)
    return trainer_state


def _write_json(path: Path, value: dict[str, Any]) -> None:
    write_text_atomic(path, json.dumps(value, indent=2) + "\n")
