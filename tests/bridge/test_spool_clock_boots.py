"""The spool's dates across boots (issue 16, clocks, second part): rows an unsynchronised boot queued are adopted
once, not at every boot; a damaged segments table is a damaged file (moved aside, its rows salvaged and dated); a
clock flapping its sync state does not grow the segments; a clock known wrong drops no other boot's rows.

The clocks are faked (wall and monotonic passed in), never the machine's.
"""

from __future__ import annotations

import sqlite3
from pathlib import Path

import pytest

from bridge.spool import SpoolStorageError, SQLiteSpool, read_stats
from bridge.spool_dates import read_segments
from gateway.types import Message

from fake_clocks import Clocks

DAY = 86400.0
HOUR = 3600.0
YEAR = 365 * DAY
TODAY = 1.7e9


def msgs(n: int) -> list[tuple[Message, int]]:
    """n (message, sampled_ms) pairs."""
    return [(Message(f"t/{i}", b"p%d" % i), i) for i in range(n)]


def open_spool(path: Path, clocks: Clocks, boot: int, synced: list[bool | None], max_age: float) -> SQLiteSpool:
    """The spool at `path` as a process of `boot` opens it, its clock's sync state what `synced[0]` says then."""
    return SQLiteSpool(
        path,
        min_free_bytes=0,
        max_age=max_age,
        clock=clocks.wall,
        monotonic=clocks.monotonic,
        boot=boot,
        synchronized=lambda: synced[0],
    )


def test_rows_adopted_from_an_unsynchronised_boot_expire_after_later_synchronised_boots(tmp_path: Path) -> None:
    """Ten rows spooled at 1970 (max_age a day), then boots each synchronised for 20 h adding a row: the ten are
    adopted once, at the first of them, and expire a day later; the backlog does not grow by a row per boot."""
    path, clocks, synced = tmp_path / "s.db", Clocks(100.0, 10.0), [False]
    spool = open_spool(path, clocks, 1, synced, DAY)
    spool.add(msgs(10))
    spool.close()
    counts = []
    for boot in range(2, 8):
        clocks.boot(TODAY + boot * DAY)
        synced[0] = True
        spool = open_spool(path, clocks, boot, synced, DAY)
        spool.expire(clocks.now)
        clocks.run(20 * HOUR)
        spool.expire(clocks.now)
        counts.append(spool.stats().count)
        spool.add(msgs(1))
        spool.close()
    assert counts == [10, 1, 1, 1, 1, 1]


def test_rows_of_a_boot_whose_sync_state_stays_unknown_are_adopted_once(tmp_path: Path) -> None:
    """A box that never knows its sync state: rows of an earlier boot are adopted at the next, and from the boot
    after on they age by the wall time they were given then (max_age after it), not adopted again."""
    path, clocks, synced = tmp_path / "s.db", Clocks(100.0, 10.0), [None]
    spool = open_spool(path, clocks, 1, synced, 2 * DAY)
    spool.add(msgs(3))
    spool.close()
    clocks.boot(TODAY)
    spool = open_spool(path, clocks, 2, synced, 2 * DAY)  # adopted as if queued at TODAY
    clocks.run(DAY)
    assert spool.expire(clocks.now) == 0
    spool.close()
    clocks.boot(TODAY + 2 * DAY + 1)
    spool = open_spool(path, clocks, 3, synced, 2 * DAY)
    try:
        assert spool.expire(clocks.now) == 3
    finally:
        spool.close()


def test_rows_adopted_and_then_synchronised_in_the_same_run_keep_their_date_at_the_next_boot(tmp_path: Path) -> None:
    """Rows adopted while this boot's clock is unsynchronised, and the clock then set by NTP: they are dated by the
    synchronised clock for the next boot (max_age from their adoption, on it), even with no add after it."""
    path, clocks, synced = tmp_path / "s.db", Clocks(100.0, 10.0), [False]
    spool = open_spool(path, clocks, 1, synced, 2 * DAY)
    spool.add(msgs(2))
    spool.close()
    clocks.boot(200.0)  # boots at 1970 again
    spool = open_spool(path, clocks, 2, synced, 2 * DAY)
    clocks.run(HOUR)
    clocks.now += TODAY  # NTP sets the clock an hour after the adoption
    synced[0] = True
    spool.close()
    clocks.boot(TODAY + 2 * DAY + 190)  # the adoption was at TODAY + 200 on the synchronised clock
    spool = open_spool(path, clocks, 3, synced, 2 * DAY)
    try:
        assert spool.expire(clocks.now) == 0
        clocks.run(20)
        assert spool.expire(clocks.now) == 2
    finally:
        spool.close()


def damage_segments(path: Path) -> None:
    """Overwrite the root page of the file's segments table with garbage."""
    db = sqlite3.connect(path)
    root = db.execute("SELECT rootpage FROM sqlite_master WHERE name = 'segments'").fetchone()[0]
    size = db.execute("PRAGMA page_size").fetchone()[0]
    db.close()
    with open(path, "r+b") as f:
        f.seek((root - 1) * size)
        f.write(b"\xff" * size)


def test_a_damaged_segments_table_at_open_is_salvaged_and_its_rows_are_adopted(tmp_path: Path) -> None:
    """A spool whose segments page is garbage opens (moved aside, its rows carried over) instead of failing the
    start; the rows, their dates lost, get max_age from the open, not their 1970 wall age."""
    path, clocks, synced = tmp_path / "s.db", Clocks(100.0, 10.0), [False]
    spool = open_spool(path, clocks, 1, synced, DAY)
    spool.add(msgs(10))
    spool.close()
    damage_segments(path)
    clocks.boot(TODAY)
    synced[0] = True
    spool = open_spool(path, clocks, 2, synced, DAY)
    try:
        assert list(tmp_path.glob("s.db.corrupt-*"))
        assert spool.expire(clocks.now) == 0 and spool.stats().count == 10
        clocks.run(DAY + 1)
        assert spool.expire(clocks.now) == 10
    finally:
        spool.close()


def test_segments_in_memory_follow_the_table_through_steps_and_prunes(tmp_path: Path) -> None:
    """After adds across steps of the wall clock, deliveries and a sync gained, the spool's segments are the
    table's (it keeps them in memory instead of reading the table at every new segment)."""
    path, clocks, synced = tmp_path / "s.db", Clocks(100.0, 10.0), [False]
    spool = open_spool(path, clocks, 1, synced, YEAR)
    try:
        for i in range(12):
            spool.add(msgs(3))
            clocks.now += 10.0 if i % 2 else -10.0  # a step each time: a new segment
            if i % 3 == 2:
                spool.accept(e.id for e in spool.take(5))  # older segments date nothing any more
            if i == 7:
                synced[0] = True
        spool.add(msgs(1))
        assert spool._segments == read_segments(spool._db)
        assert len(spool._segments) < 12
    finally:
        spool.close()


def test_a_clock_flapping_its_sync_state_keeps_the_segments_few(tmp_path: Path) -> None:
    """A clock whose sync state flips at every one of 10,000 adds, never stepping, starts no segment per flip:
    the segments, which every add that starts one used to read back, stay at one."""
    path, clocks, synced = tmp_path / "s.db", Clocks(100.0, 10.0), [False]
    spool = open_spool(path, clocks, 1, synced, YEAR)
    spool._db.execute("PRAGMA synchronous=OFF")  # the test counts segments, not fsyncs
    spool._synchronous = "FULL"  # and so keeps its own setting
    try:
        for _ in range(10_000):
            synced[0] = not synced[0]
            spool.add(msgs(1))
            clocks.run(0.01)
        assert len(read_segments(spool._db)) == 1 and len(spool._segments) == 1
    finally:
        spool.close()


def test_a_clock_known_unsynchronised_drops_no_row_another_boot_dated(tmp_path: Path) -> None:
    """Rows of a synchronised earlier boot, and a clock that boots ten years ahead (a bad RTC), known
    unsynchronised: none of them expires until the clock is synchronised and they are really past max_age."""
    path, clocks, synced = tmp_path / "s.db", Clocks(wall=TODAY), [True]
    spool = open_spool(path, clocks, 1, synced, DAY)
    spool.add(msgs(4))
    spool.close()
    clocks.boot(TODAY + 10 * YEAR)
    synced[0] = False
    spool = open_spool(path, clocks, 2, synced, DAY)
    try:
        assert spool.expire(clocks.now) == 0
        spool.add(msgs(1))
        assert spool.stats().count == 5
        clocks.now = TODAY + HOUR  # NTP sets it right
        synced[0] = True
        assert spool.expire(clocks.now) == 0
        clocks.now = TODAY + DAY + 1
        assert spool.expire(clocks.now) == 4
    finally:
        spool.close()


def test_read_stats_dates_a_backlog_spooled_at_1970_by_the_synchronised_clock(tmp_path: Path) -> None:
    """`fieldgate spool` (read_stats) on rows queued at 1970 and then dated by NTP's clock: their queue time is
    when they were queued on that clock (an hour before it was set), not 1970, so their age is no 56 years."""
    path, clocks, synced = tmp_path / "s.db", Clocks(100.0, 10.0), [False]
    spool = open_spool(path, clocks, 1, synced, YEAR)
    spool.add(msgs(2))
    clocks.run(HOUR)
    clocks.now += TODAY  # NTP sets the clock
    synced[0] = True
    spool.close()
    oldest = read_stats(path).oldest_queued_at
    assert oldest is not None and abs(oldest - (TODAY + 100)) < 1


def test_a_spool_whose_rows_cannot_be_dated_at_close_still_closes(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Dating this boot's rows at close fails (a full disk): the spool still closes and lets go of its file, and
    the rows stay undated (adopted at the next boot) rather than the stop failing."""
    path, clocks, synced = tmp_path / "s.db", Clocks(100.0, 10.0), [False]
    spool = open_spool(path, clocks, 1, synced, YEAR)
    spool.add(msgs(2))
    synced[0] = True

    def full(*_: object, **__: object) -> None:
        raise SpoolStorageError("disk full")

    monkeypatch.setattr(spool, "_write", full)
    spool.close()
    again = open_spool(path, clocks, 1, [None], YEAR)  # the lock was released
    try:
        assert again.stats().count == 2 and read_segments(again._db)[0][4] is None
    finally:
        again.close()
