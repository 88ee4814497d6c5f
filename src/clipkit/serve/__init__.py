"""HTTP serving of a retrieval index (FastAPI + uvicorn): search, images, embeddings, health, metrics, a page.

Names are imported on first use (PEP 562), so `clipkit.serve.config` (the CLI's flags) loads no torch.
"""

from __future__ import annotations

from clipkit.lazy import lazy_getattr

# name -> the module that defines it.
_LAZY = {
    "ServeConfig": "clipkit.serve.config",
    "InvalidServeSetting": "clipkit.serve.config",
    "create_app": "clipkit.serve.app",
    "BatchFailed": "clipkit.serve.batching",
    "BatcherStopped": "clipkit.serve.batching",
    "MicroBatcher": "clipkit.serve.batching",
    "Overloaded": "clipkit.serve.batching",
}

__all__ = sorted(_LAZY)


__getattr__ = lazy_getattr(__name__, _LAZY)
