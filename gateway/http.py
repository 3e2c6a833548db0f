"""`gateway.http`: Prometheus `/metrics`, `/healthz` and a read-only status page, served on the gateway's loop."""

from __future__ import annotations

import asyncio
import html
import logging
import time
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from typing import TYPE_CHECKING, Any

from aiohttp import web
from prometheus_client import CollectorRegistry, ProcessCollector
from prometheus_client.exposition import choose_encoder
from prometheus_client.metrics_core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.registry import Collector
from prometheus_client.utils import floatToGoString

from bridge import statefiles
from drivers.modbus.bus import ModbusBus
from drivers.modbus.device import RESPONSE_BUCKETS
from gateway import __version__
from gateway.config.addresses import split_listen
from gateway.errors import FieldgateError
from gateway.jsonsafe import dumps_safe
from gateway.spool_report import human_age, human_size
from gateway.supervise import Supervised

if TYPE_CHECKING:
    from gateway.app import Gateway

log = logging.getLogger(__name__)

REFRESH_S = 5  # the status page reloads itself this often
UTILISATION_WINDOW = 60.0  # seconds of wire time the utilisation gauge averages over
UTILISATION_SAMPLE = 5.0  # how often the line counters are sampled for it
SHUTDOWN_TIMEOUT = 1.0  # a scrape in progress at stop gets this long


class Utilisation:
    """Each line's wire time / wall time over about the last minute, from samples of its counters."""

    def __init__(self, buses: Iterable[ModbusBus], window: float = UTILISATION_WINDOW) -> None:
        self.buses = list(buses)
        self._samples: deque[tuple[float, dict[str, float]]] = deque()
        self._window = window

    def sample(self, now: float | None = None) -> None:
        """Remember every line's wire time now; drop samples older than the window."""
        now = time.monotonic() if now is None else now
        self._samples.append((now, {b.name: b.stats.wire_seconds for b in self.buses}))
        # Keep one sample at least a window old, so that the ratio covers the whole window.
        while len(self._samples) > 1 and now - self._samples[1][0] >= self._window:
            self._samples.popleft()

    def ratio(self, bus: ModbusBus, now: float | None = None) -> float:
        """Share of the window the line's frames were on the wire (0 before any sample)."""
        now = time.monotonic() if now is None else now
        if not self._samples:
            return 0.0
        since, wire = self._samples[0]
        elapsed = now - since
        if elapsed <= 0:
            return 0.0
        return max(0.0, bus.stats.wire_seconds - wire.get(bus.name, 0.0)) / elapsed


def _counter(name: str, doc: str, labels: list[str]) -> CounterMetricFamily:
    return CounterMetricFamily(f"fieldgate_{name}", doc, labels=labels)


def _gauge(name: str, doc: str, labels: list[str]) -> GaugeMetricFamily:
    return GaugeMetricFamily(f"fieldgate_{name}", doc, labels=labels)


class GatewayCollector(Collector):
    """Reads the gateway's live counters at scrape time: no second set of counters to keep in step."""

    def __init__(self, gateway: Gateway, utilisation: Utilisation) -> None:
        self.gateway = gateway
        self.utilisation = utilisation

    def collect(self) -> Iterator[Metric]:
        """Every series of the gateway, as of now."""
        gw = self.gateway
        info = _gauge("info", "The gateway's id and version (always 1).", ["gateway", "version"])
        info.add_metric([gw.cfg.gateway.id, __version__], 1)
        yield info
        uptime = _gauge("uptime_seconds", "Seconds since the gateway started.", [])
        uptime.add_metric([], time.monotonic() - gw.started_at)
        yield uptime
        for part in (self._lines, self._devices, self._mcp, self._sinks, self._gateway):
            yield from self._guarded(part)

    @staticmethod
    def _guarded(part: Callable[[], Iterator[Metric]]) -> list[Metric]:
        """One part's series, or none (logged) when reading it fails: the rest of the scrape still answers."""
        try:
            return list(part())
        except Exception:
            log.exception("metrics: %s could not be read", part.__name__.strip("_"))
            return []

    def _lines(self) -> Iterator[Metric]:
        counters = {
            "transactions": "Modbus transactions on the line, answered or not.",
            "timeouts": "Transactions without an answer within the response timeout.",
            "crc_errors": "Transactions whose answer never formed a frame with a valid CRC.",
            "exceptions": "Modbus exception responses.",
            "errors": "Answers that did not fit the request (wrong unit, wrong length).",
            "reopen_attempts": "Attempts to (re)open the serial port.",
            "wire_seconds": "Seconds the frames of answered reads took on the wire.",
        }
        families = {k: _counter(f"modbus_line_{k}", doc, ["line"]) for k, doc in counters.items()}
        util = _gauge(
            "modbus_line_utilisation_ratio",
            f"Share of wall time the line's frames were on the wire, over the last {UTILISATION_WINDOW:.0f} s.",
            ["line"],
        )
        now = time.monotonic()
        for bus in self.gateway.buses:
            stats = vars(bus.stats)
            for key, family in families.items():
                family.add_metric([bus.name], stats[key])
            util.add_metric([bus.name], self.utilisation.ratio(bus, now))
        yield from families.values()
        yield util

    def _devices(self) -> Iterator[Metric]:
        counters = {
            "transactions": "Modbus transactions with the device, answered or not.",
            "timeouts": "Transactions without an answer within the response timeout.",
            "crc_errors": "Transactions whose answer never formed a frame with a valid CRC.",
            "exceptions": "Modbus exception responses from the device.",
            "errors": "Answers that did not fit the request.",
            "cycles": "Poll cycles run.",
            "skipped_cycles": "Poll cycles skipped because the line could not start them in time.",
            "writes": "Writes to the device.",
        }
        labels = ["line", "device"]
        families = {k: _counter(f"modbus_device_{k}", doc, labels) for k, doc in counters.items()}
        online = _gauge("modbus_device_online", "1 while the device answers its polls, else 0.", labels)
        response = HistogramMetricFamily(
            "fieldgate_modbus_device_response_seconds",
            "Time from request to answer of the device's answered reads.",
            labels=labels,
        )
        bounds = [floatToGoString(b) for b in RESPONSE_BUCKETS] + ["+Inf"]
        for bus in self.gateway.buses:
            for device in bus.devices.values():
                key = [bus.name, device.name]
                stats = vars(device.stats)
                for name, family in families.items():
                    family.add_metric(key, stats[name])
                online.add_metric(key, 1 if device.online else 0)
                cumulative, buckets = 0, []
                for bound, count in zip(bounds, device.stats.response_counts, strict=True):
                    cumulative += count
                    buckets.append((bound, cumulative))
                response.add_metric(key, buckets, device.stats.response_sum_s)
        yield from families.values()
        yield online
        yield response

    def _mcp(self) -> Iterator[Metric]:
        mcp = self.gateway.mcp
        if mcp is None:
            return
        sessions = _gauge("mcp_sessions", "MCP sessions open now.", [])
        sessions.add_metric([], len(mcp.sessions))
        rejected = _counter("mcp_rejected_connections", "Connections closed at once: max_sessions reached.", [])
        rejected.add_metric([], mcp.rejected)
        yield sessions
        yield rejected
        yield _by_reason("mcp_auth_failures", "Failed HELLOs (NACK 7), by reason.", mcp.auth_failures)
        yield _by_reason(
            "mcp_refused_connections",
            "Connections closed at accept, by reason (max_sessions, max_pending, max_pending_per_ip, banned).",
            mcp.refused,
        )
        pending = _gauge("mcp_pending_connections", "Connections accepted and not past HELLO now.", [])
        pending.add_metric([], mcp.pending)
        yield pending
        counters = {
            "frames_in": "Frames received from the device.",
            "frames_out": "Frames sent to the device.",
            "nacks_sent": "NACKs sent to the device.",
            "crc_errors": "Frames from the device with a bad CRC.",
            "duplicates": "DATA frames received again (already ACKed, not published twice).",
            "sessions_opened": "Sessions the device opened (HELLO accepted).",
            "commands": "Commands sent to the device.",
            "command_timeouts": "Commands the device did not answer in time.",
            "rejected_payloads": "DATA frames refused with NACK 5 (not strict JSON, a bad name, ts, size or count).",
            "bad_ts": "DATA frames refused for a ts before 2000 or beyond the gateway's clock + max_future_ts.",
        }
        families = {k: _counter(f"mcp_{k}", doc, ["device"]) for k, doc in counters.items()}
        online = _gauge("mcp_device_online", "1 while the device has a session, else 0.", ["device"])
        ids = [d.id for d in mcp.cfg.devices]
        for device_id in ids:
            stats = vars(mcp.stats_for(device_id))
            for key, family in families.items():
                family.add_metric([device_id], stats[key])
            online.add_metric([device_id], 1 if device_id in mcp.sessions else 0)
        yield from families.values()
        yield online

    def _sinks(self) -> Iterator[Metric]:
        gauges = {
            "sink_queued": ("queued", "Messages not yet acknowledged by the broker or committed to the spool."),
            "spool_messages": ("spool_messages", "Messages held in the sink's spool."),
            "spool_bytes": ("spool_bytes", "Bytes of the messages held in the sink's spool."),
        }
        counters = {
            "spool_dropped": ("dropped", "Messages dropped: evicted from a full spool, expired, or refused."),
            "spool_commits": ("spool_commits", "Commits to the spool."),
            "spool_fsyncs": ("spool_fsyncs", "fsync calls of the spool."),
            "spool_written_bytes": ("spool_bytes_written", "Bytes written to the spool file."),
            "sink_live": ("live", "Messages acknowledged straight from the live queue."),
            "sink_spooled": ("spooled", "Messages committed to the spool."),
            "sink_replayed": ("replayed", "Messages acknowledged from the spool."),
        }
        g = {name: _gauge(name, doc, ["sink"]) for name, (_, doc) in gauges.items()}
        c = {name: _counter(name, doc, ["sink"]) for name, (_, doc) in counters.items()}
        oldest = _gauge(
            "spool_oldest_age_seconds", "Age of the oldest message in the spool (absent when empty).", ["sink"]
        )
        connected = _gauge("sink_connected", "1 while the sink's broker session is up, else 0.", ["sink"])
        published = _counter("sink_published", "Messages the sink handed to its broker.", ["sink"])
        for outbox, sink in zip(self.gateway.outboxes, self.gateway.sinks, strict=True):
            figures = outbox.figures()
            for name, (key, _) in gauges.items():
                g[name].add_metric([sink.name], figures[key])
            for name, (key, _) in counters.items():
                c[name].add_metric([sink.name], figures[key])
            if figures["spool_oldest_age_s"] is not None:
                oldest.add_metric([sink.name], figures["spool_oldest_age_s"])
            connected.add_metric([sink.name], 1 if sink.connected else 0)
            published.add_metric([sink.name], sink.stats.published)
        yield from g.values()
        yield oldest
        yield from c.values()
        yield connected
        yield published

    def _gateway(self) -> Iterator[Metric]:
        gw = self.gateway
        failures = _counter(
            "task_failures", "Times a supervised task failed (each is restarted with back-off).", ["task"]
        )
        down = _gauge("task_down", "1 while a supervised task waits for its restart after a failure.", ["task"])
        waiting = {e.name for e in gw.supervisor.tasks if e.restart_at is not None}
        for entry in gw.supervisor.tasks:
            failures.add_metric([entry.name], entry.failures)
            down.add_metric([entry.name], 1 if entry.name in waiting else 0)
        yield failures
        yield down
        dropped = _counter(
            "requests_dropped",
            "set/cmd requests no device would see (unknown, none it takes, over its rate) beyond the sink's limit "
            "of 10/s: not audited or answered.",
            ["sink"],
        )
        router = gw.router
        for sink in gw.sinks:
            dropped.add_metric([sink.name], router.dropped_requests.get(sink.name, 0) if router else 0)
        yield dropped
        values = _counter("values_dropped", "Values whose name could not be a topic level: not published.", [])
        values.add_metric([], router.dropped_values if router else 0)
        yield values
        yield _by_reason(
            "state_files_corrupt",
            "State files that could not be read, moved aside as <name>.corrupt-<unix seconds>; started afresh.",
            statefiles.corrupt_counts(),
            label="file",
        )
        if gw.broker is not None:
            refused = gw.broker.login_failures()  # a broker child reports its counts to its BrokerProcess
            yield _by_reason("broker_auth_failures", "Embedded broker logins refused, by reason.", refused)


def _by_reason(name: str, doc: str, counts: dict[str, int], *, label: str = "reason") -> Metric:
    """A counter family with one series per key of `counts`."""
    family = _counter(name, doc, [label])
    for key, value in sorted(counts.items()):
        family.add_metric([key], value)
    return family


class HttpServer:
    """The gateway's HTTP listener: `/metrics` (Prometheus), `/healthz` and `/` (status page)."""

    def __init__(self, gateway: Gateway, listen: str) -> None:
        self.gateway = gateway
        self.listen = listen
        self.port = 0
        self.utilisation = Utilisation(gateway.buses)
        self.registry = CollectorRegistry(auto_describe=False)
        self.registry.register(GatewayCollector(gateway, self.utilisation))
        ProcessCollector(registry=self.registry)  # RSS, CPU, open fds: what a Pi runs short of
        self._runner: web.AppRunner | None = None
        self._sampler: Supervised | None = None

    async def start(self) -> None:
        """Bind and serve; FieldgateError with the address and the reason when it cannot bind."""
        app = web.Application()
        app.router.add_get("/", self._page)
        app.router.add_get("/metrics", self._metrics)
        app.router.add_get("/healthz", self._healthz)
        # No access log: a scrape every 15 s would fill the journal with nothing.
        runner = web.AppRunner(app, access_log=None, shutdown_timeout=SHUTDOWN_TIMEOUT)
        await runner.setup()
        host, port = split_listen(self.listen)  # an empty host: None, every interface to aiohttp
        try:
            await web.TCPSite(runner, host, port).start()
        except OSError as exc:
            await runner.cleanup()
            raise FieldgateError(f"status page cannot listen on {self.listen} (gateway.http): {exc}") from exc
        self._runner = runner
        self.port = int(runner.addresses[0][1])
        self.utilisation.sample()
        self._sampler = self.gateway.supervisor.spawn("http:utilisation", self._sample_loop)
        log.info("status page on http://%s:%d/ (metrics at /metrics)", host or "0.0.0.0", self.port)

    async def stop(self) -> None:
        """Stop listening; a request in progress gets a moment to finish."""
        if self._sampler is not None:
            await self.gateway.supervisor.stop(self._sampler)
            self._sampler = None
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    async def _sample_loop(self) -> None:
        while True:
            await asyncio.sleep(UTILISATION_SAMPLE)
            self.utilisation.sample()

    # --- handlers -----------------------------------------------------------------------------------

    async def _metrics(self, request: web.Request) -> web.Response:
        encoder, content_type = choose_encoder(request.headers.get("Accept", ""))
        return web.Response(body=encoder(self.registry), headers={"Content-Type": content_type})

    async def _healthz(self, request: web.Request) -> web.Response:
        # That this handler runs at all shows the event loop answers; the rest is what can die quietly.
        problems = self.problems()
        if problems:
            return web.Response(status=503, text="\n".join(problems) + "\n")
        return web.Response(text="ok\n")

    async def _page(self, request: web.Request) -> web.Response:
        page = StatusPage(self.gateway, self.utilisation, self.problems()).render()
        # "replace": a string no encoder takes (a lone surrogate) costs one "?" on the page, not the page.
        return web.Response(body=page.encode("utf-8", "replace"), content_type="text/html", charset="utf-8")

    def problems(self) -> list[str]:
        """Why the gateway is not healthy (the same view the systemd watchdog has)."""
        return self.gateway.problems()


# --- the status page --------------------------------------------------------------------------------

_STYLE = """
body{font:14px/1.4 system-ui,sans-serif;margin:1.5em;color:#222;background:#fafafa}
h1{font-size:1.4em;margin:0 0 .2em}h2{font-size:1.1em;margin:1.4em 0 .4em}
table{border-collapse:collapse;background:#fff}th,td{border:1px solid #ddd;padding:.25em .6em;text-align:left;
vertical-align:top}th{background:#f0f0f0}td.n{text-align:right;font-variant-numeric:tabular-nums}
.online{color:#080}.offline{color:#b00}.unknown{color:#888}.bad{color:#b00}
dl.values{margin:0;display:grid;grid-template-columns:auto 1fr;gap:0 .8em}
dl.values>div{display:contents}
dt{color:#555}dd{margin:0;font-family:monospace}
footer{margin-top:2em;color:#777}
"""


def _e(value: object) -> str:
    return html.escape(str(value), quote=True)


def _state(online: bool | None, words: tuple[str, str] = ("online", "offline")) -> str:
    css = "unknown" if online is None else "online" if online else "offline"
    word = "unknown" if online is None else words[0] if online else words[1]
    return f'<span class="{css}">{word}</span>'


def _table(headers: list[str], rows: list[str]) -> str:
    head = "".join(f"<th>{_e(h)}</th>" for h in headers)
    body = "".join(rows) if rows else f'<tr><td colspan="{len(headers)}">none</td></tr>'
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def _cells(values: list[tuple[str, bool]]) -> str:
    """`<td>`s from (already escaped html, numeric?) pairs."""
    return "<tr>" + "".join(f'<td class="n">{v}</td>' if n else f"<td>{v}</td>" for v, n in values) + "</tr>"


#: Ages beyond this (about 31,700 years) are not ages: a device clock or a ts that is not one.
_AGE_MAX_MS = 10**15


def _age(now_ms: int, ts: object) -> str:
    """How old a sample taken at `ts` (unix ms, as the device said) is, for people; total for any ts."""
    if not isinstance(ts, int) or isinstance(ts, bool) or not ts:
        return human_age(None)
    behind = now_ms - ts
    if behind <= -1000:
        # Ahead of the gateway's clock by a second or more: said as such, by how much when that is a sane number.
        return "in the future" if -behind > _AGE_MAX_MS else f"{human_age(-behind / 1000)} ahead"
    if behind > _AGE_MAX_MS:
        return "ts out of range"
    return human_age(max(0, behind) / 1000)


class StatusPage:
    """The read-only status page: lines, devices with their last values, MCP sessions, sinks and spools."""

    def __init__(self, gateway: Gateway, utilisation: Utilisation, problems: list[str]) -> None:
        self.gateway = gateway
        self.utilisation = utilisation
        self.problems = problems
        self.now = time.monotonic()
        self.now_ms = time.time_ns() // 1_000_000

    def render(self) -> str:
        """The whole page as HTML; every value from the field or the config is escaped."""
        gw = self.gateway
        gid = _e(gw.cfg.gateway.id)
        health = (
            '<span class="online">ok</span>'
            if not self.problems
            else '<span class="bad">' + "; ".join(_e(p) for p in self.problems) + "</span>"
        )
        parts = [
            "<!doctype html>",
            '<html lang="en"><head><meta charset="utf-8">',
            f'<meta http-equiv="refresh" content="{REFRESH_S}">',
            '<meta name="viewport" content="width=device-width, initial-scale=1">',
            f"<title>Fieldgate {gid}</title><style>{_STYLE}</style></head><body>",
            f"<header><h1>Fieldgate {gid}</h1>",
            f"<p>version {_e(__version__)} · up {human_age(self.now - gw.started_at)} · health: {health}</p></header>",
            '<section id="devices"><h2>Devices</h2>',
            self._guarded(self._devices),
            "</section>",
            '<section id="lines"><h2>Modbus lines</h2>',
            self._guarded(self._lines),
            "</section>",
            '<section id="mcp"><h2>MCP sessions</h2>',
            self._guarded(self._mcp),
            "</section>",
            '<section id="sinks"><h2>Sinks and spools</h2>',
            self._guarded(self._sinks),
            "</section>",
            f"<footer>Reloads every {REFRESH_S} s · "
            '<a href="/metrics">/metrics</a> · <a href="/healthz">/healthz</a></footer>',
            "</body></html>",
        ]
        return "\n".join(parts)

    @staticmethod
    def _guarded(section: Callable[[], str]) -> str:
        """A section's HTML, or a line saying it could not be shown (logged): one bad part costs its section only."""
        try:
            return section()
        except Exception as exc:
            log.exception("status page: the %s section could not be rendered", section.__name__.strip("_"))
            return f'<p class="bad">This section could not be shown: {_e(repr(exc)[:200])}</p>'

    def _devices(self) -> str:
        gw = self.gateway
        modbus = {d.name: (bus, d) for bus in gw.buses for d in bus.devices.values()}
        rows = []
        views = gw.router.devices if gw.router else {}
        for name, view in views.items():
            if name in modbus:
                bus, device = modbus[name]
                where = f"Modbus {_e(bus.name)}, unit {device.unit}"
                online = device.online
            else:
                where = "MCP"
                online = view.online
            rows.append(
                _cells(
                    [
                        (_e(name), False),
                        (where, False),
                        (_state(online), False),
                        (self._values(name, view.latest), False),
                        (_e(_age(self.now_ms, view.latest_ts)), True),
                    ]
                )
            )
        return _table(["device", "where", "state", "last values", "age"], rows)

    @staticmethod
    def _values(device: str, values: dict[str, Any]) -> str:
        if not values:
            return "—"
        # The value as its MQTT topic carries it (JSON), so that the page and the broker agree.
        items = "".join(
            f'<div data-device="{_e(device)}" data-point="{_e(point)}"><dt>{_e(point)}</dt>'
            f"<dd>{_e(dumps_safe(value).decode())}</dd></div>"
            for point, value in values.items()
        )
        return f'<dl class="values">{items}</dl>'

    def _lines(self) -> str:
        rows = []
        for bus in self.gateway.buses:
            cfg, st = bus.cfg, bus.stats
            framing = f"{cfg.baudrate} {cfg.bytesize}{cfg.parity}{cfg.stopbits:g}"
            rows.append(
                _cells(
                    [
                        (_e(bus.name), False),
                        (_e(cfg.port), False),
                        (_e(framing), False),
                        (str(st.transactions), True),
                        (str(st.timeouts), True),
                        (str(st.crc_errors), True),
                        (str(st.exceptions), True),
                        (str(st.errors), True),
                        (f"{self.utilisation.ratio(bus, self.now):.1%}", True),
                    ]
                )
            )
        headers = ["line", "port", "framing", "transactions", "timeouts", "CRC errors", "exceptions", "errors"]
        return _table([*headers, "utilisation (1 min)"], rows)

    def _mcp(self) -> str:
        mcp = self.gateway.mcp
        if mcp is None:
            return "<p>MCP is not enabled.</p>"
        rows = []
        for device_id, session in sorted(mcp.sessions.items()):
            st = mcp.stats_for(device_id)
            peer = session.peer
            where = f"{peer[0]}:{peer[1]}" if isinstance(peer, tuple) and len(peer) >= 2 else str(peer)
            rows.append(
                _cells(
                    [
                        (_e(device_id), False),
                        (_e(where), False),
                        (str(st.frames_in), True),
                        (str(st.frames_out), True),
                        (str(st.nacks_sent), True),
                        (str(st.crc_errors), True),
                        (str(st.duplicates), True),
                    ]
                )
            )
        summary = (
            f"<p>{len(mcp.sessions)} session(s) of {len(mcp.cfg.devices)} device(s); "
            f"{mcp.rejected} refused at max_sessions.</p>"
        )
        headers = ["device", "peer", "frames in", "frames out", "NACKs", "CRC errors", "duplicates"]
        return summary + _table(headers, rows)

    def _sinks(self) -> str:
        rows = []
        for outbox, sink in zip(self.gateway.outboxes, self.gateway.sinks, strict=True):
            f = outbox.figures()
            rows.append(
                _cells(
                    [
                        (_e(sink.name), False),
                        (_state(sink.connected, ("connected", "disconnected")), False),
                        (str(f["queued"]), True),
                        (str(f["spool_messages"]), True),
                        (_e(human_size(f["spool_bytes"])), True),
                        (_e(human_age(f["spool_oldest_age_s"])), True),
                        (str(f["dropped"]), True),
                        (str(f["spool_fsyncs"]), True),
                        (_e(human_size(f["spool_bytes_written"])), True),
                    ]
                )
            )
        headers = ["sink", "broker", "queued", "spooled", "spool size", "oldest", "dropped", "fsyncs", "written"]
        return _table(headers, rows)
