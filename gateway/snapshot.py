"""One frozen view of the whole gateway, and the one builder that reads the gateway's parts to make it.

P/metrics, the Prometheus collector, the status page, /healthz, the watchdog and the systemd status line
all render a `GatewaySnapshot`; none of them reads a driver, outbox, sink or the supervisor itself.
A part whose reading raises is left empty and kept in `unreadable`: each renderer then drops what
needs it (a section, a group of series) and renders the rest.
"""

from __future__ import annotations

import time
from collections.abc import Collection, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any, Protocol

from bridge import statefiles
from gateway.clock import ClockSnapshot
from gateway.supervise import Supervisor
from gateway.types import McpServerSnapshot, ModbusLineSnapshot, ModbusServerSnapshot, Value, now_ms

#: The parts a snapshot reads; each may be `unreadable` on its own.
LINES, MCP, SINKS, DEVICES, TASKS, DROPS, STATE_FILES, BROKER = (
    "lines",
    "mcp",
    "sinks",
    "devices",
    "tasks",
    "drops",
    "state files",
    "broker",
)
MODBUS_SERVER = "modbus server"
CLOCK = "clock"
#: Every part: what a snapshot reads unless asked for fewer (the watchdog reads only what health needs).
ALL_PARTS = (LINES, MCP, SINKS, DEVICES, TASKS, DROPS, STATE_FILES, BROKER, MODBUS_SERVER, CLOCK)


@dataclass(frozen=True, slots=True)
class SinkSnapshot:
    """One northbound sink and its outbox: connection, counters, spool figures, health."""

    name: str
    connected: bool
    counters: dict[str, Any]  # the sink's own (published, connects, ...; a Sparkplug sink's host_online: bool | None)
    figures: dict[str, Any]  # the outbox's and its spool's (queued, spool_messages, dropped, ...)
    backlog: int  # messages in the spool or on their way into it
    problem: str | None  # why its outbox is not running (None: it runs)
    requests_dropped: int  # set/cmd requests from it that no device would see, beyond its limit


@dataclass(frozen=True, slots=True)
class TaskSnapshot:
    """One supervised task: failures so far, and whether it waits for its restart now."""

    name: str
    failures: int
    down: bool


@dataclass(frozen=True, slots=True)
class PublishedDevice:
    """What the router has published of one device: its state and latest values (`latest_ts` in unix ms)."""

    name: str
    online: bool | None
    latest: dict[str, Value]
    latest_ts: int


@dataclass(frozen=True, slots=True)
class GatewaySnapshot:
    """The whole gateway at one moment (`taken_at`: time.monotonic(), `taken_at_ms`: unix ms)."""

    gateway_id: str
    taken_at: float
    taken_at_ms: int
    uptime_s: float
    reloading: bool
    lines: tuple[ModbusLineSnapshot, ...] = ()
    mcp: McpServerSnapshot | None = None
    modbus_server: ModbusServerSnapshot | None = None  # None: no `modbus.server` configured
    sinks: tuple[SinkSnapshot, ...] = ()
    devices: tuple[PublishedDevice, ...] = ()
    tasks: tuple[TaskSnapshot, ...] = ()
    task_problems: tuple[str, ...] = ()  # every supervised task that failed and waits for its restart
    lasting_task_problems: tuple[str, ...] = ()  # of those, the ones that keep failing (what the watchdog acts on)
    values_dropped: int = 0
    state_files_corrupt: dict[str, int] = field(default_factory=dict)
    broker_login_failures: dict[str, int] | None = None  # None: no embedded broker
    clock: ClockSnapshot | None = None  # None: no clock watch (not rendered)
    unreadable: dict[str, BaseException] = field(default_factory=dict)
    read: frozenset[str] = frozenset(ALL_PARTS)  # the parts this snapshot was asked for

    def require(self, *parts: str) -> None:
        """Raise what reading the first of `parts` that could not be read raised; nothing when all were read.

        LookupError for a part this snapshot was not asked for: its fields would only look empty.
        """
        for part in parts:
            if part not in self.read:
                raise LookupError(f"the {part} part was not read into this snapshot")
            if (exc := self.unreadable.get(part)) is not None:
                raise exc


class SnapshotSource(Protocol):
    """What renderers are given instead of the gateway: a call that takes a snapshot of some or all parts."""

    def __call__(self, parts: Collection[str] = ALL_PARTS) -> GatewaySnapshot: ...


# --- the builder -----------------------------------------------------------------------------------


class _Sink(Protocol):
    @property
    def name(self) -> str: ...
    @property
    def connected(self) -> bool: ...
    @property
    def stats(self) -> Any: ...


class _Outbox(Protocol):
    @property
    def sink(self) -> Any: ...
    @property
    def backlog(self) -> int: ...
    def snapshot(self) -> Any: ...
    def health(self, *, loops: bool = True) -> str | None: ...


class _DeviceView(Protocol):
    @property
    def online(self) -> bool | None: ...
    @property
    def latest(self) -> dict[str, Value]: ...
    @property
    def latest_ts(self) -> int: ...


class _Router(Protocol):
    @property
    def devices(self) -> Mapping[str, _DeviceView]: ...
    @property
    def dropped_requests(self) -> Mapping[str, int]: ...
    @property
    def dropped_values(self) -> int: ...


class _Broker(Protocol):
    def login_failures(self) -> dict[str, int]: ...


class _ClockWatch(Protocol):
    def snapshot(self) -> ClockSnapshot: ...


class _Line(Protocol):
    def snapshot(self) -> ModbusLineSnapshot: ...


class _McpServer(Protocol):
    def snapshot(self) -> McpServerSnapshot: ...


class _ModbusServer(Protocol):
    def snapshot(self) -> ModbusServerSnapshot: ...


class GatewayParts(Protocol):
    """The running gateway's parts that a snapshot reads."""

    @property
    def gateway_id(self) -> str: ...
    @property
    def started_at(self) -> float: ...
    @property
    def buses(self) -> Sequence[_Line]: ...
    @property
    def mcp(self) -> _McpServer | None: ...
    @property
    def modbus_server(self) -> _ModbusServer | None: ...
    @property
    def router(self) -> _Router | None: ...
    @property
    def outboxes(self) -> Sequence[_Outbox]: ...
    @property
    def sinks(self) -> Sequence[_Sink]: ...
    @property
    def supervisor(self) -> Supervisor: ...
    @property
    def broker(self) -> _Broker | None: ...

    @property
    def reloading(self) -> bool: ...


def take_snapshot(gw: GatewayParts, parts: Collection[str] = ALL_PARTS) -> GatewaySnapshot:
    """Read `parts` of the gateway (every part unless told), once, now."""
    now = time.monotonic()
    taken = frozenset(parts)
    fields: dict[str, Any] = {}
    unreadable: dict[str, BaseException] = {}

    def read(part: str, reader: Any) -> None:
        if part not in taken:
            return
        try:
            fields.update(reader())
        except Exception as exc:  # one part that cannot be read costs what needs it, not the snapshot
            unreadable[part] = exc

    read(LINES, lambda: {"lines": tuple(bus.snapshot() for bus in gw.buses)})
    read(MCP, lambda: {"mcp": gw.mcp.snapshot() if gw.mcp is not None else None})
    read(MODBUS_SERVER, lambda: {"modbus_server": _modbus_server(gw)})
    read(SINKS, lambda: {"sinks": _sinks(gw)})
    read(DEVICES, lambda: {"devices": _devices(gw.router)})
    read(TASKS, lambda: _tasks(gw.supervisor))
    read(DROPS, lambda: {"values_dropped": gw.router.dropped_values if gw.router else 0})
    read(STATE_FILES, lambda: {"state_files_corrupt": statefiles.corrupt_counts()})
    read(BROKER, lambda: {"broker_login_failures": gw.broker.login_failures() if gw.broker is not None else None})
    read(CLOCK, lambda: {"clock": _clock(gw)})
    return GatewaySnapshot(
        gateway_id=gw.gateway_id,
        taken_at=now,
        taken_at_ms=now_ms(),
        uptime_s=now - gw.started_at,
        reloading=gw.reloading,
        unreadable=unreadable,
        read=taken,
        **fields,
    )


def _clock(gw: GatewayParts) -> ClockSnapshot | None:
    # A gateway without a ClockWatch (none built yet, or a test's parts) has no clock part to show.
    watch: _ClockWatch | None = getattr(gw, "clock", None)
    return watch.snapshot() if watch is not None else None


def _modbus_server(gw: GatewayParts) -> ModbusServerSnapshot | None:
    server = gw.modbus_server
    return server.snapshot() if server is not None else None


def _sinks(gw: GatewayParts) -> tuple[SinkSnapshot, ...]:
    dropped = gw.router.dropped_requests if gw.router else {}
    return tuple(
        SinkSnapshot(
            name=sink.name,
            connected=sink.connected,
            counters=asdict(sink.stats),
            # With what went out dated by a clock known not synchronised (bridge/delivery.py: ClockedPublisher).
            figures={**asdict(outbox.snapshot()), "unsynchronised": _unsynchronised(outbox)},
            backlog=outbox.backlog,
            problem=outbox.health(loops=False),  # its loops run under our supervisor, whose problems name them
            requests_dropped=dropped.get(sink.name, 0),
        )
        for outbox, sink in zip(gw.outboxes, gw.sinks, strict=True)
    )


def _unsynchronised(outbox: _Outbox) -> int:
    # An outbox without the count (a test's stand-in) has sent nothing unsynchronised.
    return int(getattr(getattr(outbox, "stats", None), "unsynchronised", 0))


def _devices(router: _Router | None) -> tuple[PublishedDevice, ...]:
    if router is None:
        return ()
    return tuple(
        PublishedDevice(name, view.online, dict(view.latest), view.latest_ts) for name, view in router.devices.items()
    )


def _tasks(supervisor: Supervisor) -> dict[str, Any]:
    return {
        "tasks": tuple(TaskSnapshot(e.name, e.failures, e.restart_at is not None) for e in supervisor.tasks),
        "task_problems": tuple(supervisor.problems()),
        "lasting_task_problems": tuple(supervisor.problems(lasting=True)),
    }
