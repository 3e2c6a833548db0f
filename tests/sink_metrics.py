"""A sink's counters as the gateway shows them: a snapshot holding just that sink, and /metrics scraped from it."""

from __future__ import annotations

from dataclasses import asdict

from prometheus_client import generate_latest
from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.registry import CollectorRegistry

from bridge.outbox import OutboxSnapshot
from bridge.sink import MqttSink
from gateway.prometheus import GatewayCollector
from gateway.snapshot import GatewaySnapshot, SinkSnapshot
from gateway.utilisation import Utilisation


def snapshot_of(sink: MqttSink) -> GatewaySnapshot:
    """A gateway snapshot holding this sink as the snapshot builder takes it (its stats as counters)."""
    figures = asdict(OutboxSnapshot(0, 0, 0, None, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0))
    sinks = (SinkSnapshot(sink.name, sink.connected, asdict(sink.stats), figures, 0, None, 0),)
    return GatewaySnapshot("g", 100.0, 0, 1.0, False, sinks=sinks)


def scrape(snap: GatewaySnapshot) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    """/metrics of the snapshot: (name, labels) -> value."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(GatewayCollector(lambda parts=(): snap, Utilisation()))
    text = generate_latest(registry).decode()
    return {
        (s.name, frozenset(s.labels.items())): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }
