"""How the server sheds load: every request has a deadline, and an overloaded server says so at once.

503 answers carry `Retry-After`, so clients back off instead of hammering a busy server; nothing waits
without a bound.
"""

from __future__ import annotations

import asyncio
import logging

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse

from clipkit.serve.batching import BatcherStopped, BatchFailed, Overloaded
from clipkit.serve.guards import drain_body, refuse

log = logging.getLogger(__name__)


class RequestDeadline:
    """ASGI middleware: a request not answered within `timeout_s` gets 503 with Retry-After (and its
    work is cancelled: a request waiting in a batcher's queue is dropped from it)."""

    def __init__(self, app, *, timeout_s: float, retry_after_s: int):
        self.app = app
        self.timeout_s = timeout_s
        self.retry_after = str(retry_after_s).encode()

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = False

        async def send_and_note_start(message) -> None:
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await asyncio.wait_for(self.app(scope, receive, send_and_note_start), self.timeout_s)
        except asyncio.TimeoutError:
            if started:  # too late for a status: the server closes the half-sent response
                raise
            await refuse(
                send, 503, f"no answer within the request deadline ({self.timeout_s:g} s): the server is busy; "
                "retry later", extra_headers=[(b"retry-after", self.retry_after)],
            )  # fmt: skip


class InFlightLimit:
    """ASGI middleware: at most `max_requests` requests in progress; past that, 503 with Retry-After at once,
    before the body is read. It bounds what requests can hold together (bodies, queued work)."""

    def __init__(self, app, *, max_requests: int, retry_after_s: int, max_body_bytes: int):
        self.app = app
        self.max_requests = max_requests
        self.max_body_bytes = max_body_bytes
        self.retry_after = str(retry_after_s).encode()
        self.in_progress = 0

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        if self.in_progress >= self.max_requests:
            # An upload still being sent would otherwise meet a reset instead of the 503.
            declared = dict(scope["headers"]).get(b"content-length", b"")
            await drain_body(
                receive, int(declared) if declared.isdigit() else None, limit=self.max_body_bytes
            )
            await refuse(
                send, 503, f"{self.max_requests} requests are in progress, the most this server takes; retry later",
                extra_headers=[(b"retry-after", self.retry_after)],
            )  # fmt: skip
            return
        self.in_progress += 1
        try:
            await self.app(scope, receive, send)
        finally:
            self.in_progress -= 1


def add_overload_handlers(app: FastAPI, *, retry_after_s: int) -> None:
    """Batcher errors as HTTP answers: a full queue or a stopped batcher 503, a failed batch 500."""

    async def overloaded(request: Request, exc: Exception) -> JSONResponse:
        return JSONResponse(
            {"detail": f"the server is overloaded ({exc}); retry later"},
            status_code=503, headers={"Retry-After": str(retry_after_s)},
        )  # fmt: skip

    async def stopped(request: Request, exc: Exception) -> JSONResponse:
        return JSONResponse(
            {"detail": f"the server cannot answer searches: {exc}; see /readyz"},
            status_code=503, headers={"Retry-After": str(retry_after_s)},
        )  # fmt: skip

    async def failed(request: Request, exc: Exception) -> JSONResponse:
        return JSONResponse({"detail": str(exc)}, status_code=500)

    app.add_exception_handler(Overloaded, overloaded)
    app.add_exception_handler(BatcherStopped, stopped)
    app.add_exception_handler(BatchFailed, failed)
