"""Life under systemd: the sd_notify protocol, a watchdog that pings only while the gateway makes progress, STATUS.

The protocol is a few `KEY=value` lines in one datagram to the Unix socket named by `NOTIFY_SOCKET`
(`@name` is in the abstract namespace). Outside systemd the variable is unset and all of this is a
no-op. See sd_notify(3) and systemd.service(5) (`Type=notify`, `WatchdogSec=`).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
import sys
import time
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, TextIO

if TYPE_CHECKING:
    from drivers.modbus.bus import ModbusBus
    from gateway.app import Gateway
    from gateway.supervise import Supervised

log = logging.getLogger(__name__)

#: How often the one-line STATUS= summary is refreshed.
STATUS_INTERVAL = 10.0
#: The least lateness of the watchdog's own timer taken as a blocked event loop (tiny test intervals).
MIN_LATENESS = 0.25

#: A progress check: given `time.monotonic()`, what is stuck (one line), or None when all is well.
Check = Callable[[float], str | None]


# --- the notify protocol ------------------------------------------------------------------------


def _socket_address() -> str | None:
    raw = os.environ.get("NOTIFY_SOCKET", "")
    if raw.startswith("@"):
        return "\0" + raw[1:]  # Linux abstract namespace
    if raw.startswith("/"):
        return raw
    return None  # unset, or a kind we do not speak (vsock:)


def notify(**fields: object) -> bool:
    """Send `KEY=value` fields (`notify(READY=1, STATUS="...")`) to systemd; False when not under it or not sent."""
    address = _socket_address()
    if address is None or not fields:
        return False
    # One field per line: a value must not smuggle in a line of its own.
    text = "\n".join(f"{key}={str(value).replace(chr(10), ' ')}" for key, value in fields.items())
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
            # Never wait on the event loop: a full queue at systemd's end drops this one message.
            sock.setblocking(False)
            sock.sendto(text.encode(), address)
    except OSError as exc:
        log.debug("sd_notify to %s failed: %s", os.environ.get("NOTIFY_SOCKET"), exc)
        return False
    return True


def ready(status: str | None = None) -> bool:
    """READY=1: start-up is complete (with a first STATUS line when given)."""
    return notify(READY=1, STATUS=status) if status else notify(READY=1)


def status(text: str) -> bool:
    """STATUS=: the one line `systemctl status` shows."""
    return notify(STATUS=text)


def watchdog_ping() -> bool:
    """WATCHDOG=1: the service is alive."""
    return notify(WATCHDOG=1)


def stopping(status: str | None = None) -> bool:
    """STOPPING=1: shutdown has begun."""
    return notify(STOPPING=1, STATUS=status) if status else notify(STOPPING=1)


def watchdog_interval() -> float | None:
    """Seconds between watchdog pings: half of `WATCHDOG_USEC`; None when systemd wants none from this process."""
    try:
        usec = int(os.environ.get("WATCHDOG_USEC", ""))
    except ValueError:
        return None
    if usec <= 0:
        return None
    pid = os.environ.get("WATCHDOG_PID")
    if pid and pid != str(os.getpid()):
        return None  # inherited from the process systemd meant (sd_watchdog_enabled does the same)
    return usec / 2e6


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


def gateway_healthy(gw: Gateway) -> Check:
    """A check that fails with the gateway's first lasting problem (a stuck or ended line, a sink's outbox not
    running, a supervised task that keeps failing); skipped while a reload rebuilds lines and sinks.

    A task's first failures are the supervisor's to fix (it restarts the task within a second or so): they
    show on /healthz, but only one that keeps failing (`Gateway.problems(lasting=True)`) stops the pings, for
    the pings stop for good and systemd then restarts the whole gateway, Modbus lines and MCP sessions too.
    """

    def check(now: float) -> str | None:
        if gw.reloading:
            return None
        problems = gw.problems(lasting=True)
        return problems[0] if problems else None

    return check


def line_alive(bus: ModbusBus) -> Check:
    """A check that fails when a Modbus line's task has not moved for longer than any healthy step takes."""

    def check(now: float) -> str | None:
        idle = now - bus.alive_at
        if idle <= bus.alive_limit or bus.stopping:  # a line being stopped (a reload) is not stuck
            return None
        return (
            f"modbus line {bus.name} ({bus.cfg.port}) has not moved for {idle:.1f} s "
            f"(its longest step is {bus.alive_limit:.1f} s): stuck in I/O"
        )

    return check


# --- the gateway under systemd --------------------------------------------------------------------


def _count(n: int, what: str) -> str:
    return f"{n:,} {what}{'' if n == 1 else 's'}"


def status_line(gw: Gateway) -> str:
    """The gateway in one line: devices online per line, MCP sessions, each sink's state."""
    parts = []
    if gw.buses:
        devices = [d for b in gw.buses for d in b.devices.values()]
        online = sum(1 for d in devices if d.online)
        parts.append(f"{online}/{len(devices)} devices online on {_count(len(gw.buses), 'line')}")
    if gw.mcp is not None:
        parts.append(_count(len(gw.mcp.sessions), "MCP session"))
    sinks = []
    for outbox, sink in zip(gw.outboxes, gw.sinks, strict=True):
        backlog = outbox.backlog
        if sink.connected:
            state = f"up, replaying {backlog:,}" if backlog else "up"
        elif backlog:
            state = f"spooling {backlog:,}"
        else:
            state = "down" if sink.stats.connects else "connecting"  # not yet, at READY
        sinks.append(f"{sink.name} {state}")
    if sinks:
        parts.append("sinks: " + "; ".join(sinks))
    return ", ".join(parts) or "running"


class ServiceNotifier:
    """What the gateway tells systemd: READY with a STATUS, fresh STATUS lines, watchdog pings, STOPPING."""

    def __init__(self, gw: Gateway) -> None:
        self.gw = gw
        self.watchdog: Watchdog | None = None
        self._status: Supervised | None = None

    def ready(self) -> None:
        """Everything is up: READY=1, then keep STATUS fresh and start the watchdog if systemd asked for one."""
        if _socket_address() is None:
            return
        ready(status_line(self.gw))
        # Supervised like every long-lived task; the watchdog is not: its end (a failure, or stuck) must mean no
        # more pings, so that systemd restarts the gateway, never a restart that pings again.
        self._status = self.gw.supervisor.spawn("systemd:status", self._status_loop)
        interval = watchdog_interval()
        if interval is not None:
            self.watchdog = Watchdog(interval, [gateway_healthy(self.gw)])
            self.watchdog.start()
            log.info(
                "systemd watchdog: a ping every %.1f s while the event loop and %s make progress",
                interval,
                _count(len(self.gw.buses), "Modbus line"),
            )

    def reloading(self) -> None:
        """RELOADING=1 (with the MONOTONIC_USEC systemd wants alongside it): a config reload has begun."""
        usec = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
        notify(RELOADING=1, MONOTONIC_USEC=usec, STATUS="reloading the config")

    def reloaded(self) -> None:
        """READY=1 again after a reload, refused or not; the watchdog now watches the lines that run now."""
        ready(status_line(self.gw))

    async def stopping(self) -> None:
        """STOPPING=1; no more pings or STATUS refreshes (systemd disarms the watchdog while stopping)."""
        stopping("stopping: flushing to the spools, closing sessions")
        if self.watchdog is not None:
            await self.watchdog.stop()
        status_task, self._status = self._status, None
        if status_task is not None:
            await self.gw.supervisor.stop(status_task)

    async def _status_loop(self) -> None:
        while True:
            await asyncio.sleep(STATUS_INTERVAL)
            status(status_line(self.gw))


# --- logging to journald --------------------------------------------------------------------------

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
