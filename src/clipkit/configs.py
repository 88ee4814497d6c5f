"""Where the Hydra config tree (`conf/`) lives, for code that reads single files from it."""

from __future__ import annotations

import os
from pathlib import Path

_PACKAGE_DIR = Path(__file__).resolve().parent


def config_dir() -> Path:
    """The `conf/` directory: inside the package for a wheel install, at the repository root otherwise."""
    for candidate in (_PACKAGE_DIR / "conf", _PACKAGE_DIR.parents[1] / "conf"):
        if (candidate / "config.yaml").is_file():
            return candidate
    raise FileNotFoundError(
        f"clipkit's conf/ directory was not found next to {_PACKAGE_DIR}; reinstall with `pip install -e .` "
        "from a source checkout or `pip install clipkit`"
    )


def cache_dir() -> Path:
    """Where clipkit keeps what it can rebuild (generated datasets, text classifiers): $CLIPKIT_CACHE,
    else ~/.cache/clipkit. conf/data/*.yaml reads the same variable with the same default."""
    return Path(os.environ.get("CLIPKIT_CACHE") or "~/.cache/clipkit").expanduser()
