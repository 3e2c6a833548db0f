"""What a Sparkplug edge node sees of the gateway: its devices as they are now, and the way a write goes in."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass

from bridge.sink import SinkStats
from bridge.sparkplug.payload import MetricSpec
from gateway.types import Value


@dataclass(frozen=True)
class DeviceNow:
    """A device as the gateway knows it now, for its birth: its declared metrics and its latest values."""

    name: str
    online: bool | None  # None: not known yet (not polled, no session yet)
    specs: tuple[MetricSpec, ...] | None  # None: it declares nothing (an MCP device pushes what it has)
    values: Mapping[str, Value]
    ts: int  # when the latest values were sampled (unix ms); 0: none yet


#: The devices as they are now (their births are made from this).
DevicesNow = Callable[[], list[DeviceNow]]
#: The gateway's request path: (`<device>/set/<point>`, JSON value), as an MQTT `set` arrives.
SetRequest = Callable[[str, bytes], None]


def metric_sets(node: list[tuple[MetricSpec, Value]], devices: list[DeviceNow]) -> object:
    """What the births declare, to compare: the node's metrics and each device's declared ones."""
    return tuple(spec for spec, _ in node), tuple((d.name, d.specs) for d in devices)


@dataclass
class SparkplugStats(SinkStats):
    """Counters of a Sparkplug sink: its MQTT connection's, and the node's."""

    births: int = 0  # NBIRTH sequences published (connects, rebirths, reloads)
    rebirth_requests: int = 0
    device_births: int = 0
    device_deaths: int = 0
    commands: int = 0  # DCMD metrics handed to the write path
    bad_commands: int = 0  # NCMD/DCMD/STATE payloads refused unread
    host_online: bool | None = None  # the primary host's last STATE (None: no primary host, or not heard yet)
