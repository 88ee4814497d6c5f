"""Prometheus metrics: requests, errors and latency per route, index size and generation, micro-batch sizes."""

from __future__ import annotations

import time
from collections.abc import Collection

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST

__all__ = ["CONTENT_TYPE_LATEST", "MetricsMiddleware", "ServerMetrics"]

LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)


class ServerMetrics:
    """The app's own registry (not prometheus_client's global one), so several apps can live in a process."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.requests = Counter(
            "clipkit_http_requests",
            "HTTP requests answered",
            ["method", "route", "status"],
            registry=self.registry,
        )
        self.errors = Counter(
            "clipkit_http_errors", "HTTP requests answered with status >= 400", ["route", "status"],
            registry=self.registry,
        )  # fmt: skip
        self.latency = Histogram(
            "clipkit_http_request_duration_seconds", "Time to answer a request", ["route"],
            buckets=LATENCY_BUCKETS, registry=self.registry,
        )  # fmt: skip
        self.index_images = Gauge(
            "clipkit_index_images", "Images in the served index", registry=self.registry
        )
        self.index_generation = Gauge(
            "clipkit_index_generation",
            "Generation of the served index (index.json's)",
            registry=self.registry,
        )
        self.batch_size = Histogram(
            "clipkit_batch_size", "Requests computed together in one micro-batch", ["batcher"],
            buckets=BATCH_BUCKETS, registry=self.registry,
        )  # fmt: skip

    def render(self) -> bytes:
        return generate_latest(self.registry)


class MetricsMiddleware:
    """ASGI middleware that counts and times every HTTP request, labelled by route template
    (`/v1/images/{image_id}`), so label values stay few whatever paths clients send."""

    def __init__(self, app, *, metrics: ServerMetrics, known_paths: Collection[str]):
        self.app = app
        self.metrics = metrics
        self.known_paths = frozenset(known_paths)

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        start = time.perf_counter()
        status = 500

        async def send_and_note_status(message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_and_note_status)
        finally:
            route = scope.get("route")
            if route is not None and hasattr(route, "path"):
                label = route.path
            else:  # rejected before routing (e.g. 413), or no such route
                label = scope["path"] if scope["path"] in self.known_paths else "unmatched"
            self.metrics.requests.labels(scope["method"], label, str(status)).inc()
            if status >= 400:
                self.metrics.errors.labels(label, str(status)).inc()
            self.metrics.latency.labels(label).observe(time.perf_counter() - start)
