"""Sharded checkpoints (torch.distributed.checkpoint directories written by FSDP training), read safely.

A checkpoint directory of an FSDP run holds `sharded/`: every rank's shards of the model (`model.*`) and
optimizer state (`optimizer.*`). Reading the model back needs no process group and any number of
processes; `clipkit export` and `build_model` read it through `read_sharded_model`.
"""

from __future__ import annotations

import re
import warnings
from pathlib import Path

import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint import FileSystemReader
from torch.distributed.checkpoint.filesystem import _StorageInfo
from torch.distributed.checkpoint.metadata import (
    ChunkStorageMetadata,
    Metadata,
    MetadataIndex,
    StorageMeta,
    TensorProperties,
    TensorStorageMetadata,
)

from clipkit.errors import ClipkitError
from clipkit.models import dcp_metadata
from clipkit.models.dcp_metadata import MAX_METADATA_BYTES, MetadataFormatError

SHARDED_STATE_DIR = "sharded"
MODEL_PREFIX = "model."
EMA_PREFIX = "ema."  # the EMA of the weights (train.ema_decay), beside the model's shards


def read_sharded_model(directory: Path, prefix: str = MODEL_PREFIX) -> dict[str, torch.Tensor]:
    """The full model state dict from a sharded checkpoint directory, in one process (for export);
    `prefix=EMA_PREFIX` reads the EMA of the weights instead."""
    reader = SafeFileSystemReader(str(directory))
    metadata = reader.read_metadata()
    wanted = {name: meta for name, meta in metadata.state_dict_metadata.items() if name.startswith(prefix)}
    # The index alone decides these allocations: no more bytes than the shard files hold.
    needed = sum(meta.size.numel() * meta.properties.dtype.itemsize for meta in wanted.values())
    stored = sum(p.stat().st_size for p in Path(directory).glob("*.distcp"))
    if needed > stored:
        raise ClipkitError(
            f"{directory}/.metadata describes {needed} bytes of tensors but its shard files hold {stored}; "
            "the checkpoint is incomplete or not clipkit's: re-save it"
        )
    state = {name: torch.empty(meta.size, dtype=meta.properties.dtype) for name, meta in wanted.items()}
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


class SafeFileSystemReader(FileSystemReader):
    """A torch.distributed.checkpoint FileSystemReader whose index is read without unpickling
    (`dcp_metadata.loads`) and checked before DCP acts on it: tensors only (DCP would unpickle any other
    entry without restriction), storage files inside the directory, shapes that fit their tensors. The
    tensors themselves torch reads with weights_only=True."""

    def read_metadata(self, *args, **kwargs):
        path = Path(self.path) / ".metadata"
        try:
            if path.stat().st_size > MAX_METADATA_BYTES:
                raise MetadataFormatError(f"larger than {MAX_METADATA_BYTES >> 20} MiB")
            metadata = dcp_metadata.loads(path.read_bytes())
            _check_metadata(metadata)
        except (
            ValueError,
            OSError,
            TypeError,
            AttributeError,
        ) as e:  # ValueError: pickletools parse errors too
            raise ClipkitError(
                f"{path} is not a clipkit sharded-checkpoint index ({e}); refusing to load it: re-save the "
                "checkpoint with clipkit, or remove the directory"
            ) from None
        if metadata.storage_meta is None:
            metadata.storage_meta = StorageMeta()
        metadata.storage_meta.load_id = self.load_id
        return metadata


def _check_metadata(metadata) -> None:
    """The index describes tensors stored in files of its own directory, and nothing else."""
    if type(metadata) is not Metadata:
        raise MetadataFormatError(f"it holds a {type(metadata).__name__}, not a checkpoint Metadata")
    entries = getattr(metadata, "state_dict_metadata", None)
    if not isinstance(entries, dict):
        raise MetadataFormatError("it has no state_dict_metadata mapping")
    for name, meta in entries.items():
        if not isinstance(name, str):
            raise MetadataFormatError(f"entry name {name!r:.80} is not a string")
        if type(meta) is not TensorStorageMetadata:
            raise MetadataFormatError(f"entry {name!r:.80} is a {type(meta).__name__}, not a tensor")
        _check_tensor(name, meta)
    storage = getattr(metadata, "storage_data", None)
    if not isinstance(storage, dict):
        raise MetadataFormatError("it has no storage_data mapping")
    for index, info in storage.items():
        if type(index) is not MetadataIndex or type(info) is not _StorageInfo:
            raise MetadataFormatError(f"storage_data maps {type(index).__name__} to {type(info).__name__}")
        relative = getattr(info, "relative_path", None)
        if not (isinstance(relative, str) and _STORAGE_FILE.fullmatch(relative)):
            raise MetadataFormatError(f"storage file {relative!r:.80} is not a file name in the checkpoint")
        if not all(dcp_metadata._is_count(getattr(info, key, None)) for key in ("offset", "length")):
            raise MetadataFormatError(f"storage of {index.fqn!r:.80} has no valid offset and length")
        if getattr(info, "transform_descriptors", None):  # clipkit never writes compressed shards
            raise MetadataFormatError(f"storage of {index.fqn!r:.80} names stream transforms")
    if type(getattr(metadata, "storage_meta", None)) not in (StorageMeta, type(None)):
        raise MetadataFormatError("storage_meta is not a StorageMeta")


_STORAGE_FILE = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]*\.distcp")  # DCP's `__{rank}_{n}.distcp`


def _check_tensor(name: str, meta) -> None:
    properties, size, chunks = (getattr(meta, k, None) for k in ("properties", "size", "chunks"))
    if type(properties) is not TensorProperties or not isinstance(
        getattr(properties, "dtype", None), torch.dtype
    ):
        raise MetadataFormatError(f"entry {name!r:.80} has no tensor dtype")
    if type(size) is not torch.Size or not isinstance(chunks, list):
        raise MetadataFormatError(f"entry {name!r:.80} has no size and chunk list")
    for chunk in chunks:
        offsets, sizes = getattr(chunk, "offsets", None), getattr(chunk, "sizes", None)
        if not (
            type(chunk) is ChunkStorageMetadata
            and type(offsets) is torch.Size
            and type(sizes) is torch.Size
            and len(offsets) == len(sizes) == len(size)
            and all(o + s <= n for o, s, n in zip(offsets, sizes, size, strict=True))
        ):
            raise MetadataFormatError(f"entry {name!r:.80} has a chunk outside its size {tuple(size)}")
