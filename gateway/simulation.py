"""Builds the configured virtual field devices (the `simulator` section) and runs them."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path

from drivers.modbus.settings import LineSettings, TcpEndpoint
from drivers.sim.line import VirtualLine
from drivers.sim.mcp import McpSimDevice
from drivers.sim.modbus import ModbusSimulator, SimPoint, SimSlave
from drivers.sim.waves import Wave
from gateway.config.addresses import TCP_SCHEME, port_key, resolve_path, split_listen
from gateway.config.schema import Config, SimModbusDevice, SimValue
from gateway.config.settings import modbus_line

log = logging.getLogger(__name__)


def _wave(v: SimValue | None) -> Wave:
    if v is None:
        return Wave()
    return Wave(kind=v.wave, value=v.value, min=v.min, max=v.max, period=v.period, step=v.step)


@dataclass
class Simulation:
    """The running virtual lines and their slaves."""

    lines: list[VirtualLine] = field(default_factory=list)
    simulators: dict[str, ModbusSimulator] = field(default_factory=dict)  # by link path or tcp:// url
    mcp_devices: list[McpSimDevice] = field(default_factory=list)

    async def stop_mcp(self) -> None:
        """Disconnect the simulated MCP devices (before the gateway's MCP server goes)."""
        for device in self.mcp_devices:
            await device.stop()
        self.mcp_devices.clear()

    async def stop(self) -> None:
        """Stop every device and remove the lines."""
        await self.stop_mcp()
        for sim in self.simulators.values():
            await sim.stop()
        for line in self.lines:
            line.close()


async def start_simulation(cfg: Config, base: Path) -> Simulation:
    """Create each virtual line and TCP endpoint, link or bind it where the config says, and start its slaves."""
    sim = Simulation()
    assert cfg.simulator is not None
    for line_cfg in cfg.simulator.modbus:
        link = resolve_path(line_cfg.link, base)
        bus_cfg = next((b for b in cfg.modbus.buses if resolve_path(b.port, base) == link), None)
        bus = modbus_line(bus_cfg) if bus_cfg else None
        line = VirtualLine(link)
        line.start()
        sim.lines.append(line)
        slaves = _slaves(line_cfg.devices, bus)
        simulator = ModbusSimulator(line.device_port, slaves, baudrate=bus.baudrate if bus else 9600)
        await simulator.start()
        sim.simulators[link] = simulator
        log.info("simulated line %s: units %s", link, ", ".join(str(s.unit) for s in slaves))
    for endpoint_cfg in cfg.simulator.modbus_tcp:
        url = TCP_SCHEME + endpoint_cfg.listen
        bus_cfg = next((b for b in cfg.modbus.buses if port_key(b.port) == port_key(url)), None)
        bus = modbus_line(bus_cfg) if bus_cfg else None
        host, port = split_listen(endpoint_cfg.listen, "0.0.0.0")
        slaves = _slaves(endpoint_cfg.devices, bus)
        # It speaks what the bus polling it speaks: Modbus TCP, or RTU frames as a serial device server would.
        framing = bus.framing if bus else "tcp"
        simulator = ModbusSimulator(TcpEndpoint(host, port), slaves, framing=framing)
        await simulator.start()
        sim.simulators[url] = simulator
        units = ", ".join(str(s.unit) for s in slaves)
        log.info("simulated %s endpoint %s: units %s", "Modbus TCP" if framing == "tcp" else "RTU", url, units)
    return sim


def _slaves(devices: list[SimModbusDevice], bus: LineSettings | None) -> list[SimSlave]:
    """The simulated slaves, each with the points of the device its bus polls at the same unit."""
    slaves = []
    for dev in devices:
        dev_cfg = next((d for d in bus.devices if d.unit == dev.unit), None) if bus else None
        points = [
            SimPoint(p.name, p.table, p.address, p.codec, _wave(dev.values.get(p.name)))
            for p in (dev_cfg.points if dev_cfg else [])
        ]
        slaves.append(SimSlave(dev.unit, points, dead=dev.dead))
    return slaves


async def start_mcp_simulation(cfg: Config, sim: Simulation, port: int) -> None:
    """Connect the simulated MCP devices to the gateway's own MCP server (listening on `port`)."""
    assert cfg.simulator is not None and cfg.mcp is not None
    tokens = {d.id: d.token for d in cfg.mcp.devices}
    host = split_listen(cfg.mcp.listen, "0.0.0.0")[0]
    host = "127.0.0.1" if host in ("0.0.0.0", "::", "") else host
    for dev in cfg.simulator.mcp:
        waves = {name: _wave(v) for name, v in dev.values.items()}
        device = McpSimDevice(host, port, dev.id, tokens[dev.id], interval=dev.interval, waves=waves)
        await device.start()
        sim.mcp_devices.append(device)
    if cfg.simulator.mcp:
        log.info("simulated MCP devices: %s", ", ".join(d.id for d in cfg.simulator.mcp))
