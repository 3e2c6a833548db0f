"""The edge node's birth/death sequence number (bdSeq), kept in the state dir across restarts.

Each MQTT connection's will (an NDEATH) and its NBIRTH carry the same bdSeq; the next connection takes the next
number (0-255, wrapping). A host pairs an NDEATH with the NBIRTH it ends by that number, so a restart must not
start again at a number an earlier session still holds: the number is written (atomically, fsynced) before the
connection that uses it is attempted.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
from pathlib import Path

from bridge.statefiles import move_aside, sync_dir

log = logging.getLogger("bridge.sparkplug")


class BdSeqFile:
    """`<state_dir>/sparkplug/<sink>.bdseq`: the bdSeq of the last connection attempted, as decimal text."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.value = self._load()

    def _load(self) -> int | None:
        """The number an earlier run used (None: none, or a file that is not ours, moved aside and counted)."""
        try:
            raw = self.path.read_bytes()[:64]
        except FileNotFoundError:
            return None
        except OSError as exc:
            if exc.errno != errno.EIO:
                log.warning("sparkplug: cannot read %s (%s): bdSeq starts at 0", self.path, exc)
                return None
            self._corrupt(f"cannot be read: {exc}")
            return None
        text = raw.decode("ascii", "replace").strip()
        if not text.isdigit() or not 0 <= int(text) <= 255:
            self._corrupt(f"holds {raw[:20]!r}, not a number 0-255")
            return None
        return int(text)

    def _corrupt(self, reason: str) -> None:
        try:
            move_aside(self.path, "sparkplug", reason)
        except OSError as exc:  # replaced at the next connection all the same
            log.error("sparkplug: %s is corrupt (%s) and cannot be moved aside: %s", self.path, reason, exc)
        return None

    def next(self) -> int:
        """The bdSeq of the next connection: one past the last one's, written down before it is used."""
        self.value = 0 if self.value is None else (self.value + 1) % 256
        tmp = self.path.with_name(self.path.name + ".tmp")
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            with open(tmp, "w", encoding="ascii") as f:
                f.write(f"{self.value}\n")
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, self.path)
            sync_dir(self.path.parent)  # the rename too must survive a power cut, or an old number comes back
        except OSError as exc:
            # The connection goes ahead: a host may then see a number an earlier run used, which is less bad
            # than no data at all. Said each time: a state dir that cannot be written needs looking at.
            log.warning(
                "sparkplug: cannot write %s (%s): bdSeq %d is not kept across a restart", self.path, exc, self.value
            )
            with contextlib.suppress(OSError):
                os.unlink(tmp)
        return self.value
