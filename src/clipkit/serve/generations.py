"""The index generation being served, replaced by a newer one without a restart.

`clipkit index add` (or a rebuild) commits a new generation and points `index.json` at it. The server
notices (it polls `index.json`, or is told with `POST /v1/index/reload`), opens the new generation beside
the old one, and switches: new requests read the new one, requests already running finish on the old
one, which is closed when the last of them is done. Until then it holds its files (see
`clipkit.retrieval.store`), so no writer removes them under a reader.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import threading
from collections.abc import Iterator

from clipkit.errors import ClipkitError
from clipkit.retrieval import RetrievalIndex
from clipkit.retrieval.store import MANIFEST_NAME, read_manifest

log = logging.getLogger(__name__)


class ServedIndex:
    """The current `RetrievalIndex`, and how many requests are using each open generation."""

    def __init__(self, index: RetrievalIndex):
        self.index_dir = index.index_dir
        self.fingerprint: str = index.model["fingerprint"]
        self._current = index
        self._users: dict[RetrievalIndex, int] = {index: 0}
        self._lock = threading.Lock()  # guards _current and _users (requests run on several threads)
        self._reload_lock = threading.Lock()  # one reload at a time
        self.reload_error: str | None = None  # why the last reload failed, until one succeeds

    @property
    def current(self) -> RetrievalIndex:
        """The generation new requests get (for counts and names; `reading()` to use it)."""
        return self._current

    @contextlib.contextmanager
    def reading(self) -> Iterator[RetrievalIndex]:
        """The current generation, kept open until the block ends even if a reload replaces it meanwhile."""
        with self._lock:
            index = self._current
            self._users[index] += 1
        try:
            yield index
        finally:
            with self._lock:
                self._users[index] -= 1
                retired = index is not self._current and self._users[index] == 0
                if retired:
                    del self._users[index]
            if retired:
                index.close()

    def reload(self) -> bool:
        """Switch to the generation `index.json` names now, if it is another one; True when it switched.

        A generation of another model is refused (ClipkitError) and the current one stays.
        """
        with self._reload_lock:
            manifest = read_manifest(self.index_dir)
            if manifest.get("generation") == self._current.generation:
                return False
            fresh = RetrievalIndex(self.index_dir, search_params=self._current.search_overrides)
            if fresh.model["fingerprint"] != self.fingerprint:
                fresh.close()
                raise ClipkitError(
                    f"{self.index_dir / MANIFEST_NAME} now names an index of another model "
                    f"(fingerprint {fresh.model['fingerprint'][:12]}, serving {self.fingerprint[:12]}); "
                    "restart `clipkit serve` to serve it"
                )
            with self._lock:
                old, self._current = self._current, fresh
                self._users[fresh] = 0
                retired = self._users[old] == 0
                if retired:
                    del self._users[old]
            if retired:
                old.close()
            log.info(
                "now serving generation %d of %s (%d images)", fresh.generation, self.index_dir, fresh.count
            )
            return True

    def close(self) -> None:
        with self._lock:
            open_indexes, self._users = list(self._users), {}
        for index in open_indexes:
            index.close()


def manifest_stamp(index_dir) -> tuple[int, int, int] | None:
    """What changes when `index.json` is replaced: (inode, mtime ns, size); None when it is missing."""
    try:
        stat = os.stat(os.path.join(index_dir, MANIFEST_NAME))
    except FileNotFoundError:
        return None
    return stat.st_ino, stat.st_mtime_ns, stat.st_size


async def watch_manifest(served: ServedIndex, interval_s: float, on_reload) -> None:
    """Reload whenever `index.json` is replaced, checking every `interval_s` seconds (until cancelled)."""
    seen = None  # the first check compares generations: a commit since the index was opened is not missed
    while True:
        await asyncio.sleep(interval_s)
        stamp = manifest_stamp(served.index_dir)
        if stamp is None or stamp == seen:
            continue
        seen = stamp
        with contextlib.suppress(Exception):  # logged and shown by /healthz; the current generation stays
            await reload_now(served, on_reload)


async def reload_now(served: ServedIndex, on_reload) -> bool:
    """`served.reload()` off the event loop (opening a large index takes a while); errors are logged and kept."""
    try:
        switched = await asyncio.to_thread(served.reload)
    except Exception as e:
        served.reload_error = str(e) if isinstance(e, ClipkitError) else f"{type(e).__name__}: {e}"
        log.error("cannot serve the new generation of %s: %s", served.index_dir, e)
        raise
    served.reload_error = None
    if switched:
        on_reload(served.current)
    return switched
