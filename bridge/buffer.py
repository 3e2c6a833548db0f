"""Store-and-forward buffers: add, take a batch, then accept or reject it; limits in bytes and age.

`Buffer` is the interface every implementation keeps (one shared test suite runs against all of
them); `MemoryBuffer` is the in-memory one. `bridge/spool.py` holds the SQLite one. Both are
synchronous and do no I/O of their own beyond their storage: the sink decides when to call them.

Semantics shared by every buffer:
- ids grow monotonically with each add; FIFO order is id order.
- `take(n)` hands out up to n of the oldest entries not already in flight and leaves them stored;
  `accept` removes them (delivered), `reject` makes them takeable again, ahead of newer ones.
- `max_size` bounds the sum of `Entry.size`; `max_age` drops entries queued longer ago than that, counted on the
  monotonic clock for entries of this boot (a step of the wall clock, NTP setting a Pi's clock by years, neither
  ages nor rejuvenates them) and on the wall clock only for entries an earlier boot left.
  When an add does not fit, `drop_oldest` evicts from the front (in flight or not, counted in
  `dropped`) and `reject` raises `BufferFull` without adding any of the items.
"""

from __future__ import annotations

import heapq
import math
from collections import OrderedDict, deque
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Literal, Protocol

from gateway.errors import SinkError
from gateway.types import CLOCK, STEP_MS, Message

WhenFull = Literal["drop_oldest", "reject"]
Clock = Callable[[], float]

#: Bytes an entry counts beyond its topic and payload: roughly what its id, timestamps, flags and
#: the storage's per-row header take, so that a flood of tiny messages is still bounded.
ENTRY_OVERHEAD = 32
#: The defaults of the sink's `spool:` config section.
DEFAULT_MAX_SIZE = 256 * 1024**2
DEFAULT_MAX_AGE = 30 * 86400.0


def entry_size(message: Message) -> int:
    """Bytes one message counts against a buffer's `max_size`."""
    return len(message.topic.encode()) + len(message.payload) + ENTRY_OVERHEAD


def entry_sizes(items: Sequence[tuple[Message, int]]) -> tuple[list[int], list[int]]:
    """The entry_size of each item, and the positions of those that have none (a topic that cannot be UTF-8)."""
    sizes: list[int] = []
    bad: list[int] = []
    for i, (message, _) in enumerate(items):
        try:
            sizes.append(entry_size(message))
        except (ValueError, TypeError, AttributeError):
            sizes.append(0)
            bad.append(i)
    return sizes, bad


@dataclass(frozen=True, slots=True)
class Entry:
    """One buffered message and what the buffer knows about it."""

    id: int  # FIFO position, assigned by the buffer
    message: Message
    sampled_ms: int  # the sample's ts (unix ms), kept for replay ordering and newest-state decisions
    queued_at: float  # unix seconds when it was buffered, as the wall clock read then
    size: int  # bytes it counts against max_size
    # How the buffer dates it, not what it holds (left out of ==): the boot it was buffered in (ProcessClock.boot;
    # None: a spool row of an older schema) and the monotonic time it was buffered at (max_age counts from there).
    boot: int | None = field(default=None, compare=False)
    queued_mono: float | None = field(default=None, compare=False)


def queued_wall(queued_at: float, boot: int | None, queued_mono: float | None, this_boot: int, offset: float) -> float:
    """When an entry was buffered, on the wall clock as it reads now (`offset`: wall - monotonic now): moved by the
    steps of the wall clock since (as its monotonic time tells, when it is of this boot; STEP_MS or more in all: a
    slewed clock's drift is no step, and an age needs no millisecond); else as stored."""
    if boot != this_boot or queued_mono is None:
        return queued_at
    moved = queued_mono + offset - queued_at
    return queued_at + moved if abs(moved) * 1000 >= STEP_MS else queued_at


def buffer_clocks(clock: Clock | None, monotonic: Clock | None) -> tuple[Clock, Clock]:
    """A buffer's wall and monotonic clocks: the process clock's by default; a `clock` alone (a test's) is taken for
    both, as one clock that never steps."""
    if clock is None:
        return (lambda: CLOCK.wall()), (monotonic or (lambda: CLOCK.monotonic()))
    return clock, monotonic or clock


@dataclass(frozen=True, slots=True)
class BufferStats:
    """What a buffer holds and what it cost so far; the write figures stay 0 for the in-memory buffer."""

    count: int
    bytes: int
    oldest_queued_at: float | None
    dropped: int
    in_flight: int = 0
    commits: int = 0
    fsyncs: int = 0
    bytes_written: int = 0


class BufferFull(SinkError):
    """add() refused its items: the buffer is full and `when_full` is reject, or they can never fit."""


class StorageError(SinkError):
    """The buffer's storage failed (a full disk, an I/O error, a corrupt file): it can store nothing now."""


class EntryRefused(SinkError):
    """add() refused its items for what one of them holds (a number out of the storage's range, an odd topic).

    `bad`: the positions of the items at fault, when the buffer could tell (else empty); the others may be
    added again without them.
    """

    def __init__(self, message: str, bad: Sequence[int] = ()) -> None:
        super().__init__(message)
        self.bad = tuple(bad)


class EntryTooLarge(BufferFull, EntryRefused):
    """add() refused its items because one of them is larger than max_size: it can never be buffered."""


class Buffer(Protocol):
    """A FIFO of messages with transactional delivery: take a batch, then accept or reject it."""

    name: str
    #: True when calls do I/O (the outbox then makes them from a worker thread, one at a time).
    durable: bool

    def add(self, items: Sequence[tuple[Message, int]]) -> list[int]:
        """Store (message, sampled_ms) pairs, all or none; their ids, once they are durable (with each message's
        anchor, if it has one).

        SinkError if not: BufferFull, StorageError (nothing can be stored now), else these items cannot be.
        """

    def take(self, n: int) -> list[Entry]:
        """Up to n of the oldest entries not in flight; they stay stored until accepted."""

    def accept(self, ids: Iterable[int]) -> None:
        """Delivered: remove these entries (unknown ids are ignored)."""

    def reject(self, ids: Iterable[int]) -> None:
        """Not delivered: these in-flight entries become takeable again, in their old place."""

    def expire(self, now: float) -> int:
        """Drop entries queued more than max_age before `now` (the wall clock, as the buffer's own reads it now:
        entries of this boot are dated on the monotonic clock); how many were dropped."""

    def stats(self) -> BufferStats:
        """Counts, bytes, the oldest entry's age and the drop counter."""

    def newest_retained(self) -> dict[str, int]:
        """The id of the newest retained entry of each topic that has one (what a replay may publish retained)."""

    def forget_retained(self, topic: str, through_id: int) -> int:
        """Remove the retained entries of `topic` up to `through_id` (a newer state went out); how many."""

    def close(self) -> None:
        """Release the storage; the buffer is unusable afterwards."""


@dataclass(frozen=True, slots=True)
class Limits:
    """The capacity rules of one buffer."""

    max_size: int = DEFAULT_MAX_SIZE
    max_age: float = DEFAULT_MAX_AGE
    when_full: WhenFull = "drop_oldest"

    def __post_init__(self) -> None:
        if self.max_size <= 0:
            raise ValueError(f"max_size must be positive, not {self.max_size}")
        if not self.max_age > 0:
            raise ValueError(f"max_age must be positive, not {self.max_age}")
        if self.when_full not in ("drop_oldest", "reject"):
            raise ValueError(f"when_full must be drop_oldest or reject, not {self.when_full!r}")


@dataclass(frozen=True, slots=True)
class Eviction:
    """The oldest entries an add has to drop to make room: how many, their bytes, the last id."""

    count: int = 0
    size: int = 0
    last_id: int = 0


def plan_room(
    name: str,
    limits: Limits,
    sizes: Sequence[int],
    held: int,
    oldest: Iterator[tuple[int, int]],
    *,
    room: int | None = None,
    why: str = "",
) -> Eviction:
    """Decide how a batch of `sizes` fits next to `held` bytes: what to evict, or raise BufferFull.

    `room` is the capacity to use when it is smaller than max_size (the spool's free-disk floor);
    `oldest` yields (id, size) from the oldest entry on and is consumed only as far as needed.
    """
    capacity = limits.max_size if room is None else min(room, limits.max_size)
    largest = max(sizes, default=0)
    if largest > limits.max_size:
        raise EntryTooLarge(
            f"{name}: a message of {largest} bytes is larger than max_size ({limits.max_size} bytes)"
            " and can never be buffered",
            [i for i, size in enumerate(sizes) if size > limits.max_size],
        )
    total = sum(sizes)
    if total > capacity:
        # Evicting everything would still not make room: refuse whole, whatever the policy.
        raise BufferFull(f"{name}: {len(sizes)} messages ({total} bytes) do not fit in {capacity} bytes{why}")
    need = held + total - capacity
    if need <= 0:
        return Eviction()
    if limits.when_full == "reject":
        raise BufferFull(
            f"{name}: full ({held} of {capacity} bytes{why}), {len(sizes)} messages refused (when_full: reject)"
        )
    count = freed = last = 0
    for entry_id, size in oldest:
        count, freed, last = count + 1, freed + size, entry_id
        if freed >= need:
            return Eviction(count, freed, last)
    raise AssertionError(f"{name}: held bytes ({held}) disagree with the entries")  # pragma: no cover


def requeue(ids: Iterable[int], in_flight: set[int], returned: list[int]) -> None:
    """`reject` for every buffer: the ids in `in_flight` move to the `returned` heap; others are ignored."""
    for entry_id in ids:
        if entry_id in in_flight:
            in_flight.remove(entry_id)
            heapq.heappush(returned, entry_id)


class MemoryBuffer:
    """A Buffer in memory: no I/O, gone with the process; for one thread (the event loop)."""

    durable = False

    def __init__(
        self,
        *,
        max_size: int = DEFAULT_MAX_SIZE,
        max_age: float = DEFAULT_MAX_AGE,
        when_full: WhenFull = "drop_oldest",
        clock: Clock | None = None,
        monotonic: Clock | None = None,
        name: str = "memory buffer",
    ) -> None:
        self.limits = Limits(max_size, max_age, when_full)
        self.name = name
        self._clock, self._monotonic = buffer_clocks(clock, monotonic)
        self._boot = CLOCK.boot
        # OrderedDict, not dict: popping from the front of a plain dict leaves dummies that make
        # next(iter()) slow down over millions of evictions.
        self._entries: OrderedDict[int, Entry] = OrderedDict()
        self._fresh: deque[int] = deque()  # never taken, oldest first; ids removed meanwhile are skipped
        self._returned: list[int] = []  # heap of rejected ids: takeable again before fresh ones
        self._in_flight: set[int] = set()
        self._bytes = 0
        self._dropped = 0
        self._next_id = 1
        self._closed = False

    def add(self, items: Sequence[tuple[Message, int]]) -> list[int]:
        """Store (message, sampled_ms) pairs, all or none, evicting or refusing per the limits."""
        self._check_open()
        now, mono = self._clock(), self._monotonic()
        self.expire(now)
        if not items:
            return []
        sizes, bad = entry_sizes(items)
        if bad:
            raise EntryRefused(f"{self.name}: cannot store {len(bad)} message(s): a topic that is not UTF-8", bad)
        oldest = ((e.id, e.size) for e in self._entries.values())
        plan = plan_room(self.name, self.limits, sizes, self._bytes, oldest)
        for _ in range(plan.count):
            self._pop_oldest()
        self._dropped += plan.count
        ids = list(range(self._next_id, self._next_id + len(items)))
        self._next_id += len(items)
        for entry_id, (message, sampled_ms), size in zip(ids, items, sizes, strict=True):
            self._entries[entry_id] = Entry(entry_id, message, sampled_ms, now, size, self._boot, mono)
            self._fresh.append(entry_id)
            self._bytes += size
        return ids

    def take(self, n: int) -> list[Entry]:
        """Up to n of the oldest entries not in flight."""
        self._check_open()
        taken: list[Entry] = []
        entries, fresh, returned = self._entries, self._fresh, self._returned
        while len(taken) < n:
            while returned and returned[0] not in entries:
                heapq.heappop(returned)
            while fresh and fresh[0] not in entries:
                fresh.popleft()
            if returned and (not fresh or returned[0] < fresh[0]):
                entry_id = heapq.heappop(returned)
            elif fresh:
                entry_id = fresh.popleft()
            else:
                break
            self._in_flight.add(entry_id)
            taken.append(entries[entry_id])
        return taken

    def accept(self, ids: Iterable[int]) -> None:
        """Remove delivered entries; unknown or already dropped ids are ignored."""
        self._check_open()
        for entry_id in ids:
            entry = self._entries.pop(entry_id, None)
            if entry is not None:
                self._bytes -= entry.size
                self._in_flight.discard(entry_id)

    def reject(self, ids: Iterable[int]) -> None:
        """Make in-flight entries takeable again; other ids are ignored."""
        self._check_open()
        requeue(ids, self._in_flight, self._returned)

    def expire(self, now: float) -> int:
        """Drop entries queued before now - max_age, from the oldest on; how many."""
        self._check_open()
        if math.isinf(self.limits.max_age):
            return 0
        cutoff = now - self.limits.max_age
        offset = self._clock() - self._monotonic()
        # FIFO prefix only: should a newer entry look older than its predecessors, it expires with them
        # instead of jumping the queue.
        count = 0
        while self._entries:
            oldest = next(iter(self._entries.values()))
            if self._queued(oldest, offset) >= cutoff:
                break
            self._pop_oldest()
            count += 1
        self._dropped += count
        return count

    def stats(self) -> BufferStats:
        """Counts, bytes, the oldest entry's queue time (on the wall clock as it reads now) and the drop counter."""
        offset = self._clock() - self._monotonic()
        oldest = self._queued(next(iter(self._entries.values())), offset) if self._entries else None
        return BufferStats(len(self._entries), self._bytes, oldest, self._dropped, len(self._in_flight))

    def newest_retained(self) -> dict[str, int]:
        """The id of the newest retained entry of each topic."""
        self._check_open()
        return {e.message.topic: e.id for e in self._entries.values() if e.message.retain}

    def forget_retained(self, topic: str, through_id: int) -> int:
        """Remove the retained entries of `topic` up to `through_id`."""
        self._check_open()
        ids = [i for i, e in self._entries.items() if i <= through_id and e.message.retain and e.message.topic == topic]
        self.accept(ids)
        return len(ids)

    def close(self) -> None:
        """Forget everything; later calls raise SinkError."""
        self._closed = True
        self._entries.clear()
        self._fresh.clear()
        self._returned.clear()
        self._in_flight.clear()
        self._bytes = 0

    def _queued(self, e: Entry, offset: float) -> float:
        return queued_wall(e.queued_at, e.boot, e.queued_mono, self._boot, offset)

    def _pop_oldest(self) -> None:
        entry_id, entry = self._entries.popitem(last=False)
        self._bytes -= entry.size
        self._in_flight.discard(entry_id)
        # Keep the queues from growing with ids that are gone while nobody takes (a long outage).
        while self._fresh and self._fresh[0] not in self._entries:
            self._fresh.popleft()
        while self._returned and self._returned[0] not in self._entries:
            heapq.heappop(self._returned)

    def _check_open(self) -> None:
        if self._closed:
            raise SinkError(f"{self.name}: closed")
