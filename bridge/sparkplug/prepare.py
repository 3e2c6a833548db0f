"""What a Sparkplug sink's outbox keeps of the gateway's messages: only what changed, statuses, node metrics, and a
refused write's point again (so that a host that showed the written value shows the device's again).

Run as each message is handed over (in the order the gateway made them); what it returns is queued or spooled as it
is, and made into Sparkplug messages when it goes out (node.py).
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

from bridge.sparkplug.payload import MetricSpec
from gateway.jsonsafe import dumps_safe
from gateway.types import Message, Value

#: The node's own metrics and their values now (version, uptime, each line's counters).
NodeMetrics = Callable[[], list[tuple[MetricSpec, Value]]]


@dataclass
class Put:
    """What was handed to the outbox last, per device and for the node: the base of "only what changed"."""

    devices: dict[str, dict[str, Value]] = field(default_factory=dict)
    node: dict[str, Value] = field(default_factory=dict)


def _changed(last: dict[str, Value], values: Mapping[str, Value]) -> dict[str, Value]:
    """The values that differ from `last` (a value of another type counts: 1 and 1.0 and True are not the same)."""
    out = {}
    for name, value in values.items():
        old = last.get(name, _changed)
        if old is _changed or old != value or type(old) is not type(value):
            out[name] = value
    last.update(out)
    return out


class Prepare:
    """The outbox's `prepare` of one Sparkplug sink, and what it handed over last."""

    def __init__(self, node_metrics: NodeMetrics, clock: Callable[[], int]) -> None:
        self.put = Put()
        self._node_metrics = node_metrics
        self._clock = clock

    def prepare(self, message: Message) -> Message | None:
        """What the outbox keeps of a gateway message: changed values, statuses, node metrics, refused writes."""
        topic = message.topic
        device, _, rest = topic.partition("/")
        if rest == "telemetry":
            body = json.loads(message.payload)
            values = body["values"]
            changed = _changed(self.put.devices.setdefault(device, {}), values)
            if not changed:
                return None
            if len(changed) == len(values):
                return message
            return Message(topic, dumps_safe({"ts": body["ts"], "values": changed}), ts=message.ts)
        if rest == "status":
            if message.payload not in (b"online", b"offline"):
                return None
            return Message(topic, message.payload, ts=self._clock())
        if topic == "metrics":
            values = {spec.name: value for spec, value in self._node_metrics()}
            changed = _changed(self.put.node, values)
            now = self._clock()
            return Message("metrics", dumps_safe({"ts": now, "values": changed}), ts=now) if changed else None
        if rest.startswith("set/") and rest.endswith("/result"):
            return self._refused(device, rest[4 : -len("/result")], message.payload)
        return None  # per-point retained values, discovery, command results: Sparkplug has no use for them

    def _refused(self, device: str, point: str, payload: bytes) -> Message | None:
        """A refused write's point as the device has it, again: a host that showed the written value reverts."""
        if json.loads(payload).get("ok"):
            return None  # the read-back brings the new value
        last = self.put.devices.get(device, {})
        if point not in last:
            return None
        now = self._clock()
        return Message(f"{device}/telemetry", dumps_safe({"ts": now, "values": {point: last[point]}}), ts=now)
