"""What HELLO and DATA payloads must hold for the gateway to take them (pure; no I/O, the clock passed in).

Every refusal is a `MalformedPayload` (NACK 5) whose message is short and names the field at fault;
attacker-supplied text appears in it only quoted and cut short.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from drivers.mcp.codec import Frame, MalformedPayload
from gateway.types import TOPIC_NAME

#: 2000-01-01T00:00Z in unix milliseconds: no device of this gateway's time sends data older than that.
TS_MIN_MS = 946_684_800_000
#: 10000-01-01T00:00Z: the bound that holds when the gateway's clock cannot judge a ts (it is not synchronised).
TS_MAX_MS = 253_402_300_800_000
#: docs/mcp.md §2: device ids become an MQTT topic level.
DEVICE_ID = re.compile(r"[A-Za-z0-9_.-]{1,64}")
#: Value names become MQTT topic levels and status-page rows: the config's rule for names.
VALUE_NAME = TOPIC_NAME
#: Integers wider than this are not measurements, and no double downstream could hold them.
MAX_INT_BITS = 1024

Value = bool | int | float | str | None


class BadTs(MalformedPayload):
    """A DATA `ts` outside [2000-01-01, the gateway's clock + max_future_ts] (NACK 5, counted as bad_ts); while the
    gateway's clock is known not synchronised, outside [2000-01-01, 9999-12-31]."""


def quoted(text: object, limit: int = 40) -> str:
    """`text` as a short repr for a NACK reason or a log line (never its whole length)."""
    shown = repr(text)
    return shown if len(shown) <= limit else shown[: limit - 3] + "..."


@dataclass(frozen=True, slots=True)
class Hello:
    """A HELLO's fields, checked for form (not yet for the token)."""

    device_id: str
    token: str
    boot_id: str
    heartbeat_s: int


def read_hello(frame: Frame, default_heartbeat_s: int) -> Hello:
    """The HELLO in `frame`; MalformedPayload naming the field when its form is wrong."""
    body = frame.body()
    device_id, token, boot_id = body.get("device_id"), body.get("token"), body.get("boot_id")
    hb = body.get("heartbeat_s", default_heartbeat_s)
    if not isinstance(device_id, str) or not DEVICE_ID.fullmatch(device_id):
        raise MalformedPayload("device_id must be 1-64 of A-Z a-z 0-9 _ . -", frame.seq)
    if not isinstance(token, str) or not isinstance(boot_id, str):
        raise MalformedPayload("token and boot_id must be strings", frame.seq)
    if isinstance(hb, bool) or not isinstance(hb, int) or not 1 <= hb <= 3600:
        raise MalformedPayload("heartbeat_s must be an integer from 1 to 3600", frame.seq)
    return Hello(device_id, token, boot_id, hb)


def read_data(
    frame: Frame, *, now_ms: int, max_future_ms: int | None, max_string: int, max_points: int
) -> tuple[int | None, dict[str, Value]]:
    """The `ts` (None when absent) and `values` of DATA; MalformedPayload (BadTs for `ts`) when they do not fit.

    `max_future_ms` None: the gateway's clock is known not synchronised (a Pi before NTP, perhaps years behind), so
    it cannot say what is in the future: a device's ts is then held to TS_MAX_MS instead.
    """
    body = frame.body()
    ts, values = body.get("ts"), body.get("values")
    if ts is not None:
        if isinstance(ts, bool) or not isinstance(ts, int):
            raise BadTs("ts must be unix milliseconds (an integer)", frame.seq)
        # Compared as Python integers, so a 400-digit ts is refused here and never reaches SQLite or a float.
        if ts < TS_MIN_MS:
            raise BadTs(f"ts {quoted(ts, 24)} is before 2000-01-01", frame.seq)
        if ts > TS_MAX_MS:
            raise BadTs(f"ts {quoted(ts, 24)} is after 9999-12-31", frame.seq)
        if max_future_ms is not None and ts > now_ms + max_future_ms:
            ahead = "more than the allowed max_future_ts ahead of the gateway's clock"
            raise BadTs(f"ts {quoted(ts, 24)} is {ahead}", frame.seq)
    if not isinstance(values, dict) or not values:
        raise MalformedPayload("values must be a non-empty object", frame.seq)
    if len(values) > max_points:
        # Refused before any per-name work: no device may ever have that many names.
        raise MalformedPayload(f"{len(values)} value names in one frame pass max_points ({max_points})", frame.seq)
    for name, value in values.items():
        if not VALUE_NAME.fullmatch(name):
            raise MalformedPayload(f"value name {quoted(name)} is not topic-safe", frame.seq)
        _check_value(name, value, max_string, frame.seq)
    return ts, values


def _check_value(name: str, value: Any, max_string: int, seq: int) -> None:
    if value is None or isinstance(value, bool | float):
        return  # floats come finite from the strict reader
    if isinstance(value, int):
        if value.bit_length() > MAX_INT_BITS:
            raise MalformedPayload(f"value {quoted(name)} is an integer out of range", seq)
        return
    if isinstance(value, str):
        # Characters first: no encoding work for a string that is too long either way.
        if len(value) > max_string or len(value.encode("utf-8", "surrogatepass")) > max_string:
            raise MalformedPayload(f"value {quoted(name)} is longer than max_string ({max_string} bytes)", seq)
        return
    raise MalformedPayload(f"value {quoted(name)} must be a number, string, bool or null", seq)


def new_names(names: Iterable[str], known: set[str], max_points: int, seq: int) -> list[str]:
    """The names not in `known`; MalformedPayload naming max_points when they would take it past `max_points`."""
    fresh = [name for name in names if name not in known]
    if len(known) + len(fresh) > max_points:
        raise MalformedPayload(
            f"{len(fresh)} new value name(s) would pass max_points ({max_points}; this device has {len(known)})",
            seq,
        )
    return fresh
