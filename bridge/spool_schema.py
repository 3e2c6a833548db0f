"""The spool's file: its tables, the lock that keeps it to one process, opening it and reading it cold.

One SQLite file per sink: `messages` (the FIFO, one row per entry, ids from AUTOINCREMENT) and
`meta` (the `dropped` counter). `bridge/spool.py` builds the buffer on top; `read_stats` reads a
file without opening it as a spool (for `fieldgate spool`).
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import sqlite3
from dataclasses import dataclass
from pathlib import Path

import sqlite_utils

from bridge.buffer import BufferStats, EntryRefused, StorageError
from bridge.buffer import Entry as Entry
from gateway.errors import SinkError
from gateway.types import Message

CREATE_MESSAGES = """CREATE TABLE messages (id INTEGER PRIMARY KEY AUTOINCREMENT, topic TEXT NOT NULL,
    payload BLOB NOT NULL, retain INTEGER NOT NULL, qos INTEGER, sampled_ms INTEGER NOT NULL,
    queued_at REAL NOT NULL, size INTEGER NOT NULL)"""
COLUMNS = ("id", "topic", "payload", "retain", "qos", "sampled_ms", "queued_at", "size")
SELECT = f"SELECT {', '.join(COLUMNS)} FROM messages"
INSERT = f"INSERT INTO messages ({', '.join(COLUMNS)}) VALUES ({', '.join('?' * len(COLUMNS))})"
CREATE_META = "CREATE TABLE IF NOT EXISTS [meta] ([key] TEXT PRIMARY KEY, [value] INTEGER)"
SET_DROPPED = (
    "INSERT INTO meta (key, value) VALUES ('dropped', ?) ON CONFLICT(key) DO UPDATE SET value = excluded.value"
)

#: One row of `messages`, in COLUMNS order.
Row = tuple[int, str, bytes, int, int | None, int, float, int]


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


def to_entry(row: Row) -> Entry:
    """The buffer entry one `messages` row holds."""
    entry_id, topic, payload, retain, qos, sampled_ms, queued_at, size = row
    return Entry(entry_id, Message(topic, bytes(payload), bool(retain), qos), sampled_ms, queued_at, size)


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
        schema = sqlite_utils.Database(db, recursive_triggers=False, execute_plugins=False)
        messages = schema.table("messages")
        new = not messages.exists()
        if not new and set(messages.columns_dict) != set(COLUMNS):
            raise SpoolStorageError(f"{name}: {path} is not a spool (columns {sorted(messages.columns_dict)})")
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


def read_stats(path: str | os.PathLike[str]) -> BufferStats:
    """What a spool file holds, read without opening it as a spool (for `fieldgate spool`)."""
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
        oldest = next(messages.rows_where(order_by="id", limit=1, select="queued_at"), {}).get("queued_at")
        dropped = next(meta.rows_where("key = 'dropped'"), {}).get("value", 0) if meta.exists() else 0
    except sqlite3.Error as exc:
        raise spool_error(f"cannot read spool {path}: {exc}", exc) from exc
    finally:
        db.close()
    return BufferStats(count, held, oldest, dropped)
