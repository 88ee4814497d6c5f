"""Training data: webdataset shards in, batches out; shard writing, generated datasets, tokenizers.

`clipkit.data` imports neither Accelerate nor Hydra: the training loop passes rank, world size and seed.
The stream and the shard reader load torch and webdataset; they are imported on first use, so that
`clipkit.data.inputs`, `clipkit.data.images` and `clipkit.data.config` stay light.
"""

from __future__ import annotations

from clipkit.data.config import DataConfig
from clipkit.lazy import lazy_getattr

# name -> the module that defines it, imported when the name is first used (PEP 562).
_LAZY = {
    "TrainStream": "clipkit.data.stream",
    "iter_val_batches": "clipkit.data.stream",
    "ensure_generated": "clipkit.data.prepare",
    "prepare_data": "clipkit.data.prepare",
    "iter_captions": "clipkit.data.shards",
}

__all__ = ["DataConfig", *_LAZY]


__getattr__ = lazy_getattr(__name__, _LAZY)
