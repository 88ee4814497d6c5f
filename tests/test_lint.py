"""The code base passes ruff (the lint rules live in pyproject.toml)."""

from __future__ import annotations

import subprocess
import sys

from conftest import REPO_ROOT


def test_ruff_check_passes():
    result = subprocess.run(
        [sys.executable, "-m", "ruff", "check", "src", "tests", "scripts"],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
    )
    assert result.returncode == 0, result.stdout[-4000:]
