"""Text-to-image retrieval: embed a collection, keep a FAISS index and an SQLite metadata table on disk.

`clipkit.retrieval` imports neither FastAPI nor Accelerate nor Hydra; `clipkit.serve` puts an HTTP API
over it. Names are imported on first use (PEP 562), so `clipkit.retrieval.sources` (listing a
collection) loads neither torch nor FAISS.
"""

from __future__ import annotations

from clipkit.lazy import lazy_getattr

# name -> the module that defines it.
_LAZY = {
    "IndexReport": "clipkit.retrieval.builder",
    "add_to_index": "clipkit.retrieval.builder",
    "build_index": "clipkit.retrieval.builder",
    "build_index_from_embeddings": "clipkit.retrieval.builder",
    "load_encoder": "clipkit.retrieval.builder",
    "open_index": "clipkit.retrieval.builder",
    "Encoder": "clipkit.retrieval.encoder",
    "model_fingerprint": "clipkit.retrieval.encoder",
    "ImageItem": "clipkit.retrieval.sources",
    "ImageListing": "clipkit.retrieval.sources",
    "list_images": "clipkit.retrieval.sources",
    "read_item_bytes": "clipkit.retrieval.sources",
    "INDEX_KINDS": "clipkit.retrieval.store",
    "ImageRecord": "clipkit.retrieval.store",
    "ImageUnavailable": "clipkit.retrieval.store",
    "RetrievalIndex": "clipkit.retrieval.store",
    "read_manifest": "clipkit.retrieval.store",
    "read_record_bytes": "clipkit.retrieval.store",
}

__all__ = sorted(_LAZY)


__getattr__ = lazy_getattr(__name__, _LAZY)
