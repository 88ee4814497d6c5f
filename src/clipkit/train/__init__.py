"""Training: `accelerate launch -m clipkit.train [overrides]`, `python -m clipkit.train`, `clipkit train`.

The trainer (torch, open_clip, Accelerate) is imported on first use, as `clipkit.data` and `clipkit.models`
do, so that composing and checking the config (`--cfg job`, a misspelled key) answers before it loads.
"""

from __future__ import annotations

import importlib
from typing import Any

_LAZY = {"Trainer": "clipkit.train.loop", "run": "clipkit.train.loop"}

__all__ = list(_LAZY)


def __getattr__(name: str) -> Any:
    if name not in _LAZY:
        raise AttributeError(f"module 'clipkit.train' has no attribute {name!r}")
    return getattr(importlib.import_module(_LAZY[name]), name)
