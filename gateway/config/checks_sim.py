"""Cross-checks of the `simulator` section: each simulated device must be one the gateway polls or accepts."""

from __future__ import annotations

from typing import Any

from .addresses import TCP_SCHEME, host_port, port_key
from .checkbase import CheckBase
from .problems import Path, hint
from .schema import SimModbusDevice


class SimulatorChecks(CheckBase):
    """Simulated lines, endpoints and MCP devices against the buses and MCP devices they stand in for."""

    def _simulator(self) -> None:
        sim = self.config.simulator
        if sim is None:
            return
        self._sim_mcp()
        links: dict[Any, Path] = {}
        for n, line in enumerate(sim.modbus):
            at = ("simulator", "modbus", n)
            link = port_key(line.link)
            self._first(links, link, at + ("link",), f"link {line.link!r} is used by two simulated lines")
            self._sim_units(line.devices, at, "line")
            self._sim_polled(link, line.devices, at, "link", "line")
        for n, endpoint in enumerate(sim.modbus_tcp):
            at = ("simulator", "modbus_tcp", n)
            if host_port(endpoint.listen) is None:
                self._error(at + ("listen",), f"{endpoint.listen!r} is not HOST:PORT (e.g. 127.0.0.1:5502)")
                continue
            url = port_key(TCP_SCHEME + endpoint.listen)
            self._first(links, url, at + ("listen",), f"{endpoint.listen!r} is listened on by two simulated endpoints")
            self._sim_units(endpoint.devices, at, "endpoint")
            self._sim_polled(url, endpoint.devices, at, "listen", "endpoint")

    def _sim_units(self, devices: list[SimModbusDevice], at: Path, what: str) -> None:
        units: dict[Any, Path] = {}
        for k, simdev in enumerate(devices):
            message = f"unit {simdev.unit} is simulated twice on this {what}"
            self._first(units, simdev.unit, at + ("devices", k, "unit"), message)

    def _sim_polled(self, port: str, devices: list[SimModbusDevice], at: Path, key: str, what: str) -> None:
        """The bus at `port` must exist (else nothing polls the simulated devices), and poll each of them."""
        buses = {port_key(bus.port): b for b, bus in reversed(list(enumerate(self.config.modbus.buses)))}
        if port not in buses:
            # A bus dropped as invalid may be the one meant here: no "not found" then.
            if not self.pruned.dropped(("modbus", "buses"), depth=1, keys=("port",)):
                self._warn(at + (key,), f"no modbus bus has port {port!r}: nothing polls this simulated {what}")
            return
        for k, simdev in enumerate(devices):
            self._sim_device(buses[port], simdev.unit, simdev.values, at + ("devices", k))

    def _sim_mcp(self) -> None:
        """A simulated MCP device must be one the MCP server accepts (its token comes from there)."""
        assert self.config.simulator is not None
        known = sorted(d.id for d in self.config.mcp.devices) if self.config.mcp else []
        if self.pruned.dropped(("mcp",)):
            return
        for n, device in enumerate(self.config.simulator.mcp):
            if device.id not in known:
                where = "mcp.devices" if self.config.mcp else "an `mcp` section"
                self._error(("simulator", "mcp", n, "id"), f"{device.id!r} is not in {where}{hint(device.id, known)}")

    def _sim_device(self, b: int, unit: int, values: dict[str, Any], at: Path) -> None:
        """The values of a simulated slave must name points of the device polled at its unit."""
        bus = self.config.modbus.buses[b]
        bus_at = ("modbus", "buses", b)
        found = [(d, device) for d, device in enumerate(bus.devices) if device.unit == unit]
        if not found:
            if self.pruned.dropped(self.pruned.original(bus_at + ("devices",)), depth=1, keys=("unit",)):
                return
            units = ", ".join(str(device.unit) for device in bus.devices) or "none"
            text = f"bus {bus.name!r} has no device with unit {unit} (units there: {units})"
            if values:
                self._error(at + ("unit",), text)
            else:
                self._warn(at + ("unit",), text + ": nothing polls this simulated device")
            return
        d, device = found[0]
        device_at = self.pruned.original(bus_at + ("devices", d))
        if (
            self.pruned.dropped(device_at + ("points",))
            or self.pruned.dropped(device_at + ("template",))
            or (device.template and self.pruned.dropped(("modbus", "templates", device.template)))
        ):
            return  # a point dropped as invalid may be the one named here
        points = [point.name for point in device.points]
        for key in values:
            if key not in points:
                suffix = hint(key, points) or f" (points: {', '.join(points) or 'none'})"
                self._error(
                    at + ("values", key),
                    f"device {device.name!r} (unit {unit}) has no point {key!r}{suffix}",
                )
