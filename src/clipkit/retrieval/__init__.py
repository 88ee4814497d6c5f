"""Text-to-image retrieval: embed a collection, keep a FAISS index and an SQLite metadata table on disk.

`clipkit.retrieval` imports neither FastAPI nor Accelerate nor Hydra; `clipkit.serve` puts an HTTP API
over it.
"""

from clipkit.retrieval.builder import (
    IndexReport,
    add_to_index,
    build_index,
    build_index_from_embeddings,
    load_encoder,
    open_index,
)
from clipkit.retrieval.encoder import Encoder, model_fingerprint
from clipkit.retrieval.sources import ImageItem, list_image_items, read_item_bytes
from clipkit.retrieval.store import INDEX_KINDS, ImageRecord, RetrievalIndex, read_manifest

__all__ = [
    "INDEX_KINDS",
    "Encoder",
    "ImageItem",
    "ImageRecord",
    "IndexReport",
    "RetrievalIndex",
    "add_to_index",
    "build_index",
    "build_index_from_embeddings",
    "list_image_items",
    "load_encoder",
    "model_fingerprint",
    "open_index",
    "read_item_bytes",
    "read_manifest",
]
