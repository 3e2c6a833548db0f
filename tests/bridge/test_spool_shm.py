"""The spool and its WAL's wal-index (`-shm`): SQLite's own lock on it is kept, and a damaged one costs nothing.

The write meter (bridge/spool_io.py) reads the WAL length in use from the wal-index header after each commit.
It must never close a descriptor of the `-shm` while SQLite's connection lives: POSIX locks belong to the
process, so that close would drop SQLite's "in use" lock, and another connection (`fieldgate spool` reading a
running spool) would take itself for the only one and start the wal-index over. A header that is cut, zeroed,
written over or claims far more frames than the WAL holds is not trusted: the meter falls back to the WAL
file's size, which costs at most one early checkpoint, never one per commit, and never a message.
"""

from __future__ import annotations

import os
import shutil
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from bridge.spool import SQLiteSpool
from gateway.types import Message

LIMIT = 64 * 1024  # checkpoint_bytes: a few adds fill the WAL
DMS = 128  # the byte of the -shm SQLite's connections hold a shared lock on while they use it (SQLite's os_unix.c)
INDEX_HEADER = 96  # the wal-index header: two copies of 48 bytes


def batch(k: int, n: int = 10) -> list[tuple[Message, int]]:
    """n messages of add number k, in order: topic "t/<k>/<i>", sampled_ms k * 1000 + i."""
    return [(Message(f"t/{k}/{i}", os.urandom(100)), k * 1000 + i) for i in range(n)]


def shm_locks(db: Path) -> list[str]:
    """The POSIX locks this process holds on the spool's -shm, from the kernel's table (/proc/locks)."""
    inode = os.stat(f"{db}-shm").st_ino
    with open("/proc/locks") as f:
        rows = [line.split() for line in f if "->" not in line]  # "->": a waiter, not a holder
    # "1: POSIX  ADVISORY  READ 1234 fe:00:5678 128 128": type, pid, device:inode, first and last byte.
    return [
        " ".join(r[3:5] + r[6:8])
        for r in rows
        if r[1] == "POSIX" and r[5].endswith(f":{inode}") and r[4] == str(os.getpid())
    ]


def checkpoint_sequence(db: Path) -> int:
    """The WAL header's checkpoint sequence number: one up each time a checkpoint lets the WAL start over."""
    with open(f"{db}-wal", "rb") as f:
        return int.from_bytes(f.read(16)[12:16], "big")


def in_order(spool: SQLiteSpool) -> list[int]:
    """The sampled_ms of everything the spool holds, as take hands it out (then given back)."""
    taken = spool.take(10**6)
    spool.reject([e.id for e in taken])
    return [e.sampled_ms for e in taken]


def test_sqlites_in_use_lock_on_the_wal_index_holds_while_the_spool_writes(tmp_path: Path) -> None:
    path = tmp_path / "spool.db"
    spool = SQLiteSpool(path, min_free_bytes=0, checkpoint_bytes=LIMIT, accept_sync_interval=0)
    try:
        in_use = f"READ {os.getpid()} {DMS} {DMS}"
        assert in_use in shm_locks(path)
        spool.add(batch(0))
        first = checkpoint_sequence(path)
        for k in range(1, 40):  # adds, accepts and the checkpoints they bring: each reads the wal-index
            spool.add(batch(k))
            if k % 5 == 4:
                spool.accept(e.id for e in spool.take(20))
            assert in_use in shm_locks(path), f"SQLite's lock on the wal-index is gone after add {k}"
        assert checkpoint_sequence(path) != first  # the WAL did fill and start over on the way
        spool.expire(0)
        assert in_use in shm_locks(path)
    finally:
        spool.close()


# --- a damaged wal-index -----------------------------------------------------------------------------


def emptied(header: bytes) -> bytes:
    """A wal-index of no bytes at all."""
    return b""


def cut(header: bytes) -> bytes:
    """A wal-index cut to 3 bytes (what a connection that thinks it is alone does to it)."""
    return header[:3]


def zeroed(header: bytes) -> bytes:
    """A wal-index of zeros (a crash before SQLite built it, or a filesystem that lost its pages)."""
    return bytes(len(header))


def overwritten(header: bytes) -> bytes:
    """Random bytes over the header: its two copies no longer agree."""
    return os.urandom(len(header))


def torn(header: bytes) -> bytes:
    """The first copy of the header written over with a small, plausible frame count; the second left as it was."""
    copy = bytearray(header)
    copy[16:20] = (1).to_bytes(4, sys.byteorder)
    return bytes(copy)


def huge(header: bytes) -> bytes:
    """A header whose copies agree and say it is built, but claim 2**31 frames: far more than the WAL holds."""
    copy = bytearray(header[:48])
    copy[16:20] = (2**31).to_bytes(4, sys.byteorder)
    return bytes(copy) * 2 + header[96:]


def too_many(header: bytes) -> bytes:
    """A header whose copies agree, but claiming 300 frames (1.2 MB) more than were written since the last reading."""
    copy = bytearray(header[:48])
    frames = int.from_bytes(copy[16:20], sys.byteorder) + 300
    copy[16:20] = frames.to_bytes(4, sys.byteorder)
    return bytes(copy) * 2 + header[96:]


DAMAGES: dict[str, Callable[[bytes], bytes]] = {
    "emptied": emptied,
    "cut": cut,
    "zeroed": zeroed,
    "overwritten": overwritten,
    "torn": torn,
    "huge": huge,
    "too_many": too_many,
}


@pytest.fixture(params=list(DAMAGES))
def damage(request: pytest.FixtureRequest) -> Callable[[bytes], bytes]:
    return DAMAGES[request.param]


@pytest.fixture
def running(tmp_path: Path) -> Iterator[tuple[SQLiteSpool, int]]:
    """A spool whose WAL has filled and started over once, and a descriptor of its -shm to damage it through.

    The descriptor is closed only after the spool: closing it earlier would drop SQLite's locks on the file.
    """
    spool = SQLiteSpool(tmp_path / "spool.db", min_free_bytes=0, checkpoint_bytes=LIMIT)
    shm = os.open(f"{spool.path}-shm", os.O_RDWR)
    try:
        for k in range(12):
            spool.add(batch(k))
        yield spool, shm
    finally:
        spool.close()
        os.close(shm)


def read_damaged(spool: SQLiteSpool, shm: int, damage: Callable[[bytes], bytes]) -> int:
    """What the spool's meter reads from its wal-index while another process has damaged it.

    The damage is written between SQLite's last use of the file and the meter's read, and the wal-index is
    put back as it was before SQLite uses it again (SQLite checks the header itself and would rebuild it).
    """
    before = os.pread(shm, os.fstat(shm).st_size, 0)
    try:
        damaged = damage(before)
        os.ftruncate(shm, len(damaged))
        os.pwrite(shm, damaged, 0)
        return spool._io.wal_in_use()
    finally:
        os.pwrite(shm, before, 0)


def test_a_damaged_wal_index_reads_as_the_wal_files_size(
    running: tuple[SQLiteSpool, int], damage: Callable[[bytes], bytes]
) -> None:
    spool, shm = running
    wal = Path(f"{spool.path}-wal").stat().st_size
    healthy = spool._io.wal_in_use()
    assert 0 < healthy < wal  # restarted in place: less of the file is in use than the file holds
    assert read_damaged(spool, shm, damage) == wal
    assert spool._io.wal_in_use() == healthy  # put back: read as before
    spool.add(batch(12))
    assert in_order(spool) == [k * 1000 + i for k in range(13) for i in range(10)]


def test_a_damaged_wal_index_left_by_a_crash_is_rebuilt_and_the_spool_goes_on(
    tmp_path: Path, damage: Callable[[bytes], bytes]
) -> None:
    """A crash leaves the WAL and its wal-index behind; the copy is damaged before the spool opens it again."""
    live = tmp_path / "live"
    live.mkdir()
    spool = SQLiteSpool(live / "spool.db", min_free_bytes=0, checkpoint_bytes=2**40)
    crashed = tmp_path / "crashed"
    crashed.mkdir()
    try:
        for k in range(12):
            spool.add(batch(k))
        for suffix in ("", "-wal", "-shm"):  # what a power cut leaves: the files as they are between two commits
            shutil.copy(f"{spool.path}{suffix}", crashed / f"spool.db{suffix}")
    finally:
        spool.close()
    shm = crashed / "spool.db-shm"
    shm.write_bytes(damage(shm.read_bytes()))
    path = crashed / "spool.db"
    reopened = SQLiteSpool(path, min_free_bytes=0, checkpoint_bytes=LIMIT)
    try:
        assert in_order(reopened) == [k * 1000 + i for k in range(12) for i in range(10)]
        first = checkpoint_sequence(path) if Path(f"{path}-wal").stat().st_size else None
        for k in range(12, 32):
            reopened.add(batch(k))
        assert first is None or (checkpoint_sequence(path) - first) % 2**32 <= 2
        assert in_order(reopened) == [k * 1000 + i for k in range(32) for i in range(10)]
    finally:
        reopened.close()
