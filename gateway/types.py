"""The few values that cross the boundaries between drivers, the router and the sinks."""

from __future__ import annotations

import re
import time
from dataclasses import dataclass, field
from typing import Any

#: A name that becomes an MQTT topic level (ids, sink names, point and value names): 1-64 of A-Z a-z 0-9 _ . -,
#: not starting with "." or "-". Use it with `fullmatch` only: `match` with "$" lets a trailing newline through.
TOPIC_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]{0,63}")

def now_ms() -> int:
    """The wall clock in unix milliseconds: the unit of every `ts` the gateway publishes or stores."""
    return time.time_ns() // 1_000_000


#: A decoded field value as it is published: JSON scalars only.
Value = bool | int | float | str | None


@dataclass(frozen=True, slots=True)
class Sample:
    """Values read from one device at one moment (`ts` in unix ms, taken at the field)."""

    device: str
    ts: int
    values: dict[str, Value]


@dataclass(frozen=True, slots=True)
class DeviceState:
    """A device went online or offline."""

    device: str
    online: bool
    reason: str = ""


#: Marks a Message topic as absolute: published as it is, not under the sink's prefix (Home
#: Assistant discovery). Kept in the topic string, not a flag, so that it survives the spool.
ABSOLUTE = "/"


def absolute(topic: str) -> str:
    """The Message topic that publishes on `topic` itself, outside the sink's prefix."""
    return ABSOLUTE + topic


@dataclass(frozen=True, slots=True)
class Message:
    """One MQTT message for a sink; `topic` is relative to the sink's prefix unless made `absolute`."""

    topic: str
    payload: bytes
    retain: bool = False
    qos: int | None = None  # None: the sink's own QoS
    ts: int | None = None  # unix ms the content was sampled at (kept through the spool); None: when queued


@dataclass(frozen=True, slots=True)
class Write:
    """A request to write one point of one device."""

    device: str
    point: str
    value: Any
    origin: str = ""  # who asked (sink name, client id), for the audit log later


@dataclass(frozen=True, slots=True)
class WriteResult:
    """The outcome of a Write; `value` is what the device holds after the write when read back."""

    ok: bool
    value: Any = None
    error: str | None = None


@dataclass(frozen=True, slots=True)
class Command:
    """A named command for a device (MCP devices)."""

    device: str
    name: str
    args: dict[str, Any] = field(default_factory=dict)
    id: str | None = None


@dataclass(frozen=True, slots=True)
class CommandResult:
    """The outcome of a Command, as the device (or the gateway on its behalf) reported it."""

    ok: bool
    result: Any = None
    error: str | None = None
