"""HTTP serving of a retrieval index (FastAPI + uvicorn): search, images, embeddings, health, metrics, a page."""

from clipkit.serve.app import ServeConfig, create_app
from clipkit.serve.batching import BatcherStopped, BatchFailed, MicroBatcher, Overloaded

__all__ = ["BatchFailed", "BatcherStopped", "MicroBatcher", "Overloaded", "ServeConfig", "create_app"]
