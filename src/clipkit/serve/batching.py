"""Micro-batching: requests that arrive together are computed together.

A text encoder costs nearly the same for one query as for a few dozen (the weights are read once per
forward pass), so encoding concurrent queries as one batch raises throughput under load. Each request
waits at most `max_wait_s` for company, and a batch holds at most `max_batch` requests; the batch runs
in an executor thread so the event loop keeps accepting requests meanwhile.

The queue is bounded (`max_queue`): when it is full, `submit` refuses at once (`Overloaded`) rather than
letting waits grow without limit. A batch whose computation fails hands `BatchFailed` to its callers and
the batcher goes on with the next batch; if the batcher task itself ends (cancelled, or a bug), `alive`
turns false, waiting callers get `BatcherStopped`, and so does every later `submit`: nothing waits on a
queue that nobody reads.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable, Sequence
from concurrent.futures import Executor
from typing import Generic, TypeVar

Item = TypeVar("Item")
Result = TypeVar("Result")

log = logging.getLogger(__name__)


class Overloaded(Exception):
    """The server cannot take this request now (queue full, or no answer before its deadline); retry later."""


class BatcherStopped(Exception):
    """The batcher is not running (never started, shutting down, or its task ended)."""


class BatchFailed(Exception):
    """The batch this request was computed in raised; `__cause__` is what it raised."""


class MicroBatcher(Generic[Item, Result]):
    """`await submit(item)` -> `compute([... item ...])[i]`, with items from concurrent callers batched.

    `compute` takes a list of items and returns one result per item, in order; an exception it raises
    (or a result count that does not match) fails every caller of that batch with `BatchFailed`.
    `on_batch(size)` is called once per batch (for metrics).
    """

    def __init__(
        self,
        compute: Callable[[list[Item]], Sequence[Result]],
        *,
        executor: Executor,
        max_batch: int = 64,
        max_wait_s: float = 0.005,
        max_queue: int = 1024,
        on_batch: Callable[[int], None] | None = None,
        name: str = "batcher",
    ):
        if max_batch < 1:
            raise ValueError(f"max_batch must be at least 1, got {max_batch}")
        if max_wait_s < 0:
            raise ValueError(f"max_wait_s must be 0 or more, got {max_wait_s}")
        if max_queue < 1:
            raise ValueError(f"max_queue must be at least 1, got {max_queue}")
        self.compute = compute
        self.executor = executor
        self.max_batch = max_batch
        self.max_wait_s = max_wait_s
        self.max_queue = max_queue
        self.on_batch = on_batch
        self.name = name
        self._queue: asyncio.Queue[tuple[Item, asyncio.Future]] | None = None
        self._task: asyncio.Task | None = None
        self.failure: str | None = None  # why the task ended, once it has
        self._in_flight: list[tuple[Item, asyncio.Future]] = []  # the batch being computed

    @property
    def alive(self) -> bool:
        return self._task is not None and not self._task.done()

    @property
    def waiting(self) -> int:
        return 0 if self._queue is None else self._queue.qsize()

    def start(self) -> None:
        """Start collecting batches on the running event loop."""
        self._queue = asyncio.Queue(maxsize=self.max_queue)
        self.failure = None
        self._task = asyncio.get_running_loop().create_task(self._run(), name=f"clipkit-{self.name}")
        self._task.add_done_callback(self._ended)

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task

    async def submit(self, item: Item) -> Result:
        if not self.alive:
            raise BatcherStopped(f"the {self.name} batcher is not running ({self.failure or 'not started'})")
        assert self._queue is not None
        future = asyncio.get_running_loop().create_future()
        try:
            self._queue.put_nowait((item, future))
        except asyncio.QueueFull:
            raise Overloaded(f"{self.max_queue} {self.name} requests are already waiting") from None
        # Cancelling the caller (its deadline) cancels the future, and the batcher skips it.
        return await future

    def _ended(self, task: asyncio.Task) -> None:
        """The task ended (stop, or a failure): fail everyone still waiting, so no caller hangs."""
        if task.cancelled():
            self.failure = "stopped"
        else:
            error = task.exception()
            self.failure = f"its task failed: {type(error).__name__}: {error}"
            log.error("the %s batcher stopped: %r", self.name, error, exc_info=error)
        waiting = list(self._in_flight)
        while self._queue is not None and not self._queue.empty():
            waiting.append(self._queue.get_nowait())
        for _, future in waiting:
            if not future.done():
                future.set_exception(
                    BatcherStopped(f"the {self.name} batcher is not running ({self.failure})")
                )

    async def _run(self) -> None:
        while True:
            batch = await self._collect()
            batch = [(item, future) for item, future in batch if not future.done()]  # callers that gave up
            if batch:
                self._in_flight = batch
                await self._compute(batch)
                self._in_flight = []

    async def _collect(self) -> list[tuple[Item, asyncio.Future]]:
        loop = asyncio.get_running_loop()
        assert self._queue is not None
        batch = [await self._queue.get()]
        deadline = loop.time() + self.max_wait_s
        while len(batch) < self.max_batch:
            if not self._queue.empty():  # take what is already waiting without yielding
                batch.append(self._queue.get_nowait())
                continue
            remaining = deadline - loop.time()
            if remaining <= 0:
                break
            try:
                batch.append(await asyncio.wait_for(self._queue.get(), remaining))
            except asyncio.TimeoutError:  # (builtin TimeoutError only from Python 3.11)
                break
        return batch

    async def _compute(self, batch: list[tuple[Item, asyncio.Future]]) -> None:
        loop = asyncio.get_running_loop()
        try:
            if self.on_batch is not None:
                self.on_batch(len(batch))
            results = await loop.run_in_executor(self.executor, self.compute, [item for item, _ in batch])
            if len(results) != len(batch):
                raise RuntimeError(f"{len(batch)} requests but {len(results)} results")
        except Exception as e:  # noqa: BLE001 (handed to this batch's callers; the next batch is unaffected)
            log.error("a %s batch of %d failed: %r", self.name, len(batch), e, exc_info=e)
            for _, future in batch:
                if not future.done():
                    # The client sees no internals (paths, messages); the log has them.
                    failure = BatchFailed(
                        f"the {self.name} batch this request was in failed; the server log says why"
                    )
                    failure.__cause__ = e
                    future.set_exception(failure)
            return
        for (_, future), result in zip(batch, results, strict=True):
            if not future.done():
                future.set_result(result)
