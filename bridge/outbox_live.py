"""The live queue: messages straight to the broker, with a window of publishes in flight.

What the connection loses before its PUBACK (the sink fails those publishes with `SinkOffline`) goes to the spool,
and so does the queue behind a publish that finds the connection gone, in order.
"""

from __future__ import annotations

import asyncio
import collections
import functools
import time
from collections.abc import Callable

from bridge import outbox_limits as limits
from bridge.delivery import Delivery, OutboxStats, Publisher, log, start_publish
from bridge.outbox_buffer import OutboxBuffer
from bridge.outbox_commit import GroupCommit
from bridge.outbox_retained import RetainedTopics
from gateway.errors import SinkError, SinkOffline

#: A live message the broker refuses is logged at most this often (s) per sink, with a count.
REFUSAL_LOG_INTERVAL = 60.0


class LiveQueue:
    """Messages on their way straight to the broker: the queue, and those the sink has, not yet acknowledged."""

    def __init__(
        self,
        sink: Publisher,
        spool: OutboxBuffer,
        commits: GroupCommit,
        retained: RetainedTopics,
        stats: OutboxStats,
        *,
        window: int,
        not_retained: Callable[[Delivery], None],
    ) -> None:
        self.queue: collections.deque[Delivery] = collections.deque()
        self.in_flight: set[Delivery] = set()  # live messages the sink has, not yet acknowledged
        self._refusals, self._refusal_said = 0, float("-inf")
        self._sink = sink
        self._spool = spool
        self._commits = commits
        self._retained = retained
        self._stats = stats
        self._not_retained = not_retained
        self._ready = asyncio.Event()
        self._window = asyncio.Semaphore(window)

    def __len__(self) -> int:
        """Messages in the queue or in flight."""
        return len(self.queue) + len(self.in_flight)

    def append(self, item: Delivery) -> None:
        """Queue a message for the broker."""
        self.queue.append(item)
        self._ready.set()

    async def run(self) -> None:
        """Hand the queue to the sink, a window of publishes at a time, for ever."""
        while True:
            if not self.queue:
                self._ready.clear()
                await self._ready.wait()
                continue
            await self._window.acquire()
            item = self.queue.popleft() if self.queue else None
            if item is None or item.superseded:
                self._window.release()
                if item is not None:
                    item.resolve()
                continue
            started = start_publish(self._sink, item.message) if self._sink.connected else None
            if started is None:
                # The connection is gone: this and everything behind it goes to the spool, in order.
                self._window.release()
                self._commits.spool_it(item)
                while self.queue:
                    self._commits.spool_it(self.queue.popleft())
                continue
            self.in_flight.add(item)
            started.add_done_callback(functools.partial(self._acknowledged, item))

    def _acknowledged(self, item: Delivery, started: asyncio.Future[None]) -> None:
        self._window.release()
        self.in_flight.discard(item)
        if item.settled:
            return  # stopped meanwhile: it went to the spool
        exc = None if started.cancelled() else started.exception()
        if started.cancelled() or isinstance(exc, SinkOffline):
            # Not acknowledged: keep it (a duplicate if the broker had it after all). Also while stopping:
            # stop() commits what is pending once its awaits are over.
            self._commits.spool_it(item)
            return
        if exc is not None:
            # Refused (the broker said no to it, or paho would not take it): given up, counted, and said at most
            # once a minute (a topic the broker refuses comes at the data's rate).
            self._stats.undeliverable += 1
            self._refusals += 1
            now = time.monotonic()
            if now - self._refusal_said >= REFUSAL_LOG_INTERVAL:
                log.warning("sink %s: %s (%d refused since the last such line)", self._sink.name, exc, self._refusals)
                self._refusal_said, self._refusals = now, 0
            self._not_retained(item)
            item.resolve(exc if isinstance(exc, SinkError) else SinkError(f"sink {self._sink.name}: {exc}"))
            return
        self._stats.live += 1
        if self._retained.acknowledged_live(item):
            self._spool.in_background(self._spool.forget_older(item.message.topic, self._retained.last_id))
        item.resolve()

    def spill_stalled(self, now: float) -> None:
        """Spool the awaited messages the connected broker has left unacknowledged for LIVE_WAIT_MAX by `now`."""
        cutoff = now - limits.LIVE_WAIT_MAX
        stalled = [it for it in self.in_flight if it.awaited and it.since < cutoff and not it.settled]
        if any(it.awaited and it.since < cutoff for it in self.queue):
            keep: collections.deque[Delivery] = collections.deque()
            for it in self.queue:
                (stalled if it.awaited and it.since < cutoff else keep).append(it)
            self.queue = keep
        if stalled:
            log.warning(
                "sink %s: broker has not acknowledged %d message(s) for %.0f s: spooled",
                self._sink.name,
                len(stalled),
                limits.LIVE_WAIT_MAX,
            )
            for it in stalled:
                self._commits.spool_it(it)  # one still with paho may arrive twice: at least once
