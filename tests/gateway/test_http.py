"""`gateway.http` on a real gateway (simulated Modbus line, MCP device, embedded broker) with a real HTTP client."""

from __future__ import annotations

import asyncio
import os
import re
import socket
import subprocess
import sys
import time
from collections.abc import AsyncIterator
from dataclasses import asdict, dataclass, replace
from html.parser import HTMLParser
from pathlib import Path
from types import SimpleNamespace

import aiohttp
import pytest
from prometheus_client import generate_latest
from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.registry import CollectorRegistry

from bridge.outbox import OutboxSnapshot
from bridge.sink import SinkStats
from bridge.sparkplug.view import SparkplugStats
from drivers.mcp.codec import Frame, FrameType
from gateway import __version__
from gateway.app import Gateway
from gateway.clock import ClockSnapshot
from gateway.config import load_config, parse_config
from gateway.errors import FieldgateError
from gateway.jsonsafe import loads_strict
from gateway.prometheus import GatewayCollector
from gateway.snapshot import GatewaySnapshot, SinkSnapshot
from gateway.status_page import StatusPage
from gateway.types import Sample
from gateway.utilisation import Utilisation

from configs import broker, config, device, line, mcp, mcp_device, point, sim_line, sim_mcp, sim_slave, simulator, write
from helpers import Received, Subscriber, free_port, now_ms, until
from mcp_peer import RawPeer

ROOT = Path(__file__).resolve().parents[2]


@dataclass
class Web:
    """A running gateway, the base URL of its HTTP listener and a subscriber on its broker."""

    gw: Gateway
    url: str
    sub: Subscriber
    http: aiohttp.ClientSession


def write_config(tmp_path: Path, http: str | None, mqtt: int = 0) -> Path:
    """The test config with `gateway.http` set as given, every other port free."""
    plc = device(
        "plc",
        1,
        poll="100ms",
        points=[point("count", "holding", 0, "uint16"), point("label", "holding", 10, "string:8")],
    )
    ghost = device("ghost", 3, poll="100ms", points=[point("level", "input", 0)])
    cfg = config(
        id="web1",
        http=http,
        broker=broker(mqtt or free_port(), process="inline"),
        buses=[line("rs485", "./ttyA", plc, ghost)],
        mcp=mcp(free_port(), devices=[mcp_device("pump-1")]),
        simulator=simulator(
            modbus=[sim_line("./ttyA", sim_slave(1), sim_slave(3, dead=True))],
            mcp=[sim_mcp("pump-1", "100ms", {"flow": {"value": 12.5}})],
        ),
    )
    return write(cfg, tmp_path)


@pytest.fixture
async def web(tmp_path: Path) -> AsyncIterator[Web]:
    """The test gateway with its status page on a free loopback port."""
    port, mqtt = free_port(), free_port()
    gw = Gateway(load_config(write_config(tmp_path, f"127.0.0.1:{port}", mqtt)))
    await gw.start()
    sub = Subscriber(mqtt)
    await asyncio.to_thread(sub.start)
    session = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=5))
    try:
        yield Web(gw, f"http://127.0.0.1:{port}", sub, session)
    finally:
        await session.close()
        sub.stop()
        await gw.stop()


async def get(web: Web, path: str) -> tuple[int, str, str]:
    """(status, content type, body) of a GET."""
    async with web.http.get(web.url + path) as resp:
        return resp.status, resp.headers.get("Content-Type", ""), await resp.text()


Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


async def scrape(web: Web) -> Samples:
    """Every sample of /metrics, keyed by (sample name, labels)."""
    status, ctype, body = await get(web, "/metrics")
    assert status == 200 and ctype.startswith("text/plain")
    return {
        (s.name, frozenset(s.labels.items())): s.value
        for family in text_string_to_metric_families(body)
        for s in family.samples
    }


def value(samples: Samples, name: str, **labels: str) -> float:
    """One sample's value; KeyError (naming what there is) if the series is missing."""
    key = (name, frozenset(labels.items()))
    if key not in samples:
        similar = sorted(str(dict(lbl)) for n, lbl in samples if n == name)
        raise KeyError(f"{name}{labels} not scraped; {name} has {similar}")
    return samples[key]


def listening_ports() -> set[int]:
    """TCP ports this process listens on (from /proc: its socket inodes in state LISTEN)."""
    inodes = set()
    for fd in os.listdir("/proc/self/fd"):
        try:
            target = os.readlink(f"/proc/self/fd/{fd}")
        except OSError:
            continue
        if target.startswith("socket:["):
            inodes.add(target[8:-1])
    ports = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        with open(table) as f:
            for line in f.readlines()[1:]:
                cols = line.split()
                if cols[3] == "0A" and cols[9] in inodes:
                    ports.add(int(cols[1].rsplit(":", 1)[1], 16))
    return ports


# --- /metrics -----------------------------------------------------------------------------------------


async def test_metrics_parse_and_move_between_scrapes(web: Web) -> None:
    plc = {"line": "rs485", "device": "plc"}

    async def pump_connected() -> Samples | None:
        s = await scrape(web)
        return (
            s
            if value(s, "fieldgate_mcp_sessions") == 1 and value(s, "fieldgate_sink_connected", sink="local")
            else None
        )

    first = await until(pump_connected, what="a session of the simulated MCP device and the sink connected", every=0.1)

    def grew(s: Samples) -> bool:
        return all(
            value(s, name, **labels) > value(first, name, **labels)
            for name, labels in (
                ("fieldgate_modbus_device_transactions_total", plc),
                ("fieldgate_modbus_device_response_seconds_count", plc),
                ("fieldgate_modbus_line_transactions_total", {"line": "rs485"}),
                ("fieldgate_mcp_frames_in_total", {"device": "pump-1"}),
                ("fieldgate_sink_published_total", {"sink": "local"}),
                ("fieldgate_uptime_seconds", {}),
            )
        )

    # Scrape again until every counter moved (not a fixed pause: a busy machine polls less in 0.5 s).
    async def moved() -> Samples | None:
        s = await scrape(web)
        ghost_timed_out = value(s, "fieldgate_modbus_device_timeouts_total", line="rs485", device="ghost") > 0
        return s if grew(s) and ghost_timed_out else None

    second = await until(moved, 30, "the counters to move between two scrapes", every=0.1)

    for name in ("transactions_total", "response_seconds_count"):
        before, after = (
            value(first, f"fieldgate_modbus_device_{name}", **plc),
            value(second, f"fieldgate_modbus_device_{name}", **plc),
        )
        assert 0 < before < after, name
    assert value(second, "fieldgate_modbus_line_transactions_total", line="rs485") > value(
        first, "fieldgate_modbus_line_transactions_total", line="rs485"
    )
    # The histogram is cumulative and ends in +Inf = _count; at 115200 baud on a pty answers take < 1 s.
    count = value(second, "fieldgate_modbus_device_response_seconds_count", **plc)
    assert value(second, "fieldgate_modbus_device_response_seconds_bucket", **plc, le="+Inf") == count
    assert value(second, "fieldgate_modbus_device_response_seconds_bucket", **plc, le="1.0") == count
    assert 0 < value(second, "fieldgate_modbus_device_response_seconds_sum", **plc) < count
    assert 0 < value(second, "fieldgate_modbus_line_utilisation_ratio", line="rs485") < 1
    assert value(second, "fieldgate_modbus_line_wire_seconds_total", line="rs485") > 0
    # Every failure kind is exported for the line and each device, the line's count being its devices' sum
    # (plc and the dead ghost, whose timeouts make the line's count non-zero); each failure was a transaction.
    line_tx = value(second, "fieldgate_modbus_line_transactions_total", line="rs485")
    for name in ("timeouts", "crc_errors", "exceptions", "errors"):
        per_device = [
            value(second, f"fieldgate_modbus_device_{name}_total", line="rs485", device=d) for d in ("plc", "ghost")
        ]
        on_line = value(second, f"fieldgate_modbus_line_{name}_total", line="rs485")
        assert on_line == sum(per_device) <= line_tx, (name, per_device, on_line, line_tx)
    assert value(second, "fieldgate_modbus_device_online", **plc) == 1

    assert value(second, "fieldgate_mcp_frames_in_total", device="pump-1") > value(
        first, "fieldgate_mcp_frames_in_total", device="pump-1"
    )
    assert value(second, "fieldgate_mcp_frames_out_total", device="pump-1") > 0  # its ACKs
    assert value(second, "fieldgate_mcp_nacks_sent_total", device="pump-1") == 0
    assert value(second, "fieldgate_mcp_device_online", device="pump-1") == 1

    for name in ("spool_messages", "spool_bytes", "sink_queued"):
        assert value(second, f"fieldgate_{name}", sink="local") >= 0
    for name in ("spool_dropped", "spool_fsyncs", "spool_written_bytes", "sink_published"):
        assert value(second, f"fieldgate_{name}_total", sink="local") >= 0
    assert value(second, "fieldgate_sink_published_total", sink="local") > value(
        first, "fieldgate_sink_published_total", sink="local"
    )
    assert value(second, "fieldgate_uptime_seconds") > value(first, "fieldgate_uptime_seconds") > 0
    assert value(second, "fieldgate_info", gateway="web1", version=__version__) == 1


async def test_a_dead_unit_shows_offline_with_timeouts(web: Web) -> None:
    ghost = {"line": "rs485", "device": "ghost"}

    async def offline() -> Samples | None:
        s = await scrape(web)
        return (
            s
            if value(s, "fieldgate_modbus_device_online", **ghost) == 0
            and web.gw.buses[0].devices["ghost"].online is False
            else None
        )

    samples = await until(offline, what="ghost to go offline", every=0.1)
    assert value(samples, "fieldgate_modbus_device_timeouts_total", **ghost) > 0
    assert value(samples, "fieldgate_modbus_device_response_seconds_count", **ghost) == 0
    assert value(samples, "fieldgate_modbus_device_online", line="rs485", device="plc") == 1
    assert value(samples, "fieldgate_modbus_line_timeouts_total", line="rs485") >= value(
        samples, "fieldgate_modbus_device_timeouts_total", **ghost
    )


async def test_metrics_count_task_failures_dropped_requests_and_corrupt_state_files(
    web: Web, monkeypatch: pytest.MonkeyPatch
) -> None:
    samples = await scrape(web)
    assert value(samples, "fieldgate_task_failures_total", task="metrics") == 0
    assert value(samples, "fieldgate_task_down", task="sink:local:connect") == 0
    assert value(samples, "fieldgate_requests_dropped_total", sink="local") == 0
    for file in ("spool", "homeassistant", "users"):
        assert value(samples, "fieldgate_state_files_corrupt_total", file=file) == 0
    # The broker runs on our loop here: its login refusals are ours to count.
    assert value(samples, "fieldgate_broker_auth_failures_total", reason="bad_password") == 0
    task = web.gw.supervisor.running("metrics")
    assert task is not None
    web.gw.supervisor.restart_min = 30.0  # it stays down while the test looks
    task.cancel()  # as a bug would end it
    # The sink's limit for requests no device takes is a burst of 20, then 10/s. The router's clock stands still
    # meanwhile: the 30 may take more than a second to arrive on a busy machine, and exactly 10 are dropped.
    assert web.gw.router is not None
    frozen = time.monotonic()
    monkeypatch.setattr(web.gw.router, "_clock", lambda: frozen)
    for i in range(30):
        web.sub.publish(f"fieldgate/web1/ghost-{i}/set/x", "1")

    async def counted() -> Samples | None:
        s = await scrape(web)
        return s if value(s, "fieldgate_requests_dropped_total", sink="local") >= 10 else None

    samples = await until(counted, what="the dropped requests to be counted", every=0.1)
    assert value(samples, "fieldgate_requests_dropped_total", sink="local") == 10
    assert value(samples, "fieldgate_task_failures_total", task="metrics") == 1
    assert value(samples, "fieldgate_task_down", task="metrics") == 1


async def test_metrics_count_mcp_login_failures_refusals_and_rejected_payloads(web: Web) -> None:
    assert web.gw.mcp is not None
    reader, writer = await asyncio.open_connection("127.0.0.1", web.gw.mcp.port)
    intruder = RawPeer(reader, writer)
    try:
        assert (await intruder.hello("pump-1", token="not-the-token-0001")).type == FrameType.NACK
    finally:
        intruder.close()
    reader, writer = await asyncio.open_connection("127.0.0.1", web.gw.mcp.port)
    peer = RawPeer(reader, writer)
    try:
        assert (await peer.hello("pump-1", boot_id="b7")).type == FrameType.ACK
        await peer.send(Frame.json(FrameType.DATA, 2, {"ts": 10**20, "values": {"flow": 1.0}}))
        assert (await peer.recv()).type == FrameType.NACK
    finally:
        peer.close()
    samples = await scrape(web)
    assert value(samples, "fieldgate_mcp_auth_failures_total", reason="bad_token") == 1
    assert value(samples, "fieldgate_mcp_auth_failures_total", reason="unknown_device") == 0
    for reason in ("max_sessions", "max_pending", "max_pending_per_ip", "banned"):
        assert value(samples, "fieldgate_mcp_refused_connections_total", reason=reason) == 0
    assert value(samples, "fieldgate_mcp_rejected_payloads_total", device="pump-1") == 1
    assert value(samples, "fieldgate_mcp_bad_ts_total", device="pump-1") == 1

    async def pending(n: int) -> Samples | None:
        s = await scrape(web)
        return s if value(s, "fieldgate_mcp_pending_connections") == n else None

    # Idle (both peers above are gone): none; one connection that has not sent HELLO: one.
    await until(lambda: pending(0), what="a closed connection no longer counted as pending", every=0.1)
    _, silent = await asyncio.open_connection("127.0.0.1", web.gw.mcp.port)
    try:
        await until(lambda: pending(1), what="a connection without HELLO counted as pending", every=0.1)
    finally:
        silent.close()
    await until(lambda: pending(0), what="the silent connection no longer counted after it closed", every=0.1)


# --- /healthz -------------------------------------------------------------------------------------------


async def test_healthz_is_ok_until_a_task_dies(web: Web) -> None:
    assert await get(web, "/healthz") == (200, "text/plain; charset=utf-8", "ok\n")
    # The replay task is the one that once died on a full disk; kill it the way such a bug would.
    task = next(t for t in asyncio.all_tasks() if t.get_name() == "outbox:local:replay")
    task.cancel()
    await asyncio.sleep(0.05)
    status, _, body = await get(web, "/healthz")
    assert status == 503
    assert body.startswith("task outbox:local:replay: cancelled; restart 1 in ") and body.endswith(" s\n")
    _, _, page = await get(web, "/")
    assert "task outbox:local:replay: cancelled" in page
    next(t for t in asyncio.all_tasks() if t.get_name() == "modbus:rs485").cancel()
    await asyncio.sleep(0.05)
    status, _, body = await get(web, "/healthz")
    assert status == 503 and body.endswith("\nmodbus line rs485: its task has ended\n")
    # The supervisor brings the outbox's loop back (after 1 s); the line's task is the bus's own.
    await asyncio.sleep(1.2)
    status, _, body = await get(web, "/healthz")
    assert (status, body) == (503, "modbus line rs485: its task has ended\n")
    assert web.gw.supervisor.running("outbox:local:replay") not in (None, task)


async def test_healthz_reports_a_line_stuck_in_io_as_the_watchdog_sees_it(web: Web) -> None:
    assert (await get(web, "/healthz"))[0] == 200
    bus = web.gw.buses[0]
    seen = []
    for _ in range(5):
        # As if its task had hung in a read for that long. The live task stamps alive_at again whenever it
        # wakes, which may fall between this line and the request on a loaded machine: then try again.
        bus.alive_at -= bus.alive_limit + 5
        status, _, body = await get(web, "/healthz")
        seen.append((status, body))
        if status == 503:
            break
    assert status == 503 and "modbus line rs485" in body and "stuck in I/O" in body, seen


# --- the status page ------------------------------------------------------------------------------------


class PageParser(HTMLParser):
    """The status page's table rows (cell texts, by section id) and its value cells by (device, point)."""

    def __init__(self) -> None:
        super().__init__()
        self.rows: list[tuple[str, list[str]]] = []
        self._section = ""
        self.values: dict[tuple[str, str], str] = {}
        self.meta: list[dict[str, str | None]] = []
        self._cell: list[str] | None = None
        self._point: tuple[str, str] | None = None
        self._dd: list[str] | None = None

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        a = dict(attrs)
        if tag == "section":
            self._section = a.get("id") or ""
        elif tag == "tr":
            self.rows.append((self._section, []))
        elif tag in ("td", "th"):
            self._cell = []
        elif tag == "div" and "data-point" in a:
            self._point = (a["data-device"] or "", a["data-point"] or "")
        elif tag == "dd":
            self._dd = []
        elif tag == "meta":
            self.meta.append(a)

    def table(self, section: str) -> dict[str, list[str]]:
        """The rows of one section's table by their first cell (the header row included)."""
        return {cells[0]: cells for sec, cells in self.rows if sec == section and cells}

    def handle_endtag(self, tag: str) -> None:
        if tag in ("td", "th") and self._cell is not None:
            self.rows[-1][1].append(" ".join("".join(self._cell).split()))
            self._cell = None
        elif tag == "dd" and self._dd is not None and self._point:
            self.values[self._point] = "".join(self._dd)
            self._dd = None

    def handle_data(self, data: str) -> None:
        if self._cell is not None:
            self._cell.append(data)
        if self._dd is not None:
            self._dd.append(data)


async def test_status_page_shows_live_values_as_mqtt_does_and_escapes_them(web: Web) -> None:
    sim = next(iter(web.gw.simulation.simulators.values()))  # type: ignore[union-attr]
    sim.set(1, "count", 4242)
    sim.set(1, "label", "<b>")
    for topic, payload in (("count", b"4242"), ("label", b'"<b>"')):
        got = await web.sub.wait_for(
            lambda ms, t=topic, p=payload: any(m.topic == f"fieldgate/web1/plc/{t}" and m.payload == p for m in ms)
        )
        assert got

    async def page_with_offline_ghost() -> tuple[str, PageParser] | None:
        status, ctype, body = await get(web, "/")
        assert status == 200 and ctype.startswith("text/html")
        p = PageParser()
        p.feed(body)
        devices = p.table("devices")
        return (body, p) if devices.get("ghost", [""] * 3)[2] == "offline" and "pump-1" in devices else None

    found = await until(page_with_offline_ghost, what="the page to show ghost offline and pump-1", every=0.1)
    body, page = found
    # The same text the retained MQTT topic carries, after the browser unescapes it.
    assert page.values[("plc", "count")] == "4242"
    assert page.values[("plc", "label")] == '"<b>"'
    assert "<b>" not in body and "&quot;&lt;b&gt;&quot;" in body
    assert page.values[("pump-1", "flow")] == "12.5"
    devices = page.table("devices")
    assert devices["plc"][1:3] == ["Modbus rs485, unit 1", "online"]
    assert devices["ghost"][1:3] == ["Modbus rs485, unit 3", "offline"]
    assert devices["pump-1"][1:3] == ["MCP", "online"]
    age = devices["plc"][4]  # the age of its last sample, as `fieldgate spool` writes ages
    assert age.endswith("s") and age[:-1].isdigit() and int(age[:-1]) < 5, age
    lines = page.table("lines")
    assert lines["rs485"][1].endswith("ttyA") and lines["rs485"][2] == "115200 8N1"
    assert int(lines["rs485"][3]) > 0 and int(lines["rs485"][4]) > 0  # transactions, timeouts (ghost)
    session = page.table("mcp")["pump-1"]
    assert session[1].startswith("127.0.0.1:") and int(session[2]) > 0  # peer, frames in
    assert page.table("sinks")["local"][1] == "connected"
    assert {"http-equiv": "refresh", "content": "5"} in page.meta


# --- what peers send: values, ts and names no encoder takes -------------------------------------------


async def page_ok(web: Web) -> str:
    """The status page, checked to answer 200 (and /metrics and /healthz with it)."""
    status, _, body = await get(web, "/")
    assert status == 200, body[:500]
    assert (await get(web, "/healthz"))[0] == 200
    await scrape(web)  # 200, and it parses
    return body


async def test_a_lone_surrogate_value_and_a_10e400_ts_leave_the_page_metrics_and_retained_state_whole(
    web: Web,
) -> None:
    # What an MCP device could once slip through to the router: a lone surrogate, a ts past any float.
    await web.sub.wait_for(lambda ms: any(m.topic == "fieldgate/web1/plc/count" for m in ms))
    web.gw._on_sample(Sample("pump-1", 10**400, {"flow": "\ud800", "odd": "a\udfffb"}))
    web.gw._on_sample(Sample("plc", -(10**400), {"count": 7}))
    body = await page_ok(web)
    page = PageParser()
    page.feed(body)
    assert page.values[("pump-1", "flow")] == '"?"' and page.values[("pump-1", "odd")] == '"a?b"'
    assert page.table("devices")["pump-1"][4] == "in the future"
    # The broker forgets everything; the sink's reconnect brings every device's retained state back.
    seen = len(web.sub.messages)
    sock = web.gw.sinks[0]._client.socket()
    assert isinstance(sock, socket.socket)
    sock.shutdown(socket.SHUT_RDWR)

    def republished(ms: list[Received]) -> bool:
        later = {m.topic for m in ms[seen:]}
        return {"fieldgate/web1/pump-1/odd", "fieldgate/web1/plc/label", "fieldgate/web1/ghost/status"} <= later

    assert await web.sub.wait_for(republished, timeout=15)
    assert web.sub.on("fieldgate/web1/pump-1/odd")[-1].payload == b'"a?b"'
    await page_ok(web)


async def test_hostile_modbus_text_and_mcp_data_through_a_running_gateway(web: Web) -> None:
    sim = next(iter(web.gw.simulation.simulators.values()))  # type: ignore[union-attr]
    # A device's text registers hold what they hold: bytes that are not UTF-8, NUL, ESC, markup.
    point = sim._point(1, "label")
    point.held = True
    start, regs = sim._blocks[1][point.table]
    raw = b"\xff\xfe<i\x00\x1b[1"
    regs[point.address - start : point.address - start + 4] = [raw[i] << 8 | raw[i + 1] for i in range(0, 8, 2)]

    def label(ms: list[Received]) -> Received | None:
        return next((m for m in reversed(ms) if m.topic == "fieldgate/web1/plc/label" and b"<i" in m.payload), None)

    got = await web.sub.wait_for(label)
    assert isinstance(got, Received)
    assert loads_strict(got.payload) == "\ufffd\ufffd<i\x00\x1b[1"  # strict JSON, valid UTF-8
    # An MCP device sends a ts past any float and a lone surrogate (the session may refuse them: either way
    # it answers, and nothing it sent breaks the page, the scrape or the next device's data).
    reader, writer = await asyncio.open_connection("127.0.0.1", web.gw.mcp.port)  # type: ignore[union-attr]
    peer = RawPeer(reader, writer)
    try:
        assert (await peer.hello("pump-1", seq=1, boot_id="b9")).type == FrameType.ACK
        hostile = [
            b'{"ts":1' + b"0" * 400 + b',"values":{"flow":1.0}}',
            b'{"ts":1700000000000,"values":{"flow":"\\ud800"}}',
        ]
        for seq, payload in enumerate(hostile, start=2):
            await peer.send(Frame(FrameType.DATA, seq, payload))
            answer = await peer.recv()
            assert answer.type in (FrameType.ACK, FrameType.NACK) and answer.seq == seq
            body = await page_ok(web)
            assert "&lt;i" in body and "<i" not in body
        await peer.send(Frame.json(FrameType.DATA, 9, {"ts": now_ms(), "values": {"flow": 99.5}}))
        assert (await peer.recv()).type == FrameType.ACK
        await web.sub.wait_for(
            lambda ms: any(m.topic == "fieldgate/web1/pump-1/flow" and m.payload == b"99.5" for m in ms)
        )
    finally:
        peer.close()
    await page_ok(web)


async def test_a_part_that_fails_to_read_costs_its_section_and_series_only(
    web: Web, monkeypatch: pytest.MonkeyPatch
) -> None:
    assert web.gw.mcp is not None

    def broken(device_id: str) -> object:
        raise RuntimeError("a bug in the MCP counters")

    monkeypatch.setattr(web.gw.mcp, "stats_for", broken)
    status, _, body = await get(web, "/")
    assert status == 200
    page = PageParser()
    page.feed(body)
    assert "This section could not be shown: RuntimeError(&#x27;a bug in the MCP counters&#x27;)" in body
    assert "local" in page.table("sinks") and "plc" in page.table("devices")
    samples = await scrape(web)  # 200, without the MCP device series
    assert value(samples, "fieldgate_sink_connected", sink="local") == 1
    assert not any(name == "fieldgate_mcp_frames_in_total" for name, _ in samples)


# --- configuration --------------------------------------------------------------------------------------


async def test_http_null_opens_no_listener(tmp_path: Path) -> None:
    gw = Gateway(load_config(write_config(tmp_path, None)))
    before = listening_ports()
    await gw.start()
    try:
        assert gw.http is None
        mcp_port = int(gw.cfg.mcp.listen.rsplit(":", 1)[1])  # type: ignore[union-attr]
        mqtt_port = int(gw.cfg.broker.listeners[0].rsplit(":", 1)[1])
        assert listening_ports() - before == {mcp_port, mqtt_port}
    finally:
        await gw.stop()


async def test_listening_ports_sees_the_http_listener(web: Web) -> None:
    # Proof that the check above can fail: with `http` set, its port is among them.
    assert web.gw.http is not None and web.gw.http.port in listening_ports()


async def test_a_port_in_use_is_a_clear_error(tmp_path: Path) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        gw = Gateway(load_config(write_config(tmp_path, f"127.0.0.1:{port}")))
        try:
            with pytest.raises(
                FieldgateError, match=rf"status page cannot listen on 127\.0\.0\.1:{port} \(gateway\.http\):.*in use"
            ):
                await gw.start()
        finally:
            await gw.stop()


def test_fieldgate_run_refuses_a_port_in_use_with_one_line(tmp_path: Path) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        path = write(
            config(id="cli1", http=f"127.0.0.1:{port}", broker=broker(free_port(), process="inline")), tmp_path
        )
        res = subprocess.run(
            [sys.executable, "-m", "gateway", "run", "-c", str(path)],
            cwd=ROOT,
            capture_output=True,
            text=True,
            timeout=60,
        )
    assert res.returncode == 1
    last = res.stderr.strip().splitlines()[-1]
    assert last.startswith(f"fieldgate: status page cannot listen on 127.0.0.1:{port} (gateway.http):")
    assert "Traceback" not in res.stderr


def test_listening_beyond_loopback_warns() -> None:
    exposed = parse_config("gateway: {http: '0.0.0.0:9720'}\n", "cfg.yaml")
    assert exposed.warnings == [
        "cfg.yaml:1: gateway.http: listens on 0.0.0.0:9720 without authentication (status page, /metrics)"
    ]
    assert (
        parse_config("gateway: {http: ':9720'}\n")
        .warnings[0]
        .endswith("listens on 0.0.0.0:9720 without authentication (status page, /metrics)")
    )
    assert parse_config("gateway: {http: '127.0.0.1:9720'}\n").warnings == []
    assert parse_config("gateway: {http: null}\n").warnings == []
    assert parse_config("gateway: {}\n").warnings == []  # the default is loopback


# --- utilisation ----------------------------------------------------------------------------------------


def test_utilisation_is_wire_time_over_the_last_minute() -> None:
    stats = SimpleNamespace(wire_seconds=0.0)
    bus = SimpleNamespace(name="l", counters=stats)
    util = Utilisation()
    assert util.ratio(bus, 0.0) == 0.0  # type: ignore[arg-type]
    for t in range(0, 101, 10):
        # 10 % of the line for 50 s, then 50 %.
        stats.wire_seconds = 0.1 * min(t, 50) + 0.5 * max(0, t - 50)
        util.sample([bus], float(t))  # type: ignore[list-item]
    # The oldest sample kept is the newest one at least 60 s old: t=40, wire 4.0; now wire 30.0.
    assert util.ratio(bus, 100.0) == pytest.approx((30.0 - 4.0) / 60)  # type: ignore[arg-type]


# --- Sparkplug sinks -------------------------------------------------------------------------------------


def _sparkplug_snapshot() -> GatewaySnapshot:
    """A JSON sink and two Sparkplug sinks (primary host offline; none heard) as the snapshot builder makes them."""
    figures = asdict(OutboxSnapshot(0, 0, 0, None, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0))
    node = SparkplugStats(published=40, births=3, rebirth_requests=1, device_births=9, device_deaths=2, commands=5)
    sinks = (
        SinkSnapshot("local", True, asdict(SinkStats(published=7)), figures, 0, None, 0),
        SinkSnapshot("scada", False, asdict(replace(node, bad_commands=4, host_online=False)), figures, 0, None, 0),
        SinkSnapshot("hist", True, asdict(SparkplugStats(births=1)), figures, 0, None, 0),
    )
    return GatewaySnapshot("g", 100.0, 0, 1.0, False, sinks=sinks)


def _registry(collector: GatewayCollector) -> CollectorRegistry:
    registry = CollectorRegistry(auto_describe=False)
    registry.register(collector)
    return registry


def test_metrics_show_a_sparkplug_sinks_node_counters_and_its_primary_host_as_a_gauge() -> None:
    """/metrics: fieldgate_sparkplug_* per Sparkplug sink; host_online 1/0, absent while no STATE was heard."""
    snap = _sparkplug_snapshot()
    text = generate_latest(_registry(GatewayCollector(lambda parts=(): snap, Utilisation()))).decode()
    samples = {
        (s.name, frozenset(s.labels.items())): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }
    expected = {"births": 3, "rebirth_requests": 1, "device_births": 9, "device_deaths": 2, "commands": 5}
    for key, count in {**expected, "bad_commands": 4}.items():
        assert value(samples, f"fieldgate_sparkplug_{key}_total", sink="scada") == count
    assert value(samples, "fieldgate_sparkplug_births_total", sink="hist") == 1
    assert value(samples, "fieldgate_sparkplug_host_online", sink="scada") == 0
    assert ("fieldgate_sparkplug_host_online", frozenset({("sink", "hist")})) not in samples  # None: no series
    assert not any(n.startswith("fieldgate_sparkplug") and dict(lbl).get("sink") == "local" for n, lbl in samples)
    assert value(samples, "fieldgate_sink_published_total", sink="scada") == 40


def test_status_page_shows_a_sparkplug_sinks_counters_and_primary_host() -> None:
    """The page has a row per Sparkplug sink: its primary host (— when none heard) and its node counters."""
    page = PageParser()
    page.feed(StatusPage(_sparkplug_snapshot(), Utilisation(), []).render())
    rows = [cells for section, cells in page.rows if section == "sinks"]
    assert rows[-3:] == [
        ["Sparkplug sink", "primary host", "births", "rebirth requests", "device births", "device deaths"]
        + ["writes (DCMD)", "refused commands"],
        ["scada", "offline", "3", "1", "9", "2", "5", "4"],
        ["hist", "—", "1", "0", "0", "0", "0", "0"],
    ]
    assert [cells[0] for cells in rows[:4]] == ["sink", "local", "scada", "hist"]  # the sinks table as before


# --- the clock ----------------------------------------------------------------------------------------------


def _scrape(snap: GatewaySnapshot) -> Samples:
    text = generate_latest(_registry(GatewayCollector(lambda parts=(): snap, Utilisation()))).decode()
    return {
        (s.name, frozenset(s.labels.items())): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def test_metrics_show_the_clocks_sync_state_and_steps_and_no_gauge_when_unknown() -> None:
    """/metrics: fieldgate_clock_synchronized 1/0 (no series when unknown), steps, the last step's signed size."""
    base = GatewaySnapshot("g", 100.0, 0, 1.0, False)
    assert not any(name.startswith("fieldgate_clock") for name, _ in _scrape(base))  # no watch: no series
    stepped = _scrape(replace(base, clock=ClockSnapshot(False, "kernel", 2, -5.0, 1_700_000_000_000)))
    assert value(stepped, "fieldgate_clock_synchronized") == 0
    assert value(stepped, "fieldgate_clock_steps_total") == 2
    assert value(stepped, "fieldgate_clock_last_step_seconds") == -5.0
    assert (
        value(
            _scrape(replace(base, clock=ClockSnapshot(True, "timesyncd", 0, None, None))),
            "fieldgate_clock_synchronized",
        )
        == 1
    )
    unknown = _scrape(replace(base, clock=ClockSnapshot(None, "none", 0, None, None)))
    assert value(unknown, "fieldgate_clock_steps_total") == 0
    assert not any(n in ("fieldgate_clock_synchronized", "fieldgate_clock_last_step_seconds") for n, _ in unknown)


@pytest.mark.parametrize(
    ("clock", "line", "css"),
    [
        (ClockSnapshot(True, "timesyncd", 0, None, None), "clock: synchronised (timesyncd), 0 steps", "online"),
        (
            ClockSnapshot(False, "kernel", 1, 3600.24, 0),
            "clock: NOT synchronised (kernel), 1 step; the last one forward by 3600.2 s",
            "bad",
        ),
        (ClockSnapshot(None, "none", 3, -2.0, 0), "clock: unknown, 3 steps; the last one back by 2.0 s", "unknown"),
    ],
)
def test_status_page_has_a_clock_line_in_its_header(clock: ClockSnapshot, line: str, css: str) -> None:
    """The page's header says the clock's state (coloured) and its steps; no line without a clock watch."""
    snap = GatewaySnapshot("g", 100.0, 0, 1.0, False)
    header = StatusPage(replace(snap, clock=clock), Utilisation(), []).render().split("</header>")[0]
    paragraph = header.split('<p id="clock">')[1].split("</p>")[0]
    assert re.sub(r"<[^>]+>", "", paragraph) == line
    assert f'<span class="{css}">' in paragraph
    assert 'id="clock"' not in StatusPage(snap, Utilisation(), []).render()
