"""Spool files an SD card has damaged: moved aside as `<name>.corrupt-<unix seconds>`, counted, replaced by a fresh one.

At open (random bytes, a truncated file, a valid header with garbage pages, a -wal of garbage frames that
SQLite takes for committed) and while running (once, then not again within ROTATE_INTERVAL). What is no
corruption keeps its error: a spool locked by another gateway, someone else's database. A full disk is in
test_spool_crash.py.
"""

from __future__ import annotations

import asyncio
import logging
import os
import re
import sqlite3
import struct
import time
from pathlib import Path

import pytest

from bridge import spool_file as spool_module
from bridge import statefiles
from bridge.broker import EmbeddedBroker
from bridge.outbox import Outbox
from bridge.sink import MqttSink
from bridge.spool import SpoolCorrupt, SpoolError, SpoolStorageError, SQLiteSpool
from bridge.statefiles import KEEP, corrupt_counts, move_aside
from gateway.types import Message

from helpers import Subscriber, TcpRelay, spool_rows, until

CORRUPT = re.compile(r"spool\.db\.corrupt-\d+")


@pytest.fixture(autouse=True)
def counted_apart(monkeypatch: pytest.MonkeyPatch) -> None:
    """The corrupt-file counters are process-wide: this module's count from zero and leave others' as they were."""
    monkeypatch.setattr(statefiles, "_counts", dict.fromkeys(statefiles.FILES, 0))


def fill(path: Path, n: int = 100, payload: int = 200) -> None:
    """A spool file holding n messages, closed."""
    spool = SQLiteSpool(path, min_free_bytes=0)
    spool.add([(Message(f"t/{i}", os.urandom(payload)), i) for i in range(n)])
    spool.close()


def _checksum(data: bytes, s0: int, s1: int) -> tuple[int, int]:
    words = struct.unpack(f">{len(data) // 4}I", data)
    for i in range(0, len(words), 2):
        s0 = (s0 + words[i] + s1) & 0xFFFFFFFF
        s1 = (s1 + words[i + 1] + s0) & 0xFFFFFFFF
    return s0, s1


def garbage_wal(db: Path, pages: range) -> None:
    """A -wal whose frames carry random pages with valid checksums and a commit: SQLite replays them.

    (A -wal of plain random bytes fails its header checksum and SQLite ignores it; see the test below.)
    """
    page_size = int.from_bytes(db.read_bytes()[16:18], "big")
    salt = (0x12345678, 0x9ABCDEF0)
    header = struct.pack(">IIIIII", 0x377F0683, 3007000, page_size, 0, *salt)
    s0, s1 = _checksum(header, 0, 0)
    out = header + struct.pack(">II", s0, s1)
    for k, page in enumerate(pages):
        content = os.urandom(page_size)
        frame = struct.pack(">II", page, db.stat().st_size // page_size if k == len(pages) - 1 else 0)
        s0, s1 = _checksum(frame + content, s0, s1)
        out += frame + struct.pack(">IIII", *salt, s0, s1) + content
    Path(f"{db}-wal").write_bytes(out)


def random_bytes(path: Path) -> None:
    path.write_bytes(os.urandom(50_000))


def truncated(path: Path) -> None:
    fill(path, 2000)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 3 + 100])


def garbage_pages(path: Path) -> None:
    fill(path, 2000)
    data = bytearray(path.read_bytes())
    data[4096:] = os.urandom(len(data) - 4096)  # page 1 (the header and schema) intact
    path.write_bytes(bytes(data))


def wal_of_garbage(path: Path) -> None:
    fill(path, 2000)
    garbage_wal(path, range(2, 6))


def zeros(path: Path) -> None:
    path.write_bytes(bytes(8192))


@pytest.mark.parametrize("damage", [random_bytes, truncated, garbage_pages, wal_of_garbage, zeros])
def test_a_corrupt_spool_is_moved_aside_at_open_and_a_fresh_one_works(
    tmp_path: Path, damage: object, caplog: pytest.LogCaptureFixture
) -> None:
    path = tmp_path / "spool.db"
    damage(path)  # type: ignore[operator]
    before = corrupt_counts()["spool"]
    spool = SQLiteSpool(path, min_free_bytes=0)
    try:
        assert spool.stats().count == 0
        assert spool.add([(Message("t/new", b"1"), 1)]) == [1]
        assert [e.message.topic for e in spool.take(10)] == ["t/new"]
    finally:
        spool.close()
    moved = [p.name for p in tmp_path.iterdir() if CORRUPT.fullmatch(p.name)]
    assert len(moved) == 1
    assert corrupt_counts()["spool"] == before + 1
    errors = [r.getMessage() for r in caplog.records if r.levelno == logging.ERROR]
    assert any("corrupt" in line and moved[0] in line for line in errors), errors


def test_a_wal_of_random_bytes_is_ignored_by_sqlite_and_nothing_is_lost(tmp_path: Path) -> None:
    path = tmp_path / "spool.db"
    fill(path, 50)
    Path(f"{path}-wal").write_bytes(os.urandom(40_000))
    spool = SQLiteSpool(path, min_free_bytes=0)
    try:
        assert spool.stats().count == 50
    finally:
        spool.close()
    assert not [p for p in tmp_path.iterdir() if CORRUPT.fullmatch(p.name)]


def test_a_spool_locked_by_another_gateway_is_not_corrupt(tmp_path: Path) -> None:
    path = tmp_path / "spool.db"
    first = SQLiteSpool(path, min_free_bytes=0)
    try:
        with pytest.raises(SpoolError, match="in use"):
            SQLiteSpool(path, min_free_bytes=0)
    finally:
        first.close()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["spool.db"]


def test_a_database_that_is_not_a_spool_is_refused_and_left_as_it_is(tmp_path: Path) -> None:
    """A `messages` table with other columns is someone else's data: refused by name, never moved aside or used."""
    path = tmp_path / "spool.db"
    with sqlite3.connect(path) as other:
        other.execute("CREATE TABLE messages (id INTEGER PRIMARY KEY, body TEXT)")
        other.execute("INSERT INTO messages (body) VALUES ('kept')")
    other.close()
    with pytest.raises(SpoolStorageError, match=r"is not a spool \(columns \['body', 'id'\]\)"):
        SQLiteSpool(path, min_free_bytes=0)
    assert sorted(p.name for p in tmp_path.iterdir() if not p.name.startswith("spool.db-")) == ["spool.db"]
    with sqlite3.connect(path) as again:
        assert again.execute("SELECT body FROM messages").fetchall() == [("kept",)]
    again.close()


def corrupt_under(spool: SQLiteSpool, rows: int = 15_000) -> int:
    """Fill an open spool beyond SQLite's page cache, then overwrite its pages after the first on disk."""
    for k in range(0, rows, 1000):
        spool.add([(Message(f"t/{i}", os.urandom(200)), i) for i in range(k, k + 1000)])
    spool.expire(time.time())  # a checkpoint: the pages are in the file, not only in the WAL
    spool._checkpoint()
    size = spool.path.stat().st_size
    with open(spool.path, "r+b") as f:
        f.seek(4096)
        f.write(os.urandom(size - 4096))
    return rows


def test_a_spool_that_turns_corrupt_while_running_is_rotated_once(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "spool.db"
    spool = SQLiteSpool(path, min_free_bytes=0, checkpoint_bytes=2**40)
    try:
        held = corrupt_under(spool)
        before = corrupt_counts()["spool"]
        assert spool.take(20_000) == []  # the read hit the garbage: rotated, and read again from the fresh file
        assert corrupt_counts()["spool"] == before + 1
        st = spool.stats()
        assert (st.count, st.dropped) == (0, held)  # what the old file held is lost and counted
        # The ids go on after the old ones (the outbox may still hold those).
        assert spool.add([(Message("t/after", b"x"), 1)]) == [held + 1]
        # The fresh file turns corrupt too: refused for now, not rotated again every call.
        corrupt_under(spool)
        with pytest.raises(SpoolCorrupt):
            spool.take(20_000)
        with pytest.raises(SpoolCorrupt):
            spool.take(20_000)
        assert corrupt_counts()["spool"] == before + 1
        assert len([p for p in tmp_path.iterdir() if CORRUPT.fullmatch(p.name)]) == 1
        # Once ROTATE_INTERVAL has passed, the next failure rotates again.
        monkeypatch.setattr(spool_module, "ROTATE_INTERVAL", 0.0)
        assert spool.take(20_000) == []
        assert corrupt_counts()["spool"] == before + 2
    finally:
        spool.close()


async def test_an_outbox_goes_on_with_the_fresh_spool(
    broker: EmbeddedBroker, port: int, subscriber: Subscriber, tmp_path: Path
) -> None:
    path = tmp_path / "spool.db"
    link = TcpRelay(port)
    sink = MqttSink("up", f"mqtt://127.0.0.1:{link.port}", "fg/rot", client_id=f"rot-{time.monotonic_ns()}")
    await sink.start()
    spool = SQLiteSpool(path, min_free_bytes=0, checkpoint_bytes=2**40)
    box = Outbox(sink, spool, commit_window=0.02)
    try:
        corrupt_under(spool)
        await box.start()
        await link.start()  # the replay takes from the damaged file: rotated, the backlog is gone
        await until(lambda: any(CORRUPT.fullmatch(p.name) for p in tmp_path.iterdir()), 10, "the rotation")
        await until(lambda: box.backlog == 0, 10, "an empty backlog")
        await asyncio.wait_for(box.put(Message("live", b"1"), awaited=True), 5)
        await subscriber.wait_for(lambda _: subscriber.on("fg/rot/live"), 5)
        await link.close()  # down again: spooled into the fresh file
        await until(lambda: not sink.connected, 10, "the sink to notice")
        await asyncio.wait_for(box.put(Message("later", b"2", ts=7), awaited=True), 5)
        assert box.health() is None
    finally:
        await box.stop()
        await sink.stop()
        await link.close()
    assert spool_rows(path) == [("later", 7)]


def test_move_aside_keeps_a_bounded_number_of_copies(tmp_path: Path) -> None:
    path = tmp_path / "homeassistant.json"
    clock = iter(range(1000, 2000, 10))
    for _ in range(KEEP + 2):
        path.write_text("x")
        move_aside(path, "homeassistant", "test", clock=lambda: next(clock))
    left = sorted(p.name for p in tmp_path.iterdir())
    assert len(left) == KEEP and left[-1] == f"homeassistant.json.corrupt-{1000 + 10 * (KEEP + 1)}"


def test_two_files_moved_aside_within_a_second_keep_both(tmp_path: Path) -> None:
    path = tmp_path / "users"
    for text in ("a", "b"):
        path.write_text(text)
        move_aside(path, "users", "test", clock=lambda: 1234.5)
    assert {p.name: p.read_text() for p in tmp_path.iterdir()} == {"users.corrupt-1234": "a", "users.corrupt-1235": "b"}


def test_a_rotation_that_cannot_open_a_fresh_file_refuses_until_the_interval_then_tries_again(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "spool.db"
    spool = SQLiteSpool(path, min_free_bytes=0, checkpoint_bytes=2**40)
    real_lock = spool_module.lock_file
    calls = {"n": 0}

    def failing_lock(p: Path, name: str) -> int:  # as root, a read-only folder cannot be made here
        calls["n"] += 1
        raise SpoolStorageError(f"{name}: cannot open {p}: [Errno 30] Read-only file system")

    try:
        corrupt_under(spool, 12_000)
        monkeypatch.setattr(spool_module, "lock_file", failing_lock)
        with pytest.raises(SpoolStorageError, match="no fresh spool"):
            spool.take(20_000)
        with pytest.raises(SpoolStorageError):  # refused at once, no new attempt within ROTATE_INTERVAL
            spool.add([(Message("t/x", b"x"), 1)])
        assert calls["n"] == 1 and spool.stats().count == 0
        monkeypatch.setattr(spool_module, "lock_file", real_lock)
        monkeypatch.setattr(spool_module, "ROTATE_INTERVAL", 0.0)
        assert spool.add([(Message("t/x", b"x"), 1)]) == [12_001]  # a fresh file at last, ids going on
    finally:
        spool.close()
    assert [topic for topic, _ in spool_rows(path)] == ["t/x"]


def test_a_row_of_garbage_types_is_dropped_by_take_not_handed_out_forever(tmp_path: Path) -> None:
    path = tmp_path / "spool.db"
    fill(path, 3)
    db = sqlite3.connect(path)  # a page of garbage that still parses as a row: text where bytes belong
    db.execute("INSERT INTO messages VALUES (4, 't/odd', 'not bytes', 0, NULL, 4, 0.0, 40)")
    db.execute("INSERT INTO messages VALUES (5, CAST(x'fffe' AS TEXT), x'00', 0, NULL, 5, 0.0, 40)")
    db.commit()
    db.close()
    spool = SQLiteSpool(path, min_free_bytes=0)
    try:
        taken = spool.take(10)
        # The one of text cannot be an entry: dropped and counted. The topic of bytes that are not UTF-8
        # comes out as a str paho refuses to publish (the outbox drops it after REPLAY_ATTEMPTS).
        assert [e.id for e in taken] == [1, 2, 3, 5]
        assert spool.stats().dropped == 1 and spool.stats().count == 4
        spool.reject([e.id for e in taken])
        assert [e.id for e in spool.take(10)] == [1, 2, 3, 5]
    finally:
        spool.close()


class _DiskFailsAfterCreate(sqlite3.Connection):
    """A connection whose next statement after creating `messages` fails, as on a disk that fills up just then."""

    armed = False

    def execute(self, sql: str, *args: object) -> sqlite3.Cursor:  # type: ignore[override]
        cls = type(self)
        if cls.armed and getattr(self, "_created", False):
            cls.armed = False
            raise sqlite3.OperationalError("disk I/O error")
        cursor = super().execute(sql, *args)  # type: ignore[arg-type]
        self._created = cls.armed and sql.lstrip().upper().startswith("CREATE TABLE MESSAGES")
        return cursor


def test_a_rotation_failing_between_the_table_and_its_seed_still_hands_out_no_id_twice(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "spool.db"
    spool = SQLiteSpool(path, min_free_bytes=0, checkpoint_bytes=2**40)
    real_connect = sqlite3.connect
    try:
        corrupt_under(spool, 12_000)
        in_flight = list(range(1, 11))  # taken by the outbox from the old file, accepted only later
        monkeypatch.setattr(sqlite3, "connect", lambda *a, **kw: real_connect(*a, factory=_DiskFailsAfterCreate, **kw))
        _DiskFailsAfterCreate.armed = True
        with pytest.raises(SpoolStorageError, match="no fresh spool"):
            spool.take(20_000)  # rotated; the fresh file got its table, then the disk failed
        assert not _DiskFailsAfterCreate.armed
        # Table and seed are one transaction: the failure left no table without its sequence behind.
        assert sqlite3.connect(path).execute("SELECT name FROM sqlite_master WHERE name = 'messages'").fetchall() == []
        monkeypatch.setattr(sqlite3, "connect", real_connect)
        monkeypatch.setattr(spool_module, "ROTATE_INTERVAL", 0.0)
        added = spool.add([(Message(f"t/new{i}", b"x"), i) for i in range(12)])
        assert added == list(range(12_001, 12_013))  # the ids go on after the old file's
        spool.accept(in_flight)  # the late accept hits nothing new
        assert spool.stats().count == 12
    finally:
        spool.close()
    assert len(spool_rows(path)) == 12


def test_connect_raises_a_stored_sequence_below_the_seed(tmp_path: Path) -> None:
    from bridge.spool_schema import Contents, connect

    path = tmp_path / "spool.db"
    db, held = connect(path, "s")  # a file with the table but no sequence, as a failed rotation could leave
    db.close()
    assert held.last_id == 0
    db, held = connect(path, "s", seed=Contents(0, 0, 500, 7))
    db.close()
    assert (held.last_id, held.dropped) == (500, 7)
    db, held = connect(path, "s", seed=Contents(0, 0, 100, 2))  # never lowered
    db.close()
    assert (held.last_id, held.dropped) == (500, 7)


N_SALVAGE = 2000


def fill_known(path: Path, n: int = N_SALVAGE) -> tuple[list[bytes], float]:
    """A closed spool of n messages (topic t/<id-1>, sampled_ms id-1); their payloads and the oldest queue time."""
    payloads = [os.urandom(200) for _ in range(n)]
    spool = SQLiteSpool(path, min_free_bytes=0)
    spool.add([(Message(f"t/{i}", payloads[i]), i) for i in range(n)])
    oldest = spool.stats().oldest_queued_at
    spool.close()
    assert oldest is not None
    return payloads, oldest


def damage_page(path: Path, where: str) -> None:
    """Overwrite one page of the file with random bytes: one in the middle, or the last (the newest rows)."""
    pages = path.stat().st_size // 4096
    page = pages // 2 if where == "middle" else pages - 1
    with open(path, "r+b") as f:
        f.seek(page * 4096)
        f.write(os.urandom(4096))


def check_salvaged(spool: SQLiteSpool, payloads: list[bytes], oldest: float, dropped_before: int = 0) -> None:
    """Every message the spool still holds is one it was given, in order, as it was; the rest counted as dropped."""
    entries = spool.take(len(payloads) + 10)
    ids = [e.id for e in entries]
    assert ids == sorted(ids) and len(set(ids)) == len(ids)
    for e in entries:
        assert (e.message.topic, e.message.payload, e.sampled_ms) == (f"t/{e.id - 1}", payloads[e.id - 1], e.id - 1)
    st = spool.stats()
    lost = len(payloads) - len(entries)
    # One page of 4 KiB holds at most ~16 of these rows; the rest of the backlog is all there.
    assert 0 < lost <= 40, lost
    assert (st.count, st.dropped) == (len(entries), dropped_before + lost)
    assert {e.queued_at for e in entries} == {oldest}  # queue times kept: max_age runs as before
    assert spool.add([(Message("t/after", b"x"), 1)]) == [len(payloads) + 1]  # no id handed out twice


@pytest.mark.parametrize("where", ["middle", "end"])
def test_one_bad_page_at_start_loses_only_its_rows(tmp_path: Path, where: str) -> None:
    path = tmp_path / "spool.db"
    payloads, oldest = fill_known(path)
    damage_page(path, where)
    spool = SQLiteSpool(path, min_free_bytes=0)
    try:
        check_salvaged(spool, payloads, oldest)
    finally:
        spool.close()
    assert len([p for p in tmp_path.iterdir() if CORRUPT.fullmatch(p.name)]) == 1
    assert corrupt_counts()["spool"] == 1


@pytest.mark.parametrize("where", ["middle", "end"])
def test_one_bad_page_while_running_loses_only_its_rows(tmp_path: Path, where: str) -> None:
    path = tmp_path / "spool.db"
    payloads, oldest = fill_known(path)
    spool = SQLiteSpool(path, min_free_bytes=0)
    try:
        # The page cache would hide the damage from the reads: keep it small, as under a backlog larger than it.
        spool._db.execute("PRAGMA cache_size=5")
        assert len(spool.take(10)) == 10  # in flight when the file turns bad: handed out again from the fresh one
        spool.expire(0)
        spool._db.execute("PRAGMA cache_size=5")
        damage_page(path, where)
        spool.reject(range(1, 11))
        check_salvaged(spool, payloads, oldest)
    finally:
        spool.close()
    assert len([p for p in tmp_path.iterdir() if CORRUPT.fullmatch(p.name)]) == 1
    assert corrupt_counts()["spool"] == 1


def test_a_salvage_whose_halving_budget_is_spent_still_copies_every_range_that_reads(tmp_path: Path) -> None:
    from bridge.spool_schema import connect, salvage

    damaged = tmp_path / "old.db"
    fill_known(damaged, 3000)
    damage_page(damaged, "middle")
    db, _ = connect(tmp_path / "spool.db", "s")
    try:
        got = salvage(db, damaged, budget=0.0, chunk=1000)  # a failing range is not halved: lost whole
        assert got.lost in (1000, 2000) and got.rows + got.lost == 3000 and got.last_id == 3000
        ids = [row[0] for row in db.execute("SELECT id FROM messages ORDER BY id")]
        assert len(ids) == got.rows and set(ids) <= set(range(1, 3001))
    finally:
        db.close()


def test_a_file_of_random_bytes_salvages_nothing_and_raises_nothing(tmp_path: Path) -> None:
    from bridge.spool_schema import Salvaged, connect, salvage

    damaged = tmp_path / "old.db"
    random_bytes(damaged)
    db, _ = connect(tmp_path / "spool.db", "s")
    try:
        assert salvage(db, damaged, last_id=40) == Salvaged(0, 0, 40, 0)
    finally:
        db.close()
