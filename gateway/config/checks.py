"""Cross-checks on the validated config that no single model can make; resolves device templates."""

from __future__ import annotations

from typing import Any

from drivers.modbus import rs485
from drivers.modbus.planner import BIT_TABLES
from drivers.modbus.settings import Rs485Settings
from gateway.config import ha_entities as ha

from .addresses import exposed, host_port, port_key
from .checks_modbus_tcp import ModbusTcpChecks
from .checks_sim import SimulatorChecks
from .checks_sinks import SinkChecks
from .checks_sparkplug import SparkplugChecks
from .problems import Path, Problem, hint
from .prune import Pruned
from .schema import BusConfig, Config, DeviceConfig, PointConfig
from .settings import point_codec
from .yamlsrc import Source


def check(config: Config, source: Source, pruned: Pruned) -> tuple[list[Problem], list[Problem]]:
    """(errors, warnings) of the cross-checks; device templates are resolved on the way."""
    checks = _Checks(config, source, pruned)
    checks.run()
    return checks.errors, checks.warnings


class _Checks(SimulatorChecks, ModbusTcpChecks, SparkplugChecks, SinkChecks):
    """Cross-references that no single model can check, run on the typed config."""

    def run(self) -> None:
        """Run every check; templates are resolved (with the devices) before the simulator's."""
        self._buses()
        self._shared_endpoints()
        self._ha_hints()  # before _devices: each device's own points are still at their paths
        self._devices()
        self._ha_ids()
        self._sinks()
        self._client_ids()
        self._sparkplug()  # after _devices: a device's metrics are its template's points and its own
        self._mcp()
        self._simulator()
        self._modbus_server()  # after _devices: it names the devices that exist
        self._exposure()

    # -- modbus ----------------------------------------------------------------------------

    def _buses(self) -> None:
        names: dict[Any, Path] = {}
        ports: dict[Any, Path] = {}
        for b, bus in enumerate(self.config.modbus.buses):
            at = ("modbus", "buses", b)
            self._first(names, bus.name, at + ("name",), f"bus name {bus.name!r} is used twice")
            self._rs485(bus, at)
            if bus.line_framing == "tcp":
                continue  # a Modbus TCP endpoint takes more than one connection: a warning (_shared_endpoints)
            message = f"port {bus.port!r} is used by two buses"
            self._first(ports, port_key(bus.port), at + ("port",), message)

    def _rs485(self, bus: BusConfig, at: Path) -> None:
        """RS-485 settings the kernel would change without a word: the line refuses them when it opens; said here."""
        if bus.rs485 is None:
            return
        for problem in rs485.problems(Rs485Settings(**bus.rs485.model_dump())):
            key, _, rest = problem.partition(": ")
            if key in type(bus.rs485).model_fields:
                self._error(self._key_or(at + ("rs485",), key), rest)  # the path names the key
            else:
                self._error(at + ("rs485",), problem)

    def _devices(self) -> None:
        bad_templates = self._template_duplicates()
        for b, bus in enumerate(self.config.modbus.buses):
            units: dict[Any, Path] = {}
            for d, device in enumerate(bus.devices):
                at = ("modbus", "buses", b, "devices", d)
                self._first(
                    self.device_names,
                    device.name,
                    at + ("name",),
                    f"device name {device.name!r} is used twice",
                )
                self._first(
                    units,
                    device.unit,
                    at + ("unit",),
                    f"unit {device.unit} is used twice on bus {bus.name!r}",
                )
                self._resolve(device, at, bad_templates)

    def _template_duplicates(self) -> set[str]:
        """Report repeated point names in templates; the names of the templates that have them."""
        bad: set[str] = set()
        for tname, points in self.config.modbus.templates.items():
            seen: dict[Any, Path] = {}
            for p, point in enumerate(points):
                if point.name in seen:
                    bad.add(tname)
                self._first(
                    seen,
                    point.name,
                    ("modbus", "templates", tname, p, "name"),
                    f"point name {point.name!r} is used twice in template {tname!r}",
                )
        return bad

    def _resolve(self, device: DeviceConfig, at: Path, bad_templates: set[str]) -> None:
        """Replace the device's points by its template's points followed by its own."""
        templates = self.config.modbus.templates
        own = list(device.points)
        seen: dict[Any, Path] = {}
        for p, point in enumerate(own):
            self._first(
                seen,
                point.name,
                at + ("points", p, "name"),
                f"point name {point.name!r} is used twice in device {device.name!r}",
            )
        merged: list[tuple[PointConfig, Path | None]] = []
        if device.template is not None:
            if device.template not in templates:
                self._unknown_template(device.template, at)
                return
            if device.template in bad_templates:
                return
            merged = [(point.model_copy(deep=True), None) for point in templates[device.template]]
        index = {point.name: i for i, (point, _) in enumerate(merged)}
        for p, point in enumerate(own):
            if seen.get(point.name) != at + ("points", p, "name"):
                continue  # a repeated name, reported above
            if point.name in index:
                merged[index[point.name]] = (point, at + ("points", p))  # the device's own wins
            else:
                merged.append((point, at + ("points", p)))
        device.points = [point for point, _ in merged]
        dropped = self.pruned.dropped(self.pruned.original(at)) or (
            device.template is not None and self.pruned.dropped(("modbus", "templates", device.template))
        )
        if not merged and not dropped:
            self._error(at, f"device {device.name!r} has no points (give it `points:` or a `template:`)")
        for point, own_path in merged:
            self._fits(device, point, at, own_path)

    def _unknown_template(self, name: str, at: Path) -> None:
        if self.pruned.dropped(("modbus", "templates", name)):
            return  # declared, but dropped as invalid: already reported there
        declared = list(self.config.modbus.templates)
        suffix = hint(name, declared) or (
            f" (known: {', '.join(declared)})" if declared else " (no modbus.templates are declared)"
        )
        self._error(at + ("template",), f"unknown template {name!r}{suffix}")

    def _fits(self, device: DeviceConfig, point: PointConfig, at: Path, own_path: Path | None) -> None:
        """A point must fit in one request and in the 16-bit address space."""
        if point.table in BIT_TABLES:
            return
        codec = point_codec(point)
        count = codec.count
        origin = f"point {point.name!r}" if own_path else f"point {point.name!r} (from template {device.template!r})"
        if count > device.max_registers:
            path = self._key_or(own_path, "type") if own_path else self._key_or(at, "max_registers")
            self._error(
                path,
                f"{origin} is {codec.spec}: {count} registers, "
                f"more than max_registers {device.max_registers} of device {device.name!r}",
            )
        if point.address + count - 1 > 65535:
            self._error(
                own_path + ("address",) if own_path else at,
                f"{origin} at address {point.address} runs past register 65535 ({count} registers)",
            )

    # -- northbound, mcp -----------------------------------------------------------------------

    def _sinks(self) -> None:
        names: dict[Any, Path] = {}
        for s, sink in enumerate(self.config.northbound):
            at = ("northbound", s)
            self._first(names, sink.name, at + ("name",), f"sink name {sink.name!r} is used twice")
            # A northbound section pruned for its own errors leaves the default sink in its place: not the user's.
            if sink.url is None and not self.config.broker.enabled and not self.pruned.dropped(("northbound",)):
                if self.source.has(("northbound",)):
                    self._error(
                        self._key_or(at, "url"),
                        f"sink {sink.name!r} publishes to the embedded broker (no url) but broker.enabled is false",
                    )
                else:
                    self._error(
                        ("broker", "enabled"),
                        f"the default sink {sink.name!r} publishes to the embedded broker: "
                        "enable it or list `northbound:` sinks with a url",
                    )

    def _mcp(self) -> None:
        mcp = self.config.mcp
        if mcp is None:
            return
        if host_port(mcp.listen) is None:
            self._error(("mcp", "listen"), f"{mcp.listen!r} is not HOST:PORT (e.g. 0.0.0.0:7720)")
        ids: dict[Any, Path] = {}
        for i, device in enumerate(mcp.devices):
            path = ("mcp", "devices", i, "id")
            if device.id in self.device_names:
                line = self._line(self.device_names[device.id])
                self._error(path, f"id {device.id!r} is already the name of a Modbus device (line {line})")
                continue
            self._first(ids, device.id, path, f"MCP device id {device.id!r} is used twice")
        # Limits that another one makes meaningless: said, so that nobody tunes a knob that does nothing.
        if mcp.max_pending_per_ip > mcp.max_pending:
            self._warn(
                ("mcp", "max_pending_per_ip"),
                f"max_pending_per_ip ({mcp.max_pending_per_ip}) is above max_pending ({mcp.max_pending}), "
                "which holds first",
            )
        if mcp.max_hello_payload > mcp.max_payload:
            self._warn(
                ("mcp", "max_hello_payload"),
                f"max_hello_payload ({mcp.max_hello_payload}) is above max_payload ({mcp.max_payload}), "
                "which holds first",
            )

    # -- exposure ----------------------------------------------------------------------------------

    def _exposure(self) -> None:
        broker = self.config.broker
        http = self.config.gateway.http
        if http is not None and host_port(http) is None:
            self._error(("gateway", "http"), f"{http!r} is not HOST:PORT (e.g. 127.0.0.1:9720)")
        elif http is not None and (where := exposed(http)):
            # The page and /metrics have no login: they show every value, line and spool to whoever asks.
            self._warn(("gateway", "http"), f"listens on {where} without authentication (status page, /metrics)")
        mcp = self.config.mcp
        if mcp is not None and mcp.tls is None:
            # MCP devices authenticate with tokens; without TLS those cross the network in clear.
            where = exposed(mcp.listen)
            if where:
                self._warn(("mcp", "listen"), f"listens on {where} without TLS: device tokens travel in clear")
        if broker.users is not None or not broker.enabled:
            return
        for i, url in enumerate(broker.listeners):
            where = exposed(url.split("://", 1)[1].rstrip("/"))
            if where:
                self._warn(("broker", "listeners", i), f"listens on {where} without authentication")

    # -- home assistant ----------------------------------------------------------------------------

    def _ha_hints(self) -> None:
        """Warn about device classes Home Assistant does not document for the entity a point becomes."""
        for name, points in self.config.modbus.templates.items():
            for p, point in enumerate(points):
                self._ha_class(("modbus", "templates", name, p), point)
        for b, bus in enumerate(self.config.modbus.buses):
            for d, device in enumerate(bus.devices):
                for p, point in enumerate(device.points):
                    self._ha_class(("modbus", "buses", b, "devices", d, "points", p), point)
        for i, mcp_device in enumerate(self.config.mcp.devices if self.config.mcp else []):
            for p, mcp_point in enumerate(mcp_device.points):
                comp = ha.component(mcp_point.type, False)
                self._ha_known(("mcp", "devices", i, "points", p), mcp_point.device_class, comp, mcp_point.type)

    def _ha_class(self, path: Path, point: PointConfig) -> None:
        kind = ha.point_kind(point)
        comp = "binary_sensor" if point_codec(point).type == "bitfield" else ha.component(kind, point.writable)
        self._ha_known(path, point.device_class, comp, kind)

    def _ha_known(self, path: Path, device_class: str | None, comp: str, kind: str) -> None:
        if device_class is None:
            return
        known = sorted(ha.known_device_classes(comp, kind))
        if device_class not in known:
            what = f"a {kind} {comp}" if comp == "sensor" else f"a {comp}"
            self._warn(
                path + ("device_class",),
                f"Home Assistant documents no device class {device_class!r} for {what}{hint(device_class, known)}; "
                "it ignores a discovery config with a device class it does not know",
            )

    def _ha_ids(self) -> None:
        """With discovery on, no two points may share a discovery id (`<gateway>_<device>_<point>`)."""
        if not self.config.homeassistant.enabled:
            return
        seen: dict[Any, Path] = {}
        for e in ha.entities(self.config):
            oid = ha.object_id(self.config.gateway.id, e.device, e.point)
            where = self._ha_device_path(e.device)
            message = f"point {e.point!r} of device {e.device!r} has Home Assistant id {oid!r}, as another point"
            self._first(seen, oid, where, message + ": rename one")

    def _ha_device_path(self, device: str) -> Path:
        for b, bus in enumerate(self.config.modbus.buses):
            for d, dev in enumerate(bus.devices):
                if dev.name == device:
                    return ("modbus", "buses", b, "devices", d, "name")
        for i, mcp_device in enumerate(self.config.mcp.devices if self.config.mcp else []):
            if mcp_device.id == device:
                return ("mcp", "devices", i, "id")
        return ("homeassistant",)
