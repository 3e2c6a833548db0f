"""Log lines for journald: each prefixed with its `<N>` syslog priority, no timestamp (journald stamps them)."""

from __future__ import annotations

import logging
import os
import sys
from typing import TextIO

#: syslog priorities by logging level: what journald files each line under.
_PRIORITIES = ((logging.CRITICAL, 2), (logging.ERROR, 3), (logging.WARNING, 4), (logging.INFO, 6))


def syslog_priority(levelno: int) -> int:
    """The syslog priority of a logging level (`<3>` error, `<4>` warning, `<6>` info, `<7>` debug)."""
    return next((prio for level, prio in _PRIORITIES if levelno >= level), 7)


def stderr_is_journal(stream: TextIO | None = None) -> bool:
    """True when the stream (stderr) is the one systemd connected to journald (`JOURNAL_STREAM=dev:inode`)."""
    expected = os.environ.get("JOURNAL_STREAM", "")
    dev, _, ino = expected.partition(":")
    if not dev or not ino:
        return False
    try:
        st = os.fstat((stream or sys.stderr).fileno())
    except (OSError, ValueError):
        return False
    # A child that inherited the variable but writes to a pipe must not be taken for the service itself.
    return f"{st.st_dev}:{st.st_ino}" == expected


class JournalFormatter(logging.Formatter):
    """Log lines for journald: no timestamp (journald stamps), each line prefixed with its `<N>` syslog priority."""

    def __init__(self) -> None:
        super().__init__("%(levelname)s %(name)s: %(message)s")

    def format(self, record: logging.LogRecord) -> str:
        """The record's lines, every one with the prefix (a traceback keeps the record's level)."""
        prefix = f"<{syslog_priority(record.levelno)}>"
        return "\n".join(prefix + line for line in super().format(record).splitlines())
