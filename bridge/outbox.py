"""A sink's outbox: live messages straight to the broker, everything else through the sink's spool.

Every message the gateway hands over (`put`) ends in one of three places until the broker acknowledges it:
- the live queue (`outbox_live`), drained with a window of publishes in flight, while the sink is connected,
  its live queue is below the high-water mark and (with `order: strict`) nothing waits in the spool;
- the spool (`Buffer`), otherwise (but a message someone awaits stays live while the sink is connected: its
  slow PUBACK is the back-pressure): messages gathered for `commit_window` are added in one transaction
  (`outbox_commit`), from a worker thread when the buffer does I/O (`outbox_buffer`);
- back in the spool when the connection drops before the PUBACK (the sink fails those publishes with
  `SinkOffline`).

`put` returns a future that resolves once the message is durable: PUBACKed, or committed to the spool; it
fails (BufferFull with `when_full: reject`, a spool that cannot write) when neither will happen, which is what
makes MCP ACKs truthful. A caller that does not wait may ignore it.

The backlog is replayed at `replay_rate` while live messages keep flowing (`order: live`; `outbox_replay`).
Retained topics carry state, not history: a replay never sets one back (`outbox_retained`). Both orders are
the order messages were handed over in (spool ids), never their `ts`, so no step of the wall clock changes them.

A message whose ts was taken while the clock was known not synchronised carries an anchor (gateway.types), kept
in the queue and the spool; it goes out dated by the clock as it reads then (`delivery.ClockedPublisher`).

No message stops the outbox, and any other failure in a loop is logged and the loop goes on after a pause.
`stop` never raises: it keeps in the spool what it can and logs the rest. The bounds are in `outbox_limits`.
"""

from __future__ import annotations

import asyncio
import dataclasses
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

from bridge import outbox_limits as limits
from bridge.buffer import Buffer, MemoryBuffer
from bridge.delivery import ClockedPublisher, Delivery, OutboxStats, Publisher, Restamp, log, restamp_ts
from bridge.outbox_buffer import OutboxBuffer
from bridge.outbox_commit import GroupCommit
from bridge.outbox_live import LiveQueue
from bridge.outbox_replay import Replay
from bridge.outbox_retained import RetainedTopics
from gateway.errors import SinkError
from gateway.supervise import Supervised, Supervisor
from gateway.types import CLOCK, Message

Order = Literal["live", "strict"]


@dataclass(frozen=True)
class OutboxSnapshot:
    """The outbox's and its spool's figures at one moment, as `P/metrics` publishes them (field = metric key)."""

    queued: int  # not yet acknowledged or spooled
    spool_messages: int
    spool_bytes: int
    spool_oldest_age_s: float | None  # None while the spool is empty
    dropped: int  # evicted, expired, refused, or given up as undeliverable
    spool_commits: int
    spool_fsyncs: int
    spool_bytes_written: int
    live: int
    spooled: int
    replayed: int
    coalesced: int
    refused: int
    undeliverable: int


class Outbox:
    """The way from the gateway to one sink: live queue, spool, replay."""

    def __init__(
        self,
        sink: Publisher,
        buffer: Buffer | None = None,
        *,
        window: int = 64,
        high_water: int = 10_000,
        commit_window: float = 0.12,
        replay_rate: float = 500.0,
        replay_delay: float = 0.0,
        order: Order = "live",
        clock: Callable[[], float] | None = None,
        monotonic: Callable[[], float] = time.monotonic,
        supervisor: Supervisor | None = None,
        prepare: Callable[[Message], Message | None] | None = None,
        restamp: Restamp = restamp_ts,
    ) -> None:
        """`prepare`: what the sink makes of each message handed over, before it is queued or spooled (None: the
        sink has no use for it, and its future resolves at once); a Sparkplug sink's births and data come so.
        `clock`: the wall clock (the process clock's by default); `restamp`: writes a corrected ts into a message
        (the gateway's telemetry carries its ts in the payload too)."""
        self.sink = sink
        self.buffer: Buffer = buffer if buffer is not None else MemoryBuffer(name=f"sink {sink.name} memory buffer")
        self.high_water = high_water
        self.order = order
        self.stats = OutboxStats()
        self._clock = clock or (lambda: CLOCK.wall())
        self._monotonic = monotonic
        self._seq = 0
        self._prepare = prepare
        self._spool = OutboxBuffer(self.buffer, sink.name, monotonic)
        self._retained = RetainedTopics()
        self._commits = GroupCommit(
            self._spool,
            self._retained,
            self.stats,
            commit_window=commit_window,
            not_retained=self._not_retained,
            monotonic=monotonic,
        )
        publisher = ClockedPublisher(sink, self.stats, restamp)  # what the loops publish to
        self._live = LiveQueue(
            publisher,
            self._spool,
            self._commits,
            self._retained,
            self.stats,
            window=window,
            not_retained=self._not_retained,
        )
        self._replay = Replay(
            publisher,
            self._spool,
            self._retained,
            self.stats,
            replay_rate=replay_rate,
            monotonic=monotonic,
            replay_delay=replay_delay,
        )
        # The gateway's supervisor (alone, e.g. in a test, one of its own): a loop that fails anyway is logged,
        # restarted with back-off and named by its problems() (and by health()).
        self._supervisor = supervisor or Supervisor()
        self._supervised: list[Supervised] = []
        self._stopped = False

    def __len__(self) -> int:
        """Messages not yet acknowledged or spooled (the live queue, in flight, and waiting for a commit)."""
        return len(self._live) + self._commits.waiting

    @property
    def commit_window(self) -> float:
        """Seconds the group commit gathers messages for one transaction."""
        return self._commits.commit_window

    @property
    def replay_rate(self) -> float:
        """Spooled messages replayed per second, at most."""
        return self._replay.replay_rate

    @property
    def backlog(self) -> int:
        """Messages in the spool or on their way into it."""
        return self._spool.count + self._commits.waiting

    def health(self, *, loops: bool = True) -> str | None:
        """None while the outbox runs; else why not: not started, stopped, or (with `loops`) the supervisor's
        problem with one of its loops, that failed and waits for its restart.

        The gateway asks with `loops=False`: its supervisor runs the loops, and its own problems() name them.
        """
        if self._stopped:
            return "stopped"
        if not self._supervised:
            return "not started"
        if loops and (problems := self._supervisor.problems(self._supervised)):
            return problems[0]
        return None

    # --- in -------------------------------------------------------------------------------------

    def put(self, message: Message, *, awaited: bool = False) -> asyncio.Future[None]:
        """Hand a message over; the future resolves once it is durable (SinkError if it never will be).

        `awaited`: someone waits on the future (an MCP ACK), so the message stays live while the broker is
        connected (its slow PUBACK is the back-pressure), is never replaced by a newer state of its topic, and is
        spooled if the broker leaves it unacknowledged for LIVE_WAIT_MAX. Otherwise the future may be ignored.
        """
        if self._stopped:
            raise SinkError(f"sink {self.sink.name}: outbox stopped")
        if self._prepare is not None:
            prepared = self._prepare(message)
            if prepared is None:
                unused: asyncio.Future[None] = asyncio.get_running_loop().create_future()
                unused.set_result(None)
                return unused
            message = self._keep_anchor(message, prepared)
        self._seq += 1
        if message.ts is None:
            # Dated here: anchored here (a status, a result), so that it is corrected as the router's samples are.
            ts = int(self._clock() * 1000)
            if (anchor := CLOCK.anchor(ts)) is not None:
                message = dataclasses.replace(message, ts=ts, anchor=anchor)
        else:
            ts = message.ts
        future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        item = Delivery(message, ts, future, awaited=awaited, seq=self._seq, since=self._monotonic())
        if message.retain and self._retained.handed_over(item, self._live.in_flight):
            self.stats.coalesced += 1
        if self._live_ok(awaited):
            self._live.append(item)
        else:
            self._commits.spool_it(item)
        return future

    @staticmethod
    def _keep_anchor(message: Message, prepared: Message) -> Message:
        """`prepared` with the anchor of the `message` it was made of (moved with its ts if prepare redated it), or
        one of its own if prepare dated an undated message by the clock now (a Sparkplug status)."""
        if prepared.anchor is not None or prepared.ts is None:
            return prepared
        if message.anchor is not None:
            anchor: int | None = message.anchor + (prepared.ts - message.ts if message.ts is not None else 0)
        else:
            anchor = CLOCK.anchor(prepared.ts) if message.ts is None else None
        return prepared if anchor is None else dataclasses.replace(prepared, anchor=anchor)

    def _live_ok(self, awaited: bool) -> bool:
        if not self.sink.connected:
            return False
        if self.order == "strict" and self.backlog + self._replay.replaying:
            return False
        # Someone waits on this one (an MCP ACK) and the broker is there: let them wait for its PUBACK. Slow
        # ACKs are the devices' back-pressure, and their number is bounded by the MCP server's in-flight limit;
        # spooling them instead would ACK at disk speed and take in more than the broker can be given.
        return awaited or len(self._live) < self.high_water

    def _not_retained(self, item: Delivery) -> None:
        """A retained message that will not reach the broker: its topic's newest spooled state is the one to send."""
        again = self._retained.lost(item)
        if again:
            self._spool.in_background(self._spool.offer_again(again))

    # --- lifecycle ------------------------------------------------------------------------------

    async def start(self) -> None:
        """Learn what the spool holds from an earlier run, then start draining, committing and replaying."""
        self._retained.learn(await self._spool.call(self.buffer.newest_retained))
        self._spool.count = (await self._spool.refresh()).count  # also what snapshot() shows until the next refresh
        name = self.sink.name
        loops = {
            f"outbox:{name}:live": self._live.run,
            f"outbox:{name}:commit": self._commits.run,
            f"outbox:{name}:replay": self._replay.run,
            f"outbox:{name}:housekeeping": self._housekeeping,
        }
        self._supervised = [self._supervisor.spawn(task, loop) for task, loop in loops.items()]

    async def flush(self, timeout: float) -> bool:
        """Wait until the live queue is acknowledged and nothing waits for a commit; False on timeout."""
        try:
            async with asyncio.timeout(timeout):
                while len(self):
                    await asyncio.sleep(0.01)
        except TimeoutError:
            return False
        return True

    async def stop(self) -> None:
        """Stop; what is not acknowledged yet goes to the spool (kept for the next start), then close it.

        Never raises (the gateway stops every outbox in turn): what cannot be kept is logged and its
        waiters fail.
        """
        self._stopped = True
        if self._supervised:
            # Failures were logged when they happened; what a failed loop held is still kept below.
            await self._supervisor.stop(*self._supervised)
        if self._commits.task is not None:
            try:
                await self._commits.task  # a commit under way finishes: its messages are in the spool
            except Exception:
                log.exception("sink %s: the last spool commit failed", self.sink.name)
        # In their original order: the live queue may hold younger messages than some spilled or bounced ones.
        leftovers = sorted({*self._live.in_flight, *self._live.queue, *self._commits.pending}, key=lambda it: it.seq)
        self._live.in_flight.clear()
        self._live.queue.clear()
        self._commits.pending = []
        try:
            await self._commits.commit(leftovers)
        except Exception:
            log.exception("sink %s: %d message(s) could not be spooled at stop", self.sink.name, len(leftovers))
        for it in leftovers:
            if not it.settled:
                it.resolve(SinkError(f"sink {self.sink.name}: outbox stopped"))
        await self._spool.close()

    def snapshot(self) -> OutboxSnapshot:
        """The outbox's and its spool's figures now (for `P/metrics`, the collector and the status page)."""
        st = self._spool.stats  # refreshed after each change the outbox makes, so never a call into the spool here
        oldest = None if st.oldest_queued_at is None else round(max(0.0, self._clock() - st.oldest_queued_at), 1)
        counts = self.stats
        return OutboxSnapshot(
            queued=len(self),
            spool_messages=st.count,
            spool_bytes=st.bytes,
            spool_oldest_age_s=oldest,
            dropped=st.dropped + counts.refused + counts.undeliverable,
            spool_commits=st.commits,
            spool_fsyncs=st.fsyncs,
            spool_bytes_written=st.bytes_written,
            live=counts.live,
            spooled=counts.spooled,
            replayed=counts.replayed,
            coalesced=counts.coalesced,
            refused=counts.refused,
            undeliverable=counts.undeliverable,
        )

    # --- housekeeping ---------------------------------------------------------------------------

    async def _housekeeping(self) -> None:
        while True:
            try:
                self._live.spill_stalled(self._monotonic())
                await self._spool.call(self.buffer.expire, self._clock())
                self._spool.count = (await self._spool.refresh()).count
            except SinkError as exc:
                self._spool.log_failure("housekeeping", "sink %s: %s", self.sink.name, exc)
            except Exception:
                log.exception("sink %s: housekeeping failed", self.sink.name)
            await asyncio.sleep(limits.HOUSEKEEPING_INTERVAL)
