"""The spool's contract at its edges: the int64 limits, take's bound, reads past one chunk, retained removal,
the accept-sync interval, unreadable rows, and what a damaged file costs (counted exactly, told to the operator).

test_buffers.py checks the spool against a model on ordinary inputs, test_state_files.py the corruption
handling; these tests hold the limits and the figures that those leave free.
"""

from __future__ import annotations

import logging
import os
import re
import sqlite3
import types
from pathlib import Path

import pytest

from bridge import spool_file as spool_module
from bridge import spool_io, statefiles
from bridge.buffer import BufferFull
from bridge.spool import SpoolCorrupt, SpoolEntryError, SpoolStorageError, SQLiteSpool
from gateway.types import Message

INT64_MIN, INT64_MAX = -(2**63), 2**63 - 1
CORRUPT = re.compile(r"spool\.db\.corrupt-\d+")


@pytest.fixture(autouse=True)
def counted_apart(monkeypatch: pytest.MonkeyPatch) -> None:
    """The corrupt-file counters are process-wide: count from zero here and leave others' as they were."""
    monkeypatch.setattr(statefiles, "_counts", dict.fromkeys(statefiles.FILES, 0))


def msgs(n: int, start: int = 0, *, retain: bool = False, topic: str = "t/{}") -> list[tuple[Message, int]]:
    """n (message, sampled_ms) pairs."""
    return [(Message(topic.format(i), b"p%d" % i, retain=retain), i) for i in range(start, start + n)]


class Clock:
    """A wall clock the test sets."""

    def __init__(self, now: float = 1000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


# --- what add takes --------------------------------------------------------------------------------


def test_a_ts_at_either_end_of_int64_is_stored_and_one_past_it_is_refused(tmp_path: Path) -> None:
    spool = SQLiteSpool(tmp_path / "spool.db", min_free_bytes=0)
    try:
        assert spool.add([(Message("lo", b"1"), INT64_MIN), (Message("hi", b"2"), INT64_MAX)]) == [1, 2]
        assert [e.sampled_ms for e in spool.take(5)] == [INT64_MIN, INT64_MAX]
        for ts in (INT64_MIN - 1, INT64_MAX + 1):
            with pytest.raises(SpoolEntryError) as refused:
                spool.add([(Message("ok", b"3"), 0), (Message("past", b"4"), ts)])
            assert list(refused.value.bad) == [1]
        assert spool.stats().count == 2  # the refused adds stored nothing
    finally:
        spool.close()


def test_a_refused_add_names_each_kind_of_fault_and_the_items(tmp_path: Path) -> None:
    spool = SQLiteSpool(tmp_path / "spool.db", min_free_bytes=0)
    bad_topic = Message("t/\udc80", b"x")  # a lone surrogate: no UTF-8 for it
    try:
        with pytest.raises(SpoolEntryError) as both:
            spool.add([(Message("ok", b"1"), 0), (bad_topic, 0), (Message("ok", b"2"), 2**64)])
        assert list(both.value.bad) == [1, 2]
        assert str(both.value) == (
            "spool spool.db: cannot store 2 message(s): 1 with a ts beyond SQLite's int64, "
            "1 with a topic that is not UTF-8"
        )
        with pytest.raises(SpoolEntryError) as topic_only:
            spool.add([(bad_topic, 0)])
        assert str(topic_only.value) == "spool spool.db: cannot store 1 message(s): 1 with a topic that is not UTF-8"
        with pytest.raises(SpoolEntryError) as ts_only:
            spool.add([(Message("ok", b"1"), -(2**64)), (Message("ok", b"1"), 2**64)])
        assert str(ts_only.value) == "spool spool.db: cannot store 2 message(s): 2 with a ts beyond SQLite's int64"
    finally:
        spool.close()


# --- take ------------------------------------------------------------------------------------------


def test_take_hands_out_at_most_n_when_returned_entries_were_accepted_meanwhile(tmp_path: Path) -> None:
    spool = SQLiteSpool(tmp_path / "spool.db", min_free_bytes=0)
    try:
        spool.add(msgs(12))
        spool.reject([e.id for e in spool.take(10)])
        spool.accept([1, 2])  # delivered by an earlier attempt while they waited to be taken again
        assert [e.id for e in spool.take(3)] == [3, 4, 5]
        assert [e.id for e in spool.take(10)] == [6, 7, 8, 9, 10, 11, 12]
    finally:
        spool.close()


def test_more_returned_entries_than_one_query_holds_all_come_back(tmp_path: Path) -> None:
    spool = SQLiteSpool(tmp_path / "spool.db", min_free_bytes=0)
    try:
        spool.add(msgs(1300))
        spool.reject([e.id for e in spool.take(1200)])
        assert [e.id for e in spool.take(1300)] == list(range(1, 1301))
    finally:
        spool.close()


# --- expiry and the scans behind it ----------------------------------------------------------------


@pytest.mark.parametrize("returned", [1, 2])
def test_returned_entries_that_expire_are_not_handed_out_again(tmp_path: Path, returned: int) -> None:
    clock = Clock(1000.0)
    spool = SQLiteSpool(tmp_path / "spool.db", min_free_bytes=0, max_age=10.0, clock=clock)
    try:
        spool.add(msgs(3))
        spool.reject([e.id for e in spool.take(3)][:returned])  # back in line, waiting to be taken again
        clock.now = 1020.0
        assert spool.expire(clock.now) == 3
        assert spool.take(5) == []
        spool.add(msgs(1, 3))
        assert [e.id for e in spool.take(5)] == [4]
    finally:
        spool.close()


def test_expiry_reaches_past_the_first_chunk_of_rows_and_stops_at_the_first_young_one(tmp_path: Path) -> None:
    clock = Clock(1000.0)
    spool = SQLiteSpool(tmp_path / "spool.db", min_free_bytes=0, max_age=100.0, clock=clock)
    try:
        for k in range(0, 1300, 100):
            spool.add(msgs(100, k))  # queued at 1000
        clock.now = 1050.0
        spool.add(msgs(200, 1300))  # queued at 1050
        assert spool.expire(1120.0) == 1300  # all of the old, across the 500-row reads
        st = spool.stats()
        assert (st.count, st.dropped, st.oldest_queued_at) == (200, 1300, 1050.0)
        assert spool.take(1)[0].id == 1301
    finally:
        spool.close()
    reopened = SQLiteSpool(tmp_path / "spool.db", min_free_bytes=0)
    try:
        assert (reopened.stats().count, reopened.stats().dropped) == (200, 1300)
    finally:
        reopened.close()


def test_drop_oldest_frees_room_across_more_than_one_chunk_of_rows(tmp_path: Path) -> None:
    path = tmp_path / "spool.db"
    spool = SQLiteSpool(path, min_free_bytes=0)
    spool.add(msgs(1200, 1000))  # same-sized entries
    held = spool.stats().bytes
    spool.close()
    each = held // 1200
    spool = SQLiteSpool(path, min_free_bytes=0, max_size=held)
    try:
        big = Message("big", b"x" * (700 * each - 40))  # needs the room of about 700 of the others
        spool.add([(big, 0)])
        st = spool.stats()
        assert st.bytes <= held and 690 <= st.dropped <= 710
        ids = [e.id for e in spool.take(2000)]
        assert ids == list(range(st.dropped + 1, 1202))  # a FIFO prefix went, the newest stayed
        assert st.count == len(ids)
    finally:
        spool.close()


# --- retained entries ------------------------------------------------------------------------------


def test_forget_retained_removes_only_that_topics_retained_entries_up_to_the_id(tmp_path: Path) -> None:
    spool = SQLiteSpool(tmp_path / "spool.db", min_free_bytes=0)
    try:
        spool.add(msgs(3, retain=True, topic="a"))  # 1, 2, 3
        spool.add(msgs(1, retain=False, topic="a"))  # 4: history, not state
        spool.add(msgs(2, retain=True, topic="b"))  # 5, 6
        spool.add(msgs(1, retain=True, topic="a"))  # 7: newer than the id given
        assert spool.newest_retained() == {"a": 7, "b": 6}
        assert spool.forget_retained("a", 6) == 3
        assert [e.id for e in spool.take(10)] == [4, 5, 6, 7]
        assert spool.stats().count == 4
        assert spool.forget_retained("a", 6) == 0
    finally:
        spool.close()


# --- removals and their syncs ----------------------------------------------------------------------


class Monotonic:
    """time.monotonic for spool_io, set by the test."""

    def __init__(self) -> None:
        self.now = 100.0

    def monotonic(self) -> float:
        return self.now


@pytest.fixture
def meter_clock(monkeypatch: pytest.MonkeyPatch) -> Monotonic:
    """The write meter's clock, frozen until the test moves it."""
    clock = Monotonic()
    monkeypatch.setattr(spool_io, "time", types.SimpleNamespace(monotonic=clock.monotonic))
    return clock


def test_a_removal_accept_sync_interval_after_the_last_sync_is_synced(tmp_path: Path, meter_clock: Monotonic) -> None:
    spool = SQLiteSpool(tmp_path / "spool.db", min_free_bytes=0, checkpoint_bytes=2**40, accept_sync_interval=1.0)
    try:
        spool.add(msgs(4))  # FULL: synced at 100.0
        spool.take(4)
        meter_clock.now = 100.5
        before = spool.stats().fsyncs
        spool.accept([1])  # within the interval: NORMAL, no fsync
        assert spool.stats().fsyncs == before
        meter_clock.now = 101.0  # exactly the interval since the add's sync
        spool.accept([2])
        assert spool.stats().fsyncs == before + 1
    finally:
        spool.close()


def test_expire_syncs_late_removals_once_the_interval_is_over(tmp_path: Path, meter_clock: Monotonic) -> None:
    wal = tmp_path / "spool.db-wal"
    spool = SQLiteSpool(tmp_path / "spool.db", min_free_bytes=0, checkpoint_bytes=2**40, accept_sync_interval=1.0)
    try:
        spool.add(msgs(4))
        spool.take(4)
        meter_clock.now = 100.5
        spool.accept([1])  # NORMAL: not yet on disk for sure
        before = spool.stats().fsyncs
        spool.expire(0)
        assert spool.stats().fsyncs == before and wal.stat().st_size > 0  # within the interval: left for later
        meter_clock.now = 101.0
        spool.expire(0)
        assert spool.stats().fsyncs == before + 2 and wal.stat().st_size == 0  # a checkpoint: WAL, then the file
    finally:
        spool.close()


# --- rows that cannot be entries -------------------------------------------------------------------


def test_unreadable_rows_are_dropped_counted_durably_and_logged_with_their_first_ids(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    path = tmp_path / "spool.db"
    spool = SQLiteSpool(path, min_free_bytes=0)
    spool.add(msgs(3))
    spool.close()
    db = sqlite3.connect(path)  # rows of garbage that still parse as rows: text where bytes belong, no size
    for i in range(4, 16):
        db.execute(f"INSERT INTO messages VALUES ({i}, 't/odd', 'not bytes', 0, NULL, {i}, 0.0, 'x')")
    db.commit()
    db.close()
    spool = SQLiteSpool(path, min_free_bytes=0)
    try:
        bytes_before = spool.stats().bytes  # SQLite sums a size of text as 0
        with caplog.at_level(logging.ERROR, logger="bridge.spool"):
            assert [e.id for e in spool.take(20)] == [1, 2, 3]
        assert [r.getMessage() for r in caplog.records if r.name == "bridge.spool"] == [
            "spool spool.db: dropped 12 unreadable entries (ids [4, 5, 6, 7, 8, 9, 10, 11, 12, 13])"
        ]
        st = spool.stats()
        assert (st.count, st.dropped, st.bytes) == (3, 12, bytes_before)
    finally:
        spool.close()
    reopened = SQLiteSpool(path, min_free_bytes=0)
    try:
        assert (reopened.stats().count, reopened.stats().dropped) == (3, 12)
    finally:
        reopened.close()


# --- a damaged file --------------------------------------------------------------------------------


def fill_with_drops(path: Path, clock: Clock, n: int = 2000, drops: int = 7) -> list[bytes]:
    """A spool holding n messages (ids drops+1..) after `drops` expired ones; the payloads by id."""
    payloads = [os.urandom(200) for _ in range(drops + n)]
    spool = SQLiteSpool(path, min_free_bytes=0, max_age=10.0, clock=clock)
    spool.add([(Message(f"t/{i}", payloads[i]), i) for i in range(drops)])
    clock.now += 100
    spool.add([(Message(f"t/{i}", payloads[i]), i) for i in range(drops, drops + n)])  # expires the first ones
    assert spool.stats().dropped == drops
    spool.close()
    return payloads


def damage_middle_page(path: Path) -> None:
    """Random bytes over one page in the middle of the file."""
    page = path.stat().st_size // 4096 // 2
    with open(path, "r+b") as f:
        f.seek(page * 4096)
        f.write(os.urandom(4096))


def carried(caplog: pytest.LogCaptureFixture) -> list[tuple[int, str]]:
    """The salvage's log lines: (level, message)."""
    return [(r.levelno, r.getMessage()) for r in caplog.records if "carried" in r.getMessage()]


def test_a_file_damaged_at_start_keeps_its_drop_count_and_tells_what_was_lost(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    path = tmp_path / "spool.db"
    clock = Clock()
    payloads = fill_with_drops(path, clock)
    damage_middle_page(path)
    with caplog.at_level(logging.WARNING):
        spool = SQLiteSpool(path, min_free_bytes=0, max_age=10.0, clock=clock)
    try:
        entries = spool.take(3000)
        assert all(e.message.payload == payloads[e.id - 1] for e in entries)
        lost = 2000 - len(entries)
        assert 0 < lost <= 40
        assert (spool.stats().count, spool.stats().dropped) == (len(entries), 7 + lost)
        [(level, text)] = carried(caplog)
        assert level == logging.ERROR
        moved = next(p.name for p in tmp_path.iterdir() if CORRUPT.fullmatch(p.name))
        m = re.fullmatch(
            rf"spool spool\.db: carried {len(entries)} message\(s\) over from {moved} in (\d+\.\d) s; "
            rf"{lost} lost \(counted as dropped\)",
            text,
        )
        assert m is not None, text
        assert float(m[1]) < 600
    finally:
        spool.close()


def test_a_file_of_nothing_readable_loses_nothing_it_did_not_hold(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    path = tmp_path / "spool.db"
    path.write_bytes(os.urandom(8192))
    with caplog.at_level(logging.WARNING):
        spool = SQLiteSpool(path, min_free_bytes=0)
    try:
        assert (spool.stats().count, spool.stats().dropped) == (0, 0)
        [(level, text)] = carried(caplog)
        assert level == logging.WARNING and text.endswith("; 0 lost (counted as dropped)")
        moved = [r.getMessage() for r in caplog.records if "is corrupt" in r.getMessage()]
        # The reason given is SQLite's own, not the spool's wrapper around it.
        assert moved == [
            f"spool file {path} is corrupt (file is not a database): moved aside to "
            f"{next(tmp_path.glob('spool.db.corrupt-*[0-9]'))}; starting with a fresh one"
        ]
    finally:
        spool.close()


def test_a_file_that_cannot_be_moved_aside_at_start_fails_the_open_cleanly(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "spool.db"
    path.write_bytes(os.urandom(8192))

    def refuse(*_: object, **__: object) -> Path:
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(spool_module, "move_aside", refuse)
    with pytest.raises(SpoolStorageError, match=r"; and it cannot be moved aside: \[Errno 13\] Permission denied"):
        SQLiteSpool(path, min_free_bytes=0)
    monkeypatch.undo()
    # The lock went with the failed open: a later start can take the file.
    SQLiteSpool(path, min_free_bytes=0).close()


def open_with_damage_to_come(path: Path, clock: Clock) -> SQLiteSpool:
    """The spool of fill_with_drops, open, with a page cache too small to hide damage to the file."""
    spool = SQLiteSpool(path, min_free_bytes=0)
    spool.accept(range(9, 2008, 2))  # every other row delivered: the file's ids have gaps
    spool.close()  # a checkpoint: every row is in the file, none in the WAL only
    spool = SQLiteSpool(path, min_free_bytes=0, max_age=10.0, clock=clock)
    spool._db.execute("PRAGMA cache_size=5")
    spool.reject([e.id for e in spool.take(5)])  # the small cache now holds only the first pages
    return spool


def test_a_file_damaged_while_running_counts_exactly_what_it_lost(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    path = tmp_path / "spool.db"
    clock = Clock()
    payloads = fill_with_drops(path, clock)
    spool = open_with_damage_to_come(path, clock)
    try:
        held = spool.stats().count
        assert held == 1000
        damage_middle_page(path)
        with caplog.at_level(logging.WARNING):
            entries = spool.take(3000)
        assert all(e.message.payload == payloads[e.id - 1] for e in entries)
        lost = held - len(entries)
        assert 0 < lost <= 40
        st = spool.stats()
        # Exactly the rows it held and could not carry over: not an estimate from the ids, not the old drops twice.
        assert (st.count, st.dropped) == (len(entries), 7 + lost)
        assert st.oldest_queued_at == clock.now
        assert [level for level, _ in carried(caplog)] == [logging.ERROR]
        reason = [r.getMessage() for r in caplog.records if "is corrupt (" in r.getMessage()]
        assert len(reason) == 1 and "(database disk image is malformed)" in reason[0], reason
    finally:
        spool.close()


def test_a_running_file_that_cannot_be_moved_aside_is_refused_and_said_so(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    path = tmp_path / "spool.db"
    clock = Clock()
    fill_with_drops(path, clock)
    spool = open_with_damage_to_come(path, clock)

    def refuse(*_: object, **__: object) -> Path:
        raise PermissionError(13, "Permission denied")

    try:
        damage_middle_page(path)
        monkeypatch.setattr(spool_module, "move_aside", refuse)
        with caplog.at_level(logging.ERROR), pytest.raises(SpoolCorrupt):
            spool.take(3000)
        assert [r.getMessage() for r in caplog.records if r.name == "bridge.spool"] == [
            f"spool spool.db: {path} is corrupt and cannot be moved aside ([Errno 13] Permission denied): "
            "refusing for now"
        ]
        assert path.exists() and not list(tmp_path.glob("spool.db.corrupt-*"))
    finally:
        monkeypatch.undo()
        spool.close()


def test_a_fresh_file_opened_late_still_gets_what_the_damaged_one_held(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    path = tmp_path / "spool.db"
    clock = Clock()
    payloads = fill_with_drops(path, clock)
    spool = open_with_damage_to_come(path, clock)
    real_lock = spool_module.lock_file
    mono = Monotonic()
    monkeypatch.setattr(spool_module, "time", types.SimpleNamespace(monotonic=mono.monotonic))

    def failing_lock(p: Path, name: str) -> int:
        raise SpoolStorageError(f"{name}: cannot open {p}: [Errno 30] Read-only file system")

    refused = r"^spool spool\.db: no fresh spool in place of a corrupt one: spool spool\.db: cannot open "
    try:
        held = spool.stats().count
        damage_middle_page(path)
        monkeypatch.setattr(spool_module, "lock_file", failing_lock)
        with pytest.raises(SpoolStorageError, match=refused):
            spool.take(3000)
        mono.now += spool_module.ROTATE_INTERVAL - 0.5
        with pytest.raises(SpoolStorageError, match=refused):  # within ROTATE_INTERVAL: the same refusal, at once
            spool.add(msgs(1))
        mono.now += 0.5  # exactly ROTATE_INTERVAL after the rotation: tried again, and it fails again
        with pytest.raises(SpoolStorageError, match=r"^spool spool\.db: cannot open "):
            spool.add(msgs(1))
        mono.now += 1.0  # the interval counts from that attempt now
        with pytest.raises(SpoolStorageError, match=refused):
            spool.add(msgs(1))
        monkeypatch.setattr(spool_module, "lock_file", real_lock)
        mono.now += spool_module.ROTATE_INTERVAL - 1.0
        with caplog.at_level(logging.INFO, logger="bridge.spool"):
            entries = spool.take(3000)
        assert f"spool spool.db: a fresh spool file is open again at {path}" in [r.getMessage() for r in caplog.records]
        assert entries and all(e.message.payload == payloads[e.id - 1] for e in entries)
        lost = held - len(entries)
        assert 0 < lost <= 40
        assert (spool.stats().count, spool.stats().dropped) == (len(entries), 7 + lost)
    finally:
        spool.close()


# --- durability levels and the write accounting ----------------------------------------------------


def synchronous(spool: SQLiteSpool) -> int:
    """SQLite's synchronous level on the spool's connection now (2 = FULL, 1 = NORMAL)."""
    return int(spool._db.execute("PRAGMA synchronous").fetchone()[0])


def test_adds_commit_with_full_sync_and_removals_with_normal(tmp_path: Path, meter_clock: Monotonic) -> None:
    # What an MCP ACK stands on: an add is on disk when it returns (FULL), a removal may wait (NORMAL).
    # The kernel's side of it (the fsyncs themselves) is checked under strace by test_durability_strace.py.
    clock = Clock(1000.0)
    spool = SQLiteSpool(
        tmp_path / "spool.db",
        min_free_bytes=0,
        checkpoint_bytes=2**40,
        max_age=10.0,
        accept_sync_interval=1.0,
        clock=clock,
    )
    try:
        spool.add(msgs(3))
        assert synchronous(spool) == 2
        spool.take(1)
        spool.accept([1])  # within accept_sync_interval of the add's sync
        assert synchronous(spool) == 1
        spool.add(msgs(1, 3))
        assert synchronous(spool) == 2
        fsyncs, commits = spool.stats().fsyncs, spool.stats().commits
        clock.now = 1020.0
        assert spool.expire(clock.now) == 3
        assert synchronous(spool) == 1 and spool.stats().fsyncs == fsyncs  # expiry is a removal too
        assert spool.stats().commits == commits + 1
    finally:
        spool.close()


def test_an_entry_exactly_max_age_old_is_kept(tmp_path: Path) -> None:
    clock = Clock(1000.0)
    spool = SQLiteSpool(tmp_path / "spool.db", min_free_bytes=0, max_age=10.0, clock=clock)
    try:
        spool.add(msgs(2))
        commits = spool.stats().commits
        assert spool.expire(1010.0) == 0
        assert spool.stats().commits == commits  # nothing to remove: nothing written
        assert spool.expire(1010.5) == 2
        clock.now = 1020.0
        spool.add(msgs(1, 2))
        clock.now = 1025.0
        spool.add(msgs(1, 3))
        assert spool.expire(1035.0) == 1  # queued at 1020 goes; at 1025, exactly max_age old, stays
        assert [e.id for e in spool.take(5)] == [4]
        spool.add(msgs(1, 2))
        clock.now = 1030.0
        assert spool.expire(1040.5) == 2
        assert spool.stats().dropped == 5  # the drops add up across expiries
    finally:
        spool.close()


def test_the_write_meter_counts_the_wal_header_sync_of_each_fresh_wal(tmp_path: Path) -> None:
    # Every add: one fsync of the WAL. With a checkpoint after each (checkpoint_bytes=1): two more for it,
    # and one for the header of the WAL that the next add starts afresh.
    steady = SQLiteSpool(tmp_path / "a.db", min_free_bytes=0, checkpoint_bytes=2**40)
    churn = SQLiteSpool(tmp_path / "b.db", min_free_bytes=0, checkpoint_bytes=1)
    try:
        for spool, per_add in ((steady, 1), (churn, 4)):
            spool.add(msgs(1))
            before = spool.stats().fsyncs
            spool.add(msgs(1, 1))
            spool.add(msgs(1, 2))
            assert spool.stats().fsyncs - before == 2 * per_add, spool.path.name
    finally:
        steady.close()
        churn.close()


def test_an_add_leaves_nothing_unsynced_for_expire_to_checkpoint(tmp_path: Path, meter_clock: Monotonic) -> None:
    wal = tmp_path / "spool.db-wal"
    spool = SQLiteSpool(tmp_path / "spool.db", min_free_bytes=0, checkpoint_bytes=2**40, accept_sync_interval=1.0)
    try:
        spool.add(msgs(2))
        fsyncs = spool.stats().fsyncs
        meter_clock.now += 5
        spool.expire(0)
        assert spool.stats().fsyncs == fsyncs and wal.stat().st_size > 0  # no needless checkpoint
    finally:
        spool.close()


def test_a_reopened_spool_counts_what_the_kernel_does_at_its_first_add(tmp_path: Path) -> None:
    # Seen under strace: reopening a closed spool syncs nothing; its first add syncs the header of the WAL
    # it starts, the directory (a connection's first sync of the WAL) and the commit. Closing an empty
    # WAL syncs nothing either.
    path = tmp_path / "spool.db"
    first = SQLiteSpool(path, min_free_bytes=0)
    assert first.stats().commits == 0
    first.add(msgs(1))
    first.close()
    spool = SQLiteSpool(path, min_free_bytes=0)
    try:
        assert (spool.stats().commits, spool.stats().fsyncs, spool.stats().bytes_written) == (0, 0, 0)
        spool.add(msgs(1, 1))
        assert (spool.stats().commits, spool.stats().fsyncs) == (1, 3)
        spool.add(msgs(1, 2))
        assert spool.stats().fsyncs == 4
    finally:
        spool.close()
    empty = SQLiteSpool(path, min_free_bytes=0)
    empty.close()
    assert empty.stats().fsyncs == 0


def test_removals_commit_without_sync_for_a_second_by_default(tmp_path: Path, meter_clock: Monotonic) -> None:
    spool = SQLiteSpool(tmp_path / "spool.db", min_free_bytes=0, checkpoint_bytes=2**40)
    try:
        spool.add(msgs(4))
        spool.take(4)
        fsyncs = spool.stats().fsyncs
        meter_clock.now += 0.75
        spool.accept([1])
        assert spool.stats().fsyncs == fsyncs
        meter_clock.now += 0.25  # a second since the add's sync
        spool.accept([2])
        assert spool.stats().fsyncs == fsyncs + 1
    finally:
        spool.close()


def test_a_free_disk_floor_far_below_the_free_space_refuses_nothing(tmp_path: Path) -> None:
    free = os.statvfs(tmp_path)
    assert free.f_bavail * free.f_frsize > 64 * 1024**2, "the test wants 64 MiB free in its temp folder"
    spool = SQLiteSpool(tmp_path / "spool.db", min_free_bytes=1024**2)
    try:
        assert spool.add(msgs(2)) == [1, 2]
    finally:
        spool.close()


def test_a_full_spool_that_rejects_says_what_did_not_fit(tmp_path: Path) -> None:
    spool = SQLiteSpool(tmp_path / "spool.db", min_free_bytes=0, when_full="reject", max_size=10_000)
    try:
        with pytest.raises(BufferFull) as full:
            spool.add([(Message("big", b"x" * 6000), 0), (Message("big", b"x" * 6000), 1)])
        assert re.fullmatch(r"spool spool\.db: 2 messages \(\d+ bytes\) do not fit in 10000 bytes", str(full.value))
    finally:
        spool.close()
