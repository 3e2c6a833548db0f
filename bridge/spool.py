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

Failures: every error of SQLite or of binding a row comes out as a SpoolError, of three kinds: the
rows (`SpoolEntryError`: a number beyond int64, a topic that cannot be UTF-8; nothing stored, the file
is fine), the storage (`SpoolStorageError`: a full disk, an I/O error, a lock), and a file SQLite cannot
read (`SpoolCorrupt`). A corrupt file is moved aside (`bridge/statefiles.py`) and a fresh one started:
at open, and once while running (then the call is made again on the fresh file). Before the fresh file
is used, every row the damaged one can still give is carried over (`spool_schema.salvage`: read by id
ranges, a failing range halved down to what reads, within SALVAGE_SECONDS), with its id, queued_at and
sampled_ms, so FIFO order and max_age are unchanged and one bad page costs only the rows on it. What
could not be read is counted as dropped: while running, exactly (the count held minus the rows carried
over); at start, estimated from the ids that could not be read (plus the old file's own drop counter,
if readable). The ids go on after the highest the old file handed out, so a late accept of ids taken
from it never deletes a new row. A file that turns corrupt again within ROTATE_INTERVAL is not rotated
again: the spool refuses until then, rather than making a new file every second.

The file's tables, its lock and `read_stats` are in `bridge/spool_schema.py`; the accounting of
commits, fsyncs and bytes written (`BufferStats`' write figures) in `bridge/spool_io.py`.
"""

from __future__ import annotations

import contextlib
import heapq
import logging
import os
import sqlite3
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any, TypeVar

from bridge.buffer import (
    DEFAULT_MAX_AGE,
    DEFAULT_MAX_SIZE,
    BufferStats,
    Clock,
    Entry,
    Limits,
    WhenFull,
    entry_sizes,
    plan_room,
    requeue,
)
from bridge.spool_io import WriteMeter
from bridge.spool_schema import (
    INSERT,
    SELECT,
    SET_DROPPED,
    Contents,
    Row,
    SpoolCorrupt,
    SpoolEntryError,
    SpoolError,
    SpoolStorageError,
    connect,
    lock_file,
    raise_counters,
    read_contents,
    read_stats,
    salvage,
    spool_error,
    to_entry,
)
from bridge.statefiles import move_aside
from gateway.errors import SinkError
from gateway.types import Message

log = logging.getLogger(__name__)

T = TypeVar("T")

#: Default free-disk floor on the spool's filesystem: below it the spool stops growing.
DEFAULT_MIN_FREE = 64 * 1024**2
#: WAL size that triggers a checkpoint (SQLite's own default is 1,000 pages, about this).
DEFAULT_CHECKPOINT_BYTES = 4 * 1024**2
#: The free disk is looked at again at least this often (seconds of the spool's clock), for what others write.
FREE_CHECK_INTERVAL = 1.0
#: Between looks, the spool's own writes are taken off what it saw; within this much of the floor it looks every
#: time (what its writes take beyond the bytes it counts: filesystem metadata, the wal-index, partly used blocks).
FREE_SLACK = 1024**2
#: After a corrupt file was rotated while running, the next rotation waits this long (seconds).
ROTATE_INTERVAL = 600.0
_INT64_MIN, _INT64_MAX = -(2**63), 2**63 - 1  # SQLite's INTEGER
_CHUNK = 500  # ids per IN (...) list, well below SQLite's variable limit
_COMPANIONS = ("-wal", "-shm")

__all__ = [
    "DEFAULT_CHECKPOINT_BYTES",
    "DEFAULT_MIN_FREE",
    "ROTATE_INTERVAL",
    "SQLiteSpool",
    "SpoolCorrupt",
    "SpoolEntryError",
    "SpoolError",
    "SpoolStorageError",
    "read_stats",
]


def _chunks(ids: list[int]) -> Iterator[list[int]]:
    for i in range(0, len(ids), _CHUNK):
        yield ids[i : i + _CHUNK]


class SQLiteSpool:
    """A Buffer in one SQLite file: durable adds, FIFO by id, limits in bytes, age and free disk."""

    durable = True

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
        self._io = WriteMeter(self.path)
        self._lock = threading.RLock()  # one call at a time: the sink may call from worker threads
        self._in_flight: set[int] = set()
        self._returned: list[int] = []  # heap of rejected ids, takeable again before fresh ones
        self._cursor = 0  # every stored id <= cursor is in flight or in _returned
        self._oldest_at: float | None = None
        self._oldest_known = False
        self._synchronous = ""
        self._closed = False
        self._rotated_at: float | None = None  # monotonic time of the last rotation while running
        self._unavailable: SpoolStorageError | None = None  # a rotation could not open a fresh file
        self._damaged: tuple[Path, int] | None = None  # a moved-aside file not yet carried over, and its count
        self._free_seen: tuple[float, int, int] | None = None  # the last look: when, free bytes, bytes written then
        # A lock held by another gateway is no corruption: that SpoolStorageError ends the start.
        self._lock_fd = lock_file(self.path, self.name)
        try:
            self._db = self._open()
        except SpoolCorrupt as exc:
            # At start, any unreadable file is moved aside: a dying SD card must not keep the gateway down.
            self._db = self._fresh(exc)
        except BaseException:
            os.close(self._lock_fd)
            raise

    def _open(
        self, seed: Contents | None = None, damaged: Path | None = None, held: int | None = None
    ) -> sqlite3.Connection:
        """Open the file (see `connect`); with `damaged`, first carry the rows it can still read into it.

        `held`: how many rows the damaged file held (known while running); at start it is unknown and the
        loss is estimated from the ids that could not be read.
        """
        wal_before = self._io.stat_wal()
        db, contents = connect(self.path, self.name, seed=seed)
        if damaged is not None:
            contents = self._salvage(db, damaged, contents, held)
        self._db = db
        self._count, self._bytes = contents.count, contents.bytes
        self._last_id, self._dropped = contents.last_id, contents.dropped
        # A WAL that grew past the checkpoint size (a long transaction) is cut back to it when it restarts.
        db.execute(f"PRAGMA journal_size_limit={self.checkpoint_bytes}")
        self._io.start(db, wal_before)
        self._checkpoint()  # fold a WAL left by a crash (or the salvaged rows) into the file
        return db

    def _salvage(self, db: sqlite3.Connection, damaged: Path, contents: Contents, held: int | None) -> Contents:
        """Copy what `damaged` still holds into the fresh `db`; the counters then, the rows lost counted as dropped."""
        started = time.monotonic()
        got = salvage(db, damaged, last_id=contents.last_id)
        lost = got.lost if held is None else max(0, held - got.rows)
        # At start the damaged file's own drop counter carries over; while running it is the spool's already.
        dropped = contents.dropped + lost + (got.dropped if held is None else 0)
        try:
            db.execute("BEGIN IMMEDIATE")
            raise_counters(db, max(contents.last_id, got.last_id), dropped)
            db.execute("COMMIT")
            contents = read_contents(db)
        except sqlite3.Error as exc:
            db.close()
            raise spool_error(f"{self.name}: cannot open {self.path}: {exc}", exc) from exc
        log.log(
            logging.ERROR if lost else logging.WARNING,
            "%s: carried %d message(s) over from %s in %.1f s; %d lost (counted as dropped)",
            self.name,
            got.rows,
            damaged.name,
            time.monotonic() - started,
            lost,
        )
        return contents

    def _fresh(self, exc: SpoolCorrupt) -> sqlite3.Connection:
        """Move the corrupt file aside and open a new one in its place, with what the old one can still give.

        The lock moves to the new file. Raises SpoolStorageError (the lock already released) if it cannot.
        """
        try:
            damaged = move_aside(self.path, "spool", str(exc.__cause__ or exc), companions=_COMPANIONS)
        except OSError as err:
            os.close(self._lock_fd)
            raise SpoolStorageError(f"{exc}; and it cannot be moved aside: {err}") from exc
        os.close(self._lock_fd)  # the lock of the old file, which is no longer ours to guard
        self._lock_fd = lock_file(self.path, self.name)
        try:
            return self._open(damaged=damaged)
        except BaseException:
            os.close(self._lock_fd)
            raise

    def add(self, items: Sequence[tuple[Message, int]]) -> list[int]:
        """Store (message, sampled_ms) pairs in one committed transaction, all or none."""
        with self._lock:
            self._check_open()
            return self._recovering(self._add, items)

    def _add(self, items: Sequence[tuple[Message, int]]) -> list[int]:
        now = self._clock()
        self._expire(now)
        if not items:
            return []
        sizes, topics = entry_sizes(items)
        # What SQLite would refuse, found before the transaction: the outbox can then store the rest at once.
        stamps = [i for i, (_, ts) in enumerate(items) if not (isinstance(ts, int) and _INT64_MIN <= ts <= _INT64_MAX)]
        if topics or stamps:
            faults = [f"{len(stamps)} with a ts beyond SQLite's int64"] if stamps else []
            faults += [f"{len(topics)} with a topic that is not UTF-8"] if topics else []
            bad = sorted({*topics, *stamps})
            raise SpoolEntryError(f"{self.name}: cannot store {len(bad)} message(s): {', '.join(faults)}", bad)
        room, why = None, ""
        free = self._free_bytes(now)
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
                db.execute(SET_DROPPED, (self._dropped + plan.count,))
            db.executemany(INSERT, rows)

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
            return self._recovering(self._take, n)

    def _take(self, n: int) -> list[Entry]:
        if n <= 0:
            return []
        # Returned ids are all <= the cursor and fresh ones above it, so the returned go first.
        back: list[Row] = []
        while len(back) < n and self._returned:
            # Popped ids whose rows are gone (accepted while returned) simply do not come back.
            ids = [heapq.heappop(self._returned) for _ in range(min(n - len(back), len(self._returned)))]
            for chunk in _chunks(ids):
                back += self._read(f"{SELECT} WHERE id IN ({', '.join('?' * len(chunk))})", chunk)
        back.sort()
        fresh = self._read(f"{SELECT} WHERE id > ? ORDER BY id LIMIT ?", (self._cursor, n - len(back)))
        if fresh:
            self._cursor = fresh[-1][0]
        entries: list[Entry] = []
        unreadable: list[int] = []
        for row in back + fresh:
            try:
                entries.append(to_entry(row))
            except (TypeError, ValueError):  # a row of garbage that still passed for a row
                unreadable.append(row[0])
        self._in_flight.update(e.id for e in entries)
        if unreadable:
            # Handed out it could never be published, and kept it would come back forever.
            log.error("%s: dropped %d unreadable entries (ids %s)", self.name, len(unreadable), unreadable[:10])
            self._accept(unreadable, dropped=True)
        return entries

    def accept(self, ids: Iterable[int]) -> None:
        """Remove delivered entries; unknown or already dropped ids are ignored."""
        with self._lock:
            self._check_open()
            self._recovering(self._accept, sorted(set(ids)))

    def _accept(self, wanted: list[int], *, dropped: bool = False) -> None:
        if not wanted:
            return
        durable = self._io.since_sync() >= self.accept_sync_interval

        def write(db: sqlite3.Connection) -> list[tuple[int, int]]:
            gone: list[tuple[int, int]] = []
            for chunk in _chunks(wanted):
                marks = ", ".join("?" * len(chunk))
                gone += db.execute(f"DELETE FROM messages WHERE id IN ({marks}) RETURNING id, size", chunk)
            if dropped:
                db.execute(SET_DROPPED, (self._dropped + len(gone),))
            return gone

        gone = self._write(write, durable=durable)
        self._count -= len(gone)
        self._bytes -= sum(size if isinstance(size, int) else 0 for _, size in gone)
        self._dropped += len(gone) if dropped else 0
        self._in_flight.difference_update(wanted)
        self._oldest_known = False
        self._after_commit()

    def reject(self, ids: Iterable[int]) -> None:
        """Make in-flight entries takeable again; other ids are ignored."""
        with self._lock:
            self._check_open()
            requeue(ids, self._in_flight, self._returned)

    def expire(self, now: float) -> int:
        """Drop entries queued before now - max_age, from the oldest on; also syncs late removals."""
        with self._lock:
            self._check_open()
            return self._recovering(self._expire_and_sync, now)

    def _expire_and_sync(self, now: float) -> int:
        count = self._expire(now)
        if self._io.unsynced and self._io.since_sync() >= self.accept_sync_interval:
            self._checkpoint()  # fsyncs the WAL, so recent NORMAL removals are durable too
        return count

    def stats(self) -> BufferStats:
        """Counts, bytes, the oldest entry's queue time, drops, and the write cost since open."""
        with self._lock:
            usable = not self._closed and self._unavailable is None
            oldest = self._recovering(self._oldest_queued_at) if usable else None
            written = (self._io.commits, self._io.fsyncs, self._io.bytes_written)
            return BufferStats(self._count, self._bytes, oldest, self._dropped, len(self._in_flight), *written)

    def newest_retained(self) -> dict[str, int]:
        """The id of the newest retained entry of each topic."""
        with self._lock:
            self._check_open()
            sql = "SELECT topic, MAX(id) FROM messages WHERE retain = 1 GROUP BY topic"
            return {topic: entry_id for topic, entry_id in self._recovering(self._read, sql, ())}

    def forget_retained(self, topic: str, through_id: int) -> int:
        """Remove the retained entries of `topic` up to `through_id`."""
        with self._lock:
            self._check_open()
            sql = "SELECT id FROM messages WHERE retain = 1 AND topic = ? AND id <= ?"
            rows = self._recovering(self._read, sql, (topic, through_id))
            self.accept(row[0] for row in rows)
            return len(rows)

    def close(self) -> None:
        """Checkpoint (leaving one file behind), close the database and release the file lock."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            if self._unavailable is not None:
                return  # the corrupt file's connection and lock went with the rotation
            try:
                self._checkpoint()
            finally:
                self._db.close()
                self._io.close()
                os.close(self._lock_fd)

    # --- a file that turns corrupt while running ------------------------------------------------

    def _recovering(self, work: Callable[..., T], *args: Any) -> T:
        """`work(*args)`; if the file turns out corrupt, rotate it (see ROTATE_INTERVAL) and do it once more."""
        try:
            return work(*args)
        except SpoolCorrupt as exc:
            if not self._rotate(exc):
                raise
        return work(*args)

    def _rotate(self, exc: SpoolCorrupt) -> bool:
        """Move the corrupt file aside and go on with a fresh one; False if it is too soon after the last time."""
        now = time.monotonic()
        if self._rotated_at is not None and now - self._rotated_at < ROTATE_INTERVAL:
            return False
        self._rotated_at = now
        held = self._count
        try:
            # Renamed while still open: the connection follows the old file, and closing it cannot touch the new.
            damaged = move_aside(self.path, "spool", str(exc.__cause__ or exc), companions=_COMPANIONS)
        except OSError as err:
            log.error("%s: %s is corrupt and cannot be moved aside (%s): refusing for now", self.name, self.path, err)
            return False
        with contextlib.suppress(sqlite3.Error):
            self._db.close()
        self._io.close()
        os.close(self._lock_fd)
        self._in_flight.clear()
        self._returned.clear()
        self._cursor = 0
        self._oldest_at, self._oldest_known = None, False
        self._synchronous = ""
        self._damaged = (damaged, held)  # to carry over once a fresh file is open
        try:
            self._lock_fd = lock_file(self.path, self.name)
            try:
                self._open(Contents(0, 0, self._last_id, self._dropped), damaged, held)
            except BaseException:
                os.close(self._lock_fd)
                raise
        except SpoolError as err:
            self._count = self._bytes = 0
            self._unavailable = SpoolStorageError(f"{self.name}: no fresh spool in place of a corrupt one: {err}")
            raise self._unavailable from err
        self._damaged = None
        return True

    def _retry_fresh(self) -> None:
        """After ROTATE_INTERVAL, try again to open a fresh file where a rotation could not."""
        assert self._unavailable is not None and self._rotated_at is not None
        if time.monotonic() - self._rotated_at < ROTATE_INTERVAL:
            raise SpoolStorageError(str(self._unavailable))
        self._rotated_at = time.monotonic()
        self._lock_fd = lock_file(self.path, self.name)
        damaged, held = self._damaged or (None, None)
        try:
            self._open(Contents(0, 0, self._last_id, self._dropped), damaged, held)
        except BaseException:
            os.close(self._lock_fd)
            raise
        self._unavailable = self._damaged = None
        log.info("%s: a fresh spool file is open again at %s", self.name, self.path)

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
            db.execute(SET_DROPPED, (self._dropped + count,))

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
        except (sqlite3.Error, OSError, OverflowError, ValueError, TypeError) as exc:
            raise spool_error(f"{self.name}: cannot write {self.path}: {exc}", exc) from exc
        self._io.committed(durable=durable)
        return result

    def _after_commit(self) -> None:
        if self._io.wal_size >= self.checkpoint_bytes:
            self._checkpoint(truncate=False)

    def _checkpoint(self, *, truncate: bool = True) -> None:
        # On the write path (WAL full) RESTART, not TRUNCATE: the next commit writes from the start of
        # the WAL file it has, whose size then stays put, so its fdatasync need not also journal a
        # growing file's new size. Open, close and expire leave the WAL empty on disk.
        if self._io.wal_size <= 0:
            return
        pages = self._io.wal_pages()
        try:
            self._db.execute(f"PRAGMA wal_checkpoint({'TRUNCATE' if truncate else 'RESTART'})")
        except sqlite3.Error as exc:
            # What is committed stays committed in the WAL; the next checkpoint tries again.
            log.warning("%s: checkpoint failed: %s", self.name, exc)
            return
        self._io.checkpointed(pages)

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
        except (sqlite3.Error, ValueError, TypeError, OverflowError) as exc:
            raise spool_error(f"{self.name}: cannot read {self.path}: {exc}", exc) from exc

    def _free_bytes(self, now: float) -> int:
        """Free bytes on the spool's filesystem, at most as many as a statvfs now would give.

        A statvfs per commit costs as much as a tenth of a small commit, so the last look is reused: less
        every byte the spool wrote since (the meter's count, never less than what the writes take on disk,
        save FREE_SLACK). The floor then holds exactly against the spool's own writes (near it, every add
        looks again) and against others' within FREE_CHECK_INTERVAL.
        """
        if self._free_seen is not None:
            at, seen, written = self._free_seen
            left = seen - (self._io.bytes_written - written)
            if 0 <= now - at < FREE_CHECK_INTERVAL and left >= self.min_free_bytes + FREE_SLACK:
                return left
        try:
            st = os.statvfs(self.path.parent)
        except OSError:
            self._free_seen = None
            return self.min_free_bytes  # unknown: do not refuse on account of the floor
        free = st.f_bavail * st.f_frsize
        self._free_seen = (now, free, self._io.bytes_written)
        return free

    def _check_open(self) -> None:
        if self._closed:
            raise SinkError(f"{self.name}: closed")
        if self._unavailable is not None:
            self._retry_fresh()
