"""A save killed at any point leaves `train.resume=auto` a complete checkpoint to resume from.

A forked child saves with every file-system step it takes (renames, deletions, fsyncs) counted; run k kills
the child (os._exit, no cleanup) just before its k-th step. After each kill the parent resumes as a new run
would and must load a complete checkpoint holding exactly the weights of one of the saves.
"""

from __future__ import annotations

import os
import shutil
import sys
from pathlib import Path

import pytest
import torch

from clipkit.train.checkpoint import TRAINER_STATE_NAME, load_checkpoint, resolve_resume, save_checkpoint

pytestmark = pytest.mark.skipif(sys.platform == "win32", reason="needs os.fork")

_STEPS = ("replace", "rename", "unlink", "rmdir", "fsync", "mkdir")


class Killed(Exception):
    pass


def model_and_accelerator(seed: int):
    from accelerate import Accelerator

    torch.manual_seed(seed)
    accelerator = Accelerator(cpu=True)
    model = torch.nn.Linear(3, 2)
    optimizer = torch.optim.AdamW(model.parameters())
    model, optimizer = accelerator.prepare(model, optimizer)
    return accelerator, model


def save(output_dir: Path, step: int, seed: int, keep: int) -> None:
    accelerator, _ = model_and_accelerator(seed)
    save_checkpoint(accelerator, output_dir, step, trainer_state={"step": step, "seed": seed},
                    open_clip_config={}, keep=keep)  # fmt: skip


def save_in_child(output_dir: Path, step: int, seed: int, keep: int, kill_at: int | None) -> int:
    """Save in a forked process killed before its `kill_at`-th file-system step; the steps it took."""
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: count (and maybe die at) every step
        os.close(read)
        taken = 0
        originals = {name: getattr(os, name) for name in _STEPS}

        def counted(name):
            def step_then(*args, **kwargs):
                nonlocal taken
                taken += 1
                if taken == kill_at:
                    os._exit(9)
                return originals[name](*args, **kwargs)

            return step_then

        for name in _STEPS:
            setattr(os, name, counted(name))
        try:
            save(output_dir, step, seed, keep)
            os.write(write, str(taken).encode())
        finally:
            os._exit(0)
    os.close(write)
    _, status = os.waitpid(pid, 0)
    taken = os.read(read, 64)
    os.close(read)
    assert os.WIFEXITED(status)
    return int(taken) if taken else -1


def weights(seed: int) -> dict[str, torch.Tensor]:
    _, model = model_and_accelerator(seed)
    return {k: v.clone() for k, v in model.state_dict().items()}


def resumed(output_dir: Path) -> tuple[dict, dict[str, torch.Tensor]]:
    checkpoint = resolve_resume("auto", output_dir)
    assert checkpoint is not None, "no complete checkpoint left"
    accelerator, model = model_and_accelerator(seed=999)
    state = load_checkpoint(accelerator, checkpoint)
    return state, model.state_dict()


@pytest.mark.parametrize("resave", [False, True], ids=["next step", "same step again"])
def test_a_kill_at_every_stage_of_a_save_leaves_a_resumable_run(tmp_path, resave):
    keep = 1  # the save prunes (next step) or replaces (same step) the only complete checkpoint
    first, second = weights(1), weights(2)
    step = 1 if resave else 2
    template = tmp_path / "template"
    save(template, 1, seed=1, keep=keep)
    shutil.copytree(template, tmp_path / "count")
    total = save_in_child(tmp_path / "count", step, seed=2, keep=keep, kill_at=None)
    assert total > 5
    for kill_at in range(1, total + 1):
        run = tmp_path / f"kill-{kill_at}"
        shutil.copytree(template, run)
        assert save_in_child(run, step, seed=2, keep=keep, kill_at=kill_at) == -1  # it was killed
        state, loaded = resumed(run)
        expected = second if state["seed"] == 2 else first
        assert all(torch.equal(loaded[k], expected[k]) for k in expected), (kill_at, state)
        assert state["step"] == (step if state["seed"] == 2 else 1)
        # The interrupted save, redone, completes and is what resumes.
        save_in_child(run, step, seed=2, keep=keep, kill_at=None)
        state, loaded = resumed(run)
        assert state["seed"] == 2 and all(torch.equal(loaded[k], second[k]) for k in second), kill_at
        complete = sorted(
            p.name for p in (run / "checkpoints").iterdir() if (p / TRAINER_STATE_NAME).is_file()
        )
        assert len(complete) <= keep and complete[-1] == f"step_{step:08d}", complete
