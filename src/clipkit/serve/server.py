"""The HTTP server's connection bounds: slow clients cannot hold the server, however many connections they open.

uvicorn bounds the size of a request's headers (h11's incomplete-event limit) and closes connections idle
between requests (keep-alive), but not a client that opens a connection and never finishes its headers, and
its `limit_concurrency` counts open connections, so slow clients holding that many would get every other
client a 503. Here instead:

- a connection must complete its request headers within `header_timeout_s` of its first byte (or of its
  opening), else it is closed;
- at most `max_connections` are open: a new one past that closes the connection that has sat longest
  without a request in progress (a slow or idle client), or itself when every connection is busy.

A request in progress is bounded by the app (body size, request deadline), not here.
"""

from __future__ import annotations

import logging
import time

import h11
from uvicorn.protocols.http.h11_impl import H11Protocol

log = logging.getLogger(__name__)

MAX_HEADER_BYTES = 16 * 1024  # request line and headers; h11 answers 400 past it (uvicorn's default too)


def bounded_protocol(*, header_timeout_s: float, max_connections: int) -> type[H11Protocol]:
    """uvicorn's h11 protocol with a header timeout and a connection cap (pass as `uvicorn.Config(http=...)`)."""

    class BoundedH11Protocol(H11Protocol):
        def connection_made(self, transport) -> None:
            super().connection_made(transport)
            self._idle_since = time.monotonic()
            self._header_timer = None
            self._arm_header_timer()
            if len(self.connections) > max_connections:
                self._make_room()

        def data_received(self, data: bytes) -> None:
            if self._header_timer is None and self.conn.their_state is h11.IDLE:
                self._arm_header_timer()  # the first byte of a request on a kept-alive connection
            super().data_received(data)
            if self.conn.their_state is not h11.IDLE:  # the headers are complete: a request is in progress
                self._cancel_header_timer()

        def connection_lost(self, exc) -> None:
            self._cancel_header_timer()
            super().connection_lost(exc)

        def on_response_complete(self) -> None:
            self._idle_since = time.monotonic()
            super().on_response_complete()

        def _arm_header_timer(self) -> None:
            self._header_timer = self.loop.call_later(header_timeout_s, self._headers_overdue)

        def _cancel_header_timer(self) -> None:
            if self._header_timer is not None:
                self._header_timer.cancel()
                self._header_timer = None

        def _headers_overdue(self) -> None:
            self._header_timer = None
            if self.conn.their_state is h11.IDLE and not self.transport.is_closing():
                log.debug("closing a connection that sent no complete request within %g s", header_timeout_s)
                self.transport.close()

        def _make_room(self) -> None:
            """Close the connection longest without a request in progress (this one, at worst)."""
            waiting = [
                c
                for c in self.connections
                if c is not self and c.conn.their_state is h11.IDLE and not c.transport.is_closing()
            ]
            oldest = min(waiting, key=lambda c: c._idle_since, default=self)
            log.warning("%d connections open, the limit is %d: closing one without a request in progress",
                        len(self.connections), max_connections)  # fmt: skip
            oldest.transport.close()

    return BoundedH11Protocol
