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


The file itself (transactions, checkpoints, the free-disk floor, a corrupt file moved aside and replaced)
is `SpoolFile` in `bridge/spool_file.py`; the tables, the lock and `read_stats` are in
`bridge/spool_schema.py`.
"""

from __future__ import annotations

import heapq
import os
import sqlite3
from collections.abc import Callable, Iterable, Iterator, Sequence

from bridge.buffer import (
    DEFAULT_MAX_AGE,
    DEFAULT_MAX_SIZE,
    BufferStats,
    Clock,
    Entry,
    Limits,
    WhenFull,
    buffer_clocks,
    entry_sizes,
    plan_room,
    requeue,
)
from bridge.spool_dates import INSERT_SEGMENT, PRUNE_SEGMENTS, Segment, pruned, settle
from bridge.spool_file import CHUNK, DEFAULT_CHECKPOINT_BYTES, DEFAULT_MIN_FREE, ROTATE_INTERVAL, SpoolFile, log
from bridge.spool_schema import (
    INSERT,
    INSERT_ANCHOR,
    SELECT,
    SET_DROPPED,
    Row,
    SpoolCorrupt,
    SpoolEntryError,
    SpoolError,
    SpoolStorageError,
    read_stats,
    to_entry,
)
from gateway.types import CLOCK, STEP_MS, Message

_INT64_MIN, _INT64_MAX = -(2**63), 2**63 - 1  # SQLite's INTEGER

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


def _int64(value: object) -> bool:
    return isinstance(value, int) and _INT64_MIN <= value <= _INT64_MAX


def _chunks(ids: list[int]) -> Iterator[list[int]]:
    for i in range(0, len(ids), CHUNK):
        yield ids[i : i + CHUNK]


class SQLiteSpool(SpoolFile):
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
        clock: Clock | None = None,
        monotonic: Clock | None = None,
        boot: int | None = None,
        synchronized: Callable[[], bool | None] | None = None,
        name: str | None = None,
    ) -> None:
        """`clock`, `monotonic`: the process clock's by default (a `clock` alone is taken for both: one that never
        steps); `boot`: the process clock's boot key by default (rows of another boot age by the wall clock and
        their anchors are not used); `synchronized`: whether the clock is known synchronised now, the process
        clock's by default (rows another boot queued while it was not are adopted: `bridge/spool_dates.py`)."""
        self.limits = Limits(max_size, max_age, when_full)
        wall, mono = buffer_clocks(clock, monotonic)
        super().__init__(
            path,
            min_free_bytes=min_free_bytes,
            checkpoint_bytes=checkpoint_bytes,
            accept_sync_interval=accept_sync_interval,
            clock=wall,
            monotonic=mono,
            boot=CLOCK.boot if boot is None else boot,
            synchronized=synchronized or (lambda: CLOCK.synchronized),
            name=name,
        )

    def add(self, items: Sequence[tuple[Message, int]]) -> list[int]:
        """Store (message, sampled_ms) pairs in one committed transaction, all or none."""
        with self._lock:
            self._check_open()
            return self._recovering(self._add, items)

    def _add(self, items: Sequence[tuple[Message, int]]) -> list[int]:
        now, mono = self._clock(), self._monotonic()
        self._expire(now)
        if not items:
            return []
        sizes, topics = entry_sizes(items)
        # What SQLite would refuse, found before the transaction: the outbox can then store the rest at once.
        stamps = [i for i, (m, ts) in enumerate(items) if not (_int64(ts) and (m.anchor is None or _int64(m.anchor)))]
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
            (first + i, m.topic, m.payload, int(m.retain), m.qos, sampled_ms, now, size)
            for i, ((m, sampled_ms), size) in enumerate(zip(items, sizes, strict=True))
        ]
        anchors = [(first + i, m.anchor) for i, (m, _) in enumerate(items) if m.anchor is not None]
        offset = now - mono
        synced = self._synchronized() is True
        if synced and self._unsettled:
            self._settle(offset)  # once per boot, or per step while unsynchronised: not per add
        # A new segment at a new boot or after a step: the rows before it keep the offset they were queued with. A
        # change of the sync state alone starts none: without a step, the settled offset dates the rows after it too.
        last = self._segments[-1] if self._segments else None
        segment: Segment | None = None
        if last is None or last[1] != self._boot or abs(offset - last[2]) * 1000 >= STEP_MS:
            segment = (first, self._boot, offset, int(synced), offset if synced else None)

        def write(db: sqlite3.Connection) -> int | None:
            if plan.count:
                db.execute("DELETE FROM messages WHERE id <= ?", (plan.last_id,))
                db.execute(SET_DROPPED, (self._dropped + plan.count,))
            db.executemany(INSERT, rows)
            if anchors:
                db.executemany(INSERT_ANCHOR, anchors)
            if segment is None:
                return None
            db.execute(INSERT_SEGMENT, segment)
            db.execute(PRUNE_SEGMENTS)
            held: int | None = db.execute("SELECT MIN(id) FROM messages").fetchone()[0]
            return held

        held = self._write(write, durable=True)
        # The transaction is committed: only now does the in-memory view follow it.
        self._last_id += len(rows)
        self._count += len(rows) - plan.count
        self._bytes += sum(sizes) - plan.size
        self._dropped += plan.count
        if plan.count:
            self._forget_through(plan.last_id)
        elif self._count == len(rows):
            self._oldest_at, self._oldest_known = (first, now), True
        if segment is not None:
            # As the table now is, without reading it again (a read that fails here would fail a committed add).
            self._segments = pruned([*self._segments, segment], held)
            self._unsettled = self._unsettled or not segment[3]
        self._after_commit()
        return [row[0] for row in rows]

    def _settle(self, offset: float) -> None:
        """The clock is synchronised now: this boot's unsettled segments get `offset` as their wall_s (if that
        cannot be written, the next add or the close tries again: they are adopted at the next boot until then)."""
        try:
            self._segments = self._write(lambda db: settle(db, self._segments, self._boot, offset), durable=False)
        except SpoolError as exc:
            log.warning("%s: cannot date the rows of this boot for the next: %s", self.name, exc)
            return
        self._unsettled = False

    def close(self) -> None:
        """Date this boot's rows for the next one if the clock is synchronised now (the boot may end here); close."""
        with self._lock:
            if not self._closed and self._unavailable is None and self._unsettled and self._synchronized() is True:
                self._settle(self._offset())  # never raises: the file closes whatever
        super().close()

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
                entries.append(to_entry(row, self._segment_of(row[0]), self._boot))
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

    def _expire(self, now: float) -> int:
        cutoff = now - self.limits.max_age
        oldest = self._oldest_queued_at()
        if oldest is None or oldest >= cutoff:
            return 0
        # A clock known wrong (a bad RTC, ahead) cannot tell another boot's wall dates: those rows wait for it.
        hold = self._synchronized() is False
        # FIFO prefix, as MemoryBuffer: stop at the first entry young enough.
        count = size = last = 0
        for entry_id, entry_size_, queued_at in self._scan():
            if queued_at >= cutoff or (hold and self._foreign(entry_id)):
                break
            count, size, last = count + 1, size + entry_size_, entry_id
        if not count:
            return 0

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

    def _foreign(self, entry_id: int) -> bool:
        """Whether a row is dated by another boot's wall clock (rows of the older schema age by it as they did)."""
        seg = self._segment_of(entry_id)
        return seg is not None and seg[1] != self._boot

    def _forget_through(self, last_id: int) -> None:
        """Entries up to last_id were dropped: they are no longer in flight or returned."""
        self._in_flight = {i for i in self._in_flight if i > last_id}
        while self._returned and self._returned[0] <= last_id:
            heapq.heappop(self._returned)
        self._oldest_known = False
