"""The spool against a wall clock that steps (issue 16, clocks): max_age counts on the monotonic clock within a
boot, so NTP setting a Pi's clock by years forward or back neither drops nor keeps forever what was spooled
before it; anchors survive a restart of the same boot only; a file of the schema before the dates opens as it was.

The clocks are faked (wall and monotonic passed in), never the machine's.
"""

from __future__ import annotations

import os
import sqlite3
from collections.abc import Callable
from pathlib import Path

import pytest

from bridge.buffer import Buffer, MemoryBuffer
from bridge.spool import SQLiteSpool
from gateway.types import Message

from fake_clocks import Clocks

DAY = 86400.0
YEAR = 365 * DAY
MAX_AGE = 14 * DAY
BOOT, OTHER_BOOT = 0x1234, 0x5678


def msgs(n: int, start: int = 0, anchor: int | None = None) -> list[tuple[Message, int]]:
    """n (message, sampled_ms) pairs, each with `anchor` (None: none)."""
    return [(Message(f"t/{i}", b"p%d" % i, anchor=anchor), i) for i in range(start, start + n)]


Make = Callable[..., Buffer]


def open_spool(path: Path, clocks: Clocks, boot: int, synchronized: bool | None = False) -> SQLiteSpool:
    """The spool at `path` on the test's clocks, as a process of `boot` opens it, its clock `synchronized` or not."""
    return SQLiteSpool(
        path,
        min_free_bytes=0,
        max_age=MAX_AGE,
        clock=clocks.wall,
        monotonic=clocks.monotonic,
        boot=boot,
        synchronized=lambda: synchronized,
    )


@pytest.fixture(params=["memory", "sqlite"])
def make(request: pytest.FixtureRequest, tmp_path: Path, clocks: Clocks) -> Make:
    """A buffer of either kind on the test's clocks (and, for the spool, a fixed boot)."""

    def build(**kw: object) -> Buffer:
        if request.param == "memory":
            return MemoryBuffer(max_age=MAX_AGE, clock=clocks.wall, monotonic=clocks.monotonic)
        args: dict = {"max_age": MAX_AGE, "clock": clocks.wall, "monotonic": clocks.monotonic, "boot": BOOT, **kw}
        return SQLiteSpool(tmp_path / "spool.db", min_free_bytes=0, **args)

    return build


@pytest.fixture
def clocks() -> Clocks:
    """The test's clocks, at 1970 (a Pi without a real-time clock that booted unsynchronised)."""
    return Clocks()


@pytest.mark.parametrize("step", [50 * YEAR, -50 * YEAR, 3 * DAY, -3 * DAY])
def test_a_step_of_the_wall_clock_neither_expires_nor_rejuvenates_what_is_spooled(
    make: Make, clocks: Clocks, step: float
) -> None:
    """Rows spooled before a step of the wall clock (either way, by days or by years) expire max_age after they
    were spooled on the monotonic clock: not at the step (forward), not never (back); the FIFO order holds."""
    buf = make()
    try:
        buf.add(msgs(3))
        clocks.run(10)
        clocks.step(step)  # NTP sets the clock
        assert buf.expire(clocks.now) == 0 and buf.stats().count == 3
        buf.add(msgs(2, 3))  # an add expires too
        assert buf.stats().count == 5
        oldest = buf.stats().oldest_queued_at
        assert oldest is not None and abs(oldest - (clocks.now - 10)) < 1e-6  # its age on the set clock: 10 s
        clocks.run(MAX_AGE - 15)  # 5 s short of the first rows' max_age
        assert buf.expire(clocks.now) == 0
        clocks.run(6)
        assert buf.expire(clocks.now) == 3
        assert [e.message.topic for e in buf.take(10)] == ["t/3", "t/4"]
    finally:
        buf.close()


def test_repeated_steps_both_ways_do_not_move_the_age_of_a_row(make: Make, clocks: Clocks) -> None:
    """A clock that keeps stepping by years either way between adds: every row expires max_age after its add."""
    buf = make()
    try:
        for i, step in enumerate([40 * YEAR, -60 * YEAR, 30 * YEAR, -5 * YEAR]):
            buf.add(msgs(1, i))
            clocks.run(DAY)
            clocks.step(step)
            assert buf.expire(clocks.now) == 0
        clocks.run(MAX_AGE - 4 * DAY + 1)  # the first row is max_age + 1 s old, the second 1 day younger
        assert buf.expire(clocks.now) == 1
        assert buf.stats().count == 3
    finally:
        buf.close()


def test_rows_of_an_earlier_run_of_this_boot_keep_their_age_across_a_step_while_the_gateway_was_down(
    tmp_path: Path, clocks: Clocks
) -> None:
    """Spooled, gateway stopped, the clock set by years, gateway started again in the same boot: nothing expires
    before its max_age on the monotonic clock, and the anchors come back with their rows."""
    spool = open_spool(tmp_path / "s.db", clocks, BOOT)
    spool.add(msgs(2, anchor=-7000))
    spool.close()
    clocks.run(60)
    clocks.step(50 * YEAR)
    spool = open_spool(tmp_path / "s.db", clocks, BOOT)
    try:
        assert spool.expire(clocks.now) == 0
        entries = spool.take(5)
        assert [(e.message.topic, e.message.anchor, e.sampled_ms) for e in entries] == [
            ("t/0", -7000, 0),
            ("t/1", -7000, 1),
        ]
        clocks.run(MAX_AGE)
        assert spool.expire(clocks.now) == 2
    finally:
        spool.close()


def test_rows_another_boot_queued_on_a_synchronised_clock_age_by_the_wall_clock_without_their_anchors(
    tmp_path: Path, clocks: Clocks
) -> None:
    """After a reboot the monotonic clock started again: the rows' anchors say nothing of the new one (dropped),
    and, queued on a synchronised clock, their age is the wall clock's."""
    path = tmp_path / "s.db"
    spool = open_spool(path, clocks, BOOT, synchronized=True)
    spool.add(msgs(2, anchor=123))
    spool.close()
    clocks.mono = 5.0  # a new boot
    spool = open_spool(path, clocks, OTHER_BOOT, synchronized=True)
    try:
        assert [e.message.anchor for e in spool.take(5)] == [None, None]
        clocks.now += MAX_AGE + 1  # the wall clock alone says how old they are
        assert spool.expire(clocks.now) == 2
    finally:
        spool.close()


def test_rows_another_boot_queued_on_an_unsynchronised_clock_get_max_age_from_the_next_boot(
    tmp_path: Path, clocks: Clocks
) -> None:
    """A Pi spools at 1970, a day apart, reboots, and NTP sets it to today: the rows of the earlier boot, their
    wall age meaningless, are not dropped; they expire max_age after the new boot first opened the spool, a day
    apart as they were queued, and their anchors (of the other boot's monotonic clock) are gone."""
    path = tmp_path / "s.db"
    spool = open_spool(path, clocks, BOOT, synchronized=False)
    spool.add(msgs(1, 0, anchor=10))
    clocks.run(DAY)
    spool.add(msgs(1, 1, anchor=20))
    spool.close()
    clocks.mono = 5.0  # a new boot, and later NTP: the wall clock is 50 years on
    clocks.step(50 * YEAR)
    spool = open_spool(path, clocks, OTHER_BOOT, synchronized=True)
    try:
        assert spool.expire(clocks.now) == 0 and spool.stats().count == 2
        assert [e.message.anchor for e in spool.take(5)] == [None, None]
    finally:
        spool.close()
    clocks.run(MAX_AGE - 1)  # the gateway restarted in this boot: the rows stay adopted, not adopted again
    spool = open_spool(path, clocks, OTHER_BOOT, synchronized=True)
    try:
        assert spool.expire(clocks.now) == 0
        clocks.run(2)
        assert spool.expire(clocks.now) == 1
        clocks.run(DAY)
        assert spool.expire(clocks.now) == 1
    finally:
        spool.close()


OLD_SCHEMA = [
    """CREATE TABLE messages (id INTEGER PRIMARY KEY AUTOINCREMENT, topic TEXT NOT NULL,
    payload BLOB NOT NULL, retain INTEGER NOT NULL, qos INTEGER, sampled_ms INTEGER NOT NULL,
    queued_at REAL NOT NULL, size INTEGER NOT NULL)""",
    "CREATE TABLE IF NOT EXISTS [meta] ([key] TEXT PRIMARY KEY, [value] INTEGER)",
    "INSERT INTO meta (key, value) VALUES ('dropped', 4)",
]


def test_a_spool_file_of_the_schema_before_the_dates_opens_and_keeps_its_rows(tmp_path: Path, clocks: Clocks) -> None:
    """A spool written by a gateway before anchors: opened as it is, every row handed out in order with its ts, its
    drop counter kept, its rows aged by the wall clock; new rows go on after its ids and age on the monotonic one."""
    path = tmp_path / "s.db"
    db = sqlite3.connect(path)
    for sql in OLD_SCHEMA:
        db.execute(sql)
    for i in range(1, 4):
        db.execute("INSERT INTO messages VALUES (?, ?, ?, 0, NULL, ?, ?, 40)", (i, f"old/{i}", b"x", 100 + i, 900.0))
    db.commit()
    db.close()
    spool = open_spool(path, clocks, BOOT)
    try:
        assert spool.add(msgs(1)) == [4]
        entries = spool.take(10)
        assert [(e.id, e.message.topic, e.sampled_ms, e.message.anchor) for e in entries] == [
            (1, "old/1", 101, None),
            (2, "old/2", 102, None),
            (3, "old/3", 103, None),
            (4, "t/0", 0, None),
        ]
        spool.reject(e.id for e in entries)
        assert spool.stats().dropped == 4
        clocks.step(MAX_AGE)  # the old rows (queued at 900 on the wall clock) are past max_age by it
        assert spool.expire(clocks.now) == 3
        assert [e.id for e in spool.take(10)] == [4]
    finally:
        spool.close()


def test_a_salvaged_spool_keeps_the_dates_and_anchors_of_the_rows_it_carries_over(
    tmp_path: Path, clocks: Clocks
) -> None:
    """A spool file damaged on disk is salvaged at open: the rows carried over keep their anchors and their
    monotonic dates (a ten-year step after them expires none), as they keep their ids and ts."""
    path = tmp_path / "s.db"
    spool = open_spool(path, clocks, BOOT)
    spool.add([(Message(f"t/{i}", os.urandom(200), anchor=1000 + i), i) for i in range(2000)])
    spool.close()
    pages = path.stat().st_size // 4096
    with open(path, "r+b") as f:  # one page in the middle turned to garbage
        f.seek(pages // 2 * 4096)
        f.write(os.urandom(4096))
    clocks.run(60)
    clocks.step(10 * YEAR)
    spool = open_spool(path, clocks, BOOT)
    try:
        assert spool.expire(clocks.now) == 0
        entries = spool.take(3000)
        assert 1900 < len(entries) < 2000  # one page of rows lost, no more
        assert all(e.message.anchor == 1000 + e.sampled_ms for e in entries)
        clocks.run(MAX_AGE - 61)
        assert spool.expire(clocks.now) == 0
        clocks.run(2)
        assert spool.expire(clocks.now) == len(entries)
    finally:
        spool.close()
