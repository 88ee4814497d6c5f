"""Training data: webdataset shards in, batches out; shard writing, generated datasets, tokenizers.

`clipkit.data` imports neither Accelerate nor Hydra: the training loop passes rank, world size and seed.
"""

from clipkit.data.config import DataConfig
from clipkit.data.prepare import ensure_generated, prepare_data
from clipkit.data.shards import iter_captions
from clipkit.data.stream import TrainStream, iter_val_batches

__all__ = [
    "DataConfig",
    "TrainStream",
    "ensure_generated",
    "iter_captions",
    "iter_val_batches",
    "prepare_data",
]
