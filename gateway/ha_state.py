"""The state file of Home Assistant discovery: which discovery topics an earlier run published (`homeassistant.json`).

Written atomically; a file that is not ours is moved aside and counted (bridge.statefiles), never trusted.
"""

from __future__ import annotations

import contextlib
import errno
import json
import logging
import os
from collections.abc import Iterable
from pathlib import Path

from bridge.statefiles import move_aside
from gateway.jsonsafe import loads_strict

# The logger name these lines had before the split (the state file was discovery's):
# journal filters keep working.
log = logging.getLogger("gateway.homeassistant")

STATE_FILE = "homeassistant.json"
#: A state file larger than this is no file of ours: a topic per entity, and thousands of entities take kilobytes.
MAX_STATE_BYTES = 16 * 1024**2


def load_published(path: Path) -> set[str]:
    """The discovery topics an earlier run published (empty when none).

    A file that is not what `save_published` writes (an SD card's garbage, a truncated write) is moved
    aside as `homeassistant.json.corrupt-<unix seconds>` and counted; configs of points removed meanwhile
    then stay in Home Assistant until removed by hand. One that cannot be opened (permissions) is left alone.
    """
    try:
        with open(path, "rb") as f:
            raw = f.read(MAX_STATE_BYTES + 1)
    except FileNotFoundError:
        return set()
    except OSError as exc:
        if exc.errno != errno.EIO:
            log.warning("home assistant: cannot read %s (%s): configs of removed points stay in place", path, exc)
            return set()
        return _corrupt(path, f"cannot be read: {exc}")
    try:
        return _published_topics(raw)
    except ValueError as exc:
        return _corrupt(path, str(exc))


def _published_topics(raw: bytes) -> set[str]:
    """The topics of a state file's contents; ValueError saying why for anything else."""
    if len(raw) > MAX_STATE_BYTES:
        raise ValueError(f"larger than {MAX_STATE_BYTES} bytes")
    data = loads_strict(raw)
    topics = data.get("topics") if isinstance(data, dict) else None
    if not isinstance(topics, list):
        raise ValueError('not {"topics": [...]}')
    for topic in topics:
        # Each is published to (an empty retained payload): it must be a topic paho takes.
        if not isinstance(topic, str) or not topic or len(topic.encode()) > 65535 or any(c in topic for c in "+#\0"):
            raise ValueError(f"{str(topic)[:80]!r} is not a discovery topic")
    return set(topics)


def _corrupt(path: Path, reason: str) -> set[str]:
    try:
        move_aside(path, "homeassistant", reason)
    except OSError as exc:  # it is replaced at the next save all the same
        log.error("home assistant: %s is corrupt (%s) and cannot be moved aside: %s", path, reason, exc)
    return set()


def save_published(path: Path, topics: Iterable[str]) -> None:
    """Remember the published discovery topics, atomically (a power cut leaves the old file or the new)."""
    tmp = path.with_name(path.name + ".tmp")
    try:
        with open(tmp, "w", encoding="utf-8") as f:
            json.dump({"topics": sorted(topics)}, f, indent=1)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as exc:
        log.warning("home assistant: cannot write %s: %s", path, exc)
        with contextlib.suppress(OSError):
            os.unlink(tmp)
