"""The spool's file: its tables, the lock that keeps it to one process, opening it and reading it cold.

One SQLite file per sink: `messages` (the FIFO, one row per entry, ids from AUTOINCREMENT) and
`meta` (the `dropped` counter). Two more date the rows on the monotonic clock, which no step of the wall clock
moves: `segments` (`bridge/spool_dates.py`: runs of ids queued in one boot with one wall - monotonic offset); and
`anchors`, the anchor (gateway.types.ProcessClock) of each message whose ts was taken while the clock was known
not synchronised, deleted with its message by a trigger. Being tables of their own, not columns, a file of the
schema before them opens as it is (its rows, in no segment, age by the wall clock and carry no anchor), and a
file of this schema still opens in a gateway of the one before. `bridge/spool.py` builds the buffer on top;
`read_stats` reads a file without opening it as a spool (for `fieldgate spool`); `salvage` carries the rows a
damaged file can still give into a fresh one.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import sqlite3
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from bridge.buffer import BufferStats, EntryRefused, StorageError
from bridge.buffer import Entry as Entry
from bridge.spool_dates import CREATE_SEGMENTS, Segment, copy_segments, oldest_dated, upgrade_segments, wall_dated
from gateway.errors import SinkError
from gateway.types import Message

CREATE_MESSAGES = """CREATE TABLE messages (id INTEGER PRIMARY KEY AUTOINCREMENT, topic TEXT NOT NULL,
    payload BLOB NOT NULL, retain INTEGER NOT NULL, qos INTEGER, sampled_ms INTEGER NOT NULL,
    queued_at REAL NOT NULL, size INTEGER NOT NULL)"""
COLUMNS = ("id", "topic", "payload", "retain", "qos", "sampled_ms", "queued_at", "size")
CREATE_ANCHORS = "CREATE TABLE IF NOT EXISTS anchors (id INTEGER PRIMARY KEY, anchor_ms INTEGER NOT NULL)"
CREATE_ANCHORS_TRIGGER = """CREATE TRIGGER IF NOT EXISTS anchors_follow AFTER DELETE ON messages
    BEGIN DELETE FROM anchors WHERE id = OLD.id; END"""
#: A message row and its anchor (NULL: none); `id` names the one column both tables share.
SELECT = f"SELECT {', '.join(COLUMNS)}, anchor_ms FROM messages LEFT JOIN anchors USING (id)"
INSERT = f"INSERT INTO messages ({', '.join(COLUMNS)}) VALUES ({', '.join('?' * len(COLUMNS))})"
INSERT_ANCHOR = "INSERT OR REPLACE INTO anchors (id, anchor_ms) VALUES (?, ?)"
CREATE_META = "CREATE TABLE IF NOT EXISTS [meta] ([key] TEXT PRIMARY KEY, [value] INTEGER)"
SET_DROPPED = (
    "INSERT INTO meta (key, value) VALUES ('dropped', ?) ON CONFLICT(key) DO UPDATE SET value = excluded.value"
)

#: One row of `messages` with its anchor, as SELECT reads it.
Row = tuple[int, str, bytes, int, int | None, int, float, int, int | None]


class SpoolError(SinkError):
    """The spool could not do what was asked: the base of everything it raises."""


class SpoolStorageError(SpoolError, StorageError):
    """The spool's file cannot be read or written (disk full, I/O error, not a spool, in use)."""


class SpoolCorrupt(SpoolStorageError):
    """The spool's file is not a database SQLite can read (random bytes, truncated, garbage pages)."""


class SpoolEntryError(SpoolError, EntryRefused):
    """The file is fine but these rows cannot be stored (a number beyond SQLite's int64, an unencodable topic)."""


# Primary result codes (https://sqlite.org/rescode.html): the file is damaged, or no database at all.
SQLITE_CORRUPT = 11
SQLITE_NOTADB = 26


def spool_error(message: str, exc: BaseException) -> SpoolError:
    """The SpoolError for a failure of SQLite or of binding a row: corrupt file, storage, or the rows."""
    code = getattr(exc, "sqlite_errorcode", None)
    if isinstance(exc, sqlite3.DatabaseError) and code is not None and code & 0xFF in (SQLITE_CORRUPT, SQLITE_NOTADB):
        return SpoolCorrupt(message)
    if isinstance(exc, (sqlite3.OperationalError, OSError)) or type(exc) is sqlite3.DatabaseError:
        return SpoolStorageError(message)
    # OverflowError, ValueError, TypeError, and SQLite's errors about what was bound (Integrity, Data,
    # Interface, Programming): the rows, not the file.
    return SpoolEntryError(message)


def _text(raw: bytes) -> str:
    return raw.decode("utf-8", "surrogateescape")


def to_entry(row: Row, segment: Segment | None, boot: int) -> Entry:
    """The buffer entry one `messages` row (of `segment`, None: in none) holds; its message's anchor only if the
    row is of this `boot` (another boot's monotonic clock is not this one's)."""
    entry_id, topic, payload, retain, qos, sampled_ms, queued_at, size, anchor = row
    row_boot, mono = (segment[1], queued_at - segment[2]) if segment is not None else (None, None)
    anchor = anchor if row_boot == boot and isinstance(anchor, int) else None
    message = Message(topic, bytes(payload), bool(retain), qos, anchor=anchor)
    return Entry(entry_id, message, sampled_ms, wall_dated(queued_at, segment, boot), size, row_boot, mono)


@dataclass(frozen=True, slots=True)
class Contents:
    """What an opened spool file holds: the counters the spool keeps in memory from then on."""

    count: int
    bytes: int
    last_id: int  # the highest id ever handed out (AUTOINCREMENT's sequence), 0 for a new file
    dropped: int


def lock_file(path: Path, name: str) -> int:
    """Create the file if need be and take an exclusive flock on it; the descriptor that holds the lock."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    except OSError as exc:
        raise SpoolStorageError(f"{name}: cannot open {path}: {exc}") from exc
    try:
        # flock, independent of SQLite's POSIX locks: a second gateway on the same state dir
        # would hand out the same ids twice.
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as exc:
        os.close(fd)
        raise SpoolStorageError(f"{name}: {path} is in use by another spool") from exc
    return fd


def connect(path: Path, name: str, *, seed: Contents | None = None) -> tuple[sqlite3.Connection, Contents]:
    """Open the file in WAL mode, create or check the tables, and read what it holds.

    Autocommit: the spool runs its own transactions. SpoolCorrupt if SQLite cannot read the file (or it
    holds what no spool writes), another SpoolError if it cannot open it; nothing is left open then.
    With a `seed` (a file made in place of a corrupt one), the ids go on after `seed.last_id` and the drop
    counter starts at `seed.dropped`, whether the file is new or was left by an earlier attempt: a stored
    sequence or counter below the seed's is raised to it.
    """
    try:
        db = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
    except sqlite3.Error as exc:
        raise spool_error(f"{name}: cannot open {path}: {exc}", exc) from exc
    try:
        mode = db.execute("PRAGMA journal_mode=WAL").fetchone()[0]
        if mode != "wal":
            raise SpoolStorageError(f"{name}: {path}: WAL journal not available (got {mode})")
        db.execute("PRAGMA wal_autocheckpoint=0")  # the spool checkpoints itself, to count it
        # A topic of bytes that are not UTF-8 (garbage in a page) reads as a str that paho refuses to publish,
        # which the outbox drops, instead of a row whose every read fails and holds up the backlog for good.
        db.text_factory = _text
        # SQLite's own table_info, not sqlite-utils: opening a spool is all the gateway process asks of the
        # schema, and sqlite-utils (with click, dateutil, pluggy) would cost it 4.5 MiB of resident memory.
        columns = [row[1] for row in db.execute("PRAGMA table_info(messages)")]
        new = not columns
        if not new and set(columns) != set(COLUMNS):
            raise SpoolStorageError(f"{name}: {path} is not a spool (columns {sorted(columns)})")
        # The tables and the seed in one transaction: a file left with a table but without its seed (a full
        # disk between the two) would start its ids again at 1, and a late accept of ids the outbox took
        # from the old file would then delete new rows with the same ids.
        db.execute("BEGIN IMMEDIATE")
        try:
            if new:
                # sqlite-utils cannot declare AUTOINCREMENT, which keeps ids growing after the table
                # was emptied (no id is handed out twice, so a stale accept never hits a new row).
                db.execute(CREATE_MESSAGES)
            db.execute(CREATE_META)
            # A file of the older schema gets them too: its rows are in no segment and have no anchors.
            db.execute(CREATE_ANCHORS)
            db.execute(CREATE_ANCHORS_TRIGGER)
            db.execute(CREATE_SEGMENTS)
            upgrade_segments(db)
            if seed is not None:
                raise_counters(db, seed.last_id, seed.dropped)
            db.execute("COMMIT")
        except BaseException:
            with contextlib.suppress(sqlite3.Error):
                db.execute("ROLLBACK")
            raise
        contents = read_contents(db)
    except BaseException as exc:
        db.close()
        if isinstance(exc, sqlite3.Error):
            raise spool_error(f"{name}: cannot open {path}: {exc}", exc) from exc
        if isinstance(exc, (ValueError, TypeError, OverflowError)):
            # A counter that is no number: garbage that still parses as pages.
            raise SpoolCorrupt(f"{name}: cannot open {path}: {exc}") from exc
        raise
    return db, contents


def raise_counters(db: sqlite3.Connection, last_id: int, dropped: int) -> None:
    """Raise the id sequence to `last_id` and the drop counter to `dropped` where they are below; in a transaction."""
    row = db.execute("SELECT seq FROM sqlite_sequence WHERE name = 'messages'").fetchone()
    if row is None:
        if last_id:
            db.execute("INSERT INTO sqlite_sequence (name, seq) VALUES ('messages', ?)", (last_id,))
    elif int(row[0]) < last_id:
        db.execute("UPDATE sqlite_sequence SET seq = ? WHERE name = 'messages'", (last_id,))
    row = db.execute("SELECT value FROM meta WHERE key = 'dropped'").fetchone()
    if (int(row[0]) if row else 0) < dropped:
        db.execute(SET_DROPPED, (dropped,))


def read_contents(db: sqlite3.Connection) -> Contents:
    """The counters an open spool file holds (COUNT(*) reads every leaf page)."""
    count, held = db.execute("SELECT COUNT(*), COALESCE(SUM(size), 0) FROM messages").fetchone()
    seq = db.execute("SELECT seq FROM sqlite_sequence WHERE name = 'messages'").fetchone()
    dropped = db.execute("SELECT value FROM meta WHERE key = 'dropped'").fetchone()
    return Contents(int(count), int(held), int(seq[0]) if seq else 0, int(dropped[0]) if dropped else 0)


#: Seconds a salvage may spend on ranges of a damaged file that fail (the gateway waits: at start, or in a call).
SALVAGE_SECONDS = 3.0
#: Ids per range read from a damaged file (and rows per committed batch into the fresh one, at most).
SALVAGE_CHUNK = 1000
_SALVAGE_CHECKPOINT = 50_000  # rows carried over between checkpoints of the fresh file's WAL
# Result codes that mean the fresh file cannot take more (https://sqlite.org/rescode.html).
_SQLITE_FULL = 13


@dataclass(frozen=True, slots=True)
class Salvaged:
    """What a salvage carried from a damaged file into a fresh one."""

    rows: int  # rows copied, ids and times as they were
    lost: int  # ids in the ranges that could not be read: an estimate of the rows lost
    last_id: int  # the highest id the damaged file is known to have handed out
    dropped: int  # the damaged file's own drop counter, 0 if it cannot be read
    dated: bool = True  # False: the file has segments that could not be read (the rows carried over are in none)


def salvage(
    db: sqlite3.Connection,
    source: Path,
    *,
    last_id: int = 0,
    chunk: int = SALVAGE_CHUNK,
    budget: float = SALVAGE_SECONDS,
    clock: Callable[[], float] = time.monotonic,
) -> Salvaged:
    """Copy every row of the damaged spool file `source` that SQLite can still read into the open spool `db`.

    Read by id ranges in rowid order: a range that raises is halved until what reads is copied and what
    does not is down to single ids, so one bad page costs only the rows on it. Halving gets `budget`
    seconds in all (a bad interior page can fail every range); once they are spent a failing range is
    counted lost whole, while ranges that read are still copied. Each range is its own committed
    transaction (memory stays bounded; synchronous=NORMAL, the caller's checkpoint makes it durable).
    Ids, queued_at and sampled_ms are kept: FIFO order and max_age are as before. `last_id`: the highest
    id known from elsewhere (the spool's memory), in case the file's own sequence and last page cannot
    be read. Never raises: a file that is no database salvages nothing.
    """
    try:
        db.execute("ATTACH DATABASE ? AS damaged", (str(source),))
    except sqlite3.Error:
        return Salvaged(0, 0, last_id, 0)
    try:
        return _salvage(db, last_id, chunk, budget, clock)
    finally:
        if db.in_transaction:
            with contextlib.suppress(sqlite3.Error):
                db.execute("ROLLBACK")
        with contextlib.suppress(sqlite3.Error):
            db.execute("DETACH DATABASE damaged")


def _one(db: sqlite3.Connection, sql: str) -> int | None:
    """The single integer `sql` reads, None if it cannot be read (or is no integer)."""
    try:
        row = db.execute(sql).fetchone()
    except sqlite3.Error:
        return None
    return row[0] if row and type(row[0]) is int else None


def _salvage(db: sqlite3.Connection, known: int, chunk: int, budget: float, clock: Callable[[], float]) -> Salvaged:
    if _one(db, "SELECT COUNT(*) FROM damaged.sqlite_master WHERE type = 'table' AND name = 'messages'") != 1:
        return Salvaged(0, 0, known, 0)  # no schema to read rows by: nothing to carry over
    # Each of these reads only the pages on one path of the b-tree, so they may work where COUNT(*) fails.
    first = _one(db, "SELECT MIN(id) FROM damaged.messages") or 1
    top = max(
        known,
        _one(db, "SELECT MAX(id) FROM damaged.messages") or 0,
        _one(db, "SELECT seq FROM damaged.sqlite_sequence WHERE name = 'messages'") or 0,
    )
    dropped = max(0, _one(db, "SELECT value FROM damaged.meta WHERE key = 'dropped'") or 0)
    copy = f"INSERT OR IGNORE INTO main.messages SELECT {', '.join(COLUMNS)} FROM damaged.messages"
    copy += " WHERE id BETWEEN ? AND ? ORDER BY id"
    # Dates come along where they read: a row without them ages by the wall clock, which beats losing it.
    copy_anchors = "INSERT OR IGNORE INTO main.anchors SELECT id, anchor_ms FROM damaged.anchors"
    copy_anchors += " WHERE id BETWEEN ? AND ? AND id IN (SELECT id FROM main.messages WHERE id BETWEEN ? AND ?)"
    dated = True
    try:
        copy_segments(db)
    except sqlite3.Error:  # a file of the older schema has none; a damaged table is told to the caller
        dated = _one(db, "SELECT COUNT(*) FROM damaged.sqlite_master WHERE name = 'segments'") == 0
    with contextlib.suppress(sqlite3.Error):
        db.execute("PRAGMA main.synchronous=NORMAL")
    rows = lost = 0
    spare = budget  # seconds left for ranges that fail: healthy ranges are always copied
    start = first
    while start <= top:
        todo = [(start, min(start + chunk - 1, top), False)]
        start = todo[0][1] + 1
        while todo:
            lo, hi, split = todo.pop()
            began = clock()
            try:
                db.execute("BEGIN IMMEDIATE")
                copied = db.execute(copy, (lo, hi)).rowcount
                with contextlib.suppress(sqlite3.Error):  # a failed statement is undone alone
                    db.execute(copy_anchors, (lo, hi, lo, hi))
                db.execute("COMMIT")
            except sqlite3.Error as exc:
                with contextlib.suppress(sqlite3.Error):
                    db.execute("ROLLBACK")
                spare -= clock() - began
                if getattr(exc, "sqlite_errorcode", 0) & 0xFF == _SQLITE_FULL:
                    # The fresh file cannot take the rest: what is copied stays, the rest is lost.
                    rest = sum(b - a + 1 for a, b, _ in todo) + max(0, top - start + 1)
                    return Salvaged(rows, lost + hi - lo + 1 + rest, top, dropped, dated)
            else:
                rows += copied
                if split:
                    spare -= clock() - began
                if rows // _SALVAGE_CHECKPOINT != (rows - copied) // _SALVAGE_CHECKPOINT:
                    # A large backlog must not sit on the card in the damaged copy, the fresh WAL and the fresh file.
                    with contextlib.suppress(sqlite3.Error):
                        db.execute("PRAGMA main.wal_checkpoint(TRUNCATE)")
                continue
            if lo == hi or spare <= 0:
                lost += hi - lo + 1  # the ids this range could have held
            else:
                mid = (lo + hi) // 2
                todo += [(mid + 1, hi, True), (lo, mid, True)]  # the lower half first: ids stay in order
    return Salvaged(rows, lost, top, dropped, dated)


def read_stats(path: str | os.PathLike[str]) -> BufferStats:
    """What a spool file holds, read without opening it as a spool (for `fieldgate spool`)."""
    import sqlite_utils  # only the `fieldgate spool` command reads a spool this way: not in the gateway process

    if not Path(path).is_file():
        raise SpoolError(f"no spool at {path}")
    try:
        db = sqlite_utils.Database(Path(path), recursive_triggers=False, execute_plugins=False)
    except sqlite3.Error as exc:
        raise spool_error(f"cannot read spool {path}: {exc}", exc) from exc
    try:
        messages, meta = db.table("messages"), db.table("meta")
        if not messages.exists():
            return BufferStats(0, 0, None, 0)
        count, held = db.execute("SELECT COUNT(*), COALESCE(SUM(size), 0) FROM messages").fetchone()
        first = next(messages.rows_where(order_by="id", limit=1, select="id, queued_at"), None)
        oldest = None if first is None else oldest_dated(db.conn, first["id"], first["queued_at"])
        dropped = next(meta.rows_where("key = 'dropped'"), {}).get("value", 0) if meta.exists() else 0
    except sqlite3.Error as exc:
        raise spool_error(f"cannot read spool {path}: {exc}", exc) from exc
    finally:
        db.close()
    return BufferStats(count, held, oldest, dropped)
