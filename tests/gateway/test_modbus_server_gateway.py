"""The Modbus TCP server through a real gateway: a `fieldgate run` process polling a simulated RTU line, a pymodbus
client on its server, MQTT and /metrics watched from outside; and a reload of `modbus.server` in-process.

The server shares the line with the gateway's own polls: a read the polls cover is answered from their raw
values (no transaction on the line for it), any other read goes through the line; a write to a device exposed
with `writes: true` is carried out on the line, rate-limited with the device's MQTT writes, audited, and its
points read back and published. A read-only exposed device refuses writes with exception 1, audited too.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families
from pymodbus.client import AsyncModbusTcpClient

from gateway.app import Gateway
from gateway.config import load_config
from gateway.snapshot import GatewaySnapshot
from gateway.status_page import StatusPage
from gateway.systemd import status_line
from gateway.types import ModbusLineCounters, ModbusLineSnapshot, ModbusServerSnapshot
from gateway.utilisation import Utilisation

from configs import Section, broker, config, device, line, point, sim_line, sim_slave, simulator, write
from helpers import GatewayProcess, Subscriber, free_port, subscribed, until

ROOT = Path(__file__).resolve().parents[2]
#: Exception codes a client gets.
ILLEGAL_FUNCTION, BUSY, PATH_UNAVAILABLE = 0x01, 0x06, 0x0A
#: boiler1's polled points cover holding 0..1; 50 is not polled (the slave holds 0 there).
NOT_POLLED = 50


def gateway_config(mqtt: int, http: int, server: int, *, write_burst: int = 10) -> Section:
    """boiler1 (unit 1, read-only to clients) and boiler2 (unit 2, writes allowed) on one simulated line."""
    boiler1 = device("boiler1", 1, poll="100ms", points=[point("temp", "holding", 0), point("flow", "holding", 1)])
    boiler2 = device(
        "boiler2",
        2,
        poll="100ms",
        write_rate=0.01,  # one write per 100 s on average: the burst is all a test gets
        write_burst=write_burst,
        points=[point("sp", "holding", 10, writable=True)],
    )
    cfg = config(
        broker=broker(mqtt),
        http=f"127.0.0.1:{http}",
        buses=[line("rs485", "./ttyA", boiler1, boiler2)],
        simulator=simulator(
            modbus=[
                sim_line(
                    "./ttyA",
                    sim_slave(1, {"temp": {"value": 21}, "flow": {"value": 5}}),
                    sim_slave(2, {"sp": {"value": 50}}),
                )
            ]
        ),
    )
    cfg["modbus"]["server"] = {
        "listen": f"127.0.0.1:{server}",
        "expose": [{"unit": 1, "device": "boiler1"}, {"unit": 2, "device": "boiler2", "writes": True}],
    }
    return cfg


@dataclass
class Running:
    """A gateway process, its MQTT subscriber, and where its server, /metrics and audit log are."""

    gw: GatewayProcess
    sub: Subscriber
    server: int
    metrics: str
    audit: Path


@pytest.fixture
async def running(tmp_path: Path) -> AsyncIterator[Running]:
    """`fieldgate run` on the two-boiler line, with both boilers polled once already."""
    mqtt, http, server = free_port(), free_port(), free_port()
    path = write(gateway_config(mqtt, http, server, write_burst=2), tmp_path)
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    with GatewayProcess(["run", "-c", str(path)], tmp_path / "gateway.log", cwd=tmp_path, env=env) as gw:
        await gw.logged("fieldgate t1 up")
        async with subscribed(mqtt) as sub:
            for topic in ("boiler1/temp", "boiler2/sp"):
                await sub.next_on(f"fieldgate/t1/{topic}", timeout=20)
            yield Running(gw, sub, server, f"http://127.0.0.1:{http}/metrics", tmp_path / "state" / "audit.log")


@asynccontextmanager
async def client(port: int) -> AsyncIterator[AsyncModbusTcpClient]:
    """A connected pymodbus Modbus TCP client (no retries: one request, one answer)."""
    c = AsyncModbusTcpClient("127.0.0.1", port=port, timeout=5, retries=0)
    assert await c.connect()
    try:
        yield c
    finally:
        c.close()


def own_address(c: AsyncModbusTcpClient) -> str:
    """The client's end of its connection, as the server names its peer: "127.0.0.1:<port>"."""
    host, port = c.ctx.transport.get_extra_info("sockname")[:2]
    return f"{host}:{port}"


async def scrape(url: str) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    """Every sample of /metrics, keyed by (sample name, labels)."""
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=5)) as http, http.get(url) as resp:
        assert resp.status == 200
        body = await resp.text()
    return {
        (s.name, frozenset(s.labels.items())): s.value
        for family in text_string_to_metric_families(body)
        for s in family.samples
    }


def audit_lines(path: Path) -> list[dict[str, Any]]:
    """The audit log's records so far."""
    return [json.loads(x) for x in path.read_text().splitlines()] if path.exists() else []


async def test_reads_come_from_the_poll_cache_or_through_the_line_and_metrics_show_the_server(
    running: Running,
) -> None:
    before = await scrape(running.metrics)
    async with client(running.server) as c:
        for _ in range(20):
            cached = await c.read_holding_registers(0, count=2, device_id=1)
            assert not cached.isError() and list(cached.registers) == [21, 5]
        passed = await c.read_holding_registers(NOT_POLLED, count=3, device_id=1)
        assert not passed.isError() and list(passed.registers) == [0, 0, 0]
        unknown = await c.read_holding_registers(0, count=1, device_id=9)
        assert unknown.isError() and unknown.exception_code == PATH_UNAVAILABLE
    after = await scrape(running.metrics)

    def moved(name: str, **labels: str) -> float:
        key = (name, frozenset(labels.items()))
        return after[key] - before.get(key, 0.0)

    # The 20 covered reads cost the line nothing: one pass-through transaction, for the uncovered read.
    assert moved("fieldgate_modbus_server_cache_hits_total") == 20
    assert moved("fieldgate_modbus_line_passthrough_total", line="rs485") == 1
    assert moved("fieldgate_modbus_server_passthrough_total") == 1
    assert after[("fieldgate_modbus_server_up", frozenset({("listen", f"127.0.0.1:{running.server}")}))] == 1
    assert moved("fieldgate_modbus_server_exceptions_total", code="0x0A") == 1
    assert after[("fieldgate_modbus_server_accepted_total", frozenset())] >= 1


async def test_writes_reach_the_slave_are_audited_published_and_share_the_mqtt_write_rate(running: Running) -> None:
    sub = running.sub
    async with client(running.server) as c:
        origin = f"modbus-tcp {own_address(c)}"
        refused = await c.write_register(0, 99, device_id=1)  # boiler1 is exposed read-only
        assert refused.isError() and refused.exception_code == ILLEGAL_FUNCTION
        done = await c.write_register(10, 1234, device_id=2)
        assert not done.isError() and (done.address, list(done.registers)) == (10, [1234])
        # Read back from the slave and published as an MQTT write's would be.
        await sub.wait_for(lambda ms: any(m.topic == "fieldgate/t1/boiler2/sp" and m.json() == 1234 for m in ms))
        # boiler2's write burst is 2 (its rate 1 per 100 s): an MQTT write spends the second token ...
        result = await sub.request("fieldgate/t1/boiler2/set/sp", "55")
        assert result.json()["ok"] is True, result.json()
        # ... and the next client write finds none left.
        limited = await c.write_register(10, 4321, device_id=2)
        assert limited.isError() and limited.exception_code == BUSY
        check = await c.read_holding_registers(10, count=1, device_id=2)
        assert not check.isError() and list(check.registers) == [55]

    records = await until(lambda: (r := audit_lines(running.audit)) and len(r) >= 6 and r, what="audit records")
    tcp = [r for r in records if r["origin"] == origin]
    assert [(r["device"], r["action"], r.get("stage"), r["ok"]) for r in tcp] == [
        ("boiler1", "write", None, False),  # refused: the outcome line only
        ("boiler2", "write", "request", None),  # before the device was touched
        ("boiler2", "write", None, True),
        ("boiler2", "write", None, False),  # rate limited
    ]
    assert "write_register 10 1234" in tcp[2]["point"] and "rate limited" in tcp[3]["error"]
    assert all(r["topic"] == f"modbus-tcp://127.0.0.1:{running.server}" for r in tcp)
    assert any(r["origin"] == "local" and r["device"] == "boiler2" and r["ok"] for r in records)  # the MQTT write


# --- a reload of modbus.server (in-process) -------------------------------------------------------------------


async def read_unit(port: int, unit: int, address: int = 0) -> Any:
    """One read of holding `address` on `unit` through the server at `port`."""
    async with client(port) as c:
        return await c.read_holding_registers(address, count=1, device_id=unit)


async def test_a_reload_rebuilds_the_server_with_its_new_settings_and_over_the_restarted_lines(tmp_path: Path) -> None:
    first, second = free_port(), free_port()
    cfg = gateway_config(free_port(), free_port(), first)
    cfg["gateway"]["http"] = None
    cfg["modbus"]["server"]["expose"] = [{"unit": 1, "device": "boiler1"}]
    path = write(cfg, tmp_path)
    gw = Gateway(load_config(path))
    await gw.start()
    try:
        await until(lambda: gw.buses[0].devices["boiler1"].online, what="boiler1 polled")
        old_server = gw.modbus_server
        assert old_server is not None
        assert (await read_unit(first, 2)).exception_code == PATH_UNAVAILABLE

        # Another listen address and a second unit: taken live, the old listener closed.
        cfg["modbus"]["server"] = {"listen": f"127.0.0.1:{second}", "expose": [{"unit": 1, "device": "boiler1"}]}
        cfg["modbus"]["server"]["expose"].append({"unit": 2, "device": "boiler2"})
        path.write_text(yaml.safe_dump(cfg))
        assert await gw.reload() is True
        assert gw.modbus_server is not old_server and gw.snapshot().modbus_server is not None
        response = await read_unit(second, 2)
        assert not response.isError(), response
        with pytest.raises(Exception):  # noqa: B017 - whichever way the refused connect shows
            await asyncio.wait_for(read_unit(first, 1), 5)

        # A change to the line restarts it: the server serves from the new line, not the stopped one (whose
        # cache would still answer the polled registers, and whose queue nothing serves).
        cfg["modbus"]["buses"][0]["devices"][0]["poll"] = "200ms"
        path.write_text(yaml.safe_dump(cfg))
        assert await gw.reload() is True
        await until(lambda: gw.buses[0].devices["boiler1"].online, what="boiler1 polled on the new line")
        response = await read_unit(second, 1, NOT_POLLED)
        assert not response.isError() and list(response.registers) == [0], response
        assert gw.buses[0].stats.passthrough == 1

        # Removed: no server, nothing listening.
        del cfg["modbus"]["server"]
        path.write_text(yaml.safe_dump(cfg))
        assert await gw.reload() is True
        assert gw.modbus_server is None and gw.snapshot().modbus_server is None
        with pytest.raises(Exception):  # noqa: B017
            await asyncio.wait_for(read_unit(second, 1), 5)
    finally:
        await gw.stop()


# --- how the server is shown ------------------------------------------------------------------------------------


def test_the_status_page_and_the_systemd_status_line_show_the_server_and_the_lines_pass_through() -> None:
    counters = ModbusLineCounters(transactions=40, passthrough=7, passthrough_failed=2)
    lines = (ModbusLineSnapshot("rs485", "/dev/ttyX", "9600 8E1", True, False, 0.0, 5.0, counters, ()),)
    server = ModbusServerSnapshot(
        listen="127.0.0.1:5020",
        running=True,
        connections=3,
        accepted=9,
        refused=1,
        malformed=2,
        cache_hits=120,
        passthrough=7,
        writes=4,
        busy=5,
        waiting=0,
        exceptions={0x0B: 2, 0x01: 1},
        unaudited=0,
    )
    snap = GatewaySnapshot("g", 100.0, 0, 90.0, False, lines=lines, modbus_server=server)
    html = StatusPage(snap, Utilisation(), []).render()
    section = html.split('<section id="modbus-server">')[1].split("</section>")[0]
    assert "listening" in section and "9 connection(s) accepted, 1 refused" in section and "2 closed" in section
    cells = re.findall(r"<td[^>]*>([^<]*)</td>", section)
    assert cells == ["127.0.0.1:5020", "3", "120", "7", "4", "5", "0", "0x01: 1, 0x0B: 2"]
    lines_section = html.split('<section id="lines">')[1].split("</section>")[0]
    assert "7 (2 failed)" in lines_section
    assert "3 Modbus TCP clients" in status_line(snap)
    # Without a server: said so on the page, nothing in the status line.
    bare = GatewaySnapshot("g", 100.0, 0, 90.0, False, lines=lines)
    assert "The Modbus TCP server is not enabled." in StatusPage(bare, Utilisation(), []).render()
    assert "Modbus TCP" not in status_line(bare)
