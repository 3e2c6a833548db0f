"""SQLiteSpool under crashes and failing disks: kill -9, torn transactions, a full filesystem.

The kill -9 test runs a few kills by default and many with FIELDGATE_SOAK=1.
"""

from __future__ import annotations

import contextlib
import os
import random
import resource
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from bridge import spool as spool_module
from bridge.buffer import BufferFull, StorageError
from bridge.spool import SpoolError, SQLiteSpool
from bridge.statefiles import corrupt_counts
from gateway.errors import SinkError
from gateway.types import Message

ROOT = Path(__file__).resolve().parents[2]
SOAK = os.environ.get("FIELDGATE_SOAK") == "1"

# A writer that adds batches of random size in a loop and reports each returned add on stdout as
# "<last id> <messages of this run so far>". Message k of run r has topic "r<r>/<k>", sampled_ms k,
# and a payload "<k>/<end of its batch>/" + filler, so the reader can tell where batches ended.
WRITER = """
import random, sys
from bridge.spool import SQLiteSpool
from gateway.types import Message
path, run, seed, big = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
rng = random.Random(seed)
spool = SQLiteSpool(path, min_free_bytes=0, max_size=10**10, checkpoint_bytes=256 * 1024)
seq = 0
def add(n):
    global seq
    end = seq + n
    items = [(Message(f"r{run}/{k}", f"{k}/{end}/".encode().ljust(120, b"x")), k) for k in range(seq, end)]
    ids = spool.add(items)
    seq = end
    print(ids[-1], seq, flush=True)
while True:
    if big and seq >= 60:
        print("big", flush=True)
        add(big)
        print("done", flush=True)
        big = 0
    add(rng.randint(1, 40))
"""


def start_writer(path: Path, run: int, big: int = 0) -> subprocess.Popen[str]:
    """A writer process on path; returns once it has committed its first batch."""
    proc = subprocess.Popen(
        [sys.executable, "-c", WRITER, str(path), str(run), str(random.randrange(2**32)), str(big)],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        text=True,
    )
    assert proc.stdout is not None
    first = proc.stdout.readline()
    assert first, f"writer died before its first add (rc {proc.poll()})"
    return proc


def kill(proc: subprocess.Popen[str]) -> list[str]:
    """kill -9, then what it reported before it died (complete lines only)."""
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert proc.stdout is not None
    out = proc.stdout.read()
    proc.stdout.close()
    # Each report is one write() far below PIPE_BUF, so a line is either all there or absent.
    return [line for line in out.split("\n") if line]


def check_run(spool: SQLiteSpool, run: int, reported: tuple[int, int] | None, after_id: int) -> tuple[int, int]:
    """Run `run`'s entries form a prefix of what it added, ending on a batch; (entries, last id)."""
    entries = [e for e in spool.take(10**9) if e.message.topic.startswith(f"r{run}/")]
    spool.reject([e.id for e in entries])
    for k, entry in enumerate(entries):
        assert entry.message.topic == f"r{run}/{k}" and entry.sampled_ms == k, "not a prefix, or out of order"
        assert entry.message.payload.startswith(f"{k}/".encode())
    ids = [e.id for e in entries]
    assert ids == sorted(ids) and (not ids or ids[0] > after_id), "ids must grow across restarts"
    if entries:
        end = int(entries[-1].message.payload.split(b"/")[1])
        assert end == len(entries), f"a torn batch: {len(entries)} messages stored, the batch ended at {end}"
    if reported is not None:
        last_id, count = reported
        assert len(entries) >= count, f"add() had returned {count} messages, only {len(entries)} survived"
        assert last_id in ids
    return len(entries), ids[-1] if ids else after_id


@pytest.mark.soak
def test_kill_9_leaves_a_prefix_with_everything_committed(tmp_path: Path) -> None:
    path = tmp_path / "sink.db"
    last_id = 0
    for run in range(60 if SOAK else 4):
        proc = start_writer(path, run)
        time.sleep(random.uniform(0, 0.25))
        lines = kill(proc)
        reported = tuple(map(int, lines[-1].split())) if lines else None
        spool = SQLiteSpool(path, min_free_bytes=0, max_size=10**10)
        try:
            _, last_id = check_run(spool, run, reported, last_id)  # type: ignore[arg-type]
            # Delivered, as far as the next run is concerned: keeps each reopen small.
            spool.accept([e.id for e in spool.take(10**9)])
        finally:
            spool.close()


def test_a_transaction_torn_by_kill_9_is_absent(tmp_path: Path) -> None:
    path = tmp_path / "sink.db"
    big = 300_000
    proc = start_writer(path, 0, big=big)
    assert proc.stdout is not None
    while (line := proc.stdout.readline()) and line.strip() != "big":
        reported = tuple(map(int, line.split()))
    wal = Path(f"{path}-wal")
    before = wal.stat().st_size if wal.exists() else 0
    # Kill once the big transaction has spilled uncommitted pages into the WAL (its page cache is
    # a few MB; the whole batch is tens of MB, so its commit is still far off).
    deadline = time.monotonic() + 20
    while wal.stat().st_size < before + 1024**2:
        assert time.monotonic() < deadline, "the big add never reached the WAL"
        time.sleep(0.002)
    lines = kill(proc)
    assert "done" not in lines, "the big add finished before the kill: make it bigger"
    spool = SQLiteSpool(path, min_free_bytes=0, max_size=10**10)
    try:
        count, _ = check_run(spool, 0, reported, 0)  # type: ignore[arg-type]
        assert count == reported[1]  # all of the big batch is absent
    finally:
        spool.close()


def test_a_commit_torn_by_a_power_cut_is_absent(tmp_path: Path) -> None:
    """A WAL whose last frames never made it to the disk: the last transaction is gone, no more."""
    spool = SQLiteSpool(tmp_path / "a.db", min_free_bytes=0, checkpoint_bytes=2**40)
    for k in range(3):
        spool.add([(Message(f"t/{k}", bytes([k]) * 1000), k) for _ in range(10)])
    cut = tmp_path / "cut"
    cut.mkdir()
    shutil.copy(tmp_path / "a.db", cut / "a.db")
    wal = (tmp_path / "a.db-wal").read_bytes()
    (cut / "a.db-wal").write_bytes(wal[:-100])  # the tail of the last commit is lost
    spool.close()
    reopened = SQLiteSpool(cut / "a.db", min_free_bytes=0)
    entries = reopened.take(100)
    assert [e.id for e in entries] == list(range(1, 21))
    assert [e.sampled_ms for e in entries] == [0] * 10 + [1] * 10
    assert reopened.add([(Message("t/new", b""), 9)]) == [21]  # the lost ids are handed out again
    reopened.close()


def consistent(spool: SQLiteSpool, added: list[int]) -> None:
    """The spool holds exactly the ids whose add() returned, in order."""
    assert spool.stats().count == len(added)
    taken = spool.take(10**9)
    spool.reject([e.id for e in taken])
    assert [e.id for e in taken] == added


class Mount:
    """A mounted tmpfs and the spools opened on it, which are closed before it is unmounted."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.spools: list[SQLiteSpool] = []

    def spool(self, name: str, **kwargs: Any) -> SQLiteSpool:
        """A spool in file `name` on the mount, closed at the end whatever the test's outcome."""
        spool = SQLiteSpool(self.path / name, **kwargs)
        self.spools.append(spool)
        return spool


@contextlib.contextmanager
def tmpfs(path: Path, size: str) -> Iterator[Mount]:
    """A small tmpfs mounted on path (root only); skips the test where it cannot be mounted.

    Unmounted whatever the test's outcome: a failed test leaves its spool open (the traceback holds it), and
    an open file keeps the mount busy.
    """
    path.mkdir()
    res = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)], capture_output=True)
    if res.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {res.stderr.decode().strip()}")
    mount = Mount(path)
    try:
        yield mount
    finally:
        for spool in mount.spools:
            with contextlib.suppress(Exception):  # closing a spool on a full disk may fail: unmounted anyway
                spool.close()
        if subprocess.run(["umount", str(path)], capture_output=True).returncode != 0:
            # Still busy (a file opened some other way): detached now, gone once the file is closed.
            subprocess.run(["umount", "--lazy", str(path)], check=True)


def test_a_full_disk_fails_the_add_cleanly(tmp_path: Path) -> None:
    corrupt_before = corrupt_counts()["spool"]
    with tmpfs(tmp_path / "small", "1M") as mount:
        d = mount.path
        filler = d / "filler"
        filler.write_bytes(b"\0" * 300_000)
        spool = mount.spool("a.db", min_free_bytes=0, checkpoint_bytes=2**40)
        added: list[int] = []
        with pytest.raises(SpoolError, match="full") as failure:
            for k in range(100):
                added += spool.add([(Message(f"t/{k}", os.urandom(1000)), k) for _ in range(10)])
        # A storage failure (the outbox refuses the whole batch), not corruption: nothing is moved aside.
        assert isinstance(failure.value, StorageError)
        assert not list(d.glob("*.corrupt-*")) and corrupt_counts()["spool"] == corrupt_before
        consistent(spool, added)
        filler.unlink()  # room again: the same spool goes on
        added += spool.add([(Message("t/after", b"x"), 0)])
        consistent(spool, added)
        spool.close()
        reopened = mount.spool("a.db", min_free_bytes=0)
        consistent(reopened, added)
        reopened.close()


def test_the_floor_keeps_the_filesystem_from_filling(tmp_path: Path) -> None:
    with tmpfs(tmp_path / "small", "2M") as mount:
        d = mount.path
        spool = mount.spool("a.db", min_free_bytes=1024 * 1024, when_full="reject")
        with pytest.raises(SinkError, match="below the floor"):
            for k in range(1000):
                spool.add([(Message(f"t/{k}", b"x" * 1000), k) for _ in range(10)])
        st = os.statvfs(d)
        assert st.f_bavail * st.f_frsize > 512 * 1024  # stopped near the floor, far from ENOSPC
        spool.close()


class Clock:
    """The spool's wall clock, moved by the test only."""

    def __init__(self, now: float = 1_700_000_000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


_STATVFS = os.statvfs  # the test's own look, not counted where a test counts the spool's


# What the spool promises about its free-disk floor (bridge/spool.py): others' writes are seen within a
# second, and within 1 MiB of the floor every add looks again.
CHECK_INTERVAL = 1.0
SLACK = 1024**2


def free(path: Path) -> int:
    """Free bytes on path's filesystem, as the spool reckons them."""
    st = _STATVFS(path)
    return st.f_bavail * st.f_frsize


def test_the_floor_holds_exactly_against_the_spools_own_writes(tmp_path: Path) -> None:
    """The clock stands still, so the spool never looks again for time's sake: its own writes must make it look."""
    with tmpfs(tmp_path / "small", "6M") as mount:
        floor = free(mount.path) - 2 * SLACK  # about 2 MiB above it, to be written by the spool itself
        spool = mount.spool("a.db", min_free_bytes=floor, when_full="reject", clock=Clock())
        accepted = 0
        for k in range(1000):
            before = free(mount.path)
            try:
                spool.add([(Message(f"t/{k}", os.urandom(1000)), k) for _ in range(10)])
            except BufferFull as full:
                assert "below the floor" in str(full)
                assert before < floor, f"refused with {before - floor} bytes above the floor"
                break
            assert before >= floor, f"add {k} accepted {floor - before} bytes below the floor"
            accepted += 1
        else:
            pytest.fail("the spool never reached the floor")
        assert accepted >= 20  # the spool wrote its way down to the floor before it stopped


def test_the_floor_sees_what_others_wrote_within_the_check_interval(tmp_path: Path) -> None:
    with tmpfs(tmp_path / "small", "8M") as mount:
        clock = Clock()
        floor = 2 * SLACK
        spool = mount.spool("a.db", min_free_bytes=floor, when_full="reject", clock=clock)
        spool.add([(Message("t/0", b"x" * 1000), 0)])
        filler = mount.path / "filler"
        filler.write_bytes(b"\0" * (free(mount.path) - floor // 2))  # another writer takes the disk below the floor
        clock.now += CHECK_INTERVAL
        with pytest.raises(BufferFull, match="below the floor"):
            spool.add([(Message("t/1", b"x" * 1000), 1)])
        filler.unlink()
        assert spool.add([(Message("t/2", b"x" * 1000), 2)]) == [2]  # room again: seen at the next add
        filler.write_bytes(b"\0" * (free(mount.path) - floor // 2))
        clock.now -= 3600  # a clock set back: the last look is no guide to how long ago it was
        with pytest.raises(BufferFull, match="below the floor"):
            spool.add([(Message("t/3", b"x" * 1000), 3)])


def test_the_free_disk_is_looked_at_once_per_interval_far_from_the_floor_and_every_add_near_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    looks: list[float] = []
    statvfs = os.statvfs

    def counted(path: str | os.PathLike[str]) -> os.statvfs_result:
        looks.append(clock.now)
        return statvfs(path)

    monkeypatch.setattr(spool_module.os, "statvfs", counted)
    clock = Clock()
    with tmpfs(tmp_path / "small", "8M") as mount:
        floor = free(mount.path) - 3 * SLACK
        spool = mount.spool("a.db", min_free_bytes=floor, clock=clock)
        for k in range(20):
            spool.add([(Message(f"t/{k}", b"x" * 100), k)])
        assert looks == [clock.now]  # far from the floor: one look for 20 adds
        clock.now += 0.75
        spool.add([(Message("t/20", b"x"), 20)])
        assert len(looks) == 1
        clock.now += 0.25  # exactly the interval since the look
        spool.add([(Message("t/21", b"x"), 21)])
        assert looks == [clock.now - CHECK_INTERVAL, clock.now]
        # Its own writes take it to within SLACK of the floor: from there on, every add looks.
        k = 22
        while free(mount.path) >= floor + SLACK:
            spool.add([(Message(f"t/{k}", os.urandom(1000)), k) for _ in range(64)])
            k += 1
        near = len(looks)
        for i in range(5):
            spool.add([(Message(f"t/{k + i}", b"x"), k + i)])
        assert len(looks) == near + 5


def test_a_filesystem_that_cannot_be_asked_does_not_refuse_on_account_of_the_floor(tmp_path: Path) -> None:
    folder = tmp_path / "state"
    clock = Clock()
    spool = SQLiteSpool(folder / "a.db", min_free_bytes=2**40, clock=clock)  # a floor far above any disk
    try:
        with pytest.raises(BufferFull, match="below the floor"):
            spool.add([(Message("t/0", b"x"), 0)])
        shutil.rmtree(folder)  # its open files live on; statvfs of the folder now fails
        clock.now += CHECK_INTERVAL
        for k in range(1, 4):
            assert spool.add([(Message(f"t/{k}", b"x"), k)]) == [k]
        assert [e.sampled_ms for e in spool.take(10)] == [1, 2, 3]
    finally:
        spool.close()


def test_an_io_error_fails_the_add_cleanly(tmp_path: Path) -> None:
    """Without root: a file-size limit makes the WAL write fail with EFBIG."""
    spool = SQLiteSpool(tmp_path / "a.db", min_free_bytes=0, checkpoint_bytes=2**40)
    added = spool.add([(Message("t/0", b"x" * 500), 0) for _ in range(20)])
    limits = resource.getrlimit(resource.RLIMIT_FSIZE)
    old_handler = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    resource.setrlimit(resource.RLIMIT_FSIZE, ((tmp_path / "a.db-wal").stat().st_size + 4096, limits[1]))
    try:
        with pytest.raises(SpoolError, match="cannot write"):
            spool.add([(Message("t/1", b"y" * 500), 1) for _ in range(100)])
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, limits)
        signal.signal(signal.SIGXFSZ, old_handler)
    consistent(spool, added)
    added += spool.add([(Message("t/2", b"z"), 2)])
    consistent(spool, added)
    spool.close()
