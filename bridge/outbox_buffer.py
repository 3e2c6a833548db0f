"""The outbox's calls into its buffer: on one worker thread when the buffer does I/O, and what it last said it holds.

The outbox never calls into the spool to answer a question (`len`, `backlog`, its snapshot): it keeps the count
and figures the spool gave after its last change, and refreshes them after each change it makes.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any, TypeVar

from bridge import outbox_limits as limits
from bridge.buffer import Buffer, BufferStats
from bridge.delivery import log

T = TypeVar("T")


class OutboxBuffer:
    """One sink's buffer as its outbox uses it: calls in order, its last figures, and the work left to run aside."""

    def __init__(self, buffer: Buffer, sink_name: str, monotonic: Callable[[], float]) -> None:
        self.buffer = buffer
        self.sink_name = sink_name
        self.count = 0  # entries in the spool (as of the last call into it)
        self.stats = BufferStats(0, 0, None, 0)  # refreshed after each change the outbox makes
        self.grown = asyncio.Event()  # set when entries were added or made takeable again: the replay wakes
        self.side_tasks: set[asyncio.Future[Any]] = set()
        self._monotonic = monotonic
        self._executor = ThreadPoolExecutor(1, f"spool-{sink_name}") if buffer.durable else None
        self._errors_logged: dict[str, float] = {}  # what failed -> when it was last logged

    async def call(self, fn: Callable[..., T], *args: Any) -> T:
        """Call into the buffer: on a worker thread, one call at a time, when it does I/O."""
        if self._executor is None:
            return fn(*args)
        return await asyncio.get_running_loop().run_in_executor(self._executor, fn, *args)

    async def refresh(self) -> BufferStats:
        """Ask the buffer for its figures and keep them."""
        st = await self.call(self.buffer.stats)
        self.stats = st
        return st

    async def offer_again(self, ids: list[int]) -> None:
        """Make held-back entries takeable again and wake the replay for them."""
        await self.call(self.buffer.reject, ids)
        self.count = (await self.refresh()).count
        self.grown.set()

    async def forget_older(self, topic: str, through_id: int) -> None:
        """Remove the topic's retained states up to `through_id` from the spool, then count what it holds."""
        await self.call(self.buffer.forget_retained, topic, through_id)
        self.count = (await self.refresh()).count

    def in_background(self, work: Awaitable[Any]) -> None:
        """Run `work` beside the outbox's loops; a failure is logged as a warning."""
        task = asyncio.ensure_future(work)
        self.side_tasks.add(task)
        task.add_done_callback(self._side_done)

    def _side_done(self, task: asyncio.Future[Any]) -> None:
        self.side_tasks.discard(task)
        if not task.cancelled() and task.exception() is not None:
            log.warning("sink %s: %s", self.sink_name, task.exception())

    def log_failure(self, what: str, text: str, *args: Any) -> None:
        """An ERROR line about a spool that keeps failing, at most once per REFUSAL_LOG_INTERVAL for each `what`."""
        now = self._monotonic()
        if now - self._errors_logged.get(what, -limits.REFUSAL_LOG_INTERVAL) >= limits.REFUSAL_LOG_INTERVAL:
            self._errors_logged[what] = now
            log.error(text, *args)

    async def close(self) -> None:
        """Close the buffer (logged, never raised) and let its worker thread go."""
        try:
            await self.call(self.buffer.close)
        except Exception:
            log.exception("sink %s: closing the spool failed", self.sink_name)
        if self._executor is not None:
            self._executor.shutdown(wait=True)
