"""Training: `accelerate launch -m clipkit.train [overrides]`, `python -m clipkit.train`, `clipkit train`."""

from clipkit.train.loop import Trainer, run

__all__ = ["Trainer", "run"]
