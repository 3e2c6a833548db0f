"""One suite for every Buffer (MemoryBuffer, SQLiteSpool): FIFO, take/accept/reject, limits, TTL, stats.

The last part holds what only the SQLite spool has: reopening, the free-disk floor, the file lock
and the write accounting. Crash, kill -9 and disk-full tests are in test_spool_crash.py.
"""

from __future__ import annotations

import shutil
import sqlite3
import tempfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    initialize,
    invariant,
    precondition,
    rule,
    run_state_machine_as_test,
)

from bridge.buffer import (
    ENTRY_OVERHEAD,
    Buffer,
    BufferFull,
    Entry,
    EntryRefused,
    MemoryBuffer,
    StorageError,
    entry_size,
)
from bridge.spool import SpoolError, SQLiteSpool, read_stats
from gateway.errors import SinkError
from gateway.types import Message

KINDS = ["memory", "sqlite"]
T0 = 1_700_000_000.0


class FakeClock:
    """A wall clock the test moves by hand."""

    def __init__(self, now: float = T0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def msg(i: int, payload: int = 100, **kwargs: Any) -> Message:
    """Message number i with a payload of `payload` bytes."""
    return Message(f"dev{i % 7}/telemetry", bytes([i % 256]) * payload, **kwargs)


SIZE = entry_size(msg(0))  # every msg(i) with the default payload counts this many bytes


def batch(start: int, n: int, **kwargs: Any) -> list[tuple[Message, int]]:
    """n messages numbered from start, each sampled at ts = its number."""
    return [(msg(i, **kwargs), i) for i in range(start, start + n)]


def ids(entries: list[Entry]) -> list[int]:
    return [e.id for e in entries]


Make = Callable[..., Buffer]


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture(params=KINDS)
def make(request: pytest.FixtureRequest, tmp_path: Path, clock: FakeClock) -> Iterator[Make]:
    """Builds buffers of the kind under test (limits as keyword arguments), closes them afterwards."""
    made: list[Buffer] = []

    def make(**kwargs: Any) -> Buffer:
        kwargs.setdefault("clock", clock)
        buffer: Buffer
        if request.param == "memory":
            buffer = MemoryBuffer(**kwargs)
        else:
            kwargs.setdefault("min_free_bytes", 0)
            buffer = SQLiteSpool(tmp_path / f"spool{len(made)}.db", **kwargs)
        made.append(buffer)
        return buffer

    yield make
    for buffer in made:
        buffer.close()


# -- FIFO and the take / accept / reject transaction ------------------------------------------


def test_entries_keep_everything_in_fifo_order(make: Make, clock: FakeClock) -> None:
    buf = make()
    first = buf.add([(msg(1, retain=True, qos=1), 11), (Message("a/b", b"\x00\xff"), 12)])
    clock.now += 1
    second = buf.add(batch(3, 3))
    assert first == [1, 2] and second == [3, 4, 5]
    taken = buf.take(10)
    assert ids(taken) == [1, 2, 3, 4, 5]
    assert taken[0] == Entry(1, msg(1, retain=True, qos=1), 11, T0, SIZE)
    assert taken[1] == Entry(2, Message("a/b", b"\x00\xff"), 12, T0, len("a/b") + 2 + ENTRY_OVERHEAD)
    assert taken[2].queued_at == T0 + 1 and taken[2].message.qos is None
    assert buf.add([]) == []


def test_take_never_hands_out_an_entry_twice(make: Make) -> None:
    buf = make()
    buf.add(batch(0, 8))
    assert ids(buf.take(3)) == [1, 2, 3]
    assert ids(buf.take(3)) == [4, 5, 6]
    assert ids(buf.take(100)) == [7, 8]
    assert buf.take(1) == [] and buf.take(0) == []
    assert buf.stats().count == 8 and buf.stats().in_flight == 8


def test_reject_puts_entries_back_in_their_place(make: Make) -> None:
    buf = make()
    buf.add(batch(0, 9))
    a, b = buf.take(2), buf.take(2)  # 1-2, 3-4
    buf.reject(ids(a))
    assert ids(buf.take(1)) == [1]
    buf.reject(reversed(ids(b)))  # back between 2 and 5, whatever order they are named in
    assert ids(buf.take(4)) == [2, 3, 4, 5]
    buf.reject([1, 2, 3, 4, 5])
    assert ids(buf.take(100)) == [1, 2, 3, 4, 5, 6, 7, 8, 9]


def test_accept_removes_and_ignores_what_it_does_not_know(make: Make) -> None:
    buf = make()
    buf.add(batch(0, 5))
    taken = buf.take(2)
    buf.accept(ids(taken))
    buf.accept(ids(taken))  # twice: no-op
    buf.accept([999, -1])
    buf.reject(ids(taken))  # accepted: no-op
    buf.reject([3, 999])  # never taken / unknown: no-op
    assert ids(buf.take(100)) == [3, 4, 5]
    st_ = buf.stats()
    assert (st_.count, st_.bytes, st_.in_flight) == (3, 3 * SIZE, 3)


def test_accept_of_an_entry_not_in_flight_still_removes_it(make: Make) -> None:
    buf = make()
    buf.add(batch(0, 3))
    buf.accept([2])
    assert ids(buf.take(10)) == [1, 3]


# -- limits -----------------------------------------------------------------------------------


def test_max_size_counts_bytes_and_drop_oldest_evicts(make: Make) -> None:
    buf = make(max_size=5 * SIZE)
    buf.add(batch(0, 5))
    assert buf.stats().bytes == 5 * SIZE and buf.stats().dropped == 0
    assert buf.add(batch(5, 2)) == [6, 7]
    st_ = buf.stats()
    assert (st_.count, st_.bytes, st_.dropped) == (5, 5 * SIZE, 2)
    assert ids(buf.take(10)) == [3, 4, 5, 6, 7]
    # A bigger message evicts as many of the oldest as it needs.
    buf.add([(msg(9, payload=2 * SIZE), 9)])
    assert buf.stats().dropped == 5 and ids(buf.take(10)) == [8]


def test_eviction_of_an_entry_in_flight_makes_its_accept_and_reject_no_ops(make: Make) -> None:
    buf = make(max_size=4 * SIZE)
    buf.add(batch(0, 4))
    in_flight = buf.take(2)  # 1, 2
    buf.add(batch(4, 1))  # evicts 1
    assert buf.stats().in_flight == 1
    buf.reject(ids(in_flight))
    buf.accept(ids(in_flight))  # 1 is gone already, 2 goes now
    assert buf.stats().dropped == 1
    assert ids(buf.take(10)) == [3, 4, 5]


def test_reject_policy_refuses_the_whole_batch(make: Make) -> None:
    buf = make(max_size=5 * SIZE, when_full="reject")
    buf.add(batch(0, 4))
    with pytest.raises(BufferFull, match="when_full: reject"):
        buf.add(batch(4, 2))  # one would fit, so none is added
    st_ = buf.stats()
    assert (st_.count, st_.bytes, st_.dropped) == (4, 4 * SIZE, 0)
    assert buf.add(batch(4, 1)) == [5]  # no id was used up by the refused batch
    buf.accept(ids(buf.take(2)))
    assert buf.add(batch(5, 2)) == [6, 7]
    assert ids(buf.take(10)) == [3, 4, 5, 6, 7]


@pytest.mark.parametrize("when_full", ["drop_oldest", "reject"])
def test_what_can_never_fit_is_refused_whatever_the_policy(make: Make, when_full: str) -> None:
    buf = make(max_size=3 * SIZE, when_full=when_full)
    buf.add(batch(0, 2))
    with pytest.raises(BufferFull, match=rf"larger than max_size \({3 * SIZE} bytes\)"):
        buf.add([(msg(1, payload=3 * SIZE), 1)])
    with pytest.raises(BufferFull, match="do not fit"):
        buf.add(batch(2, 4))  # the batch alone is bigger than the buffer
    assert buf.stats().count == 2 and buf.stats().dropped == 0
    assert isinstance(BufferFull("x"), SinkError)


# -- TTL --------------------------------------------------------------------------------------


def test_expire_drops_what_is_older_than_max_age(make: Make, clock: FakeClock) -> None:
    buf = make(max_age=100.0)
    buf.add(batch(0, 2))
    clock.now += 10
    buf.add(batch(2, 1))
    taken = buf.take(1)
    assert buf.expire(T0 + 100) == 0  # exactly max_age old: kept
    assert buf.expire(T0 + 100.5) == 2
    assert buf.stats().dropped == 2 and buf.stats().in_flight == 0
    buf.accept(ids(taken))  # expired while in flight: no-op
    assert ids(buf.take(10)) == [3]
    assert buf.expire(T0 + 1000) == 1 and buf.stats().count == 0 and buf.stats().oldest_queued_at is None


def test_add_enforces_max_age_too(make: Make, clock: FakeClock) -> None:
    buf = make(max_age=60.0, max_size=4 * SIZE, when_full="reject")
    buf.add(batch(0, 4))
    clock.now += 61
    assert buf.add(batch(4, 4)) == [5, 6, 7, 8]  # the old ones expired, so the new fit
    assert buf.stats().dropped == 4


# -- stats and lifecycle ------------------------------------------------------------------------


def test_stats(make: Make, clock: FakeClock) -> None:
    buf = make()
    st_ = buf.stats()
    assert (st_.count, st_.bytes, st_.oldest_queued_at, st_.dropped, st_.in_flight) == (0, 0, None, 0, 0)
    buf.add(batch(0, 2))
    clock.now += 5
    buf.add(batch(2, 2))
    assert buf.stats().oldest_queued_at == T0
    buf.accept([1, 2])
    st_ = buf.stats()
    assert (st_.count, st_.bytes, st_.oldest_queued_at) == (2, 2 * SIZE, T0 + 5)


def test_closed_buffer_refuses_work(make: Make) -> None:
    buf = make()
    buf.close()
    buf.close()
    with pytest.raises(SinkError, match="closed"):
        buf.add(batch(0, 1))
    with pytest.raises(SinkError, match="closed"):
        buf.take(1)


# -- every implementation against a model, under random operation sequences -------------------


@dataclass
class Model:
    """The Buffer semantics in their plainest form."""

    max_size: int
    max_age: float
    when_full: str
    entries: list[Entry] = field(default_factory=list)  # by id
    in_flight: set[int] = field(default_factory=set)
    dropped: int = 0
    next_id: int = 1

    def add(self, items: list[tuple[Message, int]], now: float) -> list[int] | None:
        self.expire(now)
        sizes = [entry_size(m) for m, _ in items]
        held = sum(e.size for e in self.entries)
        if sizes and (max(sizes) > self.max_size or sum(sizes) > self.max_size):
            return None
        if held + sum(sizes) > self.max_size:
            if self.when_full == "reject":
                return None
            while held + sum(sizes) > self.max_size:
                held -= self.entries[0].size
                self._drop_first()
        new = list(range(self.next_id, self.next_id + len(items)))
        self.next_id += len(items)
        self.entries += [Entry(i, m, s, now, size) for i, (m, s), size in zip(new, items, sizes, strict=True)]
        return new

    def take(self, n: int) -> list[Entry]:
        out = [e for e in self.entries if e.id not in self.in_flight][:n]
        self.in_flight |= {e.id for e in out}
        return out

    def accept(self, ids_: list[int]) -> None:
        self.entries = [e for e in self.entries if e.id not in ids_]
        self.in_flight -= set(ids_)

    def reject(self, ids_: list[int]) -> None:
        self.in_flight -= set(ids_)

    def expire(self, now: float) -> int:
        n = 0
        while self.entries and self.entries[0].queued_at < now - self.max_age:
            self._drop_first()
            n += 1
        return n

    def _drop_first(self) -> None:
        self.in_flight.discard(self.entries.pop(0).id)
        self.dropped += 1


messages = st.builds(
    Message,
    topic=st.text("abz/+é", min_size=1, max_size=12),
    payload=st.binary(max_size=120),
    retain=st.booleans(),
    qos=st.sampled_from([None, 0, 1]),
)
items = st.lists(st.tuples(messages, st.integers(0, 2**50)), max_size=6)


class BufferMachine(RuleBasedStateMachine):
    """Random add/take/accept/reject/expire/reopen sequences; the buffer must match the model."""

    kind = "memory"

    def __init__(self) -> None:
        super().__init__()
        self.clock = FakeClock()
        self.dir = tempfile.mkdtemp(prefix="buffer-machine-")
        self.buf: Buffer
        self.model: Model

    @initialize(
        max_size=st.integers(150, 1500),
        max_age=st.sampled_from([30.0, 1e9]),
        when_full=st.sampled_from(["drop_oldest", "reject"]),
    )
    def build(self, max_size: int, max_age: float, when_full: str) -> None:
        self.model = Model(max_size, max_age, when_full)
        self.limits: dict[str, Any] = {"max_size": max_size, "max_age": max_age, "when_full": when_full}
        self.buf = self._open()

    def _open(self) -> Buffer:
        if self.kind == "memory":
            return MemoryBuffer(clock=self.clock, **self.limits)
        # A small checkpoint threshold: checkpoints happen within the short runs too.
        return SQLiteSpool(
            Path(self.dir) / "s.db", clock=self.clock, min_free_bytes=0, checkpoint_bytes=16384, **self.limits
        )

    @rule(items=items)
    def add(self, items: list[tuple[Message, int]]) -> None:
        expected = self.model.add(items, self.clock.now)
        if expected is None:
            with pytest.raises(BufferFull):
                self.buf.add(items)
        else:
            assert self.buf.add(items) == expected

    @rule(n=st.integers(0, 8))
    def take(self, n: int) -> None:
        assert self.buf.take(n) == self.model.take(n)

    @rule(data=st.data(), strangers=st.lists(st.integers(-2, 200), max_size=2))
    def accept(self, data: st.DataObject, strangers: list[int]) -> None:
        chosen = (
            data.draw(st.lists(st.sampled_from(sorted(self.model.in_flight)), unique=True))
            if self.model.in_flight
            else []
        )
        self.buf.accept(chosen + strangers)
        self.model.accept(chosen + strangers)

    @rule(data=st.data(), strangers=st.lists(st.integers(-2, 200), max_size=2))
    def reject(self, data: st.DataObject, strangers: list[int]) -> None:
        chosen = (
            data.draw(st.lists(st.sampled_from(sorted(self.model.in_flight)), unique=True))
            if self.model.in_flight
            else []
        )
        self.buf.reject(chosen + strangers)
        self.model.reject(chosen + strangers)

    @rule(seconds=st.floats(0, 20))
    def tick(self, seconds: float) -> None:
        self.clock.now += seconds

    @rule()
    def expire(self) -> None:
        assert self.buf.expire(self.clock.now) == self.model.expire(self.clock.now)

    @precondition(lambda self: self.kind == "sqlite")
    @rule()
    def reopen(self) -> None:
        self.buf.close()
        self.buf = self._open()
        self.model.in_flight.clear()  # in-flight state is not stored: everything is takeable again

    @invariant()
    def same_stats(self) -> None:
        if not hasattr(self, "model"):
            return
        got = self.buf.stats()
        m = self.model
        oldest = m.entries[0].queued_at if m.entries else None
        want = (len(m.entries), sum(e.size for e in m.entries), oldest, m.dropped, len(m.in_flight))
        assert (got.count, got.bytes, got.oldest_queued_at, got.dropped, got.in_flight) == want

    def teardown(self) -> None:
        if hasattr(self, "buf"):
            self.buf.close()
        shutil.rmtree(self.dir, ignore_errors=True)


@pytest.mark.parametrize("kind", KINDS)
def test_buffer_matches_the_model(kind: str) -> None:
    machine = type(f"{kind.title()}Machine", (BufferMachine,), {"kind": kind})
    run_state_machine_as_test(machine, settings=settings(max_examples=60, stateful_step_count=40, deadline=None))


# -- SQLiteSpool only ---------------------------------------------------------------------------


def test_reopen_keeps_order_ids_and_drop_counter(tmp_path: Path, clock: FakeClock) -> None:
    path = tmp_path / "sink.db"
    spool = SQLiteSpool(path, max_size=6 * SIZE, min_free_bytes=0, clock=clock)
    spool.add(batch(0, 5))
    spool.add(batch(5, 3))  # evicts 1, 2
    spool.take(3)  # in flight at the "restart"
    before = spool.stats()
    spool.close()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["sink.db"]  # checkpointed: one file
    assert read_stats(path) == type(before)(before.count, before.bytes, before.oldest_queued_at, before.dropped)

    spool = SQLiteSpool(path, max_size=6 * SIZE, min_free_bytes=0, clock=clock)
    st_ = spool.stats()
    assert (st_.count, st_.bytes, st_.dropped, st_.in_flight) == (6, 6 * SIZE, 2, 0)
    taken = spool.take(100)
    assert ids(taken) == [3, 4, 5, 6, 7, 8]
    assert [e.sampled_ms for e in taken] == [2, 3, 4, 5, 6, 7]
    spool.accept(ids(taken))
    spool.close()
    # Emptied, then reopened: ids continue instead of starting over (AUTOINCREMENT).
    spool = SQLiteSpool(path, min_free_bytes=0, clock=clock)
    assert spool.add(batch(8, 1)) == [9]
    spool.close()


def test_free_disk_floor_makes_the_spool_behave_as_full(tmp_path: Path) -> None:
    spool = SQLiteSpool(tmp_path / "a.db", min_free_bytes=0)
    spool.add(batch(0, 4))
    spool.min_free_bytes = 2**62  # the filesystem is now "below the floor"
    ids_ = spool.add(batch(4, 2))  # drop_oldest: stays at its size, the oldest make room
    assert ids_ == [5, 6] and spool.stats().count == 4 and spool.stats().dropped == 2
    with pytest.raises(BufferFull, match="below the floor"):
        spool.add(batch(6, 5))  # more than the spool holds: nothing to evict for it
    spool.close()

    empty = SQLiteSpool(tmp_path / "b.db", min_free_bytes=2**62)
    with pytest.raises(BufferFull, match="below the floor"):
        empty.add(batch(0, 1))
    empty.close()
    rejecting = SQLiteSpool(tmp_path / "a.db", min_free_bytes=2**62, when_full="reject")
    with pytest.raises(BufferFull, match="when_full: reject"):
        rejecting.add(batch(0, 1))
    rejecting.close()


def test_a_spool_file_is_opened_once(tmp_path: Path) -> None:
    spool = SQLiteSpool(tmp_path / "a.db")
    with pytest.raises(SpoolError, match=r"^spool a\.db: .*/a\.db is in use by another spool$"):
        SQLiteSpool(tmp_path / "a.db")
    spool.close()
    SQLiteSpool(tmp_path / "a.db").close()


@pytest.mark.parametrize(
    ("bad", "named"),
    [
        ((Message("t", b"x"), 2**64 - 1), True),  # beyond SQLite's INTEGER: OverflowError in the driver
        ((Message("t", b"x"), -(2**63) - 1), True),
        ((Message("t/\ud800", b"x"), 1), True),  # a topic that cannot be UTF-8
        ((Message("t", "\ud800"), 1), False),  # type: ignore[arg-type]  # what only SQLite finds: a str payload
        ((Message("t", b"x", qos={}), 1), False),  # type: ignore[arg-type]  # a value SQLite cannot bind
    ],
    ids=["ts-above-int64", "ts-below-int64", "surrogate-topic", "str-payload", "dict-qos"],
)
def test_a_row_the_spool_cannot_store_is_a_spool_error_and_changes_nothing(
    tmp_path: Path, bad: tuple[Message, int], named: bool
) -> None:
    spool = SQLiteSpool(tmp_path / "a.db", min_free_bytes=0)
    try:
        spool.add(batch(0, 2))
        with pytest.raises(SpoolError) as refused:
            spool.add([*batch(2, 2), bad])
        assert isinstance(refused.value, EntryRefused) and not isinstance(refused.value, StorageError)
        assert refused.value.bad == ((2,) if named else ())
        assert spool.stats().count == 2
        assert spool.add(batch(2, 2)) == [3, 4]  # no id was spent on the refused batch
    finally:
        spool.close()


def test_a_foreign_file_is_not_taken_for_a_spool(tmp_path: Path) -> None:
    path = tmp_path / "other.db"
    with sqlite3.connect(path) as db:
        db.execute("CREATE TABLE messages (id INTEGER PRIMARY KEY, text TEXT)")
    db.close()
    with pytest.raises(SpoolError, match="not a spool"):
        SQLiteSpool(path)  # a database of someone else's: left alone (not moved aside like garbage)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["other.db"]


def test_write_accounting(tmp_path: Path) -> None:
    spool = SQLiteSpool(tmp_path / "a.db", min_free_bytes=0, checkpoint_bytes=2**40, accept_sync_interval=3600)
    spool.add(batch(0, 1))
    start = spool.stats()
    for i in range(10):
        spool.add(batch(i * 25, 25))
    st_ = spool.stats()
    assert st_.commits - start.commits == 10
    assert st_.fsyncs - start.fsyncs == 10  # one WAL sync per committed add
    # Every add appends at least its rows to the WAL, and not absurdly more (a few pages per commit).
    assert 250 * SIZE < st_.bytes_written - start.bytes_written < 10 * 6 * 4120
    spool.accept(ids(spool.take(50)))  # a removal within accept_sync_interval: NORMAL, no fsync
    assert spool.stats().fsyncs == st_.fsyncs and spool.stats().commits == st_.commits + 1
    spool.accept_sync_interval = 0
    spool.accept(ids(spool.take(50)))  # due: this one commits with FULL
    assert spool.stats().fsyncs == st_.fsyncs + 1
    spool.accept_sync_interval = 3600
    spool.accept(ids(spool.take(50)))
    spool.expire(0)
    assert spool.stats().fsyncs == st_.fsyncs + 1  # not due yet: the NORMAL removal stays unsynced
    spool.accept_sync_interval = 0
    spool.expire(0)  # due: a checkpoint makes it durable (WAL sync + database sync)
    assert spool.stats().fsyncs == st_.fsyncs + 3
    spool.close()


def test_checkpoints_keep_the_wal_small(tmp_path: Path) -> None:
    spool = SQLiteSpool(tmp_path / "a.db", min_free_bytes=0, checkpoint_bytes=64 * 1024)
    for i in range(40):
        spool.add(batch(i * 50, 50))
        assert (tmp_path / "a.db-wal").stat().st_size < 64 * 1024 + 50 * 4200
    st_ = spool.stats()
    assert st_.fsyncs > st_.commits  # the checkpoints' syncs are counted too
    spool.close()
