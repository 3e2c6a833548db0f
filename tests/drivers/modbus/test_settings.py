"""A Modbus line runs from its own frozen settings, written here by hand: no config file, no config package."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

from drivers.modbus.bus import ModbusBus
from drivers.modbus.codec import PointCodec
from drivers.modbus.device import Device
from drivers.modbus.settings import DeviceSettings, LineSettings, PointSettings, TcpEndpoint
from drivers.sim.line import VirtualLine
from drivers.sim.modbus import ModbusSimulator, SimPoint, SimSlave
from gateway.types import Write

from helpers import Recorder, until

ROOT = Path(__file__).resolve().parents[3]

TEMP = PointSettings("temp", "holding", 10, PointCodec("int16", scale=0.1), deadband=0.5)
SETPOINT = PointSettings("sp", "holding", 20, PointCodec("uint16"), writable=True, min=5, max=30)
RUN = PointSettings("run", "coil", 0, PointCodec("bool"), poll=0.2)


def line(port: str | TcpEndpoint, *devices: DeviceSettings) -> LineSettings:
    """A line at 115200 baud without parity (ptys refuse even parity)."""
    return LineSettings("line1", port, baudrate=115200, parity="N", devices=devices)


async def test_a_line_built_from_settings_alone_polls_and_writes_within_the_limits(tmp_path: Path) -> None:
    boiler = DeviceSettings("boiler", 3, poll=0.05, points=(TEMP, SETPOINT))
    wire = VirtualLine(tmp_path / "tty")
    wire.start()
    points = [SimPoint(p.name, p.table, p.address, p.codec) for p in boiler.points]
    sim = ModbusSimulator(wire.device_port, [SimSlave(3, points)])
    await sim.start()
    rec = Recorder()
    bus = ModbusBus(line(wire.gateway_port, boiler), rec.sample, rec.state)
    sim.set(3, "temp", 21.5)
    sim.set(3, "sp", 12)
    await bus.start()
    try:
        # The point's codec came with its settings: the raw 215 reads as 21.5.
        await until(lambda: any(s.values.get("temp") == 21.5 for s in rec.samples), what="a decoded sample")
        assert any(s.values.get("sp") == 12 for s in rec.samples)
        result = await bus.write(Write("boiler", "sp", 25))
        assert result.ok and result.value == 25 and sim.get(3, "sp") == 25
        # The write limits came with the settings too.
        refused = await bus.write(Write("boiler", "sp", 31))
        assert not refused.ok and "above the maximum 30" in str(refused.error)
        assert sim.get(3, "sp") == 25
    finally:
        await bus.stop()
        await sim.stop()
        wire.close()


def test_a_serial_device_server_prints_as_configured_and_gets_the_longer_timeout() -> None:
    dev = DeviceSettings("d", 1, points=(TEMP,))
    server = line(TcpEndpoint("10.0.0.7", 4001), dev)
    serial = line("/dev/ttyUSB0", dev)
    assert str(server.port) == "tcp://10.0.0.7:4001"
    assert server.is_tcp and not serial.is_tcp
    # A network round trip on top of the wire time: a serial device server's reads wait longer.
    assert Device(dev, server).timeout("holding", 1) > Device(dev, serial).timeout("holding", 1)


async def test_profiles_describe_each_device_from_its_settings() -> None:
    boiler = DeviceSettings("boiler", 3, full_every=30.0, write_rate=2.0, write_burst=4, points=(TEMP, SETPOINT))
    pump = DeviceSettings("pump", 4, points=(RUN,))
    bus = ModbusBus(line("/dev/null", boiler, pump), lambda s: None, lambda s: None)
    first, second = bus.profiles()
    assert (first.name, first.full_every, first.write_rate, first.write_burst) == ("boiler", 30.0, 2.0, 4)
    assert first.deadbands == {"temp": 0.5}  # only points with a deadband
    assert first.points == frozenset({"temp", "sp"})
    assert first.writer == bus.write and first.commander is None and not first.every_sample
    assert (second.name, second.full_every, second.write_rate, second.write_burst) == ("pump", 60.0, 5.0, 10)
    assert second.deadbands == {} and second.points == frozenset({"run"})


def test_the_drivers_run_without_the_config_package() -> None:
    # In a fresh interpreter: the test process itself has loaded the config package for other tests.
    script = textwrap.dedent(
        """
        import asyncio
        import sys
        from drivers.mcp.server import McpServer
        from drivers.mcp.settings import McpDeviceSettings, McpSettings
        from drivers.modbus.bus import ModbusBus, line_budget
        from drivers.modbus.codec import PointCodec
        from drivers.modbus.settings import DeviceSettings, LineSettings, PointSettings
        from drivers.sim.modbus import ModbusSimulator

        async def build() -> None:  # the drivers are built on the loop, as the gateway builds them
            point = PointSettings("v", "holding", 0, PointCodec("uint16"))
            settings = LineSettings("l", "/dev/null", devices=(DeviceSettings("d", 1, points=(point,)),))
            ModbusBus(settings, print, print).profiles()
            line_budget(settings)
            mcp = McpSettings("127.0.0.1:0", "127.0.0.1", 0, devices=(McpDeviceSettings("m", "t" * 16),))
            McpServer(mcp, print, print).profiles()

        asyncio.run(build())
        loaded = sorted(m for m in sys.modules if m.startswith("gateway.config") or m == "pydantic")
        print(",".join(loaded))
        """
    )
    run = subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert run.returncode == 0, run.stderr
    assert run.stdout.strip() == "", f"drivers loaded {run.stdout.strip()}"
