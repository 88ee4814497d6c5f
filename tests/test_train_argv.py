"""Shard specs on the training command line as users type them: braces, `::` joins, `pipe:` commands,
with or without shell quotes, through `clipkit train` and `accelerate launch -m clipkit.train`."""

from __future__ import annotations

import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

from clipkit.train.argv import quote_shard_specs
from conftest import REPO_ROOT, subprocess_env


@pytest.mark.parametrize(
    ("typed", "hydra_sees"),
    [
        (["data.train_shards=/d/{00000..00099}.tar"], ["data.train_shards='/d/{00000..00099}.tar'"]),
        (["data.train_shards=/a/{0..1}.tar::/b/{0..2}.tar"], ["data.train_shards='/a/{0..1}.tar::/b/{0..2}.tar'"]),
        (["+data.val_shards=pipe:aws s3 cp s3://b/{0..9}.tar -"], ["+data.val_shards='pipe:aws s3 cp s3://b/{0..9}.tar -'"]),
        # What bash hands over for an unquoted brace range: one argument per shard, joined back.
        (["x=1", "data.train_shards=/d/0.tar", "data.train_shards=/d/1.tar", "y=2"], ["x=1", "data.train_shards='/d/0.tar::/d/1.tar'", "y=2"]),
        # Two ranges in one word expand to their product: each shard once.
        (["data.train_shards=/a/0.tar::/b/0.tar", "data.train_shards=/a/0.tar::/b/1.tar"], ["data.train_shards='/a/0.tar::/b/0.tar::/b/1.tar'"]),
        # Already quoted for Hydra, null, a Hydra list, other keys: untouched.
        (["data.train_shards='/d/{0..1}.tar'", "data.val_shards=null", "data.train_shards=[a,b]", "model.vision_cfg={image_size: 64}"],
         ["data.train_shards='/d/{0..1}.tar'", "data.val_shards=null", "data.train_shards=[a,b]", "model.vision_cfg={image_size: 64}"]),
        (["data.train_shards=it's.tar"], ["data.train_shards='it\\'s.tar'"]),
    ],
)  # fmt: skip
def test_shard_specs_are_quoted_for_hydra(typed, hydra_sees):
    assert quote_shard_specs(typed) == hydra_sees


def shell_env() -> dict[str, str]:
    """A user's shell: this Python's `clipkit` and `accelerate` first on PATH, this checkout importable."""
    env = subprocess_env()
    env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")])
    return env


def printed_config(command: str, cwd: Path) -> str:
    """Run `command` in bash as typed, plus Hydra's `--cfg job` (print the composed config and stop)."""
    result = subprocess.run(
        ["bash", "-c", f"{command} --cfg job"],
        cwd=cwd,
        env=shell_env(),
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return result.stdout


@pytest.mark.parametrize("quoted", [True, False], ids=["quoted", "unquoted"])
def test_clipkit_train_composes_a_brace_spec_as_typed(tmp_path, quoted):
    spec = "/data/laion/{00000..00003}.tar::/data/cc3m/{00000..00001}.tar"
    argument = f"data.train_shards='{spec}'" if quoted else f"data.train_shards={spec}"
    config = printed_config(f"clipkit train data=shards {argument}", tmp_path)
    shown = re.search(r"^  train_shards: (.*)$", config, re.M).group(1)
    if quoted:
        assert shown == spec
    else:  # bash expanded the ranges; clipkit joined the shards back into one value
        expected = {f"/data/laion/{i:05d}.tar" for i in range(4)} | {
            f"/data/cc3m/{i:05d}.tar" for i in range(2)
        }
        assert sorted(shown.split("::")) == sorted(expected)


def write_shards(directory: Path) -> None:
    from shard_helpers import write_shards as write

    write(directory, num_shards=4, per_shard=8, prefix="")


def test_accelerate_launch_trains_on_an_unquoted_brace_spec(tmp_path):
    write_shards(tmp_path / "shards")
    command = (
        f"accelerate launch --config_file {REPO_ROOT / 'conf/accelerate/cpu-2proc.yaml'} -m clipkit.train "
        "model=tiny data=shards data.train_shards=shards/{00000..00003}.tar data.batch_size=4 data.workers=0 "
        "train.steps=2 train.log_every=1 output_dir=run"
    )
    result = subprocess.run(
        ["bash", "-c", command], cwd=tmp_path, env=shell_env(), capture_output=True, text=True, timeout=900
    )
    assert result.returncode == 0, result.stderr[-3000:]
    config = (tmp_path / "run" / "config.yaml").read_text()
    shown = re.search(r"^  train_shards: (.*)$", config, re.M).group(1)
    assert sorted(shown.split("::")) == [f"shards/{i:05d}.tar" for i in range(4)]
    assert (tmp_path / "run" / "model" / "open_clip_model.safetensors").is_file()


def training_commands() -> list[str]:
    """The README's Training section commands (continuation lines joined), without `# comments`."""
    readme = (REPO_ROOT / "README.md").read_text()
    section = readme.split("\n## Training\n", 1)[1].split("\n## ", 1)[0]
    commands = []
    for block in re.findall(r"```bash\n(.*?)```", section, re.S):
        for command in block.replace("\\\n", " ").splitlines():
            command = re.sub(r"\s+#.*$", "", command).strip()
            if command:
                commands.append(command)
    return commands


def test_readme_training_commands_compose_as_typed(tmp_path):
    """Every README training command with real arguments composes its config, as typed in bash; the data
    one reaches the shard check with its spec intact. (`...` stands for the user's own overrides.)"""
    trains = [c for c in training_commands() if c.startswith("clipkit train") or "-m clipkit.train" in c]
    # A sweep (-m) cannot print its config (--cfg): tests/test_sweeps.py runs the README's sweep as typed.
    runnable = [c for c in trains if "..." not in c and not c.startswith("clipkit train -m ")]
    assert len(runnable) >= 4, runnable
    for command in runnable:
        argv = shlex.split(command)
        assert argv[0] in ("clipkit", "accelerate"), command
        if "data.train_shards='/data/laion/{00000..41455}.tar'" in command:
            result = subprocess.run(
                ["bash", "-c", command],
                cwd=tmp_path,
                env=shell_env(),
                capture_output=True,
                text=True,
                timeout=600,
            )  # exactly as typed: no /data/laion here, so it stops at the shard check, naming the spec
            assert result.returncode == 2, result.stderr[-3000:]
            assert "data.train_shards '/data/laion/{00000..41455}.tar' matches no shard file" in result.stderr
        else:  # relative paths (conf/accelerate/...) are the repository's
            assert "model:" in printed_config(command, REPO_ROOT)
