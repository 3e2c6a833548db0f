"""Cross-checks of Modbus TCP: buses that share an endpoint, and the server's listen address and `expose` entries."""

from __future__ import annotations

from typing import Any

from .addresses import exposed, host_port, port_key
from .checkbase import CheckBase
from .problems import Path, hint


class ModbusTcpChecks(CheckBase):
    """Modbus TCP buses and the Modbus TCP server, against the buses and devices configured."""

    def _shared_endpoints(self) -> None:
        """Warn when two Modbus TCP buses connect to one endpoint: each would be a master of its own."""
        seen: dict[str, int] = {}
        for b, bus in enumerate(self.config.modbus.buses):
            if bus.line_framing != "tcp":
                continue  # serial ports and serial device servers: the buses check refuses a port used twice
            key = port_key(bus.port)
            if key not in seen:
                seen[key] = b
                continue
            first = self.config.modbus.buses[seen[key]]
            line = self._line(("modbus", "buses", seen[key], "port"))
            self._warn(
                ("modbus", "buses", b, "port"),
                f"bus {bus.name!r} connects to {bus.port} as bus {first.name!r} does (line {line}): "
                "one connection per bus is the rule; give their devices one bus (many units sit behind one endpoint)",
            )

    def _modbus_server(self) -> None:
        server = self.config.modbus.server
        if server is None:
            return
        at = ("modbus", "server")
        if host_port(server.listen) is None:
            self._error(at + ("listen",), f"{server.listen!r} is not HOST:PORT (e.g. 127.0.0.1:5020)")
        elif where := exposed(server.listen):
            # Modbus TCP has no login: whoever reaches the port reads every exposed device (and writes some).
            writable = [entry.device for entry in server.expose if entry.writes]
            reach = "reads the exposed devices" + (f" and writes to {', '.join(writable)}" if writable else "")
            self._warn(
                at + ("listen",), f"listens on {where}: Modbus TCP has no authentication, whoever reaches it {reach}"
            )
        units: dict[Any, int] = {}
        for i, entry in enumerate(server.expose):
            path = at + ("expose", i)
            if entry.unit in units:
                first = server.expose[units[entry.unit]]
                line = self._line(at + ("expose", units[entry.unit]))
                self._error(
                    self._key_or(path, "unit"),
                    f"unit {entry.unit} is exposed twice: for device {entry.device!r} here "
                    f"and for device {first.device!r} at line {line}",
                )
            else:
                units[entry.unit] = i
            self._exposed_device(entry.device, path)

    def _exposed_device(self, name: str, path: Path) -> None:
        """An exposed device must be a configured Modbus device: the server serves it through its bus."""
        if name in self.device_names:
            return
        if self.pruned.dropped(("modbus", "buses"), depth=3, keys=("name",)):
            return  # a device dropped as invalid may be the one named here
        known = list(self.device_names)
        if self.config.mcp and any(device.id == name for device in self.config.mcp.devices):
            reason = f"{name!r} is an MCP device: only Modbus devices can be exposed"
        else:
            listed = f"the Modbus devices are {', '.join(known)}" if known else "no Modbus devices are configured"
            reason = f"no Modbus device is named {name!r}{hint(name, known)}: {listed}"
        self._error(self._key_or(path, "device"), reason)
