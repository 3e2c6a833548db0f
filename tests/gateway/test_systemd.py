"""Life under systemd on real parts: a Unix datagram socket as NOTIFY_SOCKET, a whole gateway on a simulated
line, a Mosquitto upstream frozen with SIGSTOP, systemd-analyze on the unit, the installer staged in a folder."""

from __future__ import annotations

import asyncio
import logging
import os
import re
import shutil
import signal
import socket
import sqlite3
import statistics
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path

import pytest

import gateway.app
import gateway.supervise
import gateway.systemd as sd
from drivers.mcp.server import McpServer
from drivers.modbus.bus import ModbusBus
from gateway.app import Gateway
from gateway.config import load_config
from gateway.config.schema import BusConfig
from gateway.config.settings import modbus_line
from gateway.journal import JournalFormatter
from gateway.snapshot import GatewaySnapshot, SinkSnapshot
from gateway.types import (
    McpDeviceCounters,
    McpServerSnapshot,
    McpSessionSnapshot,
    Message,
    ModbusDeviceCounters,
    ModbusDeviceSnapshot,
    ModbusLineCounters,
    ModbusLineSnapshot,
)

from configs import (
    Section,
    broker,
    config,
    device,
    line,
    mcp,
    mcp_device,
    point,
    sim_line,
    sim_slave,
    simulator,
    sink,
    write,
)
from helpers import free_port, record_queued
from mosquitto import Mosquitto

ROOT = Path(__file__).resolve().parents[2]
UNIT = ROOT / "systemd" / "fieldgate.service"
INSTALL = ROOT / "systemd" / "install.sh"


def write_config(tmp_path: Path, *, northbound: list[Section] | None = None, process: str = "inline") -> Path:
    """The test gateway's config file (the embedded broker on our loop unless `process` says otherwise)."""
    plc = device("plc", 1, poll="100ms", points=[point("ramp", "holding", 0, "uint16")])
    other = device("other", 2, poll="100ms", points=[point("level", "input", 0)])
    ghost = device("ghost", 3, poll="100ms", points=[point("level", "input", 0)])
    ramp = {"wave": "ramp", "min": 0, "max": 60000, "step": 1, "period": "100ms"}
    cfg = config(
        id="sd",
        broker=broker(free_port(), process=process),
        northbound=northbound,
        buses=[line("line", "./ttyA", plc, other, ghost)],
        mcp=mcp(free_port(), devices=[mcp_device("pump-1")]),
        simulator=simulator(
            modbus=[
                sim_line(
                    "./ttyA",
                    sim_slave(1, {"ramp": ramp}),
                    sim_slave(2, {"level": {"value": 7}}),
                    sim_slave(3, dead=True),
                )
            ]
        ),
    )
    return write(cfg, tmp_path)


@asynccontextmanager
async def running(path: Path) -> AsyncIterator[Gateway]:
    """A started gateway, stopped at the end."""
    gw = Gateway(load_config(path))
    await gw.start()
    try:
        yield gw
    finally:
        await gw.stop()


# --- a systemd stand-in: the notify socket --------------------------------------------------------


@dataclass
class Datagram:
    """One notification as systemd would read it, with the monotonic time it arrived."""

    fields: dict[str, str]
    at: float


class NotifySocket:
    """A bound AF_UNIX datagram socket read by a thread, so arrival times stay true while the loop is blocked."""

    def __init__(self, address: str) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(address)
        self.sock.settimeout(0.05)
        self.received: list[Datagram] = []
        self._lock = threading.Lock()
        self._done = threading.Event()
        self._thread = threading.Thread(target=self._read, daemon=True)
        self._thread.start()

    def _read(self) -> None:
        while not self._done.is_set():
            try:
                data = self.sock.recv(4096)
            except TimeoutError:
                continue
            fields = dict(line.split("=", 1) for line in data.decode().splitlines())
            with self._lock:
                self.received.append(Datagram(fields, time.monotonic()))

    def close(self) -> None:
        """Stop reading and close the socket."""
        self._done.set()
        self._thread.join()
        self.sock.close()

    def having(self, key: str) -> list[Datagram]:
        """The notifications that carried `key`."""
        with self._lock:
            return [d for d in self.received if key in d.fields]

    async def wait_for(self, key: str, count: int = 1, timeout: float = 10.0) -> list[Datagram]:
        """Wait until `count` notifications carried `key`; all of them."""
        deadline = time.monotonic() + timeout
        while len(self.having(key)) < count:
            assert time.monotonic() < deadline, f"no {count}× {key} within {timeout} s: {self.received}"
            await asyncio.sleep(0.02)
        return self.having(key)


@pytest.fixture
def notify_socket(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[NotifySocket]:
    """A notify socket in tmp_path, named by NOTIFY_SOCKET; no watchdog unless a test sets WATCHDOG_USEC."""
    path = tmp_path / "notify.sock"
    assert len(str(path)) < 104, "sun_path is 108 bytes"
    monkeypatch.setenv("NOTIFY_SOCKET", str(path))
    monkeypatch.delenv("WATCHDOG_USEC", raising=False)
    monkeypatch.delenv("WATCHDOG_PID", raising=False)
    s = NotifySocket(str(path))
    try:
        yield s
    finally:
        s.close()


@pytest.fixture
def watchdog_400ms(monkeypatch: pytest.MonkeyPatch) -> None:
    """systemd's WatchdogSec=400ms for this process: a ping every 200 ms."""
    monkeypatch.setenv("WATCHDOG_USEC", "400000")
    monkeypatch.setenv("WATCHDOG_PID", str(os.getpid()))


# --- the protocol ---------------------------------------------------------------------------------


def test_without_notify_socket_everything_is_a_no_op(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("NOTIFY_SOCKET", raising=False)
    assert sd.notify(READY=1) is False
    assert sd.ready("up") is False
    monkeypatch.setenv("NOTIFY_SOCKET", "vsock:2:1234")  # a kind we do not speak: not an error either
    assert sd.watchdog_ping() is False


def test_notify_on_a_path_socket_sends_one_datagram_of_fields(notify_socket: NotifySocket) -> None:
    assert sd.ready("all up\nsecond line") is True
    assert sd.status("3/4 devices online") is True
    assert sd.watchdog_ping() is True
    assert sd.stopping() is True
    deadline = time.monotonic() + 2
    while len(notify_socket.received) < 4 and time.monotonic() < deadline:
        time.sleep(0.01)
    assert [d.fields for d in notify_socket.received] == [
        {"READY": "1", "STATUS": "all up second line"},  # a value cannot add a line of its own
        {"STATUS": "3/4 devices online"},
        {"WATCHDOG": "1"},
        {"STOPPING": "1"},
    ]


def test_notify_on_an_abstract_socket(monkeypatch: pytest.MonkeyPatch) -> None:
    name = f"fieldgate-test-{uuid.uuid4().hex}"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as server:
        server.bind("\0" + name)
        server.settimeout(2)
        monkeypatch.setenv("NOTIFY_SOCKET", "@" + name)
        assert sd.notify(READY=1, STATUS="up") is True
        assert server.recv(4096) == b"READY=1\nSTATUS=up"


def test_notify_to_a_socket_nobody_reads_fails_quietly(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("NOTIFY_SOCKET", str(tmp_path / "gone.sock"))
    assert sd.notify(WATCHDOG=1) is False


def test_watchdog_interval_is_half_of_watchdog_usec_for_this_process(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("WATCHDOG_PID", raising=False)
    monkeypatch.delenv("WATCHDOG_USEC", raising=False)
    assert sd.watchdog_interval() is None
    monkeypatch.setenv("WATCHDOG_USEC", "30000000")
    assert sd.watchdog_interval() == 15.0
    monkeypatch.setenv("WATCHDOG_PID", str(os.getpid()))
    assert sd.watchdog_interval() == 15.0
    monkeypatch.setenv("WATCHDOG_PID", str(os.getpid() + 1))  # meant for another process (our parent)
    assert sd.watchdog_interval() is None
    monkeypatch.delenv("WATCHDOG_PID")
    for bad in ("0", "-5", "soon", ""):
        monkeypatch.setenv("WATCHDOG_USEC", bad)
        assert sd.watchdog_interval() is None, bad


POINT = {"name": "p", "table": "holding", "address": 0}


# --- the gateway under systemd --------------------------------------------------------------------


async def test_ready_comes_after_the_drivers_are_up_and_stopping_ends_the_pings(
    tmp_path: Path, notify_socket: NotifySocket, watchdog_400ms: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The MCP server starts last of the drivers; hold it up to see that READY waits for it.
    up: list[float] = []
    real_start = McpServer.start

    async def slow_start(self: McpServer) -> None:
        await asyncio.sleep(0.3)
        await real_start(self)
        up.append(time.monotonic())

    monkeypatch.setattr(McpServer, "start", slow_start)
    gw = Gateway(load_config(write_config(tmp_path)))
    starting = asyncio.create_task(gw.start())
    await asyncio.sleep(0.2)
    assert notify_socket.having("READY") == []
    await starting
    ready = await notify_socket.wait_for("READY", timeout=2)
    assert len(ready) == 1 and up and ready[0].at >= up[0]
    assert all(b._task is not None for b in gw.buses)
    summary = r"\d/3 devices online on 1 line, 0 MCP sessions, sinks: local (up|connecting)"
    assert re.fullmatch(summary, ready[0].fields["STATUS"])
    await notify_socket.wait_for("WATCHDOG", count=2)

    await gw.stop()
    (stopping,) = notify_socket.having("STOPPING")
    await asyncio.sleep(0.5)  # more than two ping intervals
    assert all(d.at < stopping.at for d in notify_socket.having("WATCHDOG")), "pings after STOPPING=1"
    assert stopping.at > ready[0].at


async def test_status_lines_summarise_lines_sessions_and_sinks(
    tmp_path: Path, notify_socket: NotifySocket, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(sd, "STATUS_INTERVAL", 0.1)
    async with running(write_config(tmp_path)):
        # The dead unit is offline after its third failed poll; the other two answer. On a busy machine the
        # first samples can reach the spool before the local sink is up ("replaying n" for a moment): the
        # line must come to the settled state.
        settled = "2/3 devices online on 1 line, 0 MCP sessions, sinks: local up"
        deadline = time.monotonic() + 30
        while not any(d.fields == {"STATUS": settled} for d in notify_socket.having("STATUS")):
            assert time.monotonic() < deadline, notify_socket.having("STATUS")
            await asyncio.sleep(0.05)
    assert notify_socket.having("WATCHDOG") == []  # systemd asked for no watchdog (no WATCHDOG_USEC)


def test_status_line_names_each_sinks_state() -> None:
    def sink(name: str, connected: bool, connects: int, backlog: int) -> SinkSnapshot:
        return SinkSnapshot(name, connected, {"connects": connects}, {}, backlog, None, 0)

    def unit(online: bool | None) -> ModbusDeviceSnapshot:
        return ModbusDeviceSnapshot("d", 1, online, ModbusDeviceCounters())

    units = (unit(True), unit(False), unit(None))
    lines = [ModbusLineSnapshot("l", "/dev/x", "9600 8E1", True, False, 0.0, 1.0, ModbusLineCounters(), units)]
    sinks = (
        sink("local", True, 1, 0),
        sink("cloud", False, 3, 1234),
        sink("backup", True, 2, 56),
        sink("lab", False, 0, 0),
        sink("old", False, 1, 0),
    )
    session = McpSessionSnapshot("p", "127.0.0.1:1", McpDeviceCounters())
    mcp = McpServerSnapshot((session,), (), 0, 0, {}, {}, McpDeviceCounters())
    gw = GatewaySnapshot("g", 0.0, 0, 0.0, False, lines=tuple(lines * 2), mcp=mcp, sinks=sinks)
    assert sd.status_line(gw) == (
        "2/6 devices online on 2 lines, 1 MCP session, sinks: local up; cloud spooling 1,234; "
        "backup up, replaying 56; lab connecting; old down"
    )
    assert sd.status_line(GatewaySnapshot("g", 0.0, 0, 0.0, False)) == "running"


async def test_watchdog_pings_at_half_of_watchdog_usec(
    tmp_path: Path, notify_socket: NotifySocket, watchdog_400ms: None
) -> None:
    async with running(write_config(tmp_path)):
        pings = await notify_socket.wait_for("WATCHDOG", count=6, timeout=5)
    gaps = [b.at - a.at for a, b in zip(pings, pings[1:], strict=False)]
    # Every 200 ms (half of WatchdogSec): a median under 0.3 s tells it from pinging at WatchdogSec (0.4 s) with
    # room for a busy machine's late timers; never more often than the interval (load cannot make it sooner).
    assert 0.17 < statistics.median(gaps) < 0.3, gaps
    assert max(gaps) < 0.4, gaps  # never as late as WatchdogSec itself


async def test_pings_stop_for_good_when_the_event_loop_was_blocked(
    tmp_path: Path, notify_socket: NotifySocket, watchdog_400ms: None, caplog: pytest.LogCaptureFixture
) -> None:
    async with running(write_config(tmp_path)) as gw:
        await notify_socket.wait_for("WATCHDOG", count=2)
        blocked_at = time.monotonic()
        asyncio.get_running_loop().call_soon(time.sleep, 1.0)  # a wedged callback
        await asyncio.sleep(0)
        unblocked_at = time.monotonic()
        assert unblocked_at - blocked_at >= 1.0
        await asyncio.sleep(1.0)  # five ping intervals of a loop that runs fine again
        late = [d for d in notify_socket.having("WATCHDOG") if d.at > blocked_at + 0.05]
        assert late == [], "pinged after the loop was found blocked"
        assert gw.systemd.watchdog is not None and gw.systemd.watchdog.stuck
        assert "event loop was blocked" in gw.systemd.watchdog.stuck
    errors = [r for r in caplog.records if r.levelno == logging.ERROR and r.name == "gateway.systemd"]
    assert len(errors) == 1 and "event loop was blocked" in errors[0].getMessage()


async def test_pings_stop_when_a_modbus_line_is_stuck_in_io(
    tmp_path: Path, notify_socket: NotifySocket, watchdog_400ms: None, caplog: pytest.LogCaptureFixture
) -> None:
    async with running(write_config(tmp_path)) as gw:
        await notify_socket.wait_for("WATCHDOG", count=2)
        bus = gw.buses[0]
        # A serial driver that never returns, whatever timeout it was given.
        hung = asyncio.Event()

        async def read_forever(*args: object, **kwargs: object) -> list[int]:
            await hung.wait()
            return []

        bus.alive_limit = 0.6  # the real limit is seconds (the longest transaction plus slack)
        bus._link.read = read_forever  # type: ignore[method-assign]
        stuck_at = time.monotonic()
        deadline = stuck_at + 5
        while gw.systemd.watchdog is not None and gw.systemd.watchdog.stuck is None:
            assert time.monotonic() < deadline, "the watchdog never noticed the stuck line"
            await asyncio.sleep(0.05)
        noticed = time.monotonic()
        pings = len(notify_socket.having("WATCHDOG"))
        await asyncio.sleep(0.6)
        assert len(notify_socket.having("WATCHDOG")) == pings, "pinged while the line is stuck"
        # Noticed within the line's limit plus one ping interval (and a little scheduling).
        assert noticed - stuck_at < 0.6 + 0.2 + 0.3
        # The same pings went out before the line got stuck: the loop itself was fine.
        assert any(d.at > stuck_at for d in notify_socket.having("WATCHDOG"))
    errors = [r.getMessage() for r in caplog.records if r.levelno == logging.ERROR and r.name == "gateway.systemd"]
    assert len(errors) == 1 and "modbus line line" in errors[0] and "stuck in I/O" in errors[0]


async def test_one_failure_the_supervisor_fixes_shows_on_healthz_but_does_not_stop_the_pings(
    tmp_path: Path, notify_socket: NotifySocket, watchdog_400ms: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(gateway.app, "METRICS_INTERVAL", 0.1)
    async with running(write_config(tmp_path)) as gw:
        await notify_socket.wait_for("WATCHDOG", count=2)
        metrics = gw.metrics
        calls = 0

        def fails_once() -> dict[str, object]:
            nonlocal calls
            calls += 1
            if calls == 1:
                raise RuntimeError("a passing fault")
            return metrics()

        monkeypatch.setattr(gw, "metrics", fails_once)
        deadline = time.monotonic() + 5
        while not any(p.startswith("task metrics: failed") for p in gw.problems()):
            assert time.monotonic() < deadline, "the failed metrics task never showed in problems()"
            await asyncio.sleep(0.02)
        down_at = time.monotonic()
        # The supervisor restarts it after 1 s (five ping intervals); meanwhile the pings go on.
        while gw.problems():
            assert time.monotonic() < deadline, f"the metrics task was never restarted: {gw.problems()}"
            await asyncio.sleep(0.05)
        await asyncio.sleep(0.5)
        assert gw.systemd.watchdog is not None and gw.systemd.watchdog.stuck is None
        during = [d.at for d in notify_socket.having("WATCHDOG") if d.at > down_at]
        assert len(during) >= 6, "the pings stopped while the supervisor was restarting a task"
        assert calls >= 2


async def test_pings_stop_when_a_supervised_task_keeps_failing(
    tmp_path: Path, notify_socket: NotifySocket, watchdog_400ms: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(gateway.app, "METRICS_INTERVAL", 0.1)
    async with running(write_config(tmp_path)) as gw:
        await notify_socket.wait_for("WATCHDOG", count=2)
        gw.supervisor.restart_min, gw.supervisor.restart_max = 0.05, 0.2  # a short test of 1, 2, 4 s ...

        def broken() -> dict[str, object]:
            raise RuntimeError("a bug in a counter")

        monkeypatch.setattr(gw, "metrics", broken)  # the metrics loop now fails at each turn
        deadline = time.monotonic() + 5
        while gw.systemd.watchdog is not None and gw.systemd.watchdog.stuck is None:
            assert time.monotonic() < deadline, "the watchdog kept pinging while the metrics task kept failing"
            await asyncio.sleep(0.05)
        assert gw.systemd.watchdog is not None and gw.systemd.watchdog.stuck is not None
        assert gw.systemd.watchdog.stuck.startswith("task metrics: failed: RuntimeError('a bug in a counter')")
        (entry,) = [e for e in gw.supervisor.tasks if e.name == "metrics"]
        assert entry.streak >= gateway.supervise.LASTING_FAILURES
        pings = len(notify_socket.having("WATCHDOG"))
        await asyncio.sleep(0.5)
        assert len(notify_socket.having("WATCHDOG")) == pings


async def test_an_idle_line_stays_fresh_between_polls_minutes_apart(tmp_path: Path) -> None:
    # A healthy line whose next poll is 10 minutes away must not look stuck to the watchdog.
    cfg = BusConfig.model_validate(
        {
            "name": "slow",
            "port": str(tmp_path / "nothing"),
            "devices": [{"name": "d", "unit": 1, "poll": "10m", "points": [POINT]}],
        }
    )

    class QuickLink:
        connected = True
        last_rx = 0.0  # ModbusLink's: when bytes last came in (never, here)

        async def read(self, *args: object) -> list[int]:
            return [1]

        def close(self) -> None:
            pass

    bus = ModbusBus(modbus_line(cfg), lambda s: None, lambda s: None, link=QuickLink())  # type: ignore[arg-type]
    check = sd.line_alive(bus.snapshot)
    await bus.start()
    try:
        oldest = 0.0
        end = time.monotonic() + 4.0
        while time.monotonic() < end:
            oldest = max(oldest, time.monotonic() - bus.alive_at)
            assert check(time.monotonic()) is None
            await asyncio.sleep(0.05)
        # ALIVE_TICK is 1 s (1.0-1.3 s seen on an idle machine); a task that did not tick would reach the whole
        # 4 s window, so 2.5 s leaves a busy machine room and still tells the two apart.
        assert oldest < 2.5, oldest
        assert bus.stats.transactions == 1  # polled once: the ticks are not polls
        assert 5.0 < bus.alive_limit < 10.0  # the 3 s open, a tick and slack: no false alarm, no endless wait
        # What the check says once the task stops moving.
        assert "modbus line slow" in (check(bus.alive_at + bus.alive_limit + 1) or "")
    finally:
        await bus.stop()


async def test_a_line_waiting_to_reopen_its_port_stays_fresh(tmp_path: Path) -> None:
    # Reopen back-off reaches 30 s; the task must still move every second meanwhile.
    cfg = BusConfig.model_validate(
        {
            "name": "gone",
            "port": str(tmp_path / "ttyUSB9"),
            "devices": [{"name": "d", "unit": 1, "poll": "1s", "points": [POINT]}],
        }
    )
    bus = ModbusBus(modbus_line(cfg), lambda s: None, lambda s: None)
    bus._schedule.reopen_backoff = 16.0  # as after a few failed opens
    await bus.start()
    try:
        await asyncio.sleep(0.3)
        attempts = bus.stats.reopen_attempts
        oldest = 0.0
        end = time.monotonic() + 4.0
        while time.monotonic() < end:
            oldest = max(oldest, time.monotonic() - bus.alive_at)
            await asyncio.sleep(0.05)
        assert attempts == 1 and bus.stats.reopen_attempts == 1  # still backing off
        assert oldest < 2.5, oldest  # ticks every 1 s while it backs off (16 s), as above
    finally:
        await bus.stop()


# --- stopping within 10 s with a dead upstream ------------------------------------------------------


def spooled(path: Path) -> list[tuple[str, bytes]]:
    """(topic, payload) of every message in a spool file, read as it lies on disk."""
    db = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
    try:
        return [(t, bytes(p)) for t, p in db.execute("SELECT topic, payload FROM messages ORDER BY id")]
    finally:
        db.close()


async def test_graceful_stop_within_10_s_with_a_dead_upstream_spools_what_was_queued(
    tmp_path: Path, mosquitto: Mosquitto, notify_socket: NotifySocket
) -> None:
    northbound = [sink("local"), sink("cloud", mosquitto.url)]
    # The broker in its own process, as in production: its stop is part of the 10 s.
    path = write_config(tmp_path, northbound=northbound, process="separate")
    gw = Gateway(load_config(path))
    await gw.start()
    frozen = False
    try:
        cloud = next(o for o in gw.outboxes if o.sink.name == "cloud")
        deadline = time.monotonic() + 10
        while not (cloud.sink.connected and cloud.stats.live > 5):
            assert time.monotonic() < deadline, "the cloud sink never got going"
            await asyncio.sleep(0.05)

        queued: list[Message] = record_queued(cloud)
        # Frozen, not gone: the connection stays up and nothing is ever acknowledged again.
        assert mosquitto.pid is not None
        os.kill(mosquitto.pid, signal.SIGSTOP)
        frozen = True
        # Messages keep being queued for it (about 8 a second): wait for five, not for a fixed 0.6 s.
        deadline = time.monotonic() + 10
        while len(queued) < 5:
            assert time.monotonic() < deadline, f"only {len(queued)} messages queued for the frozen upstream"
            await asyncio.sleep(0.05)
        assert cloud.sink.connected

        started = time.monotonic()
        await gw.stop()
        took = time.monotonic() - started
    finally:
        if frozen and mosquitto.pid is not None:
            os.kill(mosquitto.pid, signal.SIGCONT)
    assert took < 10.0, f"stop took {took:.1f} s"
    assert took > 2.5, f"stop took {took:.1f} s: did the flush wait for the frozen upstream at all?"
    assert notify_socket.having("STOPPING")

    rows = spooled(gw.cfg.spool_path(next(s for s in gw.cfg.northbound if s.name == "cloud")))
    on_disk = set(rows)
    telemetry = [m for m in queued if not m.retain]
    missing = [m.topic for m in telemetry if (m.topic, m.payload) not in on_disk]
    assert telemetry and missing == [], f"{len(missing)} of {len(telemetry)} queued messages not in the spool"
    # The devices that were online went offline on the way out; that too waits in the spool.
    assert ("plc/status", b"offline") in on_disk and ("other/status", b"offline") in on_disk


# --- logging to journald --------------------------------------------------------------------------


def test_journal_formatter_prefixes_every_line_with_its_priority() -> None:
    fmt = JournalFormatter()

    def line(level: int, msg: str, exc: bool = False) -> str:
        exc_info = None
        if exc:
            try:
                raise ValueError("inner")
            except ValueError:
                exc_info = sys.exc_info()
        return fmt.format(logging.LogRecord("fieldgate.x", level, __file__, 1, msg, (), exc_info))

    assert line(logging.ERROR, "boom") == "<3>ERROR fieldgate.x: boom"
    assert line(logging.WARNING, "hm") == "<4>WARNING fieldgate.x: hm"
    assert line(logging.INFO, "up") == "<6>INFO fieldgate.x: up"
    assert line(logging.DEBUG, "d") == "<7>DEBUG fieldgate.x: d"
    assert line(logging.CRITICAL, "c").startswith("<2>")
    traceback = line(logging.ERROR, "failed", exc=True).splitlines()
    assert len(traceback) > 3 and all(x.startswith("<3>") for x in traceback)  # journald files them all as errors


def _log_through_cli(stderr_path: Path, env: dict[str, str]) -> str:
    code = (
        "import logging; from gateway.cli import _setup_logging; _setup_logging('INFO', False); "
        "logging.getLogger('fieldgate.t').warning('line is down'); logging.getLogger('fieldgate.t').info('up')"
    )
    with stderr_path.open("w") as err:
        subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, stderr=err, check=True, timeout=30)
    return stderr_path.read_text()


def test_cli_logs_for_journald_only_when_stderr_is_the_journal_stream(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if k not in ("JOURNAL_STREAM", "INVOCATION_ID")}
    plain = _log_through_cli(tmp_path / "plain.log", env)
    assert re.fullmatch(r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3} WARNING fieldgate.t: line is down\n.* INFO .*\n", plain)

    # systemd's JOURNAL_STREAM names the device and inode of the stream it gave us as stderr.
    target = tmp_path / "journal.log"
    target.touch()
    st = target.stat()
    journal = _log_through_cli(target, {**env, "JOURNAL_STREAM": f"{st.st_dev}:{st.st_ino}"})
    assert journal == "<4>WARNING fieldgate.t: line is down\n<6>INFO fieldgate.t: up\n"

    # Inherited by a process whose stderr goes elsewhere (a pipe, a file): timestamps stay.
    other = _log_through_cli(tmp_path / "other.log", {**env, "JOURNAL_STREAM": f"{st.st_dev}:{st.st_ino}"})
    assert not other.startswith("<") and re.match(r"\d{4}-", other)


# --- the unit and the installer -------------------------------------------------------------------


def unit_lines() -> set[str]:
    """The unit's settings, one `Key=value` per line, without comments."""
    return {x.strip() for x in UNIT.read_text().splitlines() if x.strip() and not x.startswith("#")}


def test_unit_has_what_the_appliance_needs() -> None:
    lines = unit_lines()
    for needed in (
        "Type=notify",
        "NotifyAccess=main",
        "ExecStart=/opt/fieldgate/venv/bin/fieldgate run -c /etc/fieldgate/config.yaml",
        "User=fieldgate",
        "Group=fieldgate",
        "SupplementaryGroups=dialout",
        "StateDirectory=fieldgate",
        "ConfigurationDirectory=fieldgate",
        "ProtectSystem=strict",
        "ProtectHome=yes",
        "PrivateTmp=yes",
        "NoNewPrivileges=yes",
        "RestrictAddressFamilies=AF_UNIX AF_INET AF_INET6",
        "Restart=always",
        "RestartSec=5",
        "WatchdogSec=30",
        "TimeoutStopSec=15",
    ):
        assert needed in lines, needed
    # Each of these would close the serial ports (a device allow-list) or break the gateway.
    for breaks in ("PrivateDevices=", "DevicePolicy=", "DeviceAllow=", "ProtectClock=", "MemoryDenyWriteExecute="):
        assert not any(x.startswith(breaks) for x in lines), breaks
    # The stop budget (gateway.app.STOP_BUDGET) fits well inside what systemd waits.
    from gateway.app import STOP_BUDGET

    assert STOP_BUDGET < 10 < 15


def _analyze() -> str:
    found = shutil.which("systemd-analyze")
    if found is None:
        pytest.skip("systemd-analyze is not installed")
    return found


def test_systemd_analyze_verify_passes(tmp_path: Path) -> None:
    analyze = _analyze()
    # verify insists that ExecStart's binary exists; the venv is not installed here: point it at one that is.
    copy = tmp_path / "fieldgate.service"
    text = UNIT.read_text()
    assert "ExecStart=/opt/fieldgate/venv/bin/fieldgate " in text
    copy.write_text(text.replace("/opt/fieldgate/venv/bin/fieldgate", sys.executable))
    result = subprocess.run([analyze, "verify", str(copy)], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0 and result.stdout == "" and result.stderr == "", result.stdout + result.stderr
    # The shipped file itself: the missing binary is its only complaint.
    original = subprocess.run([analyze, "verify", str(UNIT)], capture_output=True, text=True, timeout=60)
    complaints = [x for x in (original.stdout + original.stderr).splitlines() if x.strip()]
    if Path("/opt/fieldgate/venv/bin/fieldgate").exists():
        assert complaints == []
    else:
        assert complaints == [
            "fieldgate.service: Command /opt/fieldgate/venv/bin/fieldgate is not executable: No such file or directory"
        ]


def test_systemd_analyze_security_rates_the_unit_ok(tmp_path: Path) -> None:
    analyze = _analyze()
    copy = tmp_path / "fieldgate.service"
    copy.write_text(UNIT.read_text().replace("/opt/fieldgate/venv/bin/fieldgate", sys.executable))
    # Exposure 0 (locked down) to 10 (unprotected); the unit scores 2.0 today. Fails if hardening is dropped.
    result = subprocess.run(
        [analyze, "security", "--offline=yes", "--threshold=25", "--no-pager", str(copy)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stdout[-600:] + result.stderr
    assert re.search(r"Overall exposure level for fieldgate.service: [0-2]\.\d", result.stdout), result.stdout[-300:]


PORT_502_LINES = ("AmbientCapabilities=CAP_NET_BIND_SERVICE", "CapabilityBoundingSet=CAP_NET_BIND_SERVICE")


def test_port_502_is_one_uncommenting_away_and_then_the_unit_grants_that_capability_alone(tmp_path: Path) -> None:
    text = UNIT.read_text()
    # Off as shipped: the shipped config's Modbus TCP server listens on 5020.
    assert not any(x.startswith(("AmbientCapabilities=", "CapabilityBoundingSet=CAP")) for x in unit_lines())
    for setting in PORT_502_LINES:
        assert f"\n#{setting}\n" in text, setting
        text = text.replace(f"\n#{setting}\n", f"\n{setting}\n")
    settings = [x for x in text.splitlines() if x and not x.startswith("#")]
    # systemd adds up CapabilityBoundingSet= lines after the last empty one, which resets the set: what holds is
    # what follows it, and an ambient capability outside the bounding set would not be granted.
    bounding = [x.split("=", 1)[1] for x in settings if x.startswith("CapabilityBoundingSet=")]
    reset = max(i for i, value in enumerate(bounding) if value == "")
    assert [value for value in bounding[reset + 1 :] if value] == ["CAP_NET_BIND_SERVICE"]
    ambient = [x.split("=", 1)[1] for x in settings if x.startswith("AmbientCapabilities=")]
    assert ambient == ["CAP_NET_BIND_SERVICE"]
    assert "NoNewPrivileges=yes" in settings  # an ambient capability survives it; setuid binaries still gain none
    analyze = _analyze()
    copy = tmp_path / "fieldgate.service"
    copy.write_text(text.replace("/opt/fieldgate/venv/bin/fieldgate", sys.executable))
    verify = subprocess.run([analyze, "verify", str(copy)], capture_output=True, text=True, timeout=60)
    assert verify.returncode == 0 and verify.stdout == "" and verify.stderr == "", verify.stdout + verify.stderr
    security = subprocess.run(
        [analyze, "security", "--offline=yes", "--threshold=25", "--no-pager", str(copy)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    rating = re.search(r"Overall exposure level for fieldgate.service: [0-2]\.\d", security.stdout)
    assert rating, security.stdout[-300:]


def test_install_sh_is_valid_bash_and_shellcheck_clean() -> None:
    subprocess.run(["bash", "-n", str(INSTALL)], check=True, timeout=30)
    assert os.access(INSTALL, os.X_OK)
    if shutil.which("shellcheck") is None:
        pytest.skip("shellcheck is not installed (bash -n passed)")
    result = subprocess.run(["shellcheck", str(INSTALL)], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stdout


def _install(dest: Path, *args: str, extra_env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "DESTDIR": str(dest), "PYTHON": sys.executable, **(extra_env or {})}
    return subprocess.run(["bash", str(INSTALL), *args], env=env, capture_output=True, text=True, timeout=300)


def test_install_sh_staged_installs_upgrades_keeps_the_config_and_uninstalls(tmp_path: Path) -> None:
    dest = tmp_path / "root"
    # The first run installs only the package: no dependencies fetched, so `fieldgate check` cannot pass yet.
    first = _install(dest, extra_env={"PIP_NO_DEPS": "1"})
    assert first.returncode == 0, first.stdout + first.stderr
    venv = dest / "opt/fieldgate/venv"
    assert (venv / "bin/fieldgate").exists()
    assert list(venv.glob("lib/python3*/site-packages/gateway/systemd.py"))
    config = dest / "etc/fieldgate/config.yaml"
    assert config.stat().st_mode & 0o777 == 0o640
    # /etc is read-only to the service: the simulator's pty link moved to the state directory.
    assert "port: /var/lib/fieldgate/ttySIM0" in config.read_text() and "./var/ttySIM0" not in config.read_text()
    assert (dest / "etc/systemd/system/fieldgate.service").read_text() == UNIT.read_text()
    assert "runs the simulator" in first.stderr
    would = [x.removeprefix("fieldgate-install: would run: ") for x in first.stdout.splitlines() if "would run" in x]
    assert would[0].startswith(("useradd --system --user-group --groups dialout", "usermod --append --groups dialout"))
    assert would[0].endswith(" fieldgate")
    assert would[-3:] == [
        "systemctl daemon-reload",
        "systemctl enable fieldgate.service",
        "systemctl restart fieldgate.service",
    ]

    # Again, as an upgrade, with the dependencies there (the test's own): the config is the technician's now.
    site = next(venv.glob("lib/python3*/site-packages"))
    deps = next(Path(sys.prefix).glob("lib/python3*/site-packages"))
    (site / "zz-test-deps.pth").write_text(f"{deps}\n")
    config.write_text(config.read_text().replace("id: demo", "id: plant-7"))
    second = _install(dest, extra_env={"PIP_NO_DEPS": "1"})
    assert second.returncode == 0, second.stdout + second.stderr
    assert "keeping /etc/fieldgate/config.yaml" in second.stdout
    assert "id: plant-7" in config.read_text()
    assert "does not pass 'fieldgate check'" not in second.stderr, second.stderr  # the installed gateway runs
    assert "ok" in second.stdout

    (dest / "var/lib/fieldgate/spool").mkdir(parents=True)
    (dest / "var/lib/fieldgate/spool/local.sqlite").write_bytes(b"spooled")
    gone = _install(dest, "--uninstall")
    assert gone.returncode == 0, gone.stdout + gone.stderr
    assert not (dest / "opt/fieldgate").exists() and not (dest / "etc/systemd/system/fieldgate.service").exists()
    assert config.exists() and (dest / "var/lib/fieldgate/spool/local.sqlite").exists()
    assert "would run: systemctl disable --now fieldgate.service" in gone.stdout

    purged = _install(dest, "--uninstall", "--purge")
    assert purged.returncode == 0, purged.stdout + purged.stderr
    assert not (dest / "etc/fieldgate").exists() and not (dest / "var/lib/fieldgate").exists()
    assert "would run: userdel fieldgate" in purged.stdout


def test_install_sh_refuses_unknown_arguments(tmp_path: Path) -> None:
    result = _install(tmp_path / "root", "--frobnicate")
    assert result.returncode == 1 and "unknown argument: --frobnicate" in result.stderr
    assert not (tmp_path / "root").exists()
