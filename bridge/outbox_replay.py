"""The replay: the spool's backlog to the broker at `replay_rate`, in batches taken, then accepted or rejected.

After a (re)connect the replay starts after a random delay in [0, `replay_delay`] s: a fleet of gateways that a
broker restart brought back in the same few seconds does not start every backlog at once.

A spooled retained state goes out only if it is still the newest of its topic (see `outbox_retained`). A spooled
entry the broker connection refuses (a topic paho will not publish) is dropped after REPLAY_ATTEMPTS tries, so
that it cannot hold up the backlog behind it.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import random
from collections.abc import Callable

from bridge import outbox_limits as limits
from bridge.buffer import Entry
from bridge.delivery import OutboxStats, Publisher, log, start_publish
from bridge.outbox_buffer import OutboxBuffer
from bridge.outbox_retained import RetainedTopics
from gateway.errors import SinkError, SinkOffline


def draw_delay(limit: float) -> float:
    """How long this replay waits after a connect: uniform in [0, limit], so a fleet spreads over the whole span."""
    return random.uniform(0.0, limit)


class Replay:
    """The loop that sends the spool's backlog, and the refusal count of each entry the broker refused."""

    def __init__(
        self,
        sink: Publisher,
        spool: OutboxBuffer,
        retained: RetainedTopics,
        stats: OutboxStats,
        *,
        replay_rate: float,
        monotonic: Callable[[], float],
        replay_delay: float = 0.0,
    ) -> None:
        self.replay_rate = replay_rate
        self.replay_delay = replay_delay
        self.holding_off = 0.0  # seconds the replay still waits after a reconnect (0: not waiting)
        # The sink was seen offline since the replay last ran: a (re)connect, after which the replay holds off.
        self._reconnected = False
        self.replaying = 0  # entries of the step under way
        self.refusals: dict[int, int] = {}  # spool id -> refused publishes (entries in the replay only)
        self._sink = sink
        self._spool = spool
        self._retained = retained
        self._stats = stats
        self._monotonic = monotonic

    async def run(self) -> None:
        """Replay the backlog at replay_rate while the sink is connected, for ever."""
        batch = max(1, min(limits.REPLAY_BATCH, int(self.replay_rate / 10) or 1))
        next_at = self._monotonic()
        # A backlog left by an earlier run is replayed after the first connect's delay too (a fleet restarted by a
        # power cut comes back together).
        self._reconnected = self._spool.count > 0
        while True:
            if self._spool.count <= 0:
                self._spool.grown.clear()
                await self._spool.grown.wait()
                next_at = self._monotonic()  # no catching up for the time spent idle
                continue
            if not self._sink.connected:
                self._reconnected = True
                await self._sink.wait_connected(1.0)
                next_at = self._monotonic()
                continue
            if self._reconnected:
                self._reconnected = False
                await self._hold_off()
                next_at = self._monotonic()
                continue  # connected still? (if not, the next connect draws a delay of its own)
            delay = next_at - self._monotonic()
            if delay > 0:
                await asyncio.sleep(delay)
            entries: list[Entry] = []
            try:
                entries = await self._spool.call(self._spool.buffer.take, batch)
                if not entries:
                    self._spool.count = 0
                    continue
                next_at += len(entries) / self.replay_rate
                self.replaying = len(entries)
                await self._step(entries)
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                if isinstance(exc, SinkError):  # the spool cannot read or write (a full disk): try again later
                    self._spool.log_failure("replay", "sink %s: replay paused: %s", self._sink.name, exc)
                else:
                    log.exception("sink %s: replay failed; going on in %g s", self._sink.name, limits.LOOP_PAUSE)
                    with contextlib.suppress(Exception):  # taken but not settled: takeable again
                        await self._spool.call(self._spool.buffer.reject, [e.id for e in entries])
                await asyncio.sleep(limits.LOOP_PAUSE)
                next_at = self._monotonic()
            finally:
                self.replaying = 0

    async def _hold_off(self) -> None:
        """Wait a random part of replay_delay before the backlog goes out after a (re)connect."""
        if self.replay_delay <= 0:
            return
        delay = draw_delay(self.replay_delay)
        log.info("sink %s: replay of the backlog starts in %.1f s (replay_delay)", self._sink.name, delay)
        until = self._monotonic() + delay
        try:
            while (left := until - self._monotonic()) > 0:
                self.holding_off = left
                await asyncio.sleep(min(left, 1.0))
        finally:
            self.holding_off = 0.0

    async def _step(self, entries: list[Entry]) -> None:
        """Publish one batch; accept what the broker acknowledged (and what is superseded), reject the rest."""
        done: list[int] = []
        sent: list[tuple[Entry, asyncio.Future[None]]] = []
        back: list[int] = []
        for i, e in enumerate(entries):
            newest = self._retained.newest_of(e)
            if newest is None:
                done.append(e.id)  # the broker has a newer state of this topic: this one would set it back
                continue
            if newest != e.id:
                done += self._retained.hold_back(e)  # a newer state is on its way: this one waits for its outcome
                continue
            # With its sample time (the SQLite spool gives the message back without it): a Sparkplug sink dates a
            # replayed DDEATH by it, and takes a status as stale by it.
            message = e.message if e.message.ts is not None else dataclasses.replace(e.message, ts=e.sampled_ms)
            started = start_publish(self._sink, message)
            if started is None:
                back = [x.id for x in entries[i:] if x.id not in done]
                self._reconnected = True
                break
            sent.append((e, started))
        if sent:
            await asyncio.wait([f for _, f in sent])
        for e, f in sent:
            exc = None if f.cancelled() else f.exception()
            if f.cancelled() or isinstance(exc, SinkOffline):
                back.append(e.id)
                self._reconnected = True  # the connection went (and may be back already): hold off again
                continue
            if exc is not None:
                # The connection is up and refused it (a topic or payload paho will not publish).
                if self._undeliverable(e, exc):
                    done.append(e.id)
                    back += self._retained.given_up(e)
                else:
                    back.append(e.id)
                continue
            done.append(e.id)
            self.refusals.pop(e.id, None)
            self._stats.replayed += 1
            if e.message.retain:
                done += self._retained.delivered(e)
        if back:
            await self._spool.call(self._spool.buffer.reject, back)
        if done:
            try:
                await self._spool.call(self._spool.buffer.accept, done)
            except SinkError:
                # Not removed (a removal needs disk space too): they go out again later, at least once.
                await self._spool.call(self._spool.buffer.reject, done)
                raise
        self._spool.count = (await self._spool.refresh()).count

    def _undeliverable(self, e: Entry, exc: BaseException) -> bool:
        """Count one refused publish of a spooled entry; True once it is to be dropped."""
        failures = self.refusals.get(e.id, 0) + 1
        if failures < limits.REPLAY_ATTEMPTS:
            if e.id not in self.refusals and len(self.refusals) >= limits.REPLAY_FAILURES_KEPT:
                # Counts of entries evicted or expired since are never cleared by a delivery: the oldest goes,
                # so that a full table never stops counting (an entry never counted would be offered forever).
                del self.refusals[next(iter(self.refusals))]
            self.refusals[e.id] = failures
            return False
        self.refusals.pop(e.id, None)
        self._stats.undeliverable += 1
        log.error(
            "sink %s: dropped spooled message %d to %r: refused %d times: %s",
            self._sink.name,
            e.id,
            e.message.topic,
            failures,
            exc,
        )
        return True
