"""The gateway process: builds every part from the config, runs them, stops them in order."""

from __future__ import annotations

import asyncio
import logging
import secrets
import signal
import time
from collections.abc import Collection
from pathlib import Path
from typing import TYPE_CHECKING

from bridge.broker_process import BrokerProcess
from bridge.outbox import Outbox
from drivers.mcp.server import McpServer
from drivers.modbus.bus import ModbusBus
from drivers.modbus.server import ModbusTcpServer
from gateway.audit import AuditLog
from gateway.broker_access import start_broker
from gateway.clock import ClockWatch
from gateway.config import Loaded
from gateway.config.schema import BusConfig, Config, SinkConfig
from gateway.config.settings import mcp_server, modbus_line
from gateway.event_gate import EventGate
from gateway.health import HEALTH_PARTS, problems
from gateway.homeassistant import Discovery
from gateway.jsonsafe import dumps_safe
from gateway.line_budgets import budget_warnings
from gateway.metrics_topic import METRICS_PARTS, metrics_payload
from gateway.modbus_server import build_modbus_server
from gateway.reload import ConfigDiff, read_for_reload
from gateway.router import Router
from gateway.sinks import Sink, SinkHooks, build_sink, refresh
from gateway.snapshot import ALL_PARTS, GatewaySnapshot, take_snapshot
from gateway.sparkplug_sinks import SparkplugSources
from gateway.supervise import Supervised, Supervisor
from gateway.systemd import ServiceNotifier
from gateway.types import DeviceProfile, Driver, Message, RequestMeta, now_ms

# Imported where a run uses them: amqtt only for a broker inside this process, aiohttp and prometheus-client only
# with `gateway.http` on, pymodbus's server (which imports aiohttp too) only for a simulator.
if TYPE_CHECKING:
    from bridge.broker import EmbeddedBroker
    from gateway.http import HttpServer
    from gateway.simulation import Simulation

log = logging.getLogger(__name__)

METRICS_INTERVAL = 10.0
STOP_FLUSH_TIMEOUT = 3.0
BROKER_DRAIN = 0.2
#: `stop` ends within this, whatever hangs (the issue asks for 10 s; the unit's TimeoutStopSec is 15).
STOP_BUDGET = 9.0
#: Of the budget, kept back from the flush for the sinks' `offline` (2 s at most) and the broker.
STOP_RESERVE = 3.0
#: How long a reload lets a removed or changed sink publish what it holds before the rest is spooled.
RELOAD_FLUSH_TIMEOUT = 1.0


class Gateway:
    """Everything one config describes, running on one event loop."""

    def __init__(self, loaded: Loaded) -> None:
        self.loaded = loaded
        self.cfg = loaded.config
        self.base = Path(loaded.path).resolve().parent
        self.simulation: Simulation | None = None
        self.broker: EmbeddedBroker | BrokerProcess | None = None
        self.sinks: list[Sink] = []
        self.outboxes: list[Outbox] = []
        self.buses: list[ModbusBus] = []
        self.mcp: McpServer | None = None
        self.modbus_server: ModbusTcpServer | None = None
        self.router: Router | None = None
        self.discovery = Discovery(self.cfg)
        self.sparkplug = SparkplugSources(lambda: self.cfg, lambda: self.router, self.snapshot)
        #: Every long-lived task of the gateway's own (sinks, broker child watcher, metrics, reloads, the status
        #: page's sampler) runs under this: restarted with back-off when it fails, and listed in problems().
        self.supervisor = Supervisor()
        # Is the wall clock synchronised, and did it step? The router retains its sync state on P/status/clock.
        self.clock = ClockWatch(self.supervisor, on_change=lambda s: self.router and self.router.clock_changed(s))
        self._metrics: Supervised | None = None
        self._reloads: Supervised | None = None
        self._stopping = asyncio.Event()
        self.started_at = 0.0
        self.http: HttpServer | None = None
        self.audit: AuditLog | None = None
        self.systemd = ServiceNotifier(self.snapshot, self.supervisor)
        self._reload_wanted = asyncio.Event()
        self._reload_lock = asyncio.Lock()
        #: Driver events go to the router through this; while a reload swaps parts they wait in it, in order.
        self.events = EventGate(lambda: self.router)
        # The callbacks every driver is built with (_build_drivers).
        self._on_sample = self.events.on_sample
        self._deliver = self.events.deliver
        self._on_state = self.events.on_state

    async def start(self) -> None:
        """Start the parts in dependency order: simulator, broker, sinks, router, drivers."""
        cfg = self.cfg
        self.started_at = time.monotonic()
        Path(cfg.gateway.state_dir).mkdir(parents=True, exist_ok=True)
        if cfg.simulator:
            from gateway.simulation import start_simulation

            self.simulation = await start_simulation(cfg, self.base)
        # Our own sinks log in with a secret made afresh at each start, held only in memory.
        self.broker = await start_broker(cfg, self.base, secrets.token_urlsafe(32), self.supervisor)

        self._build_sinks()
        audit = cfg.gateway.audit
        self.audit = AuditLog(cfg.gateway.state_dir, max_bytes=audit.max_size, backups=audit.backups)
        self.router = Router(self.outboxes, self._build_drivers(), audit=self.audit)
        for outbox in self.outboxes:
            await outbox.start()
        self.discovery.sync(self.outboxes)  # removals of points gone since the last run; configs on connect
        for sink in self.sinks:
            await sink.start()
        for warning in budget_warnings(cfg):
            log.warning("%s", warning)
        for driver in self.drivers:
            await driver.start()
        if self.mcp and self.simulation and cfg.simulator and cfg.simulator.mcp:
            from gateway.simulation import start_mcp_simulation

            await start_mcp_simulation(cfg, self.simulation, self.mcp.port)
        if cfg.gateway.http is not None:
            # After the drivers: the first page and scrape already show every line and device.
            from gateway.http import HttpServer

            self.http = HttpServer(self.snapshot, cfg.gateway.http, self.supervisor)
            await self.http.start()
        self._metrics = self.supervisor.spawn("metrics", self._metrics_loop)
        self.clock.start()
        # A SIGHUP that came during start-up is carried out now that everything is up.
        self._reloads = self.supervisor.spawn("reload", self._reload_loop)
        log.info(
            "fieldgate %s up: %d Modbus line(s) with %d device(s), %d MCP device(s) allowed, %d sink(s)",
            cfg.gateway.id,
            len(self.buses),
            sum(len(b.devices) for b in self.buses),
            len(cfg.mcp.devices) if cfg.mcp else 0,
            len(self.sinks),
        )
        # Last: systemd starts what is ordered After= us only once the broker, sinks and drivers are up.
        self.systemd.ready()

    def _build_sinks(self) -> None:
        """One MQTT sink and its outbox per `northbound` entry."""
        for s in self.cfg.northbound:
            sink, outbox = self._build_sink(self.cfg, s)
            self.sinks.append(sink)
            self.outboxes.append(outbox)

    def _build_sink(self, cfg: Config, s: SinkConfig) -> tuple[Sink, Outbox]:
        """The MQTT sink of one `northbound` entry and its outbox (see gateway.sinks)."""
        auth = self.broker.auth if self.broker else None
        hooks = SinkHooks(self._request, self._reconnected, self.sparkplug)
        return build_sink(cfg, s, auth=auth, hooks=hooks, supervisor=self.supervisor)

    def _build_drivers(self) -> list[DeviceProfile]:
        """The Modbus lines, the MCP server and the Modbus TCP server; returns what the router needs of each device."""
        self.buses = [self._build_bus(b) for b in self.cfg.modbus.buses]
        if self.cfg.mcp:
            self.mcp = McpServer(mcp_server(self.cfg.mcp), self._deliver, self._on_state)
        self._build_modbus_server(self.cfg)
        return self._profiles()

    def _build_modbus_server(self, cfg: Config) -> None:
        # Over the lines as they run now; writes share the MQTT writes' rate limit and audit log.
        self.modbus_server = build_modbus_server(
            cfg, self.buses, lambda: self.router.requests.admit_write if self.router else None, lambda: self.audit
        )

    def _build_bus(self, bus_cfg: BusConfig) -> ModbusBus:
        return ModbusBus(modbus_line(bus_cfg, self.base), self._on_sample, self._on_state)

    def _profiles(self) -> list[DeviceProfile]:
        """What the router needs to know of each device, as the running drivers have it (writes go through them)."""
        return [profile for driver in self.drivers for profile in driver.profiles()]

    # Sinks are built before their outboxes and the router exist, so they look them up late (and a
    # sink that a reload replaced or removed may still deliver a request: it goes to its successor or nowhere).
    def _outbox(self, sink: str) -> Outbox | None:
        return next((o for o in self.outboxes if o.sink.name == sink), None)

    def _request(self, sink: str, topic: str, payload: bytes, meta: RequestMeta) -> None:
        outbox = self._outbox(sink)
        if self.router is not None and outbox is not None:
            self.router.on_request(outbox, topic, payload, meta)

    async def _reconnected(self, sink: str) -> None:
        outbox = self._outbox(sink)
        if self.router is not None and outbox is not None:
            self.discovery.publish(outbox, sink)
            self.router.republish(outbox)

    @property
    def reloading(self) -> bool:
        """True while a config reload is being applied (lines and sinks may be stopped and rebuilt)."""
        return self._reload_lock.locked()

    @property
    def drivers(self) -> list[Driver]:
        """The field-side drivers: every Modbus line, the MCP server, then the Modbus TCP server (after its lines)."""
        return [*self.buses, *([self.mcp] if self.mcp else []), *([self.modbus_server] if self.modbus_server else [])]

    @property
    def gateway_id(self) -> str:
        """The gateway's id (`gateway.id`)."""
        return self.cfg.gateway.id

    def snapshot(self, parts: Collection[str] = ALL_PARTS) -> GatewaySnapshot:
        """`parts` of the gateway (all unless told) as of now, frozen: what metrics, status page and systemd render."""
        return take_snapshot(self, parts)

    def problems(self, *, lasting: bool = False) -> list[str]:
        """Why the gateway is not healthy now (for /healthz and the systemd watchdog); see gateway.health."""
        return problems(self.snapshot(HEALTH_PARTS), lasting=lasting)

    def metrics(self) -> dict[str, object]:
        """Counters and gauges of every part, as published on `P/metrics`."""
        return metrics_payload(self.snapshot(METRICS_PARTS))

    async def _metrics_loop(self) -> None:
        while True:
            await asyncio.sleep(METRICS_INTERVAL)
            payload = dumps_safe({"ts": now_ms(), **self.metrics()})
            for outbox in self.outboxes:
                outbox.put(Message("metrics", payload))

    async def stop(self) -> None:
        """Stop polling, publish what is queued and the offline states, then close everything (within STOP_BUDGET)."""
        deadline = time.monotonic() + STOP_BUDGET
        # A reload under way finishes first: stopping half-swapped parts would lose the spool's tail.
        async with self._reload_lock:
            await self.supervisor.stop(self._reloads)
        await self.systemd.stopping()
        if self.http:
            # First: no scrape or page should read parts that are half stopped.
            await self.http.stop()
        await self.supervisor.stop(self._metrics)
        if self.simulation:
            await self.simulation.stop_mcp()
        for driver in reversed(self.drivers):  # the Modbus TCP server before the lines its clients wait for
            await driver.stop()
        if self.router:
            await self.router.stop()
            for name, view in self.router.devices.items():
                if view.online:
                    for outbox in self.outboxes:
                        outbox.put(Message(f"{name}/status", b"offline", retain=True))
        # All sinks flush at once, so a dead upstream costs the flush timeout once, not once per sink;
        # what is not acknowledged by then goes to the spools (outbox.stop), which is never cut short.
        flush_for = min(STOP_FLUSH_TIMEOUT, max(0.0, deadline - STOP_RESERVE - time.monotonic()))
        await asyncio.gather(*(outbox.flush(flush_for) for outbox in self.outboxes))
        for outbox in self.outboxes:
            await outbox.stop()
        await asyncio.gather(*(sink.stop() for sink in self.sinks))
        if self.broker:
            # The broker PUBACKs the last `offline` messages before it hands them on: let it.
            await asyncio.sleep(BROKER_DRAIN)
            try:
                async with asyncio.timeout(max(0.5, deadline - time.monotonic())):
                    await self.broker.stop()
            except TimeoutError:
                # It goes with this process: a broker child by PR_SET_PDEATHSIG, and systemd kills the cgroup.
                log.warning("embedded broker did not stop within the stop budget; leaving it to exit with us")
        if self.simulation:
            await self.simulation.stop()
        if self.audit:
            self.audit.close()
        await self.supervisor.stop()  # anything still supervised (nothing, when every part stopped its own)

    def request_stop(self) -> None:
        """Ask `run_forever` to stop (signal handlers call this)."""
        self._stopping.set()

    def request_reload(self) -> None:
        """Ask for the config file to be read again (SIGHUP calls this): after the reload under way, if any."""
        self._reload_wanted.set()

    async def _reload_loop(self) -> None:
        # One reload at a time; requests during one are folded into one more after it.
        while True:
            await self._reload_wanted.wait()
            self._reload_wanted.clear()
            await self.reload()

    async def reload(self, path: str | None = None) -> bool:
        """Read the config file again and apply what changed; a bad file or a restart-only change is refused whole.

        True when the new config is running. Unchanged buses, sinks and MCP sessions are not touched.
        """
        async with self._reload_lock:
            self.systemd.reloading()
            try:
                return await self._reload(path or self.loaded.path)
            except Exception:
                # Half applied is the one state worse than either config: say so plainly.
                log.exception("config reload failed while being applied; restart the gateway to get a known state")
                return False
            finally:
                self.systemd.reloaded()

    async def _reload(self, path: str) -> bool:
        log.info("reloading %s", path)
        checked = await read_for_reload(path, self.cfg, self.base)
        if checked is None:
            return False
        loaded, base, changes = checked
        await self._apply(loaded, base, changes)
        log.info("reload: %s", changes.summary())
        return True

    async def _apply(self, loaded: Loaded, base: Path, changes: ConfigDiff) -> None:
        """Carry out a checked reload: drivers off, swap sinks and devices, drivers on."""
        new = loaded.config
        assert self.router is not None
        gone_buses = set(changes.buses.removed) | set(changes.buses.changed)
        server = self.modbus_server if changes.modbus_server else None
        if server is not None:  # first: it holds the lines, and its clients get no answer from a stopping one
            await server.stop()
        for bus in [b for b in self.buses if b.name in gone_buses]:
            await bus.stop()
        if self.mcp is not None and new.mcp is not None:
            await self.mcp.reconfigure(mcp_server(new.mcp))
        self.base = base
        running = {b.name: b for b in self.buses if b.name not in gone_buses}
        fresh = [self._build_bus(b) for b in new.modbus.buses if b.name not in running]
        self.buses[:] = [running.get(b.name) or next(f for f in fresh if f.name == b.name) for b in new.modbus.buses]
        # Removed and changed sinks publish what they can while live data still flows to them.
        leaving = [o for o in self.outboxes if o.sink.name in changes.sinks.removed + changes.sinks.changed]
        await asyncio.gather(*(o.flush(RELOAD_FLUSH_TIMEOUT) for o in leaving))
        old_sinks = [self.sinks[self.outboxes.index(o)] for o in leaving]
        with self.events.held():
            started = await self._swap_sinks(new, changes)
            self.router.update(self._profiles())
            self.loaded, self.cfg = loaded, new
            refresh(self.sinks)
        await asyncio.gather(*(sink.stop() for sink in old_sinks))
        for _, outbox in started:
            await outbox.start()
        self.discovery = Discovery(new)
        self.discovery.sync(self.outboxes)
        for outbox, sink in zip(self.outboxes, self.sinks, strict=True):
            if sink.connected:
                self.discovery.publish(outbox, sink.name)
        for sink, _ in started:
            await sink.start()
        for bus in fresh:
            await bus.start()
        if changes.modbus_server:
            self._build_modbus_server(new)
            if self.modbus_server is not None:
                await self.modbus_server.start()

    async def _swap_sinks(self, new: Config, changes: ConfigDiff) -> list[tuple[Sink, Outbox]]:
        """Stop the removed and changed sinks' outboxes (spooling what they hold) and build the new ones."""
        for name in changes.sinks.removed + changes.sinks.changed:
            outbox = next(o for o in self.outboxes if o.sink.name == name)
            # Out of every list first: nothing may submit to an outbox once it is stopping.
            i = self.outboxes.index(outbox)
            del self.outboxes[i], self.sinks[i]
            await outbox.stop()
            if name in changes.sinks.removed:
                path = self.cfg.spool_path(next(s for s in self.cfg.northbound if s.name == name))
                kept = f"its spool {path} is kept with {outbox.backlog} message(s)"
                log.info("sink %s removed: %s; a sink of that name added back sends them", name, kept)
        started = []
        for s in new.northbound:
            if s.name in changes.sinks.added or s.name in changes.sinks.changed:
                # On the same spool file as before, if there was one: what it holds is sent by the new sink.
                sink, outbox = self._build_sink(new, s)
                self.sinks.append(sink)
                self.outboxes.append(outbox)
                started.append((sink, outbox))
        return started

    async def run_forever(self) -> None:
        """Start, run until SIGTERM/SIGINT, stop; SIGHUP reloads the config file."""
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self.request_stop)
        # From the start to the end: SIGHUP's default action would kill the gateway. One that comes
        # during start-up is carried out once everything is up; one during shutdown is let go.
        loop.add_signal_handler(signal.SIGHUP, self.request_reload)
        try:
            await self.start()
            await self._stopping.wait()
            log.info("stopping")
        finally:
            await self.stop()
