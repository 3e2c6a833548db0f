"""What the spool's writes cost the storage: SQLite's fsyncs and bytes written, modelled from the WAL file.

Write accounting (`BufferStats.commits/fsyncs/bytes_written`, since open; hil/bench/spool_bench.py
checks the fsync count against strace): every FULL commit is one fdatasync of the WAL; the first
commit into an empty WAL adds one (its header); a connection's first sync of the WAL also syncs
the directory; every checkpoint of a non-empty WAL adds two (WAL, then the database). A checkpoint
while running restarts the WAL in place (the file keeps its size, so a commit's fdatasync need not
journal a new file size), so the WAL's length in use is read from the wal-index (`-shm`): its
frame count, through one descriptor held from open to close. Closing any descriptor of the `-shm`
drops every POSIX lock the process holds on it, SQLite's "in use" lock among them: another
connection (`fieldgate spool`) would then take itself for the only one. Bytes are the growth of that
length (= frames appended) plus, per checkpoint, the distinct pages it copies back into the database
(read from the WAL's frame headers). Filesystem metadata, partial-page rewrites in the page cache
and the flash translation layer come on top.
"""

from __future__ import annotations

import contextlib
import os
import sqlite3
import sys
import time
from pathlib import Path

_WAL_HEADER = 32
_FRAME_HEADER = 24
# The wal-index header (sqlite.org/walformat.html): two copies of 48 bytes, equal once SQLite has written
# them, each with isInit (1 once built) and mxFrame, the frame count (native byte order).
_INDEX_HEADER = 48
_IS_INIT = 12
_MX_FRAME = slice(16, 20)


class WriteMeter:
    """One spool connection's writes: commits, fsyncs and bytes written since open, and when the WAL was last synced.

    Passive: the spool runs the statements and reports each commit and checkpoint; the meter reads
    the WAL file's size (and, before a checkpoint, its frame headers).
    """

    def __init__(self, db_path: Path) -> None:
        self.wal = Path(f"{db_path}-wal")
        self.shm = Path(f"{db_path}-shm")
        self.commits = self.fsyncs = self.bytes_written = 0
        self.wal_size = 0
        self.page_size = 0
        self.last_sync = time.monotonic()
        self.unsynced = False  # a NORMAL commit since the last fsync of the WAL
        self._dir_sync_pending = False
        self._shm_fd: int | None = None

    def start(self, db: sqlite3.Connection, wal_before: int) -> None:
        """The counters start on a freshly opened connection; `wal_before`: the WAL's size before it opened."""
        self.page_size = int(db.execute("PRAGMA page_size").fetchone()[0])
        self.close()  # a descriptor of a file closed before this one opened (a rotation)
        with contextlib.suppress(OSError):
            self._shm_fd = os.open(self.shm, os.O_RDONLY | os.O_CLOEXEC)
        # A connection fsyncs the directory along with its first sync of the WAL; creating the
        # schema of a new file did that already (uncounted: before the counters start).
        self._dir_sync_pending = self.stat_wal() == wal_before
        self.wal_size = self.wal_in_use()

    def since_sync(self) -> float:
        """Seconds since the WAL was last fsynced (a FULL commit or a checkpoint)."""
        return time.monotonic() - self.last_sync

    def committed(self, *, durable: bool) -> None:
        """A write transaction committed, with synchronous=FULL when `durable`, else NORMAL."""
        self.commits += 1
        wal = self.wal_in_use()
        # SQLite syncs the header of a WAL it (re)starts before its first frames, in any mode.
        self._count_syncs((self.wal_size == 0 and wal > 0) + durable)
        if durable:
            self.last_sync = time.monotonic()
            self.unsynced = False
        else:
            self.unsynced = True
        self.bytes_written += max(0, wal - self.wal_size)
        self.wal_size = wal

    def checkpointed(self, pages: int) -> None:
        """A full checkpoint copied `pages` (see wal_pages, read before it) into the database.

        After it the next commit starts the WAL over (at its start, or in a truncated file).
        """
        self._count_syncs(2)
        self.bytes_written += pages * self.page_size
        self.last_sync = time.monotonic()
        self.unsynced = False
        self.wal_size = 0

    def wal_pages(self) -> int:
        """Distinct database pages in the WAL: what a checkpoint copies into the file."""
        step = self.page_size + _FRAME_HEADER
        try:
            with self.wal.open("rb") as f:  # just written, so read from the page cache
                wal = f.read(self.wal_size)
        except OSError:
            return max(0, self.wal_size - _WAL_HEADER) // step  # every frame: an upper bound
        # Each frame header starts with its page number; frames past the length in use are stale
        # ones from before the WAL restarted.
        return len({wal[i : i + 4] for i in range(_WAL_HEADER, len(wal) - step + 1, step)})

    def wal_in_use(self) -> int:
        """Bytes of the WAL that hold frames since it last (re)started: header and frames, 0 when none."""
        try:
            header = os.pread(self._shm_fd, 2 * _INDEX_HEADER, 0) if self._shm_fd is not None else b""
        except OSError:
            header = b""
        first, second = header[:_INDEX_HEADER], header[_INDEX_HEADER:]
        if len(second) < _INDEX_HEADER or first != second or first[_IS_INIT] != 1:
            # No wal-index, a cut one, one zeroed or written over by someone else: the file's size, which
            # only the accounting (and at most one early checkpoint) suffers from.
            return self.stat_wal()
        frames = int.from_bytes(header[_MX_FRAME], sys.byteorder)
        in_use = _WAL_HEADER + frames * (self.page_size + _FRAME_HEADER) if frames else 0
        # A wal-index SQLite has not rebuilt yet may claim more than the file holds: never more than the file.
        return in_use if in_use <= self.wal_size + (1 << 20) else self.stat_wal()

    def close(self) -> None:
        """Let go of the wal-index; only once SQLite's connection is closed (it drops the process's locks on it)."""
        if self._shm_fd is not None:
            os.close(self._shm_fd)
            self._shm_fd = None

    def stat_wal(self) -> int:
        """The WAL file's size now (0 when there is none)."""
        try:
            return self.wal.stat().st_size
        except FileNotFoundError:
            return 0
        except OSError:
            return self.wal_size  # only the accounting suffers; what is committed stays committed

    def _count_syncs(self, n: int) -> None:
        if n:
            self.fsyncs += n + self._dir_sync_pending
            self._dir_sync_pending = False
