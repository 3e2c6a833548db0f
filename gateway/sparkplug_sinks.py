"""What a Sparkplug sink's edge node needs of the gateway: each device's metrics (from the config), the devices as
the router has them now, and the node's own metrics (from a snapshot)."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

from bridge.sparkplug.bdseq import BdSeqFile
from bridge.sparkplug.node import SparkplugNode
from bridge.sparkplug.payload import BOOLEAN, DATATYPES, DOUBLE, STRING, UINT64, MetricSpec
from bridge.sparkplug.view import DeviceNow
from gateway import __version__
from gateway.config.schema import Config, PointConfig, SinkConfig
from gateway.config.settings import point_codec
from gateway.snapshot import LINES
from gateway.types import Value

if TYPE_CHECKING:
    from gateway.router import Router
    from gateway.snapshot import GatewaySnapshot

#: Modbus point types -> Sparkplug datatypes, for points published as read (no scale or offset).
_MODBUS: dict[str, int] = {
    "bool": BOOLEAN,
    "int16": DATATYPES["Int16"],
    "uint16": DATATYPES["UInt16"],
    "int32": DATATYPES["Int32"],
    "uint32": DATATYPES["UInt32"],
    "int64": DATATYPES["Int64"],
    "uint64": UINT64,
    "float32": DATATYPES["Float"],
    "float64": DOUBLE,
    "string": STRING,
}
_MCP: dict[str, int] = {"number": DOUBLE, "bool": BOOLEAN, "string": STRING}


def point_specs(point: PointConfig) -> list[MetricSpec]:
    """The metrics of one Modbus point: itself, or a bitfield's bits as `point.bit` (a scaled number is Double)."""
    codec = point_codec(point)
    if codec.type == "bitfield":
        return [MetricSpec(f"{point.name}.{bit}", BOOLEAN) for _, bit in codec.bits]
    scaled = codec.scale != 1 or codec.offset != 0
    datatype = DOUBLE if scaled else _MODBUS[codec.type]
    return [MetricSpec(point.name, datatype, point.unit, point.min, point.max, point.writable)]


def metric_specs(cfg: Config) -> dict[str, tuple[MetricSpec, ...]]:
    """Each device's declared metrics: a Modbus device's points; the points an MCP device's config declares."""
    out: dict[str, tuple[MetricSpec, ...]] = {}
    for bus in cfg.modbus.buses:
        for device in bus.devices:
            out[device.name] = tuple(spec for point in device.points for spec in point_specs(point))
    for mcp in cfg.mcp.devices if cfg.mcp else ():
        out[mcp.id] = tuple(MetricSpec(p.name, _MCP[p.type], p.unit) for p in mcp.points)
    return out


def node_metrics(snapshot: GatewaySnapshot) -> list[tuple[MetricSpec, Value]]:
    """The edge node's own metrics: the software, its uptime, and each Modbus line's transactions and timeouts."""
    out: list[tuple[MetricSpec, Value]] = [
        (MetricSpec("Properties/Software", STRING), "Fieldgate"),
        (MetricSpec("Properties/Software Version", STRING), __version__),
        (MetricSpec("Node Info/Uptime", DOUBLE, "s"), round(snapshot.uptime_s, 1)),
    ]
    for line in snapshot.lines:
        out.append((MetricSpec(f"Lines/{line.name}/Transactions", UINT64), line.counters.transactions))
        out.append((MetricSpec(f"Lines/{line.name}/Timeouts", UINT64), line.counters.timeouts))
    return out


class SparkplugSources:
    """The gateway's side of its Sparkplug sinks; `router` and `snapshot` are read at each call (they change)."""

    def __init__(
        self, config: Callable[[], Config], router: Callable[[], Router | None], snap: Callable[..., GatewaySnapshot]
    ):
        self._config = config
        self._router = router
        self._snap = snap
        self._specs: tuple[Config, dict[str, tuple[MetricSpec, ...]]] | None = None

    def specs(self) -> dict[str, tuple[MetricSpec, ...]]:
        """Each device's declared metrics, for the config running now (worked out once per config)."""
        cfg = self._config()
        if self._specs is None or self._specs[0] is not cfg:
            self._specs = (cfg, metric_specs(cfg))
        return self._specs[1]

    def devices(self) -> list[DeviceNow]:
        """Every device the router has, with its latest values and whether it is online."""
        router = self._router()
        if router is None:
            return []
        specs = self.specs()
        return [
            DeviceNow(name, view.online, specs.get(name), view.latest, view.latest_ts)
            for name, view in router.devices.items()
        ]

    def node_metrics(self) -> list[tuple[MetricSpec, Value]]:
        """The node's metrics now."""
        return node_metrics(self._snap((LINES,)))


def build_node(
    cfg: Config, s: SinkConfig, sources: SparkplugSources, on_set: Callable[[str, bytes], None]
) -> SparkplugNode:
    """The edge node of a `format: sparkplug` sink (its MQTT connection is attached by the caller)."""
    assert s.sparkplug is not None
    sp = s.sparkplug
    edge = sp.edge_node_id or cfg.gateway.id
    bdseq = BdSeqFile(Path(cfg.gateway.state_dir) / "sparkplug" / f"{s.name}.bdseq")
    return SparkplugNode(
        s.name,
        group=sp.group_id,
        edge=edge,
        primary_host=sp.primary_host,
        bdseq=bdseq,
        devices=sources.devices,
        node_metrics=sources.node_metrics,
        on_set=on_set,
    )
