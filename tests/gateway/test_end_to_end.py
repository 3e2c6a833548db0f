"""The whole path on real parts: simulated slaves on a pty line → gateway → embedded amqtt → paho subscriber."""

from __future__ import annotations

import asyncio
import math
import struct
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import pytest
from pymodbus.client import AsyncModbusTcpClient

from gateway.app import Gateway
from gateway.config import load_config

from configs import Section, broker, config, device, line, point, sim_line, sim_slave, simulator, write
from helpers import Subscriber, free_port


def e2e_config(port: int, process: str | None = None) -> Section:
    """A plc with a point of every type and byte/word order, a steady device and a dead one on a simulated line."""
    holding = [
        point("i16", "holding", 0, "int16"),
        point("u16", "holding", 1, "uint16"),
        point("i32", "holding", 2, "int32"),
        point("u32", "holding", 4, "uint32", word_order="little"),
        point("i64", "holding", 6, "int64"),
        point("u64", "holding", 10, "uint64", word_order="little"),
        point("f32", "holding", 14, "float32"),
        point("f32ws", "holding", 16, "float32", word_order="little"),
        point("f32bs", "holding", 18, "float32", byte_order="little"),
        point("f64", "holding", 20, "float64"),
        point("f64ws", "holding", 24, "float64", word_order="little"),
        point("label", "holding", 30, "string:10"),
        point("flags", "holding", 40, "bitfield", bits={0: "run", 5: "alarm"}),
    ]
    others = [
        point("scaled", "input", 0, "int16", scale=0.1, offset=-10),
        point("relay", "coil", 3, writable=True),
        point("door", "discrete", 7),
        point("sp", "holding", 50, "uint16", scale=0.5, writable=True, min=0, max=1000),
        point("target", "holding", 60, "float32", writable=True),
    ]
    plc = device("plc", 1, poll="200ms", full_every="60s", points=holding + others)
    other = device("other", 2, poll="100ms", points=[point("level", "input", 0)])
    ghost = device("ghost", 3, poll="100ms", points=[point("level", "input", 0)])
    slaves = [sim_slave(1), sim_slave(2, {"level": {"value": 7}}), sim_slave(3, dead=True)]
    return config(
        broker=broker(port, process=process),
        buses=[line("line", "./ttyA", plc, other, ghost)],
        simulator=simulator(modbus=[sim_line("./ttyA", *slaves)]),
    )


@asynccontextmanager
async def running(path: Path) -> AsyncIterator[Gateway]:
    """A gateway started from a config file, stopped at the end."""
    gw = Gateway(load_config(path))
    await gw.start()
    try:
        yield gw
    finally:
        await gw.stop()


@pytest.fixture
async def gateway(tmp_path: Path) -> AsyncIterator[tuple[Gateway, Subscriber]]:
    """The test config's gateway and a subscriber on its embedded broker."""
    port = free_port()
    async with running(write(e2e_config(port), tmp_path)) as gw:
        sub = Subscriber(port)
        await asyncio.to_thread(sub.start)
        try:
            yield gw, sub
        finally:
            sub.stop()


def _sim(gw: Gateway):  # type: ignore[no-untyped-def]
    assert gw.simulation is not None
    return next(iter(gw.simulation.simulators.values()))


def _f32(x: float) -> float:
    return struct.unpack(">f", struct.pack(">f", x))[0]


async def test_every_type_and_order_arrives_decoded(gateway: tuple[Gateway, Subscriber]) -> None:
    gw, sub = gateway
    sim = _sim(gw)
    expected = {
        "i16": -12345,
        "u16": 54321,
        "i32": -2_000_000_000,
        "u32": 4_000_000_000,
        "i64": -(2**62) - 5,
        "u64": 2**64 - 3,
        "f32": 3.25,
        "f32ws": -1.5e-3,
        "f32bs": 1234.5,
        "f64": math.pi,
        "f64ws": -2.5e100,
        "label": "PUMP-7",
        "scaled": 12.3,
        "relay": True,
        "door": True,
    }
    for name, value in expected.items():
        sim.set(1, name, value)
    sim.set(1, "flags", 0b100001)

    def arrived(topic: str, value: object):  # type: ignore[no-untyped-def]
        def match(ms):  # type: ignore[no-untyped-def]
            for m in reversed(ms):
                if m.topic == topic and (
                    m.json() == value or (isinstance(value, float) and m.json() == pytest.approx(value, rel=1e-6))
                ):
                    return m
            return None

        return match

    for name, value in {**expected, "flags.run": True, "flags.alarm": True}.items():
        msg = await sub.wait_for(arrived(f"fieldgate/t1/plc/{name}", value), timeout=5)
        assert msg, name
    # The retained per-point topics are retained, the telemetry carries the sample time.
    tele = sub.on("fieldgate/t1/plc/telemetry")
    assert tele and all(abs(m.json()["ts"] - time.time() * 1000) < 10_000 for m in tele)


async def test_word_orders_differ_on_the_wire(gateway: tuple[Gateway, Subscriber]) -> None:
    gw, sub = gateway
    sim = _sim(gw)
    sim.set(1, "f32", 1.0)
    sim.set(1, "f32ws", 1.0)
    # The same value in both word orders occupies different register patterns.
    _, regs = sim._blocks[1]["holding"]
    assert regs[14:16] == [0x3F80, 0x0000]
    assert regs[16:18] == [0x0000, 0x3F80]
    await sub.wait_for(lambda ms: any(m.topic == "fieldgate/t1/plc/f32ws" and m.json() == 1.0 for m in ms))


async def test_write_round_trip_and_refusals(gateway: tuple[Gateway, Subscriber]) -> None:
    gw, sub = gateway
    sim = _sim(gw)
    await sub.wait_for(lambda ms: any(m.topic == "fieldgate/t1/plc/status" and m.payload == b"online" for m in ms))

    r = await sub.request("fieldgate/t1/plc/set/sp", "123.5")
    assert r.json() == {"ok": True, "value": 123.5, "error": None}
    assert sim.get(1, "sp") == 123.5

    r = await sub.request("fieldgate/t1/plc/set/target", '{"value": 21.75}')
    assert r.json() == {"ok": True, "value": 21.75, "error": None}
    assert sim.get(1, "target") == 21.75

    r = await sub.request("fieldgate/t1/plc/set/relay", "true")
    assert r.json()["ok"] is True and sim.get(1, "relay") is True

    r = await sub.request("fieldgate/t1/plc/set/i16", "5")
    assert r.json() == {"ok": False, "value": None, "error": "plc.i16 is read-only"}

    r = await sub.request("fieldgate/t1/plc/set/sp", "1001")
    assert r.json()["ok"] is False and "above the maximum 1000" in r.json()["error"]
    assert sim.get(1, "sp") == 123.5  # nothing was written

    r = await sub.request("fieldgate/t1/plc/set/target", '"warm"')
    assert r.json()["ok"] is False and "expected a number" in r.json()["error"]

    r = await sub.request("fieldgate/t1/nosuch/set/x", "1")
    assert r.json()["error"] == "unknown device 'nosuch'"


async def test_a_value_that_does_not_fit_is_refused_not_wrapped(gateway: tuple[Gateway, Subscriber]) -> None:
    gw, sub = gateway
    sim = _sim(gw)
    sim.set(1, "sp", 10)
    # sp is uint16 with scale 0.5 and no limit below 1000: 40000 would need raw 80000.
    bus = gw.buses[0]
    from gateway.types import Write

    result = await bus.write(Write("plc", "target", float("1e39")))
    assert result.ok is False and "float32" in (result.error or "")
    result = await bus.write(Write("other", "level", 3))
    assert result.ok is False and "read-only" in (result.error or "")
    assert sim.get(1, "sp") == 10


async def test_dead_unit_goes_offline_and_neighbours_keep_their_rate(gateway: tuple[Gateway, Subscriber]) -> None:
    gw, sub = gateway
    await sub.wait_for(lambda ms: any(m.topic == "fieldgate/t1/ghost/status" and m.payload == b"offline" for m in ms))
    assert sub.on("fieldgate/t1/other/status")[-1].payload == b"online"
    other = gw.buses[0].devices["other"]
    ghost = gw.buses[0].devices["ghost"]
    before, t0 = other.stats.cycles, time.monotonic()
    ghost_tx = ghost.stats.transactions
    await asyncio.sleep(2.0)
    rate = (other.stats.cycles - before) / (time.monotonic() - t0)
    # The dead neighbour is only probed with back-off: its share of the line is counted exactly here.
    assert ghost.stats.transactions - ghost_tx <= 2  # probes at 1 s, then 2 s ...
    # 100 ms poll: 10 cycles/s on an idle machine. The rate only has to show the line is not stalled behind the
    # ghost; a busy machine slows the polls, so the bound is half the poll rate, not 90 % of it.
    assert rate >= 5.0, rate
    # Only one offline message: the state change is announced once.
    assert len([m for m in sub.on("fieldgate/t1/ghost/status") if m.payload == b"offline"]) == 1


async def test_device_comes_back_online(gateway: tuple[Gateway, Subscriber]) -> None:
    gw, sub = gateway
    sim = _sim(gw)
    await sub.wait_for(lambda ms: any(m.topic == "fieldgate/t1/ghost/status" and m.payload == b"offline" for m in ms))
    sim.set_dead(3, False)
    msg = await sub.wait_for(
        lambda ms: any(m.topic == "fieldgate/t1/ghost/status" and m.payload == b"online" for m in ms), timeout=6
    )
    assert msg


async def test_shipped_config_starts_and_publishes(tmp_path: Path) -> None:
    shipped = (Path(__file__).parents[2] / "config.yaml").read_text()
    port, server_port, endpoint_port = free_port(), free_port(), free_port()
    text = (
        shipped.replace("tcp://127.0.0.1:1883", f"tcp://127.0.0.1:{port}")
        # Its status page too: 9720 may be taken by another gateway on this machine (a bench, the appliance).
        .replace("id: demo", f"id: demo\n  state_dir: ./state\n  http: 127.0.0.1:{free_port()}")
        .replace("127.0.0.1:7720", f"127.0.0.1:{free_port()}")
        # The Modbus TCP server and the simulated Modbus TCP endpoint (the bus's port and the simulator's listen).
        .replace("127.0.0.1:5020", f"127.0.0.1:{server_port}")
        .replace("127.0.0.1:5502", f"127.0.0.1:{endpoint_port}")
    )
    for address in (port, server_port, f"tcp://127.0.0.1:{endpoint_port}", f"listen: 127.0.0.1:{endpoint_port}"):
        assert f"{address}" in text
    path = tmp_path / "config.yaml"
    path.write_text(text)
    async with running(path):
        sub = Subscriber(port)
        await asyncio.to_thread(sub.start)
        try:
            for topic in (
                "fieldgate/demo/boiler1/telemetry",
                "fieldgate/demo/meter/telemetry",
                "fieldgate/demo/pump-1/telemetry",
                "fieldgate/demo/pv-meter/telemetry",  # the Modbus TCP bus
                "fieldgate/demo/inverter/telemetry",
            ):
                msg = await sub.next_on(topic, timeout=10)
                assert msg.json()["values"]
            await sub.wait_for(
                lambda ms: any(m.topic == "fieldgate/demo/spare/status" and m.payload == b"offline" for m in ms)
            )
            temps = [m.json() for m in sub.on("fieldgate/demo/boiler1/temperature")]
            assert all(55 <= t <= 65 for t in temps)
            powers = [m.json() for m in sub.on("fieldgate/demo/pv-meter/power")]
            assert powers and all(1500 <= w <= 4500 for w in powers)
            # SCADA's side: boiler1's temperature (input 0, int16 x 0.1) read through the Modbus TCP server.
            client = AsyncModbusTcpClient("127.0.0.1", port=server_port, timeout=5, retries=0)
            assert await client.connect()
            try:
                answer = await client.read_input_registers(0, count=1, device_id=1)
            finally:
                client.close()
            assert not answer.isError(), answer
            assert 550 <= struct.unpack(">h", struct.pack(">H", answer.registers[0]))[0] <= 650
        finally:
            sub.stop()


async def test_metrics_are_published(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import gateway.app

    monkeypatch.setattr(gateway.app, "METRICS_INTERVAL", 0.3)
    port = free_port()
    async with running(write(e2e_config(port), tmp_path)):
        sub = Subscriber(port)
        await asyncio.to_thread(sub.start)
        try:
            first = await sub.next_on("fieldgate/t1/metrics", timeout=5)
            m = first.json()
            assert set(m) >= {"ts", "uptime_s", "buses", "devices", "sinks"}
            await sub.wait_for(lambda ms: len([x for x in ms if x.topic == "fieldgate/t1/metrics"]) >= 3, timeout=5)
            last = sub.on("fieldgate/t1/metrics")[-1].json()
            assert last["buses"]["line"]["transactions"] > m["buses"]["line"]["transactions"]
            assert last["devices"]["ghost"]["timeouts"] >= 1
            assert last["sinks"]["local"]["connected"] is True
        finally:
            sub.stop()


async def test_the_broker_can_run_in_its_own_process(tmp_path: Path) -> None:
    port = free_port()
    async with running(write(e2e_config(port, process="separate"), tmp_path)) as gw:
        from bridge.broker_process import BrokerProcess

        assert isinstance(gw.broker, BrokerProcess) and gw.broker.pid is not None
        sub = Subscriber(port)
        await asyncio.to_thread(sub.start)
        try:
            msg = await sub.next_on("fieldgate/t1/other/level", timeout=10)
            assert msg.json() == 7
            r = await sub.request("fieldgate/t1/plc/set/sp", "10")
            assert r.json()["ok"] is True
        finally:
            sub.stop()
