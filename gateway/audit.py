"""The audit log: JSON lines of write and command requests, under the state dir, rotated by size.

A request that goes to a device gets two lines: one with `"stage": "request"` (and `ok` null) written before the
device is touched, and its outcome after, in a `finally` (the line every request has: refused ones get only
this). A `request` line without an outcome means the gateway stopped or died while the device had it.

Who asked is recorded as the sink the request came in on (`origin`). MQTT 3.1.1 tells a
subscriber nothing about the publisher, so the gateway cannot know the client id or user;
fields a payload carries about its sender (`{"value": v, "by": "..."}`) are the sender's own
claim and are not recorded as an identity. Which users may publish to `set`/`cmd` at all is
the broker's ACL's business.
"""

from __future__ import annotations

import logging
import logging.handlers
import math
import time
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from gateway.jsonsafe import dumps_safe

log = logging.getLogger(__name__)

#: Longest raw payload kept when a request is not JSON.
RAW_PAYLOAD_MAX = 256
#: A record longer than this has each field over FIELD_MAX cut to that (with its length said): requests full of
#: 60 KiB strings would otherwise rotate every earlier record out of the log within seconds.
RECORD_MAX = 4096
FIELD_MAX = 256
FILENAME = "audit.log"


@dataclass(frozen=True, slots=True)
class AuditRecord:
    """One write (`set`) or command (`cmd`) request and its outcome."""

    ts_ns: int  # unix time the request arrived
    origin: str  # the sink it came in on
    topic: str  # the full topic it was published on
    device: str
    action: str  # "set" or "cmd" (MQTT), "write" (a Modbus TCP server client)
    target: str | None  # the point written, or the command's name
    request: Any  # the value asked for, or the command's args
    ok: bool | None  # None: the `request` line, written before the outcome is known
    result: Any = None  # the value read back, or what the device answered
    error: str | None = None
    request_id: str | None = None  # a command's `id`
    raw: bytes | None = None  # the payload, when it was not JSON
    duration_ms: float = 0.0
    stage: str | None = None  # "request" on the line written before the device is touched; None on the outcome

    def to_json(self) -> str:
        """The record as one line of JSON (no newline)."""
        # From whole seconds and microseconds: no float rounding between `time` and `ts`.
        seconds, ns = divmod(self.ts_ns, 1_000_000_000)
        when = datetime.fromtimestamp(seconds, UTC).replace(microsecond=ns // 1000)
        body: dict[str, Any] = {
            "time": when.isoformat(timespec="milliseconds").replace("+00:00", "Z"),
            "ts": self.ts_ns // 1_000_000,
            "origin": self.origin,
            "topic": self.topic,
            "device": self.device,
            "action": self.action,
        }
        if self.stage is not None:
            body["stage"] = self.stage
        if self.action == "cmd":
            body.update(command=self.target, args=self.request, id=self.request_id)
        else:
            body.update(point=self.target, value=self.request)
        if self.raw is not None:
            body["payload"] = self.raw[:RAW_PAYLOAD_MAX].decode("utf-8", errors="replace")
        body.update(ok=self.ok, result=self.result, error=self.error, ms=round(self.duration_ms, 1))
        # Whatever the request held (a lone surrogate, a 10^400 number): the line is written, never skipped.
        try:
            line = dumps_safe(_plain(body)).decode("utf-8")
        except RecursionError:
            # Deeper than any JSON a request can bring (loads_strict stops at 32): recorded as such.
            for key in ("args", "value", "result"):
                if key in body:
                    body[key] = "<nested too deep to record>"
            line = dumps_safe(_plain(body)).decode("utf-8")
        return line if len(line) <= RECORD_MAX else _shortened(body)


def _shortened(body: dict[str, Any]) -> str:
    """The record with each field whose JSON is longer than FIELD_MAX cut to that, saying how long it was."""
    for key, value in body.items():
        text = dumps_safe(_plain(value)).decode("utf-8")
        if len(text) > FIELD_MAX:
            body[key] = f"{text[:FIELD_MAX]}... ({len(text)} characters, cut)"
    return dumps_safe(_plain(body)).decode("utf-8")


def _plain(value: object) -> object:
    # json.loads takes NaN and Infinity, strict JSON has neither: keep what was asked as text.
    if isinstance(value, float) and not math.isfinite(value):
        return repr(value)
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_plain(v) for v in value]
    return value


class _Handler(logging.handlers.RotatingFileHandler):
    """A rotating file handler that reports a failed write once as a warning, not a traceback per line."""

    failed = False

    def handleError(self, record: logging.LogRecord) -> None:  # noqa: N802 - logging's name
        if not self.failed:
            self.failed = True
            log.warning("audit log %s cannot be written; writes and commands go on unaudited", self.baseFilename)


class AuditLog:
    """Appends AuditRecords as JSON lines to `<state_dir>/audit.log`, keeping `backups` rotated files."""

    def __init__(self, state_dir: str | Path, *, max_bytes: int = 1024**2, backups: int = 5) -> None:
        self.path = Path(state_dir) / FILENAME
        self._handler = _Handler(self.path, maxBytes=max_bytes, backupCount=backups, encoding="utf-8")
        self._handler.setFormatter(logging.Formatter("%(message)s"))
        # A logger of its own, outside logging's tree: nothing propagates to the console or the
        # journal, and nothing another part configures on the root logger reaches this file.
        self._logger = logging.Logger("fieldgate.audit", logging.INFO)
        self._logger.addHandler(self._handler)

    def __call__(self, record: AuditRecord) -> None:
        """Append one record (a short synchronous write: requests are rare and rate-limited)."""
        self._logger.info("%s", record.to_json())  # a failed write is _Handler's to report

    def close(self) -> None:
        """Close the file."""
        self._logger.removeHandler(self._handler)
        self._handler.close()


def now_ns() -> int:
    """Unix time in nanoseconds: when a request arrived."""
    return time.time_ns()
