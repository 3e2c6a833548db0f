"""The spool's WAL on the write path: reused in place after a checkpoint, its size bounded, its writes counted."""

from __future__ import annotations

import os
from itertools import pairwise
from pathlib import Path

from bridge.spool import SQLiteSpool
from gateway.types import Message

LIMIT = 64 * 1024


def batch(k: int) -> list[tuple[Message, int]]:
    """Ten messages, as one add() of a short commit window."""
    return [(Message(f"plant/line1/{k}/{i}", os.urandom(100)), i) for i in range(10)]


def test_a_full_wal_is_reused_in_place_not_regrown_and_stays_bounded(tmp_path: Path) -> None:
    path = tmp_path / "spool.db"
    wal = Path(f"{path}-wal")
    spool = SQLiteSpool(path, min_free_bytes=0, checkpoint_bytes=LIMIT)
    try:
        sizes, written = [], []
        for k in range(200):
            before = spool.stats().bytes_written
            spool.add(batch(k))
            sizes.append(wal.stat().st_size)
            written.append(spool.stats().bytes_written - before)
        assert max(sizes) >= LIMIT  # a checkpoint on the write path leaves the WAL file its size
        first_full = next(i for i, size in enumerate(sizes) if size >= LIMIT)
        after = sizes[first_full:]
        # Once the WAL has filled, a commit makes it grow only when it runs past the limit (then the
        # checkpoint and the restart cut it back); a truncating checkpoint would regrow it every commit.
        grew = sum(b > a for a, b in pairwise(after))
        checkpoints = sum(b < a for a, b in pairwise(after))
        assert checkpoints >= 3
        assert grew <= checkpoints + 1
        assert min(after) > 0 and max(sizes) < 2 * LIMIT  # never emptied on the write path, never unbounded
        # Every commit wrote frames, also those into a WAL file that kept its size.
        assert min(written) > 0
    finally:
        spool.close()
    assert not wal.exists() or wal.stat().st_size == 0  # close leaves one file
    reopened = SQLiteSpool(path, min_free_bytes=0)
    try:
        assert reopened.stats().count == 2000
    finally:
        reopened.close()


def test_a_wal_that_reaches_the_checkpoint_size_exactly_is_checkpointed(tmp_path: Path) -> None:
    one = [(Message("plant/line1/0", b"x" * 100), 0)]
    probe = SQLiteSpool(tmp_path / "probe.db", min_free_bytes=0, checkpoint_bytes=2**40)
    try:
        probe.add(one)  # into the empty WAL the open left: the WAL is then exactly what one such add writes
        size = Path(f"{probe.path}-wal").stat().st_size
    finally:
        probe.close()
    spool = SQLiteSpool(tmp_path / "spool.db", min_free_bytes=0, checkpoint_bytes=size)
    try:
        before = spool.stats().fsyncs
        spool.add(one)
        assert spool.stats().fsyncs - before == 2 + 2  # the WAL's header and the commit, then the checkpoint's two
    finally:
        spool.close()
