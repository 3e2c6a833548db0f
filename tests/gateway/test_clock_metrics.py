"""The unsynchronised count (issue 16, clocks) from an outbox to what operators read: the snapshot's sink figures,
P/metrics `sinks.<name>.unsynchronised` and /metrics `fieldgate_sink_unsynchronised_total{sink}`. A real Outbox
and MqttSink (not started: the count is the outbox's, set as its publisher sets it); the renderers as they run.
"""

from __future__ import annotations

from types import SimpleNamespace

from prometheus_client import generate_latest
from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.registry import CollectorRegistry

from bridge.buffer import MemoryBuffer
from bridge.outbox import Outbox
from bridge.sink import MqttSink
from gateway.metrics_topic import metrics_payload
from gateway.prometheus import GatewayCollector
from gateway.snapshot import take_snapshot
from gateway.supervise import Supervisor
from gateway.utilisation import Utilisation

from helpers import free_port


class Parts:
    """A gateway of one sink, as take_snapshot reads it."""

    gateway_id = "g1"
    started_at = 10.0
    reloading = False
    router = None
    broker = None
    modbus_server = None
    mcp = None

    def __init__(self, outbox: Outbox, sink: MqttSink) -> None:
        self.supervisor = Supervisor()
        self.buses: list[object] = []
        self.outboxes = [outbox]
        self.sinks = [sink]
        self.clock = SimpleNamespace(snapshot=lambda: None)


def test_the_count_reaches_p_metrics_and_metrics() -> None:
    """What the outbox counted is `unsynchronised` beside the sink's other figures on P/metrics, and a counter per
    sink on /metrics."""
    sink = MqttSink("up", f"mqtt://127.0.0.1:{free_port()}", "fg/m", client_id="clock-metrics")
    outbox = Outbox(sink, MemoryBuffer())
    outbox.stats.unsynchronised = 7
    snap = take_snapshot(Parts(outbox, sink))  # type: ignore[arg-type]
    assert metrics_payload(snap)["sinks"]["up"]["unsynchronised"] == 7  # type: ignore[index]
    registry = CollectorRegistry(auto_describe=False)
    registry.register(GatewayCollector(lambda parts=(): snap, Utilisation()))
    samples = {
        (s.name, s.labels.get("sink")): s.value
        for family in text_string_to_metric_families(generate_latest(registry).decode())
        for s in family.samples
    }
    assert samples[("fieldgate_sink_unsynchronised_total", "up")] == 7
