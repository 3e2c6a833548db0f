"""The Prometheus collector: renders the gateway's snapshot as `fieldgate_*` series at scrape time."""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator
from dataclasses import asdict

from prometheus_client.metrics_core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.registry import Collector
from prometheus_client.utils import floatToGoString

from drivers.modbus.stats import RESPONSE_BUCKETS
from gateway import __version__
from gateway.snapshot import (
    BROKER,
    CLOCK,
    DROPS,
    LINES,
    MCP,
    MODBUS_SERVER,
    SINKS,
    STATE_FILES,
    TASKS,
    GatewaySnapshot,
    SnapshotSource,
)
from gateway.utilisation import UTILISATION_WINDOW, Utilisation

# The logger name these lines had before the split (the collector was the HTTP server's):
# journal filters keep working.
log = logging.getLogger("gateway.http")

#: The parts of a snapshot a scrape reads (not what was published of each device: the status page shows that).
SCRAPE_PARTS = (LINES, MCP, SINKS, TASKS, DROPS, STATE_FILES, BROKER, MODBUS_SERVER, CLOCK)


def _counter(name: str, doc: str, labels: list[str]) -> CounterMetricFamily:
    return CounterMetricFamily(f"fieldgate_{name}", doc, labels=labels)


def _gauge(name: str, doc: str, labels: list[str]) -> GaugeMetricFamily:
    return GaugeMetricFamily(f"fieldgate_{name}", doc, labels=labels)


class GatewayCollector(Collector):
    """Renders a fresh snapshot of the gateway at each scrape: no second set of counters to keep in step."""

    def __init__(self, snapshot: SnapshotSource, utilisation: Utilisation) -> None:
        self.snapshot = snapshot
        self.utilisation = utilisation

    def collect(self) -> Iterator[Metric]:
        """Every series of the gateway, as of now."""
        snap = self.snapshot(SCRAPE_PARTS)
        info = _gauge("info", "The gateway's id and version (always 1).", ["gateway", "version"])
        info.add_metric([snap.gateway_id, __version__], 1)
        yield info
        uptime = _gauge("uptime_seconds", "Seconds since the gateway started.", [])
        uptime.add_metric([], snap.uptime_s)
        yield uptime
        for part in (self._lines, self._devices, self._mcp, self._modbus_server, self._sinks, self._gateway, _clock):
            yield from self._guarded(part, snap)

    @staticmethod
    def _guarded(part: Callable[[GatewaySnapshot], Iterator[Metric]], snap: GatewaySnapshot) -> list[Metric]:
        """One part's series, or none (logged) when reading it fails: the rest of the scrape still answers."""
        try:
            return list(part(snap))
        except Exception:
            log.exception("metrics: %s could not be read", part.__name__.strip("_"))
            return []

    def _lines(self, snap: GatewaySnapshot) -> Iterator[Metric]:
        snap.require(LINES)
        counters = {
            "transactions": "Modbus transactions on the line, answered or not.",
            "timeouts": "Transactions without an answer within the response timeout.",
            "crc_errors": "Transactions whose answer never formed a frame with a valid CRC.",
            "exceptions": "Modbus exception responses.",
            "errors": "Answers that did not fit the request (wrong unit, wrong length).",
            "reopen_attempts": "Attempts to (re)open the serial port.",
            "passthrough": "Modbus TCP server clients' requests carried out on the line (not counted as transactions).",
            "passthrough_failed": "Of those, the ones the device did not answer (or the line lost).",
            "wire_seconds": "Seconds the frames of answered reads took on the wire.",
        }
        families = {k: _counter(f"modbus_line_{k}", doc, ["line"]) for k, doc in counters.items()}
        util = _gauge(
            "modbus_line_utilisation_ratio",
            f"Share of wall time the line's frames were on the wire, over the last {UTILISATION_WINDOW:.0f} s.",
            ["line"],
        )
        for line in snap.lines:
            values = asdict(line.counters)
            for key, family in families.items():
                family.add_metric([line.name], values[key])
            util.add_metric([line.name], self.utilisation.ratio(line, snap.taken_at))
        yield from families.values()
        yield util

    def _devices(self, snap: GatewaySnapshot) -> Iterator[Metric]:
        snap.require(LINES)
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
        for line in snap.lines:
            for device in line.devices:
                key = [line.name, device.name]
                values = asdict(device.counters)
                for name, family in families.items():
                    family.add_metric(key, values[name])
                online.add_metric(key, 1 if device.online else 0)
                cumulative, buckets = 0, []
                for bound, count in zip(bounds, device.counters.response_counts, strict=True):
                    cumulative += count
                    buckets.append((bound, cumulative))
                response.add_metric(key, buckets, device.counters.response_sum_s)
        yield from families.values()
        yield online
        yield response

    def _mcp(self, snap: GatewaySnapshot) -> Iterator[Metric]:
        snap.require(MCP)
        mcp = snap.mcp
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
        for device in mcp.devices:
            values = asdict(device.counters)
            for key, family in families.items():
                family.add_metric([device.id], values[key])
            online.add_metric([device.id], 1 if device.online else 0)
        yield from families.values()
        yield online

    def _modbus_server(self, snap: GatewaySnapshot) -> Iterator[Metric]:
        snap.require(MODBUS_SERVER)
        server = snap.modbus_server
        if server is None:
            return
        up = _gauge("modbus_server_up", "1 while the Modbus TCP server listens, else 0.", ["listen"])
        up.add_metric([server.listen], 1 if server.running else 0)
        yield up
        gauges = {
            "connections": "Modbus TCP client connections open now.",
            "waiting": "Client requests waiting for a line now.",
        }
        counters = {
            "accepted": "Client connections accepted.",
            "refused": "Client connections closed at accept: max_connections were open.",
            "malformed": "Client connections closed for a malformed MBAP frame.",
            "cache_hits": "Reads answered from the raw registers the lines polled, without a line transaction.",
            "passthrough": "Client requests carried out on a line (reads and other functions).",
            "writes": "Client writes carried out on a line (rate-limited and audited as MQTT writes).",
            "busy": "Requests answered exception 6: the connection's queue was full, or the write rate spent.",
            "unaudited": "Refused writes left out of the audit log (a flood of them is bounded).",
        }
        values = asdict(server)
        for key, doc in gauges.items():
            family = _gauge(f"modbus_server_{key}", doc, [])
            family.add_metric([], values[key])
            yield family
        for key, doc in counters.items():
            counter = _counter(f"modbus_server_{key}", doc, [])
            counter.add_metric([], values[key])
            yield counter
        exceptions = _counter("modbus_server_exceptions", "Exception responses sent to clients, by code.", ["code"])
        for code, count in sorted(server.exceptions.items()):
            exceptions.add_metric([f"0x{code:02X}"], count)
        yield exceptions

    def _sinks(self, snap: GatewaySnapshot) -> Iterator[Metric]:
        snap.require(SINKS)
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
        takeovers = _counter(
            "sink_takeovers", "Times the broker kept closing the sink's session right after connect: its client id "
            "in use by another client (one count per episode).", ["sink"],
        )  # fmt: skip
        refusals = _counter(
            "sink_refusals",
            "Packets the broker refused, by packet and reason code (MQTT 5; a 3.1.1 CONNACK's too).",
            ["sink", "reason"],
        )
        unsynchronised = _counter(
            "sink_unsynchronised", "Messages acknowledged with a ts taken while the clock was known not synchronised, "
            "before it was known synchronised again (what was still queued or spooled then went out corrected).",
            ["sink"],
        )  # fmt: skip
        for sink in snap.sinks:
            figures = sink.figures
            unsynchronised.add_metric([sink.name], figures.get("unsynchronised", 0))
            for name, (key, _) in gauges.items():
                g[name].add_metric([sink.name], figures[key])
            for name, (key, _) in counters.items():
                c[name].add_metric([sink.name], figures[key])
            if figures["spool_oldest_age_s"] is not None:
                oldest.add_metric([sink.name], figures["spool_oldest_age_s"])
            connected.add_metric([sink.name], 1 if sink.connected else 0)
            published.add_metric([sink.name], sink.counters["published"])
            takeovers.add_metric([sink.name], sink.counters["takeovers"])
            for reason, count in sorted(sink.counters.get("broker_refusals", {}).items()):
                refusals.add_metric([sink.name, reason], count)
        yield from g.values()
        yield oldest
        yield from c.values()
        yield connected
        yield published
        yield takeovers
        yield refusals
        yield unsynchronised
        yield from _sparkplug(snap)

    def _gateway(self, snap: GatewaySnapshot) -> Iterator[Metric]:
        snap.require(TASKS)
        failures = _counter(
            "task_failures", "Times a supervised task failed (each is restarted with back-off).", ["task"]
        )
        down = _gauge("task_down", "1 while a supervised task waits for its restart after a failure.", ["task"])
        for task in snap.tasks:
            failures.add_metric([task.name], task.failures)
            down.add_metric([task.name], 1 if task.down else 0)
        yield failures
        yield down
        dropped = _counter(
            "requests_dropped",
            "set/cmd requests no device would see (unknown, none it takes, over its rate) beyond the sink's limit "
            "of 10/s: not audited or answered.",
            ["sink"],
        )
        snap.require(SINKS)
        for sink in snap.sinks:
            dropped.add_metric([sink.name], sink.requests_dropped)
        yield dropped
        snap.require(DROPS)
        values = _counter("values_dropped", "Values whose name could not be a topic level: not published.", [])
        values.add_metric([], snap.values_dropped)
        yield values
        snap.require(STATE_FILES)
        yield _by_reason(
            "state_files_corrupt",
            "State files that could not be read, moved aside as <name>.corrupt-<unix seconds>; started afresh.",
            snap.state_files_corrupt,
            label="file",
        )
        snap.require(BROKER)
        if snap.broker_login_failures is not None:  # a broker child reports its counts to its BrokerProcess
            yield _by_reason(
                "broker_auth_failures", "Embedded broker logins refused, by reason.", snap.broker_login_failures
            )


#: A Sparkplug sink's own counters (bridge/sparkplug/node.py SparkplugStats), by their key in the sink's counters.
SPARKPLUG_COUNTERS = {
    "births": "NBIRTH sequences published (connects, rebirths, reloads that changed the metrics).",
    "rebirth_requests": "Rebirth requests (NCMD Node Control/Rebirth) from host applications.",
    "device_births": "DBIRTH messages published.",
    "device_deaths": "DDEATH messages published.",
    "commands": "DCMD metrics handed to the write path (each is audited there).",
    "bad_commands": "NCMD, DCMD and STATE payloads refused unread (not Sparkplug, too large, too many metrics).",
}


def _sparkplug(snap: GatewaySnapshot) -> Iterator[Metric]:
    """The series of Sparkplug sinks (those whose counters are a SparkplugStats'); none without one."""
    sinks = [sink for sink in snap.sinks if "births" in sink.counters]
    if not sinks:
        return
    families = {key: _counter(f"sparkplug_{key}", doc, ["sink"]) for key, doc in SPARKPLUG_COUNTERS.items()}
    host = _gauge(
        "sparkplug_host_online",
        "1 while the primary host's last STATE says online, 0 when it says offline (absent: none configured or heard).",
        ["sink"],
    )
    for sink in sinks:
        for key, family in families.items():
            family.add_metric([sink.name], sink.counters[key])
        online = sink.counters.get("host_online")
        if online is not None:
            host.add_metric([sink.name], 1 if online else 0)
    yield from families.values()
    yield host


def _clock(snap: GatewaySnapshot) -> Iterator[Metric]:
    """The clock's sync state and the wall clock's steps; none without a clock watch."""
    snap.require(CLOCK)
    clock = snap.clock
    if clock is None:
        return
    synced = _gauge("clock_synchronized", "1 while the clock is synchronised, else 0 (absent: cannot tell).", [])
    if clock.synchronized is not None:
        synced.add_metric([], 1 if clock.synchronized else 0)
    yield synced
    steps = _counter("clock_steps", "Steps of the wall clock over 1 s (against the monotonic clock).", [])
    steps.add_metric([], clock.steps)
    yield steps
    last = _gauge("clock_last_step_seconds", "The last step's size, + forward, - back (absent: none).", [])
    if clock.last_step_s is not None:
        last.add_metric([], clock.last_step_s)
    yield last


def _by_reason(name: str, doc: str, counts: dict[str, int], *, label: str = "reason") -> Metric:
    """A counter family with one series per key of `counts`."""
    family = _counter(name, doc, [label])
    for key, value in sorted(counts.items()):
        family.add_metric([key], value)
    return family
