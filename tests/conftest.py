"""Shared test setup: no network, no wandb account, and subprocesses that import this checkout."""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]

# Nothing may be downloaded at test time.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("WANDB_SILENT", "true")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# Generated datasets and cached classifiers go to a temporary directory, never the user's ~/.cache.
os.environ.setdefault("CLIPKIT_CACHE", tempfile.mkdtemp(prefix="clipkit-test-cache-"))


def subprocess_env(**extra: str) -> dict[str, str]:
    """Environment for a child Python that imports clipkit from this checkout's src/."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(REPO_ROOT / "src"), env.get("PYTHONPATH", "")]).rstrip(
        os.pathsep
    )
    env.update(extra)
    return env


def run_clipkit(
    *args: str, cwd: Path | None = None, timeout: float = 600, **env: str
) -> subprocess.CompletedProcess:
    """Run `python -m clipkit ARGS` as a user would, capturing its output."""
    return subprocess.run(
        [sys.executable, "-m", "clipkit", *args],
        cwd=cwd or REPO_ROOT,
        env=subprocess_env(**env),
        capture_output=True,
        text=True,
        timeout=timeout,
    )


@pytest.fixture(scope="session")
def repo_root() -> Path:
    return REPO_ROOT
