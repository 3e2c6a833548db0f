"""A gateway process polling Modbus TCP devices (a `tcp://` bus with the default framing) behind one pymodbus
endpoint: values over MQTT, a `set`, /metrics, the status page and Home Assistant discovery, as on a serial line."""

from __future__ import annotations

import asyncio
from pathlib import Path

import aiohttp
from prometheus_client.parser import text_string_to_metric_families

from drivers.modbus.settings import TcpEndpoint
from drivers.sim.modbus import ModbusSimulator, SimPoint, SimSlave
from gateway.config import load_config
from gateway.config.settings import modbus_line
from hil.ports import free_port

from configs import broker, config, device, line, point, write
from helpers import GatewayProcess, subscribed


def metric(text: str, name: str, **labels: str) -> float | None:
    """The value of one sample of the exposition `text`, None when it is not there."""
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            if s.name == name and all(s.labels.get(k) == v for k, v in labels.items()):
                return float(s.value)
    return None


async def test_a_modbus_tcp_bus_publishes_takes_a_set_and_shows_like_a_serial_line(tmp_path: Path) -> None:
    endpoint, mqtt, http = free_port(), free_port(), free_port()
    meter = device(
        "meter",
        1,
        poll="100ms",
        full_every="1s",
        points=[
            point("power", "input", 0, "float32", deadband=10),
            point("limit", "holding", 10, "int16", writable=True),
        ],
    )
    pump = device("pump", 2, poll="100ms", points=[point("running", "coil", 0)])
    bus = line("plant", f"tcp://127.0.0.1:{endpoint}", meter, pump, baudrate=None, parity=None)
    cfg = config(
        http=f"127.0.0.1:{http}",
        broker=broker(mqtt, process="inline"),
        buses=[bus],
        homeassistant={"enabled": True},
    )
    path = write(cfg, tmp_path)
    settings = modbus_line(load_config(path).config.modbus.buses[0])
    assert settings.framing == "tcp"  # the default on a tcp:// port
    slaves = [
        SimSlave(d.unit, [SimPoint(p.name, p.table, p.address, p.codec) for p in d.points]) for d in settings.devices
    ]
    sim = ModbusSimulator(TcpEndpoint("127.0.0.1", endpoint), slaves, framing="tcp")
    await sim.start()
    sim.set(1, "power", 1234.5)
    sim.set(1, "limit", 80)
    sim.set(2, "running", True)
    try:
        with GatewayProcess(["run", "-c", str(path)], tmp_path / "gw.log", cwd=tmp_path) as gw:
            await gw.logged("meter (unit 1 on plant) is online")
            await gw.logged("pump (unit 2 on plant) is online")
            async with subscribed(mqtt, "fieldgate/#", "homeassistant/#") as sub:
                # Values are published as they change (and in full snapshots): change them now.
                sim.set(1, "power", 2500.25)
                sim.set(2, "running", False)
                power = await sub.wait_for(
                    lambda ms: any(m.topic == "fieldgate/t1/meter/power" and m.json() == 2500.25 for m in ms)
                )
                assert power
                # Within the deadband: not published; past it: published.
                sim.set(1, "power", 2505.0)
                # The full snapshot (full_every) carries it once polled.
                await sub.wait_for(
                    lambda ms: any(
                        m.topic == "fieldgate/t1/meter/telemetry" and m.json()["values"].get("power") == 2505.0
                        for m in ms
                    )
                )
                sim.set(1, "power", 2600.0)
                await sub.wait_for(
                    lambda ms: any(m.topic == "fieldgate/t1/meter/power" and m.json() == 2600.0 for m in ms)
                )
                assert 2505.0 not in [m.json() for m in sub.on("fieldgate/t1/meter/power")]
                await sub.wait_for(
                    lambda ms: any(m.topic == "fieldgate/t1/pump/running" and m.json() is False for m in ms)
                )
                assert (await sub.next_on("fieldgate/t1/meter/status")).payload == b"online"

                r = await sub.request("fieldgate/t1/meter/set/limit", "42")
                assert r.json() == {"ok": True, "value": 42, "error": None}
                assert sim.get(1, "limit") == 42
                r = await sub.request("fieldgate/t1/meter/set/limit", "70000")
                assert r.json()["ok"] is False and sim.get(1, "limit") == 42

                # Home Assistant discovery for each point, as for a serial line's.
                topics = await sub.wait_for(
                    lambda ms: {m.topic for m in ms if m.topic.startswith("homeassistant/") and m.payload}
                )
                assert any("meter_power" in t for t in topics) and any("pump_running" in t for t in topics)

                async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=10)) as web:
                    labels = {"line": "plant", "device": "meter"}

                    async def scrape() -> str:
                        async with web.get(f"http://127.0.0.1:{http}/metrics") as resp:
                            assert resp.status == 200
                            return await resp.text()

                    text = await scrape()
                    first = metric(text, "fieldgate_modbus_device_transactions_total", **labels) or 0.0
                    await asyncio.sleep(0.5)
                    text = await scrape()
                    assert (metric(text, "fieldgate_modbus_device_transactions_total", **labels) or 0.0) > first
                    assert metric(text, "fieldgate_modbus_device_timeouts_total", **labels) == 0
                    # No serial wire on Modbus TCP: no wire time counted.
                    assert metric(text, "fieldgate_modbus_line_wire_seconds_total", line="plant") == 0

                    async with web.get(f"http://127.0.0.1:{http}/") as resp:
                        page = await resp.text()
                    assert resp.status == 200
                    assert f"tcp://127.0.0.1:{endpoint}" in page and "meter" in page and "pump" in page
                    assert "Modbus TCP" in page and "9600 8E1" not in page  # no baud rate on Modbus TCP
                assert gw.stop() == 0
    finally:
        await sim.stop()
