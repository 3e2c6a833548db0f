"""The spool's SQLite file: open, read, write in one transaction, checkpoint, and a corrupt file replaced.

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
commits, fsyncs and bytes written (`BufferStats`' write figures) in `bridge/spool_io.py`; the FIFO on top
(`SQLiteSpool`: add, take, accept, reject, expire) in `bridge/spool.py`; the dates of rows in `bridge/spool_dates.py`.
"""

from __future__ import annotations

import bisect
import contextlib
import logging
import os
import sqlite3
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any, TypeVar

from bridge.buffer import Clock, queued_wall
from bridge.spool_dates import Segment, date_salvaged, open_dates, wall_dated
from bridge.spool_io import WriteMeter
from bridge.spool_schema import (
    Contents,
    SpoolCorrupt,
    SpoolError,
    SpoolStorageError,
    connect,
    lock_file,
    raise_counters,
    read_contents,
    salvage,
    spool_error,
)
from bridge.statefiles import move_aside
from gateway.errors import SinkError

# The spool's log lines keep the name operators know them by.
log = logging.getLogger("bridge.spool")

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
#: Ids per IN (...) list and rows per read of a scan, well below SQLite's variable limit.
CHUNK = 500
_COMPANIONS = ("-wal", "-shm")


class SpoolFile:
    """One SQLite file of a spool and the view of what it holds: transactions, reads, checkpoints, rotation."""

    def __init__(
        self,
        path: str | os.PathLike[str],
        *,
        min_free_bytes: int,
        checkpoint_bytes: int,
        accept_sync_interval: float,
        clock: Clock,
        monotonic: Clock,
        boot: int,
        synchronized: Callable[[], bool | None],
        name: str | None,
    ) -> None:
        self.path = Path(path)
        self.name = name or f"spool {self.path.name}"
        self.min_free_bytes = min_free_bytes
        self.checkpoint_bytes = checkpoint_bytes
        self.accept_sync_interval = accept_sync_interval
        self._clock = clock
        self._monotonic = monotonic
        self._boot = boot
        self._synchronized = synchronized
        self._io = WriteMeter(self.path)
        self._lock = threading.RLock()  # one call at a time: the sink may call from worker threads
        self._in_flight: set[int] = set()
        self._returned: list[int] = []  # heap of rejected ids, takeable again before fresh ones
        self._cursor = 0  # every stored id <= cursor is in flight or in _returned
        self._count = self._bytes = self._last_id = self._dropped = 0  # what the file holds (set by _open)
        self._oldest_at: tuple[int, float] | None = None  # the oldest row's id and queued_at
        self._oldest_known = False
        self._segments: list[Segment] = []  # the file's (set by _open, then kept as the table is)
        self._unsettled = False  # a segment of this boot has no wall_s from a synchronised clock yet
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
        try:
            dates = open_dates(db, self._boot, self._monotonic(), self._offset(), self._synchronized() is True)
        except sqlite3.Error as exc:
            # A damaged segments table is a damaged file: moved aside and salvaged like any other.
            db.close()
            raise spool_error(f"{self.name}: cannot open {self.path}: {exc}", exc) from exc
        self._segments, self._unsettled, adopted = dates
        if adopted:
            log.info("%s: rows an earlier boot queued unsynchronised get max_age from now", self.name)
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
            if not got.dated:
                date_salvaged(db, self._boot, self._monotonic(), self._offset())
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

    def _offset(self) -> float:
        """Wall minus monotonic time now, as the spool's clocks read."""
        return self._clock() - self._monotonic()

    def _segment_of(self, entry_id: int) -> Segment | None:
        """The segment a row is in (None: a row of the older schema, in none)."""
        at = bisect.bisect_right(self._segments, entry_id, key=lambda seg: seg[0])
        return self._segments[at - 1] if at else None

    def _queued(self, entry_id: int, queued_at: float, offset: float) -> float:
        """When a row was queued, on the wall clock as it reads now (`offset`: wall - monotonic now; queued_wall)."""
        seg = self._segment_of(entry_id)
        if seg is None:
            return queued_at
        return queued_wall(wall_dated(queued_at, seg, self._boot), seg[1], queued_at - seg[2], self._boot, offset)

    def _oldest_queued_at(self) -> float | None:
        """When the oldest row was queued, on the wall clock as it reads now."""
        if not self._oldest_known:
            rows = self._read("SELECT id, queued_at FROM messages ORDER BY id LIMIT 1", ())
            self._oldest_at = (rows[0][0], rows[0][1]) if rows else None
            self._oldest_known = True
        if self._oldest_at is None:
            return None
        return self._queued(*self._oldest_at, self._offset())

    def _scan(self) -> Iterator[tuple[int, int, float]]:
        """(id, size, queued_at on the wall clock as it reads now) from the oldest on, read in chunks so that no
        statement stays open."""
        after = 0
        offset = self._offset()
        while True:
            rows = self._read(
                "SELECT id, size, queued_at FROM messages WHERE id > ? ORDER BY id LIMIT ?", (after, CHUNK)
            )
            for entry_id, size, queued_at in rows:
                yield entry_id, size, self._queued(entry_id, queued_at, offset)
            if len(rows) < CHUNK:
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
