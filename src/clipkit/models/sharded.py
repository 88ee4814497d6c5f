"""Sharded checkpoints (torch.distributed.checkpoint directories written by FSDP training), read safely.

A checkpoint directory of an FSDP run holds `sharded/`: every rank's shards of the model (`model.*`) and
optimizer state (`optimizer.*`). Reading the model back needs no process group and any number of
processes; `clipkit export` and `build_model` read it through `read_sharded_model`.
"""

from __future__ import annotations

import dataclasses
import enum
import pickle
import warnings
from pathlib import Path

import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint import FileSystemReader
from torch.distributed.checkpoint.metadata import StorageMeta, TensorStorageMetadata

from clipkit.errors import ClipkitError

SHARDED_STATE_DIR = "sharded"
MODEL_PREFIX = "model."
EMA_PREFIX = "ema."  # the EMA of the weights (train.ema_decay), beside the model's shards


def read_sharded_model(directory: Path, prefix: str = MODEL_PREFIX) -> dict[str, torch.Tensor]:
    """The full model state dict from a sharded checkpoint directory, in one process (for export);
    `prefix=EMA_PREFIX` reads the EMA of the weights instead."""
    reader = SafeFileSystemReader(str(directory))
    metadata = reader.read_metadata()
    state = {
        name: torch.empty(meta.size, dtype=meta.properties.dtype)
        for name, meta in metadata.state_dict_metadata.items()
        if name.startswith(prefix) and isinstance(meta, TensorStorageMetadata)
    }
    if not state:
        what = "model weights" if prefix == MODEL_PREFIX else f"'{prefix}*' tensors"
        raise ClipkitError(f"{directory} is a sharded checkpoint without {what}")
    with warnings.catch_warnings():  # "assuming the intent is to load in a single process": it is
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        dcp.load(state, storage_reader=reader, no_dist=True)
    return {name[len(prefix) :]: tensor for name, tensor in state.items()}


def has_prefix(directory: Path, prefix: str) -> bool:
    """Whether a sharded checkpoint directory holds tensors under `prefix` (reads only its index)."""
    metadata = SafeFileSystemReader(str(directory)).read_metadata()
    return any(name.startswith(prefix) for name in metadata.state_dict_metadata)


def is_sharded_checkpoint(directory: Path) -> bool:
    return (Path(directory) / ".metadata").is_file()


class _MetadataUnpickler(pickle.Unpickler):
    """DCP keeps its index (`.metadata`) as a pickle; this reads it without running arbitrary code:
    only DCP's own metadata dataclasses and enums, and torch's size and dtype types, may be built."""

    _ALLOWED = {
        ("collections", "OrderedDict"),
        ("torch", "Size"),
        ("torch.serialization", "_get_layout"),  # "torch.strided" -> torch.strided
        ("pathlib", "PosixPath"),  # the checkpoint's own path, recorded by the writer
        ("pathlib", "PurePosixPath"),
        ("pathlib", "WindowsPath"),
        ("builtins", "set"),
        ("builtins", "frozenset"),
    }

    def find_class(self, module: str, name: str):
        if (module, name) in self._ALLOWED:
            return super().find_class(module, name)
        if module == "torch" and isinstance(getattr(torch, name, None), _TORCH_CONSTANTS):
            return super().find_class(module, name)
        if module.startswith("torch.distributed.checkpoint."):
            found = super().find_class(module, name)
            if isinstance(found, type) and (dataclasses.is_dataclass(found) or issubclass(found, enum.Enum)):
                return found
        raise pickle.UnpicklingError(
            f"sharded checkpoint metadata refers to {module}.{name}; refusing to load it"
        )


_TORCH_CONSTANTS = (torch.dtype, torch.memory_format, torch.layout)


class SafeFileSystemReader(FileSystemReader):
    """A torch.distributed.checkpoint FileSystemReader whose metadata load cannot run pickled code
    (the tensors themselves torch reads with weights_only=True)."""

    def read_metadata(self, *args, **kwargs):
        path = Path(self.path) / ".metadata"
        try:
            with open(path, "rb") as f:
                metadata = _MetadataUnpickler(f).load()
        except (pickle.UnpicklingError, EOFError, AttributeError, ImportError) as e:
            raise ClipkitError(f"{path} is not a readable sharded-checkpoint index ({e})") from e
        if getattr(metadata, "storage_meta", None) is None:
            metadata.storage_meta = StorageMeta()
        metadata.storage_meta.load_id = self.load_id
        return metadata
