"""The simulator's Modbus TCP endpoints (`simulator.modbus_tcp`), read by a plain pymodbus client, not the gateway."""

from __future__ import annotations

import socket
import struct
import subprocess
import sys
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import pytest
from pymodbus.client import AsyncModbusTcpClient
from pymodbus.exceptions import ModbusIOException
from pymodbus.framer import FramerType

from gateway.config import parse_config
from gateway.simulation import Simulation, start_simulation

from configs import Section, broker, config, device, line, point, text, write
from helpers import free_port, until


def endpoint_config(port: int, **bus: object) -> Section:
    """A bus polling tcp://127.0.0.1:`port`, and a simulated endpoint there with two live units and a dead one."""
    plc = device("plc", 1, points=[point("t", "holding", 0, "int16"), point("count", "input", 2, "uint32")])
    meter = device("meter", 2, points=[point("t", "holding", 0, "int16")])
    ghost = device("ghost", 3, points=[point("t", "holding", 0, "int16")])
    ramp = {"wave": "ramp", "min": 0, "max": 1_000_000, "step": 1, "period": "20ms"}
    devices = [
        {"unit": 1, "values": {"t": {"value": -5}, "count": ramp}},
        {"unit": 2, "values": {"t": {"value": 7}}},
        {"unit": 3, "dead": True},
    ]
    return config(
        broker=None,
        buses=[line("plc-net", f"tcp://127.0.0.1:{port}", plc, meter, ghost, **bus)],
        simulator={"modbus_tcp": [{"listen": f"127.0.0.1:{port}", "devices": devices}]},
    )


@asynccontextmanager
async def simulated(cfg: Section, tmp_path: Path) -> AsyncIterator[Simulation]:
    """The config's simulated devices, running; stopped at the end."""
    sim = await start_simulation(parse_config(text(cfg)).config, tmp_path)
    try:
        yield sim
    finally:
        await sim.stop()


@asynccontextmanager
async def client(port: int, framer: FramerType) -> AsyncIterator[AsyncModbusTcpClient]:
    """A pymodbus TCP client connected to 127.0.0.1:`port`, closed at the end."""
    c = AsyncModbusTcpClient("127.0.0.1", port=port, framer=framer, timeout=2, retries=0)
    assert await c.connect()
    try:
        yield c
    finally:
        c.close()


async def test_one_endpoint_answers_modbus_tcp_for_several_units_with_moving_values(tmp_path: Path) -> None:
    port = free_port()
    async with simulated(endpoint_config(port), tmp_path) as sim, client(port, FramerType.SOCKET) as c:
        endpoint = sim.simulators[f"tcp://127.0.0.1:{port}"]
        assert endpoint.framing == "tcp"
        one = await c.read_holding_registers(0, count=1, device_id=1)
        two = await c.read_holding_registers(0, count=1, device_id=2)
        assert struct.unpack(">h", struct.pack(">H", one.registers[0]))[0] == -5
        assert two.registers == [7]
        # The same wave logic as a serial line's slaves: a ramp moves between reads.
        first = await c.read_input_registers(2, count=2, device_id=1)

        async def moved() -> bool:
            again = await c.read_input_registers(2, count=2, device_id=1)
            return again.registers != first.registers

        await until(moved, what="unit 1's ramp to move")
        assert endpoint.get(1, "t") == -5  # readable by point name, as a serial line's slaves are
        # A dead unit stays silent, as a device behind a converter that never answers.
        with pytest.raises(ModbusIOException):
            await c.read_holding_registers(0, count=1, device_id=3)


async def test_units_0_and_255_answer_as_devices_on_their_own_ip_often_do(tmp_path: Path) -> None:
    port = free_port()
    direct = [device(f"d{unit}", unit, points=[point("t", "holding", 0, "int16")]) for unit in (0, 255)]
    simulated_units = [{"unit": unit, "values": {"t": {"value": unit + 1}}} for unit in (0, 255)]
    cfg = config(
        buses=[line("plc-net", f"tcp://127.0.0.1:{port}", *direct)],
        simulator={"modbus_tcp": [{"listen": f"127.0.0.1:{port}", "devices": simulated_units}]},
    )
    async with simulated(cfg, tmp_path), client(port, FramerType.SOCKET) as c:
        assert (await c.read_holding_registers(0, count=1, device_id=0)).registers == [1]
        assert (await c.read_holding_registers(0, count=1, device_id=255)).registers == [256]


async def test_the_endpoint_speaks_rtu_frames_when_its_bus_says_framing_rtu(tmp_path: Path) -> None:
    port = free_port()
    async with simulated(endpoint_config(port, framing="rtu"), tmp_path) as sim, client(port, FramerType.RTU) as c:
        assert sim.simulators[f"tcp://127.0.0.1:{port}"].framing == "rtu"
        answer = await c.read_holding_registers(0, count=1, device_id=2)
        assert answer.registers == [7]


def test_an_endpoint_whose_port_is_taken_ends_the_start_with_one_line_naming_it(tmp_path: Path) -> None:
    with socket.create_server(("127.0.0.1", free_port())) as held:
        port = held.getsockname()[1]
        cfg = endpoint_config(port) | {"broker": broker(free_port())}
        path = write(cfg, tmp_path)
        run = subprocess.run(
            [sys.executable, "-m", "gateway", "run", "-c", str(path)], capture_output=True, text=True, timeout=60
        )
    assert run.returncode == 1, run.stderr
    said = f"fieldgate: simulator: cannot listen on tcp://127.0.0.1:{port}: Address already in use"
    assert run.stderr.strip() == said
