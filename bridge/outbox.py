"""A sink's outbox: a bounded in-memory queue drained with a window of publishes in flight.

`submit` hands a message over without waiting; `publish` returns once it is durable (PUBACK),
which is what the MCP ACK will wait on. When the
broker is away long enough to fill the queue, the oldest messages are dropped and counted (the
SQLite spool takes over this role in the store-and-forward work).
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import functools
import logging
from typing import Protocol

from gateway.errors import SinkError
from gateway.types import Message

log = logging.getLogger(__name__)


class Publisher(Protocol):
    """Anything with an awaitable durable publish."""

    name: str

    async def publish(self, message: Message) -> None:
        """Return once the message is durable."""

    def try_publish(self, message: Message) -> asyncio.Future[None] | None:
        """Start publishing now if possible: a future of its durability, or None to use publish()."""


class Outbox:
    """FIFO of messages for one sink, published with up to `window` in flight."""

    def __init__(self, sink: Publisher, *, capacity: int = 100_000, window: int = 64) -> None:
        self.sink = sink
        self.capacity = capacity
        self.dropped = 0
        self._queue: collections.deque[tuple[Message, asyncio.Future[None] | None]] = collections.deque()
        self._ready = asyncio.Event()
        self._window = asyncio.Semaphore(window)
        self._task: asyncio.Task[None] | None = None
        self._inflight: set[asyncio.Task[None]] = set()
        self._busy = 0  # messages handed to the sink, not yet acknowledged
        self._stopped = False

    def __len__(self) -> int:
        return len(self._queue)

    def submit(self, message: Message) -> None:
        """Queue a message without waiting for it."""
        self._put(message, None)

    def enqueue(self, message: Message) -> asyncio.Future[None]:
        """Queue a message now; the future resolves once the sink has it durably (SinkError if it never will)."""
        fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        if len(self._queue) >= self.capacity:
            # Someone waits on this one (an MCP ACK): refuse it rather than evict others.
            raise SinkError(f"sink {self.sink.name}: outbox full ({self.capacity} messages)")
        self._put(message, fut)
        return fut

    async def publish(self, message: Message) -> None:
        """Queue a message and return once the sink has it durably (SinkError if it never will)."""
        await self.enqueue(message)

    def _put(self, message: Message, fut: asyncio.Future[None] | None) -> None:
        if self._stopped:
            raise SinkError(f"sink {self.sink.name}: outbox stopped")
        if len(self._queue) >= self.capacity:
            _, old = self._queue.popleft()
            self.dropped += 1
            if old is not None and not old.done():
                old.set_exception(SinkError(f"sink {self.sink.name}: outbox full, message dropped"))
            if self.dropped == 1 or self.dropped % 10_000 == 0:
                log.warning(
                    "sink %s: outbox full (%d), %d oldest messages dropped so far",
                    self.sink.name,
                    self.capacity,
                    self.dropped,
                )
        self._queue.append((message, fut))
        self._ready.set()

    async def start(self) -> None:
        """Start draining."""
        self._task = asyncio.create_task(self._drain(), name=f"outbox:{self.sink.name}")

    async def flush(self, timeout: float) -> bool:
        """Wait until everything queued so far is published; False on timeout."""

        async def drained() -> None:
            while self._queue or self._busy:
                await asyncio.sleep(0.01)

        try:
            async with asyncio.timeout(timeout):
                await drained()
        except TimeoutError:
            return False
        return True

    async def stop(self) -> None:
        """Stop draining; what is still queued is failed (the spool will keep it later)."""
        self._stopped = True
        if self._task:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        for task in list(self._inflight):
            task.cancel()
        while self._queue:
            _, fut = self._queue.popleft()
            if fut is not None and not fut.done():
                fut.set_exception(SinkError(f"sink {self.sink.name} stopped"))

    async def _drain(self) -> None:
        while True:
            if not self._queue:
                self._ready.clear()
                await self._ready.wait()
                continue
            await self._window.acquire()
            message, fut = self._queue.popleft()
            self._busy += 1
            started = self.sink.try_publish(message)
            if started is not None:
                # Connected: paho has it; the PUBACK resolves `started` (no task per message).
                started.add_done_callback(functools.partial(self._finished, fut))
                continue
            task = asyncio.create_task(self._one(message, fut))
            self._inflight.add(task)
            task.add_done_callback(self._inflight.discard)

    def _finished(self, fut: asyncio.Future[None] | None, started: asyncio.Future[None]) -> None:
        self._window.release()
        self._busy -= 1
        if fut is None or fut.done():
            if not started.cancelled() and started.exception() is not None:
                log.debug("sink %s: %s", self.sink.name, started.exception())
            return
        if started.cancelled():
            fut.set_exception(SinkError(f"sink {self.sink.name} stopped"))
        elif (exc := started.exception()) is not None:
            fut.set_exception(exc if isinstance(exc, SinkError) else SinkError(f"sink {self.sink.name}: {exc}"))
        else:
            fut.set_result(None)

    async def _one(self, message: Message, fut: asyncio.Future[None] | None) -> None:
        # Disconnected: wait for the connection inside the sink's own publish.
        try:
            await self.sink.publish(message)
        except SinkError as exc:
            log.debug("sink %s: %s", self.sink.name, exc)
            if fut is not None and not fut.done():
                fut.set_exception(exc)
        except asyncio.CancelledError:
            if fut is not None and not fut.done():
                fut.set_exception(SinkError(f"sink {self.sink.name} stopped"))
            raise
        except Exception as exc:
            log.error("sink %s: publish failed: %r", self.sink.name, exc)
            if fut is not None and not fut.done():
                fut.set_exception(SinkError(f"sink {self.sink.name}: {exc}"))
        else:
            if fut is not None and not fut.done():
                fut.set_result(None)
        finally:
            self._window.release()
            self._busy -= 1
