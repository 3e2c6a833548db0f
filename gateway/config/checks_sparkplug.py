"""Cross-checks of `format: sparkplug` sinks: one edge node per name on a broker, ids and metric names hosts can tell
apart, and Home Assistant discovery, which a Sparkplug sink does not carry."""

from __future__ import annotations

from typing import Any
from urllib.parse import urlparse

from bridge.broker_acl import Access, default_access

from .checkbase import CheckBase
from .problems import Path
from .schema import SinkConfig
from .settings import point_codec


def broker_key(url: str | None) -> str:
    """A sink's broker compared by what it names: scheme, host (not case-sensitive) and port with its default."""
    if url is None:
        return "the embedded broker"
    parsed = urlparse(url)
    port = parsed.port or (8883 if parsed.scheme == "mqtts" else 1883)
    return f"{parsed.scheme}://{parsed.hostname}:{port}"  # urlparse gives the host name in lower case


class SparkplugChecks(CheckBase):
    """Sparkplug sinks against each other, against the devices and points they publish, and against discovery."""

    def _sparkplug(self) -> None:
        """Run the Sparkplug checks (after the devices: a device's points are its template's and its own)."""
        sinks = [(s, sink) for s, sink in enumerate(self.config.northbound) if sink.format == "sparkplug"]
        if not sinks:
            return
        self._edge_nodes(sinks)
        for s, sink in sinks:
            self._embedded_access(s, sink)
        self._device_case()
        self._metric_case()
        if self.config.homeassistant.enabled and len(sinks) == len(self.config.northbound):
            self._warn(
                self._key_or(("homeassistant",), "enabled"),
                "Home Assistant discovery is on but every sink is format: sparkplug: discovery configs and the "
                "topics they name are JSON-format only, so Home Assistant gets nothing (add a format: json sink)",
            )

    def _edge_nodes(self, sinks: list[tuple[int, SinkConfig]]) -> None:
        """Two sinks may not be one edge node (group_id + edge_node_id) on one broker: each would end the other.
        A cluster sink (`urls`) is on each of its nodes."""
        seen: dict[Any, int] = {}
        folded: dict[Any, int] = {}
        told: set[tuple[int, int]] = set()  # sink pairs already named (two sinks on the same cluster meet per node)
        for s, sink in sinks:
            assert sink.sparkplug is not None
            sp = sink.sparkplug
            edge = sp.edge_node_id or self.config.gateway.id
            nodes: list[str | None] = list(sink.urls) if sink.urls else [sink.url]
            for url in dict.fromkeys(nodes):
                key = (broker_key(url), sp.group_id, edge)
                fold = (key[0], sp.group_id.lower(), edge.lower())
                if key not in seen:
                    seen[key] = s
                    if fold in folded and (folded[fold], s) not in told:
                        # The same ids but for case: not the same node, yet hosts may take it for one.
                        told.add((folded[fold], s))
                        other = self.config.northbound[folded[fold]]
                        assert other.sparkplug is not None
                        self._warn(
                            self._key_or(("northbound", s, "sparkplug"), "edge_node_id"),
                            f"sink {sink.name!r} is Sparkplug edge node {sp.group_id}/{edge} on {key[0]} and sink "
                            f"{other.name!r} (line {self._line(('northbound', folded[fold]))}) is "
                            f"{other.sparkplug.group_id}/{other.sparkplug.edge_node_id or self.config.gateway.id}: "
                            "ids that differ only in case, which the specification says SHOULD NOT be (a host that "
                            "folds case takes them for one node)",
                        )
                    folded.setdefault(fold, s)
                    continue
                if (seen[key], s) in told:
                    continue
                told.add((seen[key], s))
                first = self.config.northbound[seen[key]]
                line = self._line(("northbound", seen[key]))
                named = "" if sp.edge_node_id else " (edge_node_id defaults to gateway.id)"
                self._error(
                    self._key_or(("northbound", s, "sparkplug"), "edge_node_id"),
                    f"sink {sink.name!r} is Sparkplug edge node {sp.group_id}/{edge}{named} on {key[0]}, as sink "
                    f"{first.name!r} is (line {line}): the specification makes the group_id/edge_node_id pair "
                    "unique, and each sink's births and deaths would end the other's session at the host; "
                    "give one another edge_node_id",
                )

    def _embedded_access(self, s: int, sink: SinkConfig) -> None:
        """On the embedded broker with users, a host must be let publish its STATE and commands (the default lets
        users publish only the JSON sinks' set/cmd topics): without that, a primary host's STATE never arrives."""
        broker = self.config.broker
        if sink.url is not None or not broker.enabled or broker.users is None:
            return
        assert sink.sparkplug is not None
        sp = sink.sparkplug
        base = f"spBv1.0/{sp.group_id}"
        edge = sp.edge_node_id or self.config.gateway.id
        topics = [f"{base}/NCMD/{edge}", f"{base}/DCMD/{edge}/<device>"]
        topics = ([f"spBv1.0/STATE/{sp.primary_host}"] if sp.primary_host else []) + topics
        if broker.acl is None:
            prefixes = [self.config.prefix_for(n) for n in self.config.northbound if n.url is None]
            rules = [default_access(prefixes, self.config.embedded_requests())]
        else:
            rules = [Access(tuple(rule.read), tuple(rule.write)) for rule in broker.acl.values()]
        denied = [t for t in topics if not any(rule.may_write(t.replace("<device>", "d")) for rule in rules)]
        if not denied:
            return
        state = sp.primary_host is not None and denied[0].startswith("spBv1.0/STATE/")
        effects = ["the primary host's STATE never arrives, so the sink never births and keeps all in its spool"]
        effects = effects if state else []
        if len(denied) > (1 if state else 0):
            effects.append("no rebirth request or write reaches the node")
        self._warn(
            ("northbound", s),
            f"sparkplug sink {sink.name!r} is on the embedded broker, where no user may publish "
            f"{', '.join(denied)} ({'the default access' if broker.acl is None else 'broker.acl'}): "
            f"{'; '.join(effects)}; give the host's user `write:` filters for them in broker.acl",
        )

    def _device_case(self) -> None:
        """Device ids that differ only in case: the specification says they SHOULD NOT (hosts may fold case)."""
        seen: dict[str, tuple[str, Path]] = {}
        for name, path in self._sparkplug_devices():
            folded = name.lower()
            if folded in seen and seen[folded][0] != name:
                other, first = seen[folded]
                self._warn(
                    path,
                    f"Sparkplug device ids {other!r} (line {self._line(first)}) and {name!r} differ only in case: "
                    "the specification says ids SHOULD NOT, and a host that folds case takes them as one device",
                )
            seen.setdefault(folded, (name, path))

    def _sparkplug_devices(self) -> list[tuple[str, Path]]:
        out: list[tuple[str, Path]] = []
        for b, bus in enumerate(self.config.modbus.buses):
            for d, device in enumerate(bus.devices):
                out.append((device.name, ("modbus", "buses", b, "devices", d, "name")))
        for i, mcp in enumerate(self.config.mcp.devices if self.config.mcp else []):
            out.append((mcp.id, ("mcp", "devices", i, "id")))
        return out

    def _metric_case(self) -> None:
        """Metric names of one device that differ only in case (a bitfield's bits are `point.bit` metrics)."""
        for b, bus in enumerate(self.config.modbus.buses):
            for d, device in enumerate(bus.devices):
                at: Path = ("modbus", "buses", b, "devices", d)
                names: list[str] = []
                for point in device.points:
                    codec = point_codec(point)
                    bitfield = codec.type == "bitfield"
                    names += [f"{point.name}.{bit}" for _, bit in codec.bits] if bitfield else [point.name]
                self._metric_names(device.name, names, at + ("name",))
        for i, mcp in enumerate(self.config.mcp.devices if self.config.mcp else []):
            self._metric_names(mcp.id, [p.name for p in mcp.points], ("mcp", "devices", i, "id"))

    def _metric_names(self, device: str, names: list[str], path: Path) -> None:
        seen: dict[str, str] = {}
        for name in names:
            other = seen.setdefault(name.lower(), name)
            if other != name:
                self._warn(
                    path,
                    f"metrics {other!r} and {name!r} of device {device!r} differ only in case: the Sparkplug "
                    "specification says metric names SHOULD NOT, and a host that folds case takes them as one tag",
                )
