"""Training: `accelerate launch -m clipkit.train [overrides]`, `python -m clipkit.train`, `clipkit train`.

The trainer (torch, open_clip, Accelerate) is imported on first use, as `clipkit.data` and `clipkit.models`
do, so that composing and checking the config (`--cfg job`, a misspelled key) answers before it loads.
"""

from __future__ import annotations

from clipkit.lazy import lazy_getattr

_LAZY = {"Trainer": "clipkit.train.loop", "run": "clipkit.train.loop"}

__all__ = list(_LAZY)


__getattr__ = lazy_getattr(__name__, _LAZY)
