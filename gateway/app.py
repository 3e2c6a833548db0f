"""The gateway process: builds every part from the config, runs them, stops them in order."""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import secrets
import signal
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

from bridge.broker import EmbeddedBroker, client_url
from bridge.broker_auth import INTERNAL_USER
from bridge.broker_process import BrokerProcess
from bridge.outbox import Outbox
from bridge.sink import MqttSink
from bridge.spool import SQLiteSpool
from drivers.mcp.server import McpServer
from drivers.modbus.bus import ModbusBus, line_budget
from gateway.audit import AuditLog
from gateway.broker_access import broker_auth
from gateway.config import Loaded
from gateway.config.schema import BusConfig, Config
from gateway.homeassistant import Discovery
from gateway.http import HttpServer
from gateway.router import SUBSCRIPTIONS, DeviceProfile, Router, encode_json
from gateway.simulation import Simulation, resolve_path, start_mcp_simulation, start_simulation
from gateway.systemd import ServiceNotifier
from gateway.types import DeviceState, Message, Sample

log = logging.getLogger(__name__)

METRICS_INTERVAL = 10.0
STOP_FLUSH_TIMEOUT = 3.0
BROKER_DRAIN = 0.2
#: `stop` ends within this, whatever hangs (the issue asks for 10 s; the unit's TimeoutStopSec is 15).
STOP_BUDGET = 9.0
#: Of the budget, kept back from the flush for the sinks' `offline` (2 s at most) and the broker.
STOP_RESERVE = 3.0


def budget_warnings(cfg: Config) -> list[str]:
    """One line per bus whose plan needs more than 80 % of the line's wire time."""
    out = []
    for bus in cfg.modbus.buses:
        b = line_budget(bus)
        if b.overloaded:
            hint = "polls will drift — lengthen `poll` or raise the baud rate"
            out.append(f"modbus bus {bus.name}: poll plan {b.describe()}; {hint}")
    return out


class Gateway:
    """Everything one config describes, running on one event loop."""

    def __init__(self, loaded: Loaded) -> None:
        self.loaded = loaded
        self.cfg = loaded.config
        self.base = Path(loaded.path).resolve().parent
        self.simulation: Simulation | None = None
        self.broker: EmbeddedBroker | BrokerProcess | None = None
        self.sinks: list[MqttSink] = []
        self.outboxes: list[Outbox] = []
        self.buses: list[ModbusBus] = []
        self.mcp: McpServer | None = None
        self.router: Router | None = None
        self.discovery = Discovery(self.cfg)
        self._metrics: asyncio.Task[None] | None = None
        self._stopping = asyncio.Event()
        self.started_at = 0.0
        self.http: HttpServer | None = None
        self.audit: AuditLog | None = None
        self.systemd = ServiceNotifier(self)

    async def start(self) -> None:
        """Start the parts in dependency order: simulator, broker, sinks, router, drivers."""
        cfg = self.cfg
        self.started_at = time.monotonic()
        Path(cfg.gateway.state_dir).mkdir(parents=True, exist_ok=True)
        if cfg.simulator:
            self.simulation = await start_simulation(cfg, self.base)
        if cfg.broker.enabled:
            kind = BrokerProcess if cfg.broker.process == "separate" else EmbeddedBroker
            # Our own sinks log in with a secret made afresh at each start, held only in memory.
            auth = broker_auth(cfg, self.base, secrets.token_urlsafe(32))
            self.broker = kind(cfg.broker.listeners, cert=cfg.broker.cert, key=cfg.broker.key, auth=auth)
            await self.broker.start()

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
        for bus in self.buses:
            await bus.start()
        if self.mcp:
            await self.mcp.start()
            if self.simulation and cfg.simulator and cfg.simulator.mcp:
                await start_mcp_simulation(cfg, self.simulation, self.mcp.port)
        if cfg.gateway.http is not None:
            # After the drivers: the first page and scrape already show every line and device.
            self.http = HttpServer(self, cfg.gateway.http)
            await self.http.start()
        self._metrics = asyncio.create_task(self._metrics_loop(), name="metrics")
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
        cfg = self.cfg
        outbox_of: dict[str, Outbox] = {}
        for s in cfg.northbound:
            url = s.url or client_url(cfg.broker.listeners)
            client_id = s.client_id or f"fieldgate-{cfg.gateway.id}-{s.name}"
            username, password = s.username, s.password
            auth = self.broker.auth if self.broker else None
            if s.url is None and auth is not None and username is None:
                username, password = INTERNAL_USER, auth.internal_password
                # amqtt drops a session's subscriptions when anyone connects with its client id, even a
                # client that then fails to log in: on a broker with users, ours is not guessable.
                client_id = s.client_id or f"{client_id}-{secrets.token_hex(4)}"
            sink = MqttSink(
                s.name,
                url,
                cfg.prefix_for(s),
                client_id=client_id,
                qos=s.qos,
                keepalive=s.keepalive,
                username=username,
                password=password,
                ca=s.ca,
                cert=s.cert,
                key=s.key,
                subscriptions=SUBSCRIPTIONS,
                on_request=functools.partial(self._request, outbox_of, s.name),
                on_connect=functools.partial(self._reconnected, outbox_of, s.name),
            )
            spool = SQLiteSpool(
                cfg.spool_path(s),
                max_size=s.spool.max_size,
                max_age=s.spool.max_age,
                when_full=s.spool.when_full,
                min_free_bytes=s.spool.min_free,
                name=f"sink {s.name} spool",
            )
            outbox_of[s.name] = Outbox(
                sink,
                spool,
                commit_window=s.spool.commit_window,
                replay_rate=s.spool.replay_rate,
                order=s.spool.order,
            )
            self.sinks.append(sink)
            log.info("sink %s: publishing under %s/ on %s", s.name, cfg.prefix_for(s), url)
        self.outboxes = list(outbox_of.values())

    def _build_drivers(self) -> list[DeviceProfile]:
        """The Modbus lines and the MCP server; returns what the router needs to know of each device."""
        profiles = []
        for bus_cfg in self.cfg.modbus.buses:
            bus = ModbusBus(self._bus_config(bus_cfg), self._on_sample, self._on_state)
            self.buses.append(bus)
            for dev in bus_cfg.devices:
                deadbands = {p.name: p.deadband for p in dev.points if p.deadband}
                profiles.append(
                    DeviceProfile(
                        dev.name,
                        dev.full_every,
                        deadbands,
                        bus.write,
                        write_rate=dev.write_rate,
                        write_burst=dev.write_burst,
                    )
                )
        if self.cfg.mcp:
            self.mcp = McpServer(self.cfg.mcp, self._deliver, self._on_state)
            for d in self.cfg.mcp.devices:
                profiles.append(
                    DeviceProfile(
                        d.id,
                        commander=self.mcp.command,
                        every_sample=True,
                        write_rate=d.write_rate,
                        write_burst=d.write_burst,
                    )
                )
        return profiles

    def _bus_config(self, bus: BusConfig) -> BusConfig:
        return bus.model_copy(update={"port": resolve_path(bus.port, self.base)})

    def _on_sample(self, sample: Sample) -> None:
        assert self.router is not None
        self.router.on_sample(sample)

    def _deliver(self, sample: Sample) -> asyncio.Future[Any]:
        assert self.router is not None
        return self.router.deliver(sample)

    def _on_state(self, state: DeviceState) -> None:
        assert self.router is not None
        self.router.on_state(state)

    # Sinks are built before their outboxes and the router exist, so they look them up late.
    def _request(self, outboxes: dict[str, Outbox], sink: str, topic: str, payload: bytes) -> None:
        if self.router is not None:
            self.router.on_request(outboxes[sink], topic, payload)

    async def _reconnected(self, outboxes: dict[str, Outbox], sink: str) -> None:
        if self.router is not None:
            self.discovery.publish(outboxes[sink], sink)
            self.router.republish(outboxes[sink])

    def metrics(self) -> dict[str, object]:
        """Counters and gauges of every part, as published on `P/metrics`."""
        return {
            "uptime_s": round(time.monotonic() - self.started_at, 1),
            "buses": {b.name: asdict(b.stats) for b in self.buses},
            "devices": {
                d.name: {**asdict(d.stats), "online": d.online} for b in self.buses for d in b.devices.values()
            },
            "mcp": {
                "sessions": len(self.mcp.sessions),
                "rejected": self.mcp.rejected,
                **asdict(self.mcp.totals),
                "devices": {d.id: asdict(self.mcp.stats_for(d.id)) for d in self.cfg.mcp.devices}
                if self.cfg.mcp
                else {},
            }
            if self.mcp
            else None,
            "sinks": {
                o.sink.name: {**asdict(s.stats), **o.figures(), "connected": s.connected}
                for o, s in zip(self.outboxes, self.sinks, strict=True)
            },
        }

    async def _metrics_loop(self) -> None:
        while True:
            await asyncio.sleep(METRICS_INTERVAL)
            payload = encode_json({"ts": time.time_ns() // 1_000_000, **self.metrics()})
            for outbox in self.outboxes:
                outbox.submit(Message("metrics", payload))

    async def stop(self) -> None:
        """Stop polling, publish what is queued and the offline states, then close everything (within STOP_BUDGET)."""
        deadline = time.monotonic() + STOP_BUDGET
        await self.systemd.stopping()
        if self.http:
            # First: no scrape or page should read parts that are half stopped.
            await self.http.stop()
        if self._metrics:
            self._metrics.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._metrics
        if self.simulation:
            await self.simulation.stop_mcp()
        for bus in self.buses:
            await bus.stop()
        if self.mcp:
            await self.mcp.stop()
        if self.router:
            await self.router.stop()
            for name, view in self.router.devices.items():
                if view.online:
                    for outbox in self.outboxes:
                        outbox.submit(Message(f"{name}/status", b"offline", retain=True))
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

    def request_stop(self) -> None:
        """Ask `run_forever` to stop (signal handlers call this)."""
        self._stopping.set()

    async def run_forever(self) -> None:
        """Start, run until SIGTERM/SIGINT, stop."""
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self.request_stop)
        try:
            await self.start()
            await self._stopping.wait()
            log.info("stopping")
        finally:
            await self.stop()
