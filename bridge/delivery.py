"""One message on its way from the gateway to a sink, the sink as the outbox sees it, and the outbox's counters."""

from __future__ import annotations

import asyncio
import dataclasses
import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

from gateway.errors import SinkError
from gateway.types import CLOCK, Message, ProcessClock

# Every part of the outbox logs as "bridge.outbox": operators (and the tests) filter its lines by that one name.
log = logging.getLogger("bridge.outbox")


class Publisher(Protocol):
    """A sink: an awaitable durable publish, and whether it is connected."""

    name: str

    @property
    def connected(self) -> bool:
        """True while the broker session is up."""

    def topic(self, relative: str) -> str:
        """The full topic a prefix-relative one is published on."""

    def try_publish(self, message: Message) -> asyncio.Future[None] | None:
        """Start publishing now: a future of the broker's acknowledgement, or None while disconnected."""

    async def wait_connected(self, timeout: float) -> bool:
        """Wait up to `timeout` seconds for the broker session; True when it is up."""


class Delivery:
    """One message on its way: its sample time, whether someone awaits it, where it is."""

    __slots__ = ("message", "ts", "future", "awaited", "seq", "since", "superseded", "settled", "to_spool")

    def __init__(
        self, message: Message, ts: int, future: asyncio.Future[None], *, awaited: bool, seq: int, since: float
    ) -> None:
        self.message = message
        self.ts = ts
        self.future = future  # resolves once the message is durable, fails if it never will be
        self.awaited = awaited  # someone waits on the future (an MCP ACK): it stays live and is never coalesced
        self.seq = seq
        self.since = since  # when it was handed over (monotonic)
        self.superseded = False  # a newer retained message of the topic came before this one went out
        self.settled = False  # acknowledged, spooled, superseded or failed: later news about it is ignored
        self.to_spool = False  # waiting for the next spool commit

    def resolve(self, exc: BaseException | None = None) -> None:
        """Settle it: its future resolves (or fails with `exc`), once."""
        self.settled = True
        if not self.future.done():
            if exc is None:
                self.future.set_result(None)
            else:
                self.future.set_exception(exc)
                # Marked as retrieved: a caller that hands a message over without waiting ignores its future, and
                # asyncio must not warn about that; a caller that awaits it still gets the exception.
                self.future.exception()


@dataclass
class OutboxStats:
    """Counters of one outbox (the spool's own figures come from `Buffer.stats`)."""

    live: int = 0  # acknowledged straight from the live queue
    spooled: int = 0  # committed to the spool
    replayed: int = 0  # acknowledged from the spool
    coalesced: int = 0  # retained messages replaced by a newer one of their topic before they went out
    refused: int = 0  # the spool would not take them (full with when_full: reject, a write error, a bad item)
    undeliverable: int = 0  # given up: refused live, or spooled and refused REPLAY_ATTEMPTS times
    unsynchronised: int = 0  # acknowledged with an anchored ts before the clock was known synchronised again


#: Writes a corrected `ts` into a message (its payload too, where the gateway's format carries one).
Restamp = Callable[[Message, int], Message]


def restamp_ts(message: Message, ts: int) -> Message:
    """The default Restamp: the message's `ts` only (a payload that carries its own is the gateway's to rewrite)."""
    return dataclasses.replace(message, ts=ts)


class ClockedPublisher:
    """A sink as the outbox's loops publish to it: a message with an anchor (its ts was taken while the clock was
    known not synchronised) goes out dated anchor + (wall - monotonic) as the clock reads at the publish, so the
    steps of the wall clock since, NTP setting it above all, are taken out; one acknowledged before the clock is
    known synchronised again is counted (`unsynchronised`). What is queued or spooled keeps its anchor: it is
    corrected again, by the clock as it is then, if it goes out later."""

    def __init__(self, sink: Publisher, stats: OutboxStats, restamp: Restamp, clock: ProcessClock = CLOCK) -> None:
        self.sink = sink
        self.name = sink.name
        self._stats = stats
        self._restamp = restamp
        self._clock = clock

    @property
    def connected(self) -> bool:
        """The sink's."""
        return self.sink.connected

    def topic(self, relative: str) -> str:
        """The sink's."""
        return self.sink.topic(relative)

    async def wait_connected(self, timeout: float) -> bool:
        """The sink's."""
        return await self.sink.wait_connected(timeout)

    def try_publish(self, message: Message) -> asyncio.Future[None] | None:
        """The sink's try_publish of the message as dated by the clock now."""
        if message.anchor is None or message.ts is None:
            return self.sink.try_publish(message)
        ts = self._clock.corrected(message.ts, message.anchor)
        unsynchronised = self._clock.synchronized is not True
        out = dataclasses.replace(message if ts == message.ts else self._restamp(message, ts), anchor=None)
        started = self.sink.try_publish(out)
        if started is not None and unsynchronised:
            started.add_done_callback(self._count)
        return started

    def _count(self, started: asyncio.Future[None]) -> None:
        if not started.cancelled() and started.exception() is None:
            self._stats.unsynchronised += 1


def start_publish(sink: Publisher, message: Message) -> asyncio.Future[None] | None:
    """The sink's try_publish; anything it raises comes back as a failed publish, not out of a loop."""
    try:
        return sink.try_publish(message)
    except Exception as exc:
        log.exception("sink %s: publishing to %r failed", sink.name, message.topic)
        failed: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        failed.set_exception(SinkError(f"sink {sink.name}: cannot publish to {message.topic!r}: {exc!r}"))
        return failed
