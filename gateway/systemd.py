"""Life under systemd: READY and STATUS, a watchdog that pings only while the gateway makes progress, STOPPING.

What is sent goes through gateway.sdnotify (outside systemd all of it is a no-op); what is said is
rendered from the gateway's snapshot. See systemd.service(5) (`Type=notify`, `WatchdogSec=`).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable, Sequence

from gateway.health import HEALTH_PARTS, line_stuck, problems
from gateway.sdnotify import (
    notify,
    ready,
    socket_address,
    status,
    stopping,
    watchdog_interval,
    watchdog_ping,
)
from gateway.snapshot import LINES, MCP, MODBUS_SERVER, SINKS, GatewaySnapshot, SnapshotSource
from gateway.supervise import Supervised, Supervisor
from gateway.types import ModbusLineSnapshot

log = logging.getLogger(__name__)

#: How often the one-line STATUS= summary is refreshed.
STATUS_INTERVAL = 10.0
#: The parts of a snapshot the STATUS= line reads.
STATUS_PARTS = (LINES, MCP, SINKS, MODBUS_SERVER)
#: The least lateness of the watchdog's own timer taken as a blocked event loop (tiny test intervals).
MIN_LATENESS = 0.25

#: A progress check: given `time.monotonic()`, what is stuck (one line), or None when all is well.
Check = Callable[[float], str | None]


# --- the watchdog ---------------------------------------------------------------------------------


class Watchdog:
    """Pings systemd every `interval` while the event loop is on time and every check passes; never after a failure."""

    def __init__(
        self, interval: float, checks: Sequence[Check] = (), *, ping: Callable[[], object] = watchdog_ping
    ) -> None:
        self.interval = interval
        # A timer that fires this late means the loop was blocked (or starved) for about that long.
        self.max_lateness = max(interval / 2, MIN_LATENESS)
        self.checks = list(checks)
        self.pings = 0
        #: What was found stuck; once set, no more pings: systemd restarts the gateway at WatchdogSec.
        self.stuck: str | None = None
        self._ping = ping
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        """Start pinging."""
        self._task = asyncio.create_task(self._run(), name="systemd:watchdog")

    async def stop(self) -> None:
        """Stop pinging (at shutdown)."""
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task

    def check(self, now: float, lateness: float) -> str | None:
        """What is stuck, given how late the watchdog's own timer fired; None when the gateway makes progress."""
        if lateness > self.max_lateness:
            return f"the event loop was blocked: the watchdog timer fired {lateness:.2f} s late"
        for check in self.checks:
            stuck = check(now)
            if stuck:
                return stuck
        return None

    async def _run(self) -> None:
        while True:
            due = time.monotonic() + self.interval
            await asyncio.sleep(self.interval)
            now = time.monotonic()
            stuck = self.check(now, now - due)
            if stuck is not None:
                self.stuck = stuck
                log.error("watchdog: %s; no more pings, systemd will restart the gateway", stuck)
                return
            self._ping()
            self.pings += 1


def gateway_healthy(snapshot: SnapshotSource) -> Check:
    """A check that fails with the gateway's first lasting problem (a stuck or ended line, a sink's outbox not
    running, a supervised task that keeps failing); skipped while a reload rebuilds lines and sinks.

    A task's first failures are the supervisor's to fix (it restarts the task within a second or so): they
    show on /healthz, but only one that keeps failing (`problems(lasting=True)`) stops the pings, for
    the pings stop for good and systemd then restarts the whole gateway, Modbus lines and MCP sessions too.
    """

    def check(now: float) -> str | None:
        taken = snapshot(HEALTH_PARTS)
        if taken.reloading:
            return None
        found = problems(taken, lasting=True)
        return found[0] if found else None

    return check


def line_alive(line: Callable[[], ModbusLineSnapshot]) -> Check:
    """A check that fails when a Modbus line's task has not moved for longer than any healthy step takes."""

    def check(now: float) -> str | None:
        return line_stuck(line(), now)

    return check


# --- the gateway under systemd --------------------------------------------------------------------


def _count(n: int, what: str) -> str:
    return f"{n:,} {what}{'' if n == 1 else 's'}"


def status_line(snapshot: GatewaySnapshot) -> str:
    """The gateway in one line: devices online per line, MCP sessions, each sink's state."""
    snapshot.require(*STATUS_PARTS)
    parts = []
    if snapshot.lines:
        devices = [d for line in snapshot.lines for d in line.devices]
        online = sum(1 for d in devices if d.online)
        parts.append(f"{online}/{len(devices)} devices online on {_count(len(snapshot.lines), 'line')}")
    if snapshot.mcp is not None:
        parts.append(_count(len(snapshot.mcp.sessions), "MCP session"))
    if snapshot.modbus_server is not None:
        parts.append(_count(snapshot.modbus_server.connections, "Modbus TCP client"))
    sinks = []
    for sink in snapshot.sinks:
        backlog = sink.backlog
        if sink.connected:
            state = f"up, replaying {backlog:,}" if backlog else "up"
        elif backlog:
            state = f"spooling {backlog:,}"
        else:
            state = "down" if sink.counters["connects"] else "connecting"  # not yet, at READY
        sinks.append(f"{sink.name} {state}")
    if sinks:
        parts.append("sinks: " + "; ".join(sinks))
    return ", ".join(parts) or "running"


class ServiceNotifier:
    """What the gateway tells systemd: READY with a STATUS, fresh STATUS lines, watchdog pings, STOPPING."""

    def __init__(self, snapshot: SnapshotSource, supervisor: Supervisor) -> None:
        self.snapshot = snapshot
        self.supervisor = supervisor
        self.watchdog: Watchdog | None = None
        self._status: Supervised | None = None

    def ready(self) -> None:
        """Everything is up: READY=1, then keep STATUS fresh and start the watchdog if systemd asked for one."""
        if socket_address() is None:
            return
        snapshot = self.snapshot(STATUS_PARTS)
        ready(status_line(snapshot))
        # Supervised like every long-lived task; the watchdog is not: its end (a failure, or stuck) must mean no
        # more pings, so that systemd restarts the gateway, never a restart that pings again.
        self._status = self.supervisor.spawn("systemd:status", self._status_loop)
        interval = watchdog_interval()
        if interval is not None:
            self.watchdog = Watchdog(interval, [gateway_healthy(self.snapshot)])
            self.watchdog.start()
            log.info(
                "systemd watchdog: a ping every %.1f s while the event loop and %s make progress",
                interval,
                _count(len(snapshot.lines), "Modbus line"),
            )

    def reloading(self) -> None:
        """RELOADING=1 (with the MONOTONIC_USEC systemd wants alongside it): a config reload has begun."""
        usec = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
        notify(RELOADING=1, MONOTONIC_USEC=usec, STATUS="reloading the config")

    def reloaded(self) -> None:
        """READY=1 again after a reload, refused or not; the watchdog now watches the lines that run now."""
        ready(status_line(self.snapshot(STATUS_PARTS)))

    async def stopping(self) -> None:
        """STOPPING=1; no more pings or STATUS refreshes (systemd disarms the watchdog while stopping)."""
        stopping("stopping: flushing to the spools, closing sessions")
        if self.watchdog is not None:
            await self.watchdog.stop()
        status_task, self._status = self._status, None
        if status_task is not None:
            await self.supervisor.stop(status_task)

    async def _status_loop(self) -> None:
        while True:
            await asyncio.sleep(STATUS_INTERVAL)
            status(status_line(self.snapshot(STATUS_PARTS)))
