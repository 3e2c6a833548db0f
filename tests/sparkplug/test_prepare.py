"""What a Sparkplug sink's outbox keeps of the gateway's messages (bridge/sparkplug/prepare.py): changed values only,
statuses with a fresh time, changed node metrics, a refused write's point again; nothing else."""

from __future__ import annotations

import json
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from bridge.sparkplug import payload as p
from bridge.sparkplug.payload import MetricSpec
from bridge.sparkplug.prepare import Prepare
from gateway.jsonsafe import dumps_safe
from gateway.types import Message, Value

T0 = 1_765_119_600_000


class Clock:
    """A settable unix-ms clock."""

    def __init__(self) -> None:
        self.now = T0

    def __call__(self) -> int:
        return self.now


class NodeMetrics:
    """The node's metrics as a test sets them."""

    def __init__(self) -> None:
        self.values: dict[str, Value] = {"Node Info/Uptime": 1, "Lines/rs485/Transactions": 0}

    def __call__(self) -> list[tuple[MetricSpec, Value]]:
        return [(MetricSpec(name, p.INT64), value) for name, value in self.values.items()]


def make() -> tuple[Prepare, Clock, NodeMetrics]:
    clock, node = Clock(), NodeMetrics()
    return Prepare(node, clock), clock, node


def telemetry(device: str, values: dict[str, Value], ts: int = T0) -> Message:
    """The router's telemetry message of a device."""
    return Message(f"{device}/telemetry", dumps_safe({"ts": ts, "values": values}), ts=ts)


def body(message: Message | None) -> dict[str, Any]:
    assert message is not None
    out: dict[str, Any] = json.loads(message.payload)
    return out


def test_telemetry_is_reduced_to_the_values_that_changed() -> None:
    """First all values; then only the changed ones with the sample's ts; nothing when nothing changed."""
    prep, _, _ = make()
    first = telemetry("plc", {"a": 1, "b": 2.5, "c": "x"})
    assert prep.prepare(first) is first  # all new: the message as it came
    assert prep.prepare(telemetry("plc", {"a": 1, "b": 2.5, "c": "x"}, T0 + 1)) is None
    out = prep.prepare(telemetry("plc", {"a": 1, "b": 3.0, "c": "x"}, T0 + 2))
    assert out is not None and out.topic == "plc/telemetry" and out.ts == T0 + 2
    assert body(out) == {"ts": T0 + 2, "values": {"b": 3.0}}
    assert prep.prepare(telemetry("other", {"a": 1})) is not None  # per device


@pytest.mark.parametrize(("old", "new"), [(1, 1.0), (1.0, True), (True, 1), (0, False), (None, 0), ("1", 1)])
def test_a_value_of_another_type_counts_as_changed(old: Value, new: Value) -> None:
    """1, 1.0 and True compare equal in Python but are different Sparkplug values (and may need a new birth)."""
    prep, _, _ = make()
    prep.prepare(telemetry("d", {"v": old}))
    out = prep.prepare(telemetry("d", {"v": new}, T0 + 1))
    assert out is not None and body(out)["values"] == {"v": new}
    assert type(body(out)["values"]["v"]) is type(new)


@settings(max_examples=150, deadline=None)
@given(st.lists(st.dictionaries(st.sampled_from("abcd"), st.none() | st.booleans() | st.integers(-2, 2)), max_size=12))
def test_replaying_what_was_kept_gives_the_device_state(batches: list[dict[str, Value]]) -> None:
    """Whatever the sequence, the kept messages applied in order rebuild the last value (and type) of every point."""
    prep, _, _ = make()
    state: dict[str, Value] = {}
    rebuilt: dict[str, Value] = {}
    for i, values in enumerate(batches):
        state.update(values)
        out = prep.prepare(telemetry("d", values, T0 + i))
        if out is not None:
            kept = body(out)["values"]
            assert kept and set(kept) <= set(values)
            rebuilt.update(kept)
    assert [(k, type(v), v) for k, v in sorted(rebuilt.items())] == [(k, type(v), v) for k, v in sorted(state.items())]


def test_status_is_kept_with_a_fresh_timestamp_and_only_online_or_offline() -> None:
    """online/offline go on with the time they were handed over; any other status payload is dropped."""
    prep, clock, _ = make()
    clock.now = T0 + 500
    out = prep.prepare(Message("plc/status", b"online", retain=True, ts=T0))
    assert out is not None and (out.topic, out.payload, out.ts) == ("plc/status", b"online", T0 + 500)
    clock.now = T0 + 900
    off = prep.prepare(Message("plc/status", b"offline"))
    assert off is not None and off.ts == T0 + 900
    for odd in (b"starting", b"", b"ONLINE", b'"online"'):
        assert prep.prepare(Message("plc/status", odd)) is None


def test_metrics_become_the_node_metrics_that_changed() -> None:
    """The gateway's `metrics` message is replaced by the node metrics that changed since last handed over."""
    prep, clock, node = make()
    out = prep.prepare(Message("metrics", b'{"anything": 1}'))
    assert out is not None and out.topic == "metrics" and out.ts == T0
    assert body(out) == {"ts": T0, "values": {"Node Info/Uptime": 1, "Lines/rs485/Transactions": 0}}
    assert prep.prepare(Message("metrics", b"{}")) is None
    node.values["Node Info/Uptime"] = 61
    clock.now = T0 + 60_000
    out = prep.prepare(Message("metrics", b"{}"))
    assert body(out) == {"ts": T0 + 60_000, "values": {"Node Info/Uptime": 61}}


def test_a_refused_write_brings_the_points_last_value_again_and_a_successful_one_nothing() -> None:
    """A refused `set` result: the point's last value handed over, at a fresh time; ok: nothing (the read-back
    brings the new value); a point or device never seen: nothing."""
    prep, clock, _ = make()
    prep.prepare(telemetry("plc", {"sp": -5, "other": 1}))
    clock.now = T0 + 10
    refused = prep.prepare(Message("plc/set/sp/result", b'{"ok": false, "error": "out of range"}'))
    assert refused is not None and refused.topic == "plc/telemetry" and refused.ts == T0 + 10
    assert body(refused) == {"ts": T0 + 10, "values": {"sp": -5}}
    assert prep.prepare(Message("plc/set/sp/result", b'{"ok": true, "value": 7}')) is None
    assert prep.prepare(Message("plc/set/nope/result", b'{"ok": false}')) is None
    assert prep.prepare(Message("ghost/set/sp/result", b'{"ok": false}')) is None


def test_a_refused_write_to_a_point_with_slashes_in_its_name_finds_the_point() -> None:
    """The point is everything between `set/` and `/result`."""
    prep, _, _ = make()
    prep.prepare(telemetry("plc", {"a/b": 1}))
    assert body(prep.prepare(Message("plc/set/a/b/result", b'{"ok": false}')))["values"] == {"a/b": 1}


@pytest.mark.parametrize(
    "topic",
    ["plc/temp", "plc/cmd/result", "plc/set/sp", "homeassistant/sensor/plc/temp/config", "plc/telemetry/x", "plc"],
)
def test_per_point_values_discovery_and_command_results_are_dropped(topic: str) -> None:
    """Sparkplug has no use for per-point retained values, discovery or command results."""
    prep, _, _ = make()
    assert prep.prepare(Message(topic, b'{"ok": false}')) is None


def test_odd_point_names_and_huge_values_pass_through_unchanged() -> None:
    """Names with MQTT wildcards, slashes, NULs and emoji, and huge numbers and strings, are kept as they came."""
    prep, _, _ = make()
    values: dict[str, Value] = {"a/+/#": 1, "\x00": 2, "🌡️ t": 3.5, "big": 2**70, "s": "x" * 100_000, "": None}
    out = prep.prepare(telemetry("d", values))
    assert out is not None and body(out)["values"] == values
    assert prep.prepare(telemetry("d", values)) is None


class CountingDict(dict[str, Value]):
    """A device's last values that count how often they are looked up."""

    lookups = 0

    def get(self, key: str, default: Any = None) -> Any:
        CountingDict.lookups += 1
        return super().get(key, default)


def test_a_telemetry_body_with_10000_values_is_handled_in_one_lookup_per_value() -> None:
    """10,000 values: one look-up each (linear, not quadratic); one changed value of 10,000 keeps just that one."""
    prep, _, _ = make()
    CountingDict.lookups = 0
    last = CountingDict()
    prep.put.devices["big"] = last
    values: dict[str, Value] = {f"p{i}": i for i in range(10_000)}
    assert prep.prepare(telemetry("big", values)) is not None
    values["p5000"] = -1
    out = prep.prepare(telemetry("big", values, T0 + 1))
    assert body(out)["values"] == {"p5000": -1}
    assert CountingDict.lookups == 20_000
