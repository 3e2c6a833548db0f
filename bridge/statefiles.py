"""State files that cannot be read: moved aside (never deleted), logged at ERROR, counted, replaced by a fresh one.

The gateway keeps a few files of its own under the state dir: each sink's spool, `homeassistant.json`, each
Sparkplug sink's bdSeq, and the broker users file (written by `fieldgate passwd`). An SD card that starts to
fail turns them into random bytes, truncated files or pages of garbage; none of that may keep Modbus, MCP and
the broker down. The owner of each file decides what "cannot be read" means for it and calls `move_aside`; the
file is renamed to `<name>.corrupt-<unix seconds>` (with its `-wal`/`-shm` companions, for SQLite), so
that nothing the operator might want to rescue is lost, and the gateway starts with a fresh one.
`corrupt_counts()` feeds `fieldgate_state_files_corrupt_total{file}`.

Only the KEEP newest moved-aside copies of each file are kept (older ones are deleted): a card that keeps
failing must not fill the disk with them. For the spool that loses nothing the gateway could use: before a
fresh spool is used, the rows its damaged copy can still give are carried into it (`bridge/spool.py`), so
a copy only holds what could not be read, kept for the operator to rescue by hand while it is among the
newest.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path

log = logging.getLogger(__name__)

#: The files counted, as `fieldgate_state_files_corrupt_total{file}` names them.
FILES = ("spool", "homeassistant", "users", "sparkplug")
#: Moved-aside copies of one file kept at most: a card that keeps failing must not fill the disk with them.
KEEP = 3

_lock = threading.Lock()  # spools move their files aside from worker threads
_counts: dict[str, int] = dict.fromkeys(FILES, 0)


def corrupt_counts() -> dict[str, int]:
    """Files moved aside since start, by kind (`spool`, `homeassistant`, `users`, `sparkplug`), every kind present."""
    with _lock:
        return dict(_counts)


def move_aside(
    path: Path,
    file: str,
    reason: str,
    *,
    companions: Sequence[str] = (),
    clock: Callable[[], float] = time.time,
) -> Path:
    """Rename `path` (and `path + suffix` for each companion) to `<name>.corrupt-<unix seconds>`; the new path.

    OSError if the file itself cannot be renamed (then nothing is counted and it stays where it was); a
    companion that cannot be renamed is only logged. The ERROR line says "corrupt" and the new name.
    """
    stamp = int(clock())
    while True:  # a second file moved aside within the same second takes the next free second
        target = path.with_name(f"{path.name}.corrupt-{stamp}")
        if not any(os.path.lexists(f"{target}{s}") for s in ("", *companions)):
            break
        stamp += 1
    os.rename(path, target)
    for suffix in companions:
        try:
            os.rename(f"{path}{suffix}", f"{target}{suffix}")
        except FileNotFoundError:
            pass
        except OSError as exc:
            log.warning("%s: cannot move %s%s aside: %s", file, path, suffix, exc)
    sync_dir(path.parent)
    with _lock:
        _counts[file] = _counts.get(file, 0) + 1
    log.error("%s file %s is corrupt (%s): moved aside to %s; starting with a fresh one", file, path, reason, target)
    _prune(path, companions)
    return target


def _prune(path: Path, companions: Sequence[str]) -> None:
    """Delete all but the KEEP newest moved-aside copies of `path`."""
    pattern = re.compile(re.escape(path.name) + r"\.corrupt-(\d+)")
    try:
        stamps = sorted(int(m[1]) for p in path.parent.iterdir() if (m := pattern.fullmatch(p.name)))
    except OSError:
        return
    for stamp in stamps[:-KEEP]:
        old = path.with_name(f"{path.name}.corrupt-{stamp}")
        for suffix in ("", *companions):
            with contextlib.suppress(OSError):
                os.unlink(f"{old}{suffix}")
        log.warning("%s: deleted %s, the oldest of more than %d moved-aside copies", path.name, old, KEEP)


def sync_dir(folder: Path) -> None:
    """fsync a directory so that the renames in it are durable (best effort: a card that fails here fails the next
    write too)."""
    with contextlib.suppress(OSError):
        fd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
