"""A sink's outbox: live messages straight to the broker, everything else through the sink's spool.

Every message the gateway hands over ends in one of three places until the broker acknowledges it:
- the live queue, drained with a window of publishes in flight, while the sink is connected, its
  live queue is below the high-water mark and (with `order: strict`) nothing waits in the spool;
- the spool (`Buffer`), otherwise (but a message someone waits on stays live while the sink is connected:
  its slow PUBACK is the back-pressure): messages gathered for `commit_window` are added in one
  transaction (one fsync for the lot), from a worker thread when the buffer does I/O;
- back in the spool when the connection drops before the PUBACK (the sink fails those publishes
  with `SinkOffline`).

`enqueue` returns a future that resolves once the message is durable: PUBACKed, or committed to
the spool; it fails (BufferFull with `when_full: reject`, a spool that cannot write) when neither
will happen, which is what makes MCP ACKs truthful.

The backlog is replayed at `replay_rate` while live messages keep flowing (`order: live`).
Retained topics (per-point values, device statuses) carry state, not history: a retained message
waiting in the live queue is replaced by a newer one of its topic, and a spooled one is replayed
only if it is still the newest of its topic, so a replay never sets a retained topic back. The older
spooled states of a topic (up to RETAINED_FALLBACKS) stay in the spool until a newer state is delivered:
if the newest is refused, the newest older one the broker takes is sent instead.

No message stops the outbox: a batch the spool refuses for what its items hold (a `ts` beyond SQLite's
int64, a topic that cannot be UTF-8, a message larger than max_size) is split until only those items
fail (at most SPLIT_ADDS adds), a spooled entry the broker connection refuses (a topic paho will not
publish) is dropped after REPLAY_ATTEMPTS tries, and any other failure in a loop is logged and the loop
goes on after a pause. `stop` never raises: it keeps in the spool what it can and logs the rest.
"""

from __future__ import annotations

import asyncio
import bisect
import collections
import contextlib
import functools
import logging
import time
from collections.abc import Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Literal, Protocol, TypeVar

from bridge.buffer import Buffer, BufferFull, BufferStats, Entry, EntryRefused, MemoryBuffer, StorageError
from gateway.errors import SinkError, SinkOffline
from gateway.supervise import Supervised, Supervisor
from gateway.types import Message

log = logging.getLogger(__name__)

T = TypeVar("T")
Order = Literal["live", "strict"]

#: Entries taken from the spool per replay step, at most.
REPLAY_BATCH = 100
#: Refusal counts kept for spooled entries at most (ten replay batches); the oldest is forgotten first.
REPLAY_FAILURES_KEPT = 10 * REPLAY_BATCH
#: How often expired entries are dropped and the spool's figures refreshed.
HOUSEKEEPING_INTERVAL = 1.0
#: A message someone waits on that the connected broker has not acknowledged after this long is spooled
#: (and its waiter answered on the commit): a stalled broker holds up an MCP ACK this long at most, not
#: until the keep-alive gives up on the connection.
LIVE_WAIT_MAX = 5.0
#: Adds, at most, spent on one refused batch to find the items that cannot be stored: two when the spool
#: names them, else halving it each time (one bad item among a thousand takes about 20); whatever is
#: still unsorted after that is refused.
SPLIT_ADDS = 32
#: Times a spooled entry is offered to a connected broker that refuses it (not a lost connection) before
#: it is dropped, so that it cannot hold up the backlog behind it.
REPLAY_ATTEMPTS = 3
#: Older stored states of a retained topic the replay holds back, at most (taken, neither removed nor sent), while
#: a newer one is on its way: if that one is never delivered, the newest of them goes instead. The oldest ones are
#: let go beyond this: one is needed only if every newer one is refused, and each is memory until then.
RETAINED_FALLBACKS = 8
#: How long a loop waits after an unexpected failure before it goes on.
LOOP_PAUSE = 1.0
#: A refusal is logged at once, then at most this often (with the count in between).
REFUSAL_LOG_INTERVAL = 10.0


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


class _Item:
    """One message on its way: its sample time, who waits for it, where it is."""

    __slots__ = ("message", "ts", "fut", "seq", "since", "superseded", "settled", "to_spool")

    def __init__(self, message: Message, ts: int, fut: asyncio.Future[None] | None, seq: int) -> None:
        self.message = message
        self.ts = ts
        self.fut = fut
        self.seq = seq
        self.since = time.monotonic()  # when it was handed over
        self.superseded = False  # a newer retained message of the topic came before this one went out
        self.settled = False  # acknowledged, spooled or failed: later news about it is ignored
        self.to_spool = False  # waiting for the next spool commit

    def resolve(self, exc: BaseException | None = None) -> None:
        self.settled = True
        if self.fut is not None and not self.fut.done():
            if exc is None:
                self.fut.set_result(None)
            else:
                self.fut.set_exception(exc)


@dataclass
class OutboxStats:
    """Counters of one outbox (the spool's own figures come from `Buffer.stats`)."""

    live: int = 0  # acknowledged straight from the live queue
    spooled: int = 0  # committed to the spool
    replayed: int = 0  # acknowledged from the spool
    coalesced: int = 0  # retained messages replaced by a newer one of their topic before they went out
    refused: int = 0  # the spool would not take them (full with when_full: reject, a write error, a bad item)
    undeliverable: int = 0  # spooled, then dropped: the broker connection refused them REPLAY_ATTEMPTS times


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
        order: Order = "live",
        clock: Callable[[], float] = time.time,
        supervisor: Supervisor | None = None,
    ) -> None:
        self.sink = sink
        self.buffer: Buffer = buffer if buffer is not None else MemoryBuffer(name=f"sink {sink.name} memory buffer")
        self.high_water = high_water
        self.commit_window = commit_window
        self.replay_rate = replay_rate
        self.order = order
        self.stats = OutboxStats()
        self._clock = clock
        self._queue: collections.deque[_Item] = collections.deque()
        self._ready = asyncio.Event()
        self._window = asyncio.Semaphore(window)
        self._handed: set[_Item] = set()  # live messages the sink has, not yet acknowledged
        self._pending: list[_Item] = []  # waiting for the next spool commit
        self._pending_ready = asyncio.Event()
        self._committing = 0  # messages in a spool commit under way
        self._held = 0  # entries in the spool (as of the last call into it)
        self._replaying = 0
        self._spooled_wake = asyncio.Event()
        # topic -> what holds its newest retained message: an _Item (live queue, pending) or a spool id.
        self._retained: dict[str, _Item | int] = {}
        # topic -> the newest retained entry of it committed to the spool: what the broker is to get if a newer
        # state is refused (by the spool or the broker), so that a refusal never sets the topic back further.
        self._spooled_retained: dict[str, int] = {}
        # topic -> ids (ascending) of older retained entries the replay took and holds back while a newer state is
        # on its way: removed once a newer state is delivered, offered again if the newer one never is.
        self._parked: dict[str, list[int]] = {}
        self._last_id = 0  # the newest spool id this outbox committed
        self._seq = 0
        self._executor = ThreadPoolExecutor(1, f"spool-{sink.name}") if self.buffer.durable else None
        # The gateway's supervisor (alone, e.g. in a test, one of its own): a loop that fails anyway is logged,
        # restarted with back-off and named by its problems() (and by health()).
        self._supervisor = supervisor or Supervisor()
        self._supervised: list[Supervised] = []
        self._side_tasks: set[asyncio.Future[Any]] = set()
        self._commit_task: asyncio.Task[None] | None = None
        self._last_stats = BufferStats(0, 0, None, 0)
        self._stopped = False
        self._refusal_logged = -REFUSAL_LOG_INTERVAL
        self._refusals_unlogged = 0
        self._replay_failures: dict[int, int] = {}  # spool id -> refused publishes (entries in the replay only)
        self._errors_logged: dict[str, float] = {}  # what failed -> when it was last logged

    def __len__(self) -> int:
        """Messages not yet acknowledged or spooled (the live queue, in flight, and waiting for a commit)."""
        return len(self._queue) + len(self._handed) + len(self._pending) + self._committing

    @property
    def backlog(self) -> int:
        """Messages in the spool or on their way into it."""
        return self._held + len(self._pending) + self._committing

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

    def submit(self, message: Message) -> None:
        """Hand a message over without waiting for it."""
        self._put(message, None)

    def enqueue(self, message: Message) -> asyncio.Future[None]:
        """Hand a message over; the future resolves once it is durable (SinkError if it never will be)."""
        fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._put(message, fut)
        return fut

    async def publish(self, message: Message) -> None:
        """Hand a message over and return once it is durable."""
        await self.enqueue(message)

    def _put(self, message: Message, fut: asyncio.Future[None] | None) -> None:
        if self._stopped:
            raise SinkError(f"sink {self.sink.name}: outbox stopped")
        self._seq += 1
        ts = message.ts if message.ts is not None else int(self._clock() * 1000)
        item = _Item(message, ts, fut, self._seq)
        if message.retain:
            older = self._retained.get(message.topic)
            if isinstance(older, _Item) and older.fut is None and not older.settled and older not in self._handed:
                older.superseded = True
                self.stats.coalesced += 1
            self._retained[message.topic] = item
        if self._live_ok(waited=fut is not None):
            self._queue.append(item)
            self._ready.set()
        else:
            self._spool(item)

    def _live_ok(self, waited: bool) -> bool:
        if not self.sink.connected:
            return False
        if self.order == "strict" and self.backlog + self._replaying:
            return False
        # Someone waits on this one (an MCP ACK) and the broker is there: let them wait for its PUBACK. Slow
        # ACKs are the devices' back-pressure, and their number is bounded by the MCP server's in-flight limit;
        # spooling them instead would ACK at disk speed and take in more than the broker can be given.
        return waited or len(self._queue) + len(self._handed) < self.high_water

    def _spool(self, item: _Item) -> None:
        if item.to_spool or item.settled:
            return
        item.to_spool = True
        self._pending.append(item)
        self._pending_ready.set()

    # --- lifecycle ------------------------------------------------------------------------------

    async def start(self) -> None:
        """Learn what the spool holds from an earlier run, then start draining, committing and replaying."""
        newest = await self._call(self.buffer.newest_retained)
        for topic, entry_id in newest.items():
            self._retained.setdefault(topic, entry_id)
        self._spooled_retained.update(newest)
        self._last_id = max(newest.values(), default=0)
        self._held = (await self._refresh()).count  # also what figures() shows until the next refresh
        name = self.sink.name
        loops = {
            f"outbox:{name}:live": self._drain,
            f"outbox:{name}:commit": self._commit_loop,
            f"outbox:{name}:replay": self._replay_loop,
            f"outbox:{name}:housekeeping": self._housekeeping,
        }
        self._supervised = [self._supervisor.spawn(task, loop) for task, loop in loops.items()]

    async def flush(self, timeout: float) -> bool:
        """Wait until the live queue is acknowledged and nothing waits for a commit; False on timeout."""
        try:
            async with asyncio.timeout(timeout):
                while self._queue or self._handed or self._pending or self._committing:
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
        if self._commit_task is not None:
            try:
                await self._commit_task  # a commit under way finishes: its messages are in the spool
            except Exception:
                log.exception("sink %s: the last spool commit failed", self.sink.name)
        # In their original order: the live queue may hold younger messages than some spilled or bounced ones.
        leftovers = sorted({*self._handed, *self._queue, *self._pending}, key=lambda it: it.seq)
        self._handed.clear()
        self._queue.clear()
        self._pending = []
        try:
            await self._commit(leftovers)
        except Exception:
            log.exception("sink %s: %d message(s) could not be spooled at stop", self.sink.name, len(leftovers))
        for it in leftovers:
            if not it.settled:
                it.resolve(SinkError(f"sink {self.sink.name}: outbox stopped"))
        try:
            await self._call(self.buffer.close)
        except Exception:
            log.exception("sink %s: closing the spool failed", self.sink.name)
        if self._executor is not None:
            self._executor.shutdown(wait=True)

    def figures(self) -> dict[str, Any]:
        """The outbox's and its spool's figures for `P/metrics`."""
        st = self._last_stats  # refreshed after each change the outbox makes, so never a call into the spool here
        oldest = None if st.oldest_queued_at is None else round(max(0.0, self._clock() - st.oldest_queued_at), 1)
        return {
            "queued": len(self),
            "spool_messages": st.count,
            "spool_bytes": st.bytes,
            "spool_oldest_age_s": oldest,
            "dropped": st.dropped + self.stats.refused + self.stats.undeliverable,
            "spool_commits": st.commits,
            "spool_fsyncs": st.fsyncs,
            "spool_bytes_written": st.bytes_written,
            **vars(self.stats),
        }

    # --- the live queue -------------------------------------------------------------------------

    async def _drain(self) -> None:
        while True:
            if not self._queue:
                self._ready.clear()
                await self._ready.wait()
                continue
            await self._window.acquire()
            item = self._queue.popleft() if self._queue else None
            if item is None or item.superseded:
                self._window.release()
                if item is not None:
                    item.settled = True
                continue
            started = self._try_publish(item.message) if self.sink.connected else None
            if started is None:
                # The connection is gone: this and everything behind it goes to the spool, in order.
                self._window.release()
                self._spool(item)
                while self._queue:
                    self._spool(self._queue.popleft())
                continue
            self._handed.add(item)
            started.add_done_callback(functools.partial(self._acknowledged, item))

    def _try_publish(self, message: Message) -> asyncio.Future[None] | None:
        """The sink's try_publish; anything it raises comes back as a failed publish, not out of a loop."""
        try:
            return self.sink.try_publish(message)
        except Exception as exc:
            log.exception("sink %s: publishing to %r failed", self.sink.name, message.topic)
            failed: asyncio.Future[None] = asyncio.get_running_loop().create_future()
            failed.set_exception(SinkError(f"sink {self.sink.name}: cannot publish to {message.topic!r}: {exc!r}"))
            return failed

    def _acknowledged(self, item: _Item, started: asyncio.Future[None]) -> None:
        self._window.release()
        self._handed.discard(item)
        if item.settled:
            return  # stopped meanwhile: it went to the spool
        exc = None if started.cancelled() else started.exception()
        if started.cancelled() or isinstance(exc, SinkOffline):
            # Not acknowledged: keep it (a duplicate if the broker had it after all). Also while stopping:
            # stop() commits what is pending once its awaits are over.
            self._spool(item)
            return
        if exc is not None:
            log.warning("sink %s: %s", self.sink.name, exc)
            self._not_retained(item)
            item.resolve(exc if isinstance(exc, SinkError) else SinkError(f"sink {self.sink.name}: {exc}"))
            return
        self.stats.live += 1
        if item.message.retain and self._retained.get(item.message.topic) is item:
            del self._retained[item.message.topic]  # the broker has the newest: nothing to replay
            if item.message.topic in self._spooled_retained:
                # Older states of the topic in the spool must not come back after a restart either.
                self._spooled_retained.pop(item.message.topic, None)
                self._parked.pop(item.message.topic, None)  # held back in the spool: the forget removes them
                self._background(self._forget_older(item.message.topic, self._last_id))
        item.resolve()

    async def _forget_older(self, topic: str, through_id: int) -> None:
        """Remove the topic's retained states up to `through_id` from the spool, then count what it holds."""
        await self._call(self.buffer.forget_retained, topic, through_id)
        self._held = (await self._refresh()).count

    def _background(self, work: Awaitable[Any]) -> None:
        task = asyncio.ensure_future(work)
        self._side_tasks.add(task)
        task.add_done_callback(self._side_done)

    def _side_done(self, task: asyncio.Future[Any]) -> None:
        self._side_tasks.discard(task)
        if not task.cancelled() and task.exception() is not None:
            log.warning("sink %s: %s", self.sink.name, task.exception())

    # --- into the spool -------------------------------------------------------------------------

    async def _commit_loop(self) -> None:
        while True:
            await self._pending_ready.wait()
            if self.commit_window and self.buffer.durable:
                await asyncio.sleep(self.commit_window)  # gather: one transaction, one fsync
            batch, self._pending = self._pending, []
            self._pending_ready.clear()
            batch.sort(key=lambda it: it.seq)  # failed in-flight messages come back after younger ones
            # Counted as committing in this same step: between here and the task's first step, flush(), len()
            # and the backlog would otherwise miss the batch (and `order: strict` let younger messages go live).
            items = self._begin_commit(batch)
            # Shielded: stop() waits for it rather than cutting a commit (and its waiters) in half.
            self._commit_task = asyncio.ensure_future(self._write(items))
            try:
                await asyncio.shield(self._commit_task)
            except asyncio.CancelledError:
                raise
            except Exception:  # _commit settles its items whatever happens: this is a bug, not a reason to stop
                log.exception("sink %s: spool commit failed", self.sink.name)
                await asyncio.sleep(LOOP_PAUSE)
            finally:
                if self._commit_task.done():
                    self._commit_task = None

    async def _commit(self, batch: list[_Item]) -> None:
        """Add the batch to the spool; settle everyone waiting on it (stored, or failed with SinkError)."""
        await self._write(self._begin_commit(batch))

    def _begin_commit(self, batch: list[_Item]) -> list[_Item]:
        """Settle the superseded items of the batch and count the rest as committing: the ones to write."""
        items = [it for it in batch if not it.superseded or it.fut is not None]
        for it in batch:
            if it.superseded and it.fut is None:
                it.settled = True
        self._committing += len(items)
        return items

    async def _write(self, items: list[_Item]) -> None:
        """Write items counted by _begin_commit; they stay counted until the spool's count includes them."""
        if not items:
            return
        stored = 0
        held: int | None = None
        try:
            try:
                stored = await self._store(items)
            except Exception as exc:
                log.exception("sink %s: spool commit failed", self.sink.name)
                self._refused([it for it in items if not it.settled], SinkError(f"sink {self.sink.name}: {exc!r}"))
            with contextlib.suppress(Exception):
                held = (await self._refresh()).count  # also counts out what drop_oldest evicted
        finally:
            # One step, so that the backlog never looks empty between the commit and its count.
            self._committing -= len(items)
            self._held = held if held is not None else self._held + stored
        if stored:
            self._spooled_wake.set()

    async def _store(self, items: list[_Item]) -> int:
        """Add `items` in one transaction; how many were stored.

        If the spool refuses them for what they hold (not for room or storage), the items it names fail and
        the rest is stored in one more add; if it names none, the batch is halved and each half stored on
        its own, older first, until only the items that cannot be stored fail: at most SPLIT_ADDS adds split
        further, each half still waiting then is tried once more as it is.
        """
        stored, budget = 0, SPLIT_ADDS
        todo = [items]  # the next to try at the end
        while todo:
            chunk = todo.pop()
            budget -= 1
            try:
                ids = await self._add(chunk)
            except SinkError as exc:
                # Full, disk, I/O: the same for every item. Anything else may be about some items only.
                whole = isinstance(exc, (BufferFull, StorageError)) and not isinstance(exc, EntryRefused)
                bad = set(exc.bad) if isinstance(exc, EntryRefused) else set()
                if not whole and bad and budget > 0 and bad.issubset(range(len(chunk))):
                    # The buffer named the items at fault: they fail, the others go in as one.
                    self._refused([it for i, it in enumerate(chunk) if i in bad], exc)
                    rest = [it for i, it in enumerate(chunk) if i not in bad]
                    if rest:
                        todo.append(rest)
                    continue
                if whole or len(chunk) == 1 or budget <= 0:
                    self._refused(chunk, exc)
                    continue
                half = len(chunk) // 2
                todo += [chunk[half:], chunk[:half]]
                continue
            self._stored(chunk, ids)
            stored += len(ids)
        return stored

    async def _add(self, items: list[_Item]) -> list[int]:
        """buffer.add; anything else than a SinkError it raises (a bug, an odd buffer) becomes one."""
        try:
            return await self._call(self.buffer.add, [(it.message, it.ts) for it in items])
        except SinkError:
            raise
        except Exception as exc:
            raise SinkError(f"sink {self.sink.name}: cannot spool: {exc!r}") from exc

    def _stored(self, items: list[_Item], ids: list[int]) -> None:
        """Account for a committed add and settle its waiters."""
        self.stats.spooled += len(ids)
        self._last_id = max(self._last_id, *ids)
        for it, entry_id in zip(items, ids, strict=True):
            if it.message.retain:
                self._spooled_retained[it.message.topic] = max(
                    entry_id, self._spooled_retained.get(it.message.topic, 0)
                )
                if self._retained.get(it.message.topic) is it:
                    self._retained[it.message.topic] = entry_id
            it.resolve()

    def _not_retained(self, item: _Item) -> None:
        """A retained message that will not reach the broker: its topic's newest spooled state is the one to send."""
        if item.message.retain and self._retained.get(item.message.topic) is item:
            again = self._fall_back(item.message.topic)
            if again:
                self._background(self._offer_again(again))

    def _fall_back(self, topic: str) -> list[int]:
        """The topic's newest state on its way is lost: the newest stored one is to be sent instead.

        Returns the ids the replay holds back that it is to take again (that newest stored state, when held back).
        """
        newest = self._spooled_retained.get(topic)
        if newest is None:
            del self._retained[topic]
            return []
        self._retained[topic] = newest
        held = self._parked.get(topic)
        if held and held[-1] == newest:
            held.pop()
            if not held:
                del self._parked[topic]
            return [newest]
        return []

    async def _offer_again(self, ids: list[int]) -> None:
        """Make held-back entries takeable again and wake the replay for them."""
        await self._call(self.buffer.reject, ids)
        self._held = (await self._refresh()).count
        self._spooled_wake.set()

    def _refused(self, items: list[_Item], exc: SinkError) -> None:
        if not items:
            return
        self.stats.refused += len(items)
        for it in items:
            self._not_retained(it)
            it.resolve(exc)
        now = time.monotonic()
        self._refusals_unlogged += len(items)
        if now - self._refusal_logged < REFUSAL_LOG_INTERVAL:
            return
        level = logging.WARNING if isinstance(exc, BufferFull) else logging.ERROR
        log.log(
            level,
            "sink %s: %d message(s) not spooled (%d so far): %s",
            self.sink.name,
            self._refusals_unlogged,
            self.stats.refused,
            exc,
        )
        self._refusal_logged = now
        self._refusals_unlogged = 0

    # --- out of the spool -----------------------------------------------------------------------

    async def _replay_loop(self) -> None:
        batch = max(1, min(REPLAY_BATCH, int(self.replay_rate / 10) or 1))
        next_at = time.monotonic()
        while True:
            if self._held <= 0:
                self._spooled_wake.clear()
                await self._spooled_wake.wait()
                next_at = time.monotonic()  # no catching up for the time spent idle
                continue
            if not self.sink.connected:
                await self.sink.wait_connected(1.0)
                next_at = time.monotonic()
                continue
            delay = next_at - time.monotonic()
            if delay > 0:
                await asyncio.sleep(delay)
            entries: list[Entry] = []
            try:
                entries = await self._call(self.buffer.take, batch)
                if not entries:
                    self._held = 0
                    continue
                next_at += len(entries) / self.replay_rate
                self._replaying = len(entries)
                await self._replay(entries)
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                if isinstance(exc, SinkError):  # the spool cannot read or write (a full disk): try again later
                    self._log_error("replay", "sink %s: replay paused: %s", self.sink.name, exc)
                else:
                    log.exception("sink %s: replay failed; going on in %g s", self.sink.name, LOOP_PAUSE)
                    with contextlib.suppress(Exception):  # taken but not settled: takeable again
                        await self._call(self.buffer.reject, [e.id for e in entries])
                await asyncio.sleep(LOOP_PAUSE)
                next_at = time.monotonic()
            finally:
                self._replaying = 0

    async def _replay(self, entries: list[Entry]) -> None:
        """Publish one batch; accept what the broker acknowledged (and what is superseded), reject the rest."""
        done: list[int] = []
        sent: list[tuple[Entry, asyncio.Future[None]]] = []
        back: list[int] = []
        for i, e in enumerate(entries):
            newest = self._retained.get(e.message.topic) if e.message.retain else e.id
            if newest is None:
                done.append(e.id)  # the broker has a newer state of this topic: this one would set it back
                continue
            if newest != e.id:
                done += self._park(e)  # a newer state is on its way: this one waits for its outcome
                continue
            started = self._try_publish(e.message)
            if started is None:
                back = [x.id for x in entries[i:] if x.id not in done]
                break
            sent.append((e, started))
        if sent:
            await asyncio.wait([f for _, f in sent])
        for e, f in sent:
            exc = None if f.cancelled() else f.exception()
            if f.cancelled() or isinstance(exc, SinkOffline):
                back.append(e.id)
                continue
            if exc is not None:
                # The connection is up and refused it (a topic or payload paho will not publish).
                if self._undeliverable(e, exc):
                    done.append(e.id)
                    back += self._given_up(e)
                else:
                    back.append(e.id)
                continue
            done.append(e.id)
            self._replay_failures.pop(e.id, None)
            self.stats.replayed += 1
            if e.message.retain:
                done += self._delivered(e)
        if back:
            await self._call(self.buffer.reject, back)
        if done:
            try:
                await self._call(self.buffer.accept, done)
            except SinkError:
                # Not removed (a removal needs disk space too): they go out again later, at least once.
                await self._call(self.buffer.reject, done)
                raise
        self._held = (await self._refresh()).count

    def _undeliverable(self, e: Entry, exc: BaseException) -> bool:
        """Count one refused publish of a spooled entry; True once it is to be dropped."""
        failures = self._replay_failures.get(e.id, 0) + 1
        if failures < REPLAY_ATTEMPTS:
            if e.id not in self._replay_failures and len(self._replay_failures) >= REPLAY_FAILURES_KEPT:
                # Counts of entries evicted or expired since are never cleared by a delivery: the oldest goes,
                # so that a full table never stops counting (an entry never counted would be offered forever).
                del self._replay_failures[next(iter(self._replay_failures))]
            self._replay_failures[e.id] = failures
            return False
        self._replay_failures.pop(e.id, None)
        self.stats.undeliverable += 1
        log.error(
            "sink %s: dropped spooled message %d to %r: refused %d times: %s",
            self.sink.name,
            e.id,
            e.message.topic,
            failures,
            exc,
        )
        return True

    def _park(self, e: Entry) -> list[int]:
        """Hold back an older retained state of a topic whose newer state is on its way; the ids to remove now."""
        held = self._parked.setdefault(e.message.topic, [])
        if e.id not in held:  # taken again after a failed step of the replay: held once
            bisect.insort(held, e.id)
        if len(held) > RETAINED_FALLBACKS:
            return [held.pop(0)]  # the oldest is let go: it is needed only if every newer state is refused
        return []

    def _delivered(self, e: Entry) -> list[int]:
        """A retained state the broker acknowledged from the spool: the older ones held back are to be removed."""
        topic = e.message.topic
        if self._retained.get(topic) == e.id:
            del self._retained[topic]
        held = self._parked.get(topic, [])
        cut = bisect.bisect(held, e.id)
        older, rest = held[:cut], held[cut:]
        if rest:
            self._parked[topic] = rest
        else:
            self._parked.pop(topic, None)
        return older

    def _given_up(self, e: Entry) -> list[int]:
        """A retained state dropped as undeliverable: the ids held back that the replay is to take again."""
        if not e.message.retain:
            return []
        topic = e.message.topic
        if self._spooled_retained.get(topic) == e.id:
            # The newest stored state is now the newest one held back (older ones were all taken before it).
            held = self._parked.get(topic)
            if held:
                self._spooled_retained[topic] = held[-1]
            else:
                del self._spooled_retained[topic]
        if self._retained.get(topic) == e.id:
            return self._fall_back(topic)
        return []

    # --- housekeeping ---------------------------------------------------------------------------

    async def _housekeeping(self) -> None:
        while True:
            try:
                self._spill_stalled(time.monotonic() - LIVE_WAIT_MAX)
                await self._call(self.buffer.expire, self._clock())
                self._held = (await self._refresh()).count
            except SinkError as exc:
                self._log_error("housekeeping", "sink %s: %s", self.sink.name, exc)
            except Exception:
                log.exception("sink %s: housekeeping failed", self.sink.name)
            await asyncio.sleep(HOUSEKEEPING_INTERVAL)

    def _log_error(self, what: str, text: str, *args: Any) -> None:
        """An ERROR line about a spool that keeps failing, at most once per REFUSAL_LOG_INTERVAL for each `what`."""
        now = time.monotonic()
        if now - self._errors_logged.get(what, -REFUSAL_LOG_INTERVAL) >= REFUSAL_LOG_INTERVAL:
            self._errors_logged[what] = now
            log.error(text, *args)

    def _spill_stalled(self, cutoff: float) -> None:
        """Spool the waited-on messages the connected broker has left unacknowledged since before `cutoff`."""
        stalled = [it for it in self._handed if it.fut is not None and it.since < cutoff and not it.settled]
        if any(it.fut is not None and it.since < cutoff for it in self._queue):
            keep: collections.deque[_Item] = collections.deque()
            for it in self._queue:
                (stalled if it.fut is not None and it.since < cutoff else keep).append(it)
            self._queue = keep
        if stalled:
            log.warning(
                "sink %s: broker has not acknowledged %d message(s) for %.0f s: spooled",
                self.sink.name,
                len(stalled),
                LIVE_WAIT_MAX,
            )
            for it in stalled:
                self._spool(it)  # one still with paho may arrive twice: at least once

    async def _refresh(self) -> BufferStats:
        st = await self._call(self.buffer.stats)
        self._last_stats = st
        return st

    async def _call(self, fn: Callable[..., T], *args: Any) -> T:
        """Call into the buffer: on a worker thread, one call at a time, when it does I/O."""
        if self._executor is None:
            return fn(*args)
        return await asyncio.get_running_loop().run_in_executor(self._executor, fn, *args)
