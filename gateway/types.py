"""The few values that cross the boundaries between drivers, the router and the sinks."""

from __future__ import annotations

import math
import re
import secrets
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

#: A name that becomes an MQTT topic level (ids, sink names, point and value names): 1-64 of A-Z a-z 0-9 _ . -,
#: not starting with "." or "-". Use it with `fullmatch` only: `match` with "$" lets a trailing newline through.
TOPIC_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]{0,63}")


def _boot_key() -> int:
    """This boot of the machine as an int64 (Linux's boot_id); a random one per process where it cannot be read."""
    try:
        return int(Path("/proc/sys/kernel/random/boot_id").read_text().strip().replace("-", "")[:15], 16)
    except (OSError, ValueError):
        # Unknown: no other process's monotonic time is taken for this one's (their anchors are not corrected).
        return secrets.randbits(60)


#: A change of wall - monotonic this large is a step of the wall clock (gateway/clock.py's STEP_MIN, in ms).
STEP_MS = 1000


class ProcessClock:
    """The process's clock: wall (unix s) and monotonic (s) time, whether the wall clock is known synchronised (kept
    up to date by the clock watch; None: not known) and this boot's key. One instance, `CLOCK`; tests replace its
    parts (gateway/clock.py: a fake source for a whole gateway) instead of the machine's clock.

    An *anchor* is the monotonic millisecond a wall `ts` stood for when it was taken: ts - (wall - monotonic). The
    monotonic clock does not step, so once the wall clock is set, anchor + (wall - monotonic) is that moment on the
    set clock. It holds within one boot only (the monotonic clock starts again at each).
    """

    def __init__(self, wall: Callable[[], float] = time.time, monotonic: Callable[[], float] = time.monotonic) -> None:
        self.wall = wall
        self.monotonic = monotonic
        self.synchronized: bool | None = None
        self.boot = _boot_key()
        self._offset: int | None = None  # wall - monotonic in ms, as last settled (see _settle)

    def now_ms(self) -> int:
        """The wall clock in unix milliseconds: the monotonic clock's ms plus offset_ms(), so that between steps it
        moves as the monotonic clock does (within a ms of the wall clock's own reading)."""
        mono = math.floor(self.monotonic() * 1000)
        return mono + self._settle(mono)

    def offset_ms(self) -> int:
        """Wall minus monotonic time, in ms: what a step of the wall clock changes, and nothing else."""
        return self._settle(math.floor(self.monotonic() * 1000))

    def _settle(self, mono_ms: int) -> int:
        # Each clock floored to its ms, their difference flickers by one from reading to reading: it is taken as
        # moved only beyond that (a step, or a slewed clock's drift adding up), so a ts corrected without a step
        # since is the ts taken, to the ms, and an anchor is the monotonic clock's own ms (its order theirs).
        raw = math.floor(self.wall() * 1000) - mono_ms
        if self._offset is None or abs(raw - self._offset) > 1:
            self._offset = raw
        return self._offset

    def anchor(self, ts: int) -> int | None:
        """The anchor of a `ts` taken on this clock just now while it is known NOT synchronised; else None.

        Unknown (None: neither timesyncd nor adjtimex could be read) is taken as a clock that is right: nothing
        tells that it will be set, and its samples are then treated as those of a synchronised one."""
        return ts - self.offset_ms() if self.synchronized is False else None

    def corrected(self, ts: int, anchor: int) -> int:
        """`ts`, taken at `anchor`, on the wall clock as it reads now: moved by the steps of it since, to the ms.

        A move of one ms is none: another process of this boot (the gateway restarted) settles wall - monotonic on
        its own readings, which may be the ms either clock floors to apart from the first one's, and a replayed ts
        must stay the sample's ts then. So corrected ts keep the order of their anchors within a ms."""
        moved = anchor + self.offset_ms() - ts
        return ts + moved if abs(moved) > 1 else ts


#: The clock every part of the process reads.
CLOCK = ProcessClock()


def now_ms() -> int:
    """The wall clock in unix milliseconds: the unit of every `ts` the gateway publishes or stores."""
    return CLOCK.now_ms()


#: A decoded field value as it is published: JSON scalars only.
Value = bool | int | float | str | None


@dataclass(frozen=True, slots=True)
class Sample:
    """Values read from one device at one moment (`ts` in unix ms, taken at the field)."""

    device: str
    ts: int
    values: dict[str, Value]
    # `ts` is the device's own (MCP), not the gateway's: never corrected by the gateway's steps. Where the ts came
    # from, not what the sample holds: left out of ==.
    device_clock: bool = field(default=False, compare=False)


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
    anchor: int | None = None  # ts taken while the clock was not known synchronised: its anchor (ProcessClock)


@dataclass(frozen=True, slots=True)
class Write:
    """A request to write one point of one device."""

    device: str
    point: str
    value: Any
    origin: str = ""  # who asked (sink name, client id), for the audit log later
    deadline: float | None = None  # time.monotonic() after which it is refused rather than carried out late


@dataclass(frozen=True, slots=True)
class WriteResult:
    """The outcome of a Write; `value` is what the device holds after the write when read back."""

    ok: bool
    value: Any = None
    error: str | None = None


@dataclass(frozen=True, slots=True)
class RequestMeta:
    """What a set/cmd request brought besides topic and payload, from the sink that took it."""

    max_age: float  # seconds it may be old when carried out: its MQTT 5 message expiry, else max_request_age
    age: float = 0.0  # seconds old on arrival, when it says (an MQTT 5 `ts` user property)
    respond: Callable[[bytes], None] | None = None  # MQTT 5: answers on its response topic too
    expiry_given: bool = False  # max_age is the request's own message expiry


@dataclass(frozen=True, slots=True)
class Command:
    """A named command for a device (MCP devices)."""

    device: str
    name: str
    args: dict[str, Any] = field(default_factory=dict)
    id: str | None = None
    deadline: float | None = None  # time.monotonic() after which it is not sent (again) to the device


@dataclass(frozen=True, slots=True)
class CommandResult:
    """The outcome of a Command, as the device (or the gateway on its behalf) reported it."""

    ok: bool
    result: Any = None
    error: str | None = None


#: How the router reaches a device: a write of one point, or a command (both answered by the driver).
Writer = Callable[[Write], Awaitable[WriteResult]]
Commander = Callable[[Command], Awaitable[CommandResult]]


@dataclass(frozen=True)
class DeviceProfile:
    """What the router needs to know of a device: deadbands, snapshot period, how to write it."""

    name: str
    full_every: float = 60.0
    deadbands: dict[str, float] = field(default_factory=dict)
    writer: Writer | None = None
    commander: Commander | None = None
    every_sample: bool = False  # devices that push (MCP): each sample is published whole
    write_rate: float | None = None  # writes or commands per second; None: unlimited
    write_burst: int = 10
    points: frozenset[str] | None = None  # the configured points; None: the device pushes what it has (MCP)


# --- what a driver reports of itself: frozen copies that P/metrics, /metrics, the status page and systemd render --


@dataclass(frozen=True, slots=True)
class ModbusLineCounters:
    """A Modbus line's counters; `wire_seconds`: its answered reads' frames on the wire (utilisation's numerator)."""

    transactions: int = 0
    timeouts: int = 0
    crc_errors: int = 0
    exceptions: int = 0
    errors: int = 0
    reopen_attempts: int = 0
    passthrough: int = 0  # Modbus TCP server clients' transactions carried out on the line
    passthrough_failed: int = 0
    wire_seconds: float = 0.0


@dataclass(frozen=True, slots=True)
class ModbusDeviceCounters:
    """A Modbus device's counters; `response_counts`: answered reads per response-time bucket (not cumulative)."""

    transactions: int = 0
    timeouts: int = 0
    crc_errors: int = 0
    exceptions: int = 0
    errors: int = 0
    cycles: int = 0
    skipped_cycles: int = 0
    writes: int = 0
    last_response_s: float = 0.0
    response_counts: tuple[int, ...] = ()
    response_sum_s: float = 0.0


@dataclass(frozen=True, slots=True)
class ModbusDeviceSnapshot:
    """One device of a Modbus line: its unit, whether it answers (None: not known yet) and its counters."""

    name: str
    unit: int
    online: bool | None
    counters: ModbusDeviceCounters


@dataclass(frozen=True, slots=True)
class ModbusLineSnapshot:
    """One Modbus line: where it is, its counters and devices, and whether its task runs and moves."""

    name: str
    port: str
    framing: str  # baud rate and character format, "9600 8E1"
    running: bool  # its task has not ended
    stopping: bool  # being stopped (a reload or shutdown): not stuck, going away
    alive_at: float  # time.monotonic() when its task last moved
    alive_limit: float  # the longest one healthy step of its task takes, in seconds
    counters: ModbusLineCounters
    devices: tuple[ModbusDeviceSnapshot, ...]


# --- the Modbus TCP server (issue 14): what its clients asked and how each was answered ---


@dataclass(frozen=True, slots=True)
class ModbusServerSnapshot:
    """The Modbus TCP server that shares the lines with other masters: its connections and answers so far."""

    listen: str  # host:port as configured
    running: bool  # the listener is open
    connections: int  # open now
    accepted: int  # connections accepted, ever
    refused: int  # connections closed at accept: max_connections were open
    malformed: int  # connections closed for a malformed MBAP frame
    cache_hits: int  # reads answered from the raw values the line polled
    passthrough: int  # requests carried out on a line for a client (reads and other functions)
    writes: int  # writes carried out on a line for a client
    busy: int  # answered exception 6: the connection's queue to the line was full, or the write rate spent
    waiting: int  # requests waiting for a line now
    exceptions: dict[int, int]  # exception responses sent, by code (the devices' own included)
    unaudited: int  # refused writes left out of the audit log (a flood of them is bounded)


@dataclass(frozen=True, slots=True)
class McpDeviceCounters:
    """An MCP device's counters across its sessions (or the server's totals over every device)."""

    frames_in: int = 0
    frames_out: int = 0
    crc_errors: int = 0
    nacks_sent: int = 0
    duplicates: int = 0
    sessions_opened: int = 0
    sessions_closed: int = 0
    commands: int = 0
    command_timeouts: int = 0
    rejected_payloads: int = 0
    bad_ts: int = 0


@dataclass(frozen=True, slots=True)
class McpDeviceSnapshot:
    """One configured MCP device: whether it has a session now, and its counters."""

    id: str
    online: bool
    counters: McpDeviceCounters


@dataclass(frozen=True, slots=True)
class McpSessionSnapshot:
    """One open MCP session: the device, its peer's address ("host:port") and the device's counters."""

    device: str
    peer: str
    counters: McpDeviceCounters


@dataclass(frozen=True, slots=True)
class McpServerSnapshot:
    """The MCP server: open sessions (by device id), connections refused or failed, each configured device."""

    sessions: tuple[McpSessionSnapshot, ...]
    devices: tuple[McpDeviceSnapshot, ...]
    pending: int  # connections accepted and not past HELLO now
    rejected: int  # connections refused at max_sessions, ever
    refused: dict[str, int]  # connections closed at accept or HELLO, by reason
    auth_failures: dict[str, int]  # failed HELLOs, by reason
    totals: McpDeviceCounters


#: What any driver reports; a new kind of driver adds its snapshot here and its renderers beside the others.
DriverSnapshot = ModbusLineSnapshot | McpServerSnapshot | ModbusServerSnapshot


class Driver(Protocol):
    """A field-side driver as the gateway runs it (python-can's BusABC): samples leave through the callbacks given
    to its constructor; writes and commands reach its devices through the writers and commanders of `profiles()`."""

    @property
    def name(self) -> str:
        """The driver's name in logs ("rs485-1", "mcp")."""
        ...

    async def start(self) -> None:
        """Open the line or listener and start the driver's task; FieldgateError when it cannot."""
        ...

    async def stop(self) -> None:
        """Stop the task, answer what waits with an error, close the line or listener."""
        ...

    def profiles(self) -> list[DeviceProfile]:
        """What the router needs to know of each of the driver's devices."""
        ...

    def snapshot(self) -> DriverSnapshot:
        """The driver's counters and state as of now (a frozen copy: reading it later sees no later change)."""
        ...
