"""Rigs for the HIL tests: a ModbusBus and pymodbus slaves joined by the baud-accurate line."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path

import pytest

from drivers.modbus.bus import OPEN_TIMEOUT, ModbusBus
from drivers.modbus.transport import ModbusLink
from drivers.sim.modbus import ModbusSimulator, SimPoint, SimSlave
from drivers.sim.waves import Wave
from gateway.config import parse_config
from gateway.config.schema import BusConfig
from hil.line import Faults, Rs485Line

from helpers import Recorder


def bus_config(devices_yaml: str, **bus: object) -> BusConfig:
    """A bus config validated exactly like a user's."""
    settings = {"port": "/dev/null", "baudrate": 19200, "parity": "E", **bus}
    extra = "".join(f"\n      {k}: {v}" for k, v in settings.items())
    text = f"""
modbus:
  buses:
    - name: line{extra}
      devices:
{devices_yaml}
"""
    return parse_config(text).config.modbus.buses[0]


def known_value(unit: int, address: int) -> int:
    """The constant a simulated holding register holds: distinct per unit and address."""
    return (unit * 1000 + address) & 0xFFFF


@dataclass
class Rig:
    """A bus, its line and the slaves behind it."""

    bus: ModbusBus
    sim: ModbusSimulator
    rec: Recorder
    line: Rs485Line

    def wrong_values(self) -> list[tuple[str, str, object, int]]:
        """Every published value that differs from what its slave held: (device, point, got, held)."""
        units = {d.name: d.unit for d in self.bus.cfg.devices}
        addresses = {(d.name, p.name): p.address for d in self.bus.cfg.devices for p in d.points}
        wrong: list[tuple[str, str, object, int]] = []
        for s in self.rec.samples:
            for name, value in s.values.items():
                held = known_value(units[s.device], addresses[(s.device, name)])
                if value != held:
                    wrong.append((s.device, name, value, held))
        return wrong

    async def wait_for(self, cond: Callable[[], bool], timeout: float) -> bool:
        """Poll `cond` until it holds or `timeout` seconds passed."""
        deadline = time.monotonic() + timeout
        while not cond():
            if time.monotonic() > deadline:
                return False
            await asyncio.sleep(0.02)
        return True


RigFactory = Callable[..., Awaitable[Rig]]


@pytest.fixture
async def make_rig(tmp_path: Path) -> AsyncIterator[RigFactory]:
    """Build line + slaves (constant known values) + bus from a devices YAML; all stopped at the end."""
    rigs: list[Rig] = []

    async def build(
        devices_yaml: str, *, faults: Faults | None = None, seed: int = 1, start: bool = True, **settings: object
    ) -> Rig:
        cfg = bus_config(devices_yaml, **settings)
        line = Rs485Line(
            tmp_path / f"ttyHIL{len(rigs)}",
            baudrate=cfg.baudrate,
            frame_format=f"{cfg.bytesize}{cfg.parity}{cfg.stopbits}",
            faults=faults,
            seed=seed,
        )
        await line.start()
        slaves = [
            SimSlave(
                d.unit,
                [
                    SimPoint(p.name, p.table, p.address, p.codec, Wave(value=known_value(d.unit, p.address)))
                    for p in d.points
                ],
            )
            for d in cfg.devices
        ]
        sim = ModbusSimulator(line.device_port, slaves, baudrate=cfg.baudrate)
        await sim.start()
        rec = Recorder()
        # The bus times its gaps and timeouts from the configured format (8E1); the pty only takes 8N1.
        link = ModbusLink(
            line.gateway_port,
            baudrate=cfg.baudrate,
            parity="N",
            bytesize=cfg.bytesize,
            stopbits=cfg.stopbits,
            connect_timeout=OPEN_TIMEOUT,
        )
        bus = ModbusBus(cfg.model_copy(update={"port": line.gateway_port}), rec.sample, rec.state, link=link)
        rig = Rig(bus, sim, rec, line)
        rigs.append(rig)
        if start:
            await bus.start()
        return rig

    yield build
    for rig in rigs:
        await rig.bus.stop()
        await rig.sim.stop()
        await rig.line.stop()
