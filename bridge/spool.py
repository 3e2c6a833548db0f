"""SQLiteSpool: one sink's durable store-and-forward FIFO, a single SQLite file under the state dir.

Durability (what "add() returned" means):
- WAL journal with `synchronous=FULL` for adds: SQLite fsyncs the WAL at every commit, so a
  committed batch survives kill -9 *and* a power cut. `NORMAL` would survive kill -9 but may lose
  the last commits on a power cut, which would make MCP ACKs lie. The cost is one fsync per add()
  call, so callers group messages (a short time window per add) to keep fsyncs low; see
  hil/bench/spool_bench.py for the figures.
- A transaction is all or nothing: a commit torn by a crash or a power cut is simply absent
  (WAL frames carry checksums and a commit marker), so a reopened spool holds a prefix of the adds.
- Removals (accept, expire) commit with `synchronous=NORMAL`: losing one on a power cut only brings
  delivered messages back as duplicates (at-least-once still holds), and syncing every accept
  would cost an fsync per replayed batch. At most every `accept_sync_interval` seconds a removal
  commits with FULL (or `expire()` syncs through a checkpoint), which bounds those duplicates.
  kill -9 loses no removal: a NORMAL commit is in the OS page cache when it returns.
- Taken (in-flight) state lives in memory only: after a restart everything stored is takeable
  again, so the batch in flight at a crash is sent once more.

Write accounting (`BufferStats.commits/fsyncs/bytes_written`, since open; hil/bench/spool_bench.py
checks the fsync count against strace): every FULL commit is one fdatasync of the WAL; the first
commit into an empty WAL adds one (its header); a connection's first sync of the WAL also syncs
the directory; every checkpoint of a non-empty WAL adds two (WAL, then the database). Bytes are
the WAL's growth (checkpoints truncate it, so growth = frames appended) plus, per checkpoint, the
distinct pages it copies back into the database (read from the WAL's frame headers). Filesystem
metadata, partial-page rewrites in the page cache and the flash translation layer come on top.
"""

from __future__ import annotations

import contextlib
import fcntl
import heapq
import logging
import os
import sqlite3
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any, TypeVar

import sqlite_utils

from bridge.buffer import (
    DEFAULT_MAX_AGE,
    DEFAULT_MAX_SIZE,
    BufferStats,
    Clock,
    Entry,
    Limits,
    WhenFull,
    entry_size,
    plan_room,
)
from gateway.errors import SinkError
from gateway.types import Message

log = logging.getLogger(__name__)

T = TypeVar("T")

#: Default free-disk floor on the spool's filesystem: below it the spool stops growing.
DEFAULT_MIN_FREE = 64 * 1024**2
#: WAL size that triggers a checkpoint (SQLite's own default is 1,000 pages, about this).
DEFAULT_CHECKPOINT_BYTES = 4 * 1024**2
_WAL_HEADER = 32
_FRAME_HEADER = 24
_CHUNK = 500  # ids per IN (...) list, well below SQLite's variable limit

_CREATE_MESSAGES = """CREATE TABLE messages (id INTEGER PRIMARY KEY AUTOINCREMENT, topic TEXT NOT NULL,
    payload BLOB NOT NULL, retain INTEGER NOT NULL, qos INTEGER, sampled_ms INTEGER NOT NULL,
    queued_at REAL NOT NULL, size INTEGER NOT NULL)"""
_COLUMNS = ("id", "topic", "payload", "retain", "qos", "sampled_ms", "queued_at", "size")
_SELECT = f"SELECT {', '.join(_COLUMNS)} FROM messages"
_INSERT = f"INSERT INTO messages ({', '.join(_COLUMNS)}) VALUES ({', '.join('?' * len(_COLUMNS))})"
_SET_DROPPED = (
    "INSERT INTO meta (key, value) VALUES ('dropped', ?) ON CONFLICT(key) DO UPDATE SET value = excluded.value"
)

Row = tuple[int, str, bytes, int, int | None, int, float, int]


class SpoolError(SinkError):
    """The spool's file cannot be read or written (disk full, I/O error, not a spool, in use)."""


def _entry(row: Row) -> Entry:
    entry_id, topic, payload, retain, qos, sampled_ms, queued_at, size = row
    return Entry(entry_id, Message(topic, bytes(payload), bool(retain), qos), sampled_ms, queued_at, size)


def _chunks(ids: list[int]) -> Iterator[list[int]]:
    for i in range(0, len(ids), _CHUNK):
        yield ids[i : i + _CHUNK]


class SQLiteSpool:
    """A Buffer in one SQLite file: durable adds, FIFO by id, limits in bytes, age and free disk."""

    def __init__(
        self,
        path: str | os.PathLike[str],
        *,
        max_size: int = DEFAULT_MAX_SIZE,
        max_age: float = DEFAULT_MAX_AGE,
        when_full: WhenFull = "drop_oldest",
        min_free_bytes: int = DEFAULT_MIN_FREE,
        checkpoint_bytes: int = DEFAULT_CHECKPOINT_BYTES,
        accept_sync_interval: float = 1.0,
        clock: Clock = time.time,
        name: str | None = None,
    ) -> None:
        self.limits = Limits(max_size, max_age, when_full)
        self.path = Path(path)
        self.name = name or f"spool {self.path.name}"
        self.min_free_bytes = min_free_bytes
        self.checkpoint_bytes = checkpoint_bytes
        self.accept_sync_interval = accept_sync_interval
        self._clock = clock
        self._wal = Path(f"{self.path}-wal")
        self._lock = threading.RLock()  # one call at a time: the sink may call from worker threads
        self._in_flight: set[int] = set()
        self._returned: list[int] = []  # heap of rejected ids, takeable again before fresh ones
        self._cursor = 0  # every stored id <= cursor is in flight or in _returned
        self._oldest_at: float | None = None
        self._oldest_known = False
        self._commits = self._fsyncs = self._bytes_written = self._wal_size = 0
        self._synchronous = ""
        self._last_sync = time.monotonic()
        self._unsynced = False  # a NORMAL commit since the last fsync of the WAL
        self._closed = False
        self._lock_fd = self._take_file_lock()
        try:
            self._db = self._open()
        except BaseException:
            os.close(self._lock_fd)
            raise

    def _take_file_lock(self) -> int:
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as exc:
            raise SpoolError(f"{self.name}: cannot open {self.path}: {exc}") from exc
        try:
            # flock, independent of SQLite's POSIX locks: a second gateway on the same state dir
            # would hand out the same ids twice.
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            os.close(fd)
            raise SpoolError(f"{self.name}: {self.path} is in use by another spool") from exc
        return fd

    def _open(self) -> sqlite3.Connection:
        wal_before = self._stat_wal()
        try:
            db = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False)
        except sqlite3.Error as exc:
            raise SpoolError(f"{self.name}: cannot open {self.path}: {exc}") from exc
        try:
            mode = db.execute("PRAGMA journal_mode=WAL").fetchone()[0]
            if mode != "wal":
                raise SpoolError(f"{self.name}: {self.path}: WAL journal not available (got {mode})")
            db.execute("PRAGMA wal_autocheckpoint=0")  # we checkpoint ourselves, to count it
            schema = sqlite_utils.Database(db, recursive_triggers=False, execute_plugins=False)
            messages = schema.table("messages")
            if not messages.exists():
                # sqlite-utils cannot declare AUTOINCREMENT, which keeps ids growing after the table
                # was emptied (no id is handed out twice, so a stale accept never hits a new row).
                schema.execute(_CREATE_MESSAGES)
            elif set(messages.columns_dict) != set(_COLUMNS):
                raise SpoolError(f"{self.name}: {self.path} is not a spool (columns {sorted(messages.columns_dict)})")
            schema.table("meta").create({"key": str, "value": int}, pk="key", if_not_exists=True)
            count, held = db.execute("SELECT COUNT(*), COALESCE(SUM(size), 0) FROM messages").fetchone()
            seq = db.execute("SELECT seq FROM sqlite_sequence WHERE name = 'messages'").fetchone()
            dropped = db.execute("SELECT value FROM meta WHERE key = 'dropped'").fetchone()
        except BaseException as exc:
            db.close()
            if isinstance(exc, sqlite3.Error):
                raise SpoolError(f"{self.name}: cannot open {self.path}: {exc}") from exc
            raise
        self._db = db
        self._count, self._bytes = int(count), int(held)
        self._last_id = int(seq[0]) if seq else 0
        self._dropped = int(dropped[0]) if dropped else 0
        self._page_size = int(db.execute("PRAGMA page_size").fetchone()[0])
        self._wal_size = self._stat_wal()
        # A connection fsyncs the directory along with its first sync of the WAL; creating the
        # schema of a new file did that already (uncounted: before the counters start).
        self._dir_sync_pending = self._wal_size == wal_before
        self._checkpoint()  # fold a WAL left by a crash into the file
        return db

    def add(self, items: Sequence[tuple[Message, int]]) -> list[int]:
        """Store (message, sampled_ms) pairs in one committed transaction, all or none."""
        with self._lock:
            self._check_open()
            now = self._clock()
            self._expire(now)
            if not items:
                return []
            sizes = [entry_size(message) for message, _ in items]
            room, why = None, ""
            free = self._free_bytes()
            if free < self.min_free_bytes:
                room, why = self._bytes, f"; free disk {free} bytes is below the floor of {self.min_free_bytes}"
            oldest = ((entry_id, size) for entry_id, size, _ in self._scan())
            plan = plan_room(self.name, self.limits, sizes, self._bytes, oldest, room=room, why=why)
            first = self._last_id + 1
            rows = [
                (first + i, message.topic, message.payload, int(message.retain), message.qos, sampled_ms, now, size)
                for i, ((message, sampled_ms), size) in enumerate(zip(items, sizes, strict=True))
            ]

            def write(db: sqlite3.Connection) -> None:
                if plan.count:
                    db.execute("DELETE FROM messages WHERE id <= ?", (plan.last_id,))
                    db.execute(_SET_DROPPED, (self._dropped + plan.count,))
                db.executemany(_INSERT, rows)

            self._write(write, durable=True)
            # The transaction is committed: only now does the in-memory view follow it.
            self._last_id += len(rows)
            self._count += len(rows) - plan.count
            self._bytes += sum(sizes) - plan.size
            self._dropped += plan.count
            if plan.count:
                self._forget_through(plan.last_id)
            elif self._count == len(rows):
                self._oldest_at, self._oldest_known = now, True
            self._after_commit()
            return [row[0] for row in rows]

    def take(self, n: int) -> list[Entry]:
        """Up to n of the oldest entries not in flight."""
        with self._lock:
            self._check_open()
            if n <= 0:
                return []
            # Returned ids are all <= the cursor and fresh ones above it, so the returned go first.
            back: list[Row] = []
            while len(back) < n and self._returned:
                # Popped ids whose rows are gone (accepted while returned) simply do not come back.
                ids = [heapq.heappop(self._returned) for _ in range(min(n - len(back), len(self._returned)))]
                for chunk in _chunks(ids):
                    back += self._read(f"{_SELECT} WHERE id IN ({', '.join('?' * len(chunk))})", chunk)
            back.sort()
            fresh = self._read(f"{_SELECT} WHERE id > ? ORDER BY id LIMIT ?", (self._cursor, n - len(back)))
            if fresh:
                self._cursor = fresh[-1][0]
            chosen = back + fresh
            chosen_ids = {row[0] for row in chosen}
            self._in_flight |= chosen_ids
            return [_entry(row) for row in chosen]

    def accept(self, ids: Iterable[int]) -> None:
        """Remove delivered entries; unknown or already dropped ids are ignored."""
        with self._lock:
            self._check_open()
            wanted = sorted(set(ids))
            if not wanted:
                return
            durable = time.monotonic() - self._last_sync >= self.accept_sync_interval

            def write(db: sqlite3.Connection) -> list[tuple[int, int]]:
                gone: list[tuple[int, int]] = []
                for chunk in _chunks(wanted):
                    marks = ", ".join("?" * len(chunk))
                    gone += db.execute(f"DELETE FROM messages WHERE id IN ({marks}) RETURNING id, size", chunk)
                return gone

            gone = self._write(write, durable=durable)
            self._count -= len(gone)
            self._bytes -= sum(size for _, size in gone)
            self._in_flight.difference_update(wanted)
            self._oldest_known = False
            self._after_commit()

    def reject(self, ids: Iterable[int]) -> None:
        """Make in-flight entries takeable again; other ids are ignored."""
        with self._lock:
            self._check_open()
            for entry_id in ids:
                if entry_id in self._in_flight:
                    self._in_flight.remove(entry_id)
                    heapq.heappush(self._returned, entry_id)

    def expire(self, now: float) -> int:
        """Drop entries queued before now - max_age, from the oldest on; also syncs late removals."""
        with self._lock:
            self._check_open()
            count = self._expire(now)
            if self._unsynced and time.monotonic() - self._last_sync >= self.accept_sync_interval:
                self._checkpoint()  # fsyncs the WAL, so recent NORMAL removals are durable too
            return count

    def stats(self) -> BufferStats:
        """Counts, bytes, the oldest entry's queue time, drops, and the write cost since open."""
        with self._lock:
            oldest = None if self._closed else self._oldest_queued_at()
            written = (self._commits, self._fsyncs, self._bytes_written)
            return BufferStats(self._count, self._bytes, oldest, self._dropped, len(self._in_flight), *written)

    def close(self) -> None:
        """Checkpoint (leaving one file behind), close the database and release the file lock."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            try:
                self._checkpoint()
            finally:
                self._db.close()
                os.close(self._lock_fd)

    def _expire(self, now: float) -> int:
        cutoff = now - self.limits.max_age
        oldest = self._oldest_queued_at()
        if oldest is None or oldest >= cutoff:
            return 0
        # FIFO prefix, as MemoryBuffer: stop at the first entry young enough.
        count = size = last = 0
        for entry_id, entry_size_, queued_at in self._scan():
            if queued_at >= cutoff:
                break
            count, size, last = count + 1, size + entry_size_, entry_id

        def write(db: sqlite3.Connection) -> None:
            db.execute("DELETE FROM messages WHERE id <= ?", (last,))
            db.execute(_SET_DROPPED, (self._dropped + count,))

        self._write(write, durable=False)
        self._count -= count
        self._bytes -= size
        self._dropped += count
        self._forget_through(last)
        self._after_commit()
        return count

    def _write(self, work: Callable[[sqlite3.Connection], T], *, durable: bool) -> T:
        """Run `work` in one write transaction; SpoolError, and nothing changed, if it fails."""
        level = "FULL" if durable else "NORMAL"
        try:
            if self._synchronous != level:
                self._db.execute(f"PRAGMA synchronous={level}")
                self._synchronous = level
            self._db.execute("BEGIN IMMEDIATE")
            try:
                result = work(self._db)
                self._db.execute("COMMIT")
            except BaseException:
                with contextlib.suppress(sqlite3.Error):
                    self._db.execute("ROLLBACK")  # SQLite may have rolled back already (SQLITE_FULL)
                raise
        except (sqlite3.Error, OSError) as exc:
            raise SpoolError(f"{self.name}: cannot write {self.path}: {exc}") from exc
        self._commits += 1
        wal = self._stat_wal()
        # SQLite syncs the header of a WAL it (re)starts before its first frames, in any mode.
        self._count_syncs((self._wal_size == 0 and wal > 0) + durable)
        if durable:
            self._last_sync = time.monotonic()
            self._unsynced = False
        else:
            self._unsynced = True
        self._bytes_written += max(0, wal - self._wal_size)
        self._wal_size = wal
        return result

    def _after_commit(self) -> None:
        if self._wal_size >= self.checkpoint_bytes:
            self._checkpoint()

    def _checkpoint(self) -> None:
        if self._wal_size <= 0:
            return
        pages = self._wal_pages()
        try:
            self._db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
        except sqlite3.Error as exc:
            # What is committed stays committed in the WAL; the next checkpoint tries again.
            log.warning("%s: checkpoint failed: %s", self.name, exc)
            return
        self._count_syncs(2)
        self._bytes_written += pages * self._page_size
        self._last_sync = time.monotonic()
        self._unsynced = False
        self._wal_size = self._stat_wal()

    def _wal_pages(self) -> int:
        """Distinct database pages in the WAL: what a checkpoint copies into the file."""
        step = self._page_size + _FRAME_HEADER
        try:
            wal = self._wal.read_bytes()  # just written, so read from the page cache
        except OSError:
            return max(0, self._wal_size - _WAL_HEADER) // step  # every frame: an upper bound
        # Each frame header starts with its page number; the WAL only holds frames since the last
        # (truncating) checkpoint.
        return len({wal[i : i + 4] for i in range(_WAL_HEADER, len(wal) - step + 1, step)})

    def _count_syncs(self, n: int) -> None:
        if n:
            self._fsyncs += n + self._dir_sync_pending
            self._dir_sync_pending = False

    def _forget_through(self, last_id: int) -> None:
        """Entries up to last_id were dropped: they are no longer in flight or returned."""
        self._in_flight = {i for i in self._in_flight if i > last_id}
        while self._returned and self._returned[0] <= last_id:
            heapq.heappop(self._returned)
        self._oldest_known = False

    def _oldest_queued_at(self) -> float | None:
        if not self._oldest_known:
            rows = self._read("SELECT queued_at FROM messages ORDER BY id LIMIT 1", ())
            self._oldest_at = rows[0][0] if rows else None
            self._oldest_known = True
        return self._oldest_at

    def _scan(self) -> Iterator[tuple[int, int, float]]:
        """(id, size, queued_at) from the oldest on, read in chunks so that no statement stays open."""
        after = 0
        while True:
            rows = self._read(
                "SELECT id, size, queued_at FROM messages WHERE id > ? ORDER BY id LIMIT ?", (after, _CHUNK)
            )
            yield from rows
            if len(rows) < _CHUNK:
                return
            after = rows[-1][0]

    def _read(self, sql: str, params: Sequence[object]) -> list[Any]:
        try:
            return self._db.execute(sql, params).fetchall()
        except sqlite3.Error as exc:
            raise SpoolError(f"{self.name}: cannot read {self.path}: {exc}") from exc

    def _free_bytes(self) -> int:
        try:
            st = os.statvfs(self.path.parent)
        except OSError:
            return self.min_free_bytes  # unknown: do not refuse on account of the floor
        return st.f_bavail * st.f_frsize

    def _stat_wal(self) -> int:
        try:
            return self._wal.stat().st_size
        except FileNotFoundError:
            return 0
        except OSError:
            return self._wal_size  # only the accounting suffers; what is committed stays committed

    def _check_open(self) -> None:
        if self._closed:
            raise SinkError(f"{self.name}: closed")


def read_stats(path: str | os.PathLike[str]) -> BufferStats:
    """What a spool file holds, read without opening it as a spool (for `fieldgate spool`)."""
    if not Path(path).is_file():
        raise SpoolError(f"no spool at {path}")
    db = sqlite_utils.Database(Path(path), recursive_triggers=False, execute_plugins=False)
    try:
        messages, meta = db.table("messages"), db.table("meta")
        if not messages.exists():
            return BufferStats(0, 0, None, 0)
        count, held = db.execute("SELECT COUNT(*), COALESCE(SUM(size), 0) FROM messages").fetchone()
        oldest = next(messages.rows_where(order_by="id", limit=1, select="queued_at"), {}).get("queued_at")
        dropped = next(meta.rows_where("key = 'dropped'"), {}).get("value", 0) if meta.exists() else 0
    except sqlite3.Error as exc:
        raise SpoolError(f"cannot read spool {path}: {exc}") from exc
    finally:
        db.close()
    return BufferStats(count, held, oldest, dropped)
