"""HTTP serving of a retrieval index (FastAPI + uvicorn): search, images, embeddings, health, metrics, a page."""

from clipkit.serve.app import ServeConfig, create_app
from clipkit.serve.batching import MicroBatcher

__all__ = ["MicroBatcher", "ServeConfig", "create_app"]
