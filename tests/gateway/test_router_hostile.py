"""The router against what a peer may send: values, ts and names no encoder takes, odd `cmd` ids, request floods."""

from __future__ import annotations

import asyncio
import json
import socket
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from bridge.broker import EmbeddedBroker
from bridge.outbox import Outbox
from bridge.sink import MqttSink
from gateway.audit import AuditRecord
from gateway.jsonsafe import loads_strict
from gateway.router import SUBSCRIPTIONS, Router
from gateway.status_page import StatusPage, _age
from gateway.types import Command, CommandResult, DeviceProfile, Sample, Write, WriteResult

from helpers import Subscriber

PREFIX = "fieldgate/h"


class Clock:
    """A hand-driven monotonic clock: the token buckets refill only when the test says."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@dataclass
class Routed:
    """A router on a real sink and broker, the audit records it wrote, and what its device was asked."""

    router: Router
    clock: Clock
    sub: Subscriber
    sink: MqttSink
    audit: list[AuditRecord] = field(default_factory=list)
    asked: list[Command | Write] = field(default_factory=list)
    audited_before: list[bool] = field(default_factory=list)  # per call: had its request line been written?


@pytest.fixture
async def routed(broker: EmbeddedBroker, port: int, subscriber: Subscriber) -> AsyncIterator[Routed]:
    """Device `d` takes commands and writes (and raises for the command `boom`); `m` takes neither."""
    box: list[Routed] = []

    def requested(what: str) -> bool:
        return any(r.stage == "request" and r.action == what for r in box[0].audit)

    async def commander(command: Command) -> CommandResult:
        box[0].asked.append(command)
        box[0].audited_before.append(requested("cmd"))
        if command.name == "boom":
            raise RuntimeError("the device link broke")
        return CommandResult(ok=True, result={"done": command.name})

    async def writer(write: Write) -> WriteResult:
        box[0].asked.append(write)
        box[0].audited_before.append(requested("set"))
        return WriteResult(ok=True, value=write.value)

    sink = MqttSink(
        "local",
        f"mqtt://127.0.0.1:{port}",
        PREFIX,
        client_id="router-hostile-test",
        subscriptions=SUBSCRIPTIONS,
        on_request=lambda t, p, m: box[0].router.on_request(outbox, t, p, m),
        on_connect=lambda: _republish(box[0]),
    )
    outbox = Outbox(sink)
    clock = Clock()
    records: list[AuditRecord] = []
    router = Router(
        [outbox],
        [
            DeviceProfile("d", commander=commander, writer=writer, every_sample=True),
            DeviceProfile("m"),
            DeviceProfile("r", commander=commander, write_rate=1.0, write_burst=2),
        ],
        clock=clock,
        audit=records.append,
    )
    box.append(Routed(router, clock, subscriber, sink, records))
    await outbox.start()
    await sink.start()
    assert await sink.wait_connected(5)
    # `online` through the broker: the sink's subscriptions (sent before it) are in place.
    await subscriber.wait_for(lambda ms: any(m.topic == f"{PREFIX}/status" and m.payload == b"online" for m in ms))
    try:
        yield box[0]
    finally:
        await outbox.flush(2)
        await outbox.stop()
        await sink.stop()


async def _republish(r: Routed) -> None:
    r.router.republish(r.router.outboxes[0])


HOSTILE_VALUES: dict[str, Any] = {
    "lone": "\ud800",
    "mixed": "ok \udfff still",
    "nan": float("nan"),
    "inf": float("-inf"),
    "huge": 10**400,
    "vast": 1 << 20_000,  # more digits than Python prints by default
    "listy": [1, "\ud800", {"k": b"bytes"}],  # not a Value at all: a driver bug must not poison the router either
}


def test_retained_state_never_raises_for_any_value_ts_or_name() -> None:
    router = Router([], [DeviceProfile("d", every_sample=True, deadbands={"huge": 0.5, "nan": 0.5})])
    bad_names = {"\ud800": 1, "a/b": 2, "x+": 3, "#": 4, "": 5, "nul\0": 6}
    router.on_sample(Sample("d", 10**400, {**HOSTILE_VALUES, **bad_names, "fine": 1.5}))
    router.on_sample(Sample("d", -(10**400), {"lone": "\udbff\udbff", "huge": 1.5, "nan": 10**400}))
    router.on_sample(Sample("d", 0, {"huge": 10**400, "nan": float("nan")}))  # deadbands between any two values
    retained = {m.topic: m.payload for m in router.retained_state()}
    for payload in retained.values():
        loads_strict(payload)  # strict JSON, valid UTF-8: what every subscriber can read
    assert retained["d/lone"] == b'"??"' and retained["d/mixed"] == b'"ok ? still"'
    assert retained["d/nan"] == b"null" and retained["d/huge"] == str(10**400).encode()
    assert retained["d/fine"] == b"1.5"
    # Names that cannot be a topic level are not kept (and so never published); each is counted.
    assert not any(name in {f"d/{n}" for n in bad_names} for name in retained)
    assert router.dropped_values == len(bad_names)
    # What the router keeps encodes: the view holds no string a UTF-8 encoder refuses.
    for value in router.devices["d"].latest.values():
        if isinstance(value, str):
            value.encode("utf-8")


async def test_a_lone_surrogate_value_is_republished_on_a_sink_reconnect(routed: Routed) -> None:
    router, sub = routed.router, routed.sub
    router.on_sample(Sample("d", 10**400, {"lone": "\ud800", "t": 20.5}))
    await sub.wait_for(lambda ms: any(m.topic == f"{PREFIX}/d/t" for m in ms))
    # The broker forgets; the sink reconnects and the router gives it its retained state again.
    seen = len(sub.messages)
    sock = routed.sink._client.socket()
    assert isinstance(sock, socket.socket)
    sock.shutdown(socket.SHUT_RDWR)  # under paho: no DISCONNECT, as when a link drops

    def again(ms: list[Any]) -> bool:
        later = {m.topic: m.payload for m in ms[seen:]}
        return later.get(f"{PREFIX}/d/t") == b"20.5" and later.get(f"{PREFIX}/d/lone") == b'"?"'

    assert await sub.wait_for(again, timeout=15)


async def test_a_cmd_with_an_odd_id_is_audited_before_it_runs_and_always_answered(routed: Routed) -> None:
    sub = routed.sub
    topic = f"{PREFIX}/d/cmd"
    odd: list[tuple[bytes, object]] = [
        (b'{"name":"go","id":"\\ud800"}', None),  # a lone surrogate: not strict JSON, refused (never run)
        (b'{"name":"go","id":{"a":[1,{"b":null}]}}', {"a": [1, {"b": None}]}),
        (b'{"name":"go","id":1e308}', 1e308),
        (b'{"name":"go","id":' + b"9" * 4000 + b"}", int("9" * 4000)),
        (b'{"name":"go","id":"nul\\u0000 \\u2028"}', "nul\0 \u2028"),
        (b'{"name":"boom","id":"b1"}', "b1"),  # the command raises inside the gateway
    ]
    for payload, want_id in odd:
        reply = await sub.request(topic, payload, timeout=5)
        body = loads_strict(reply.payload)
        assert body["id"] == want_id, payload[:40]
        assert body["ok"] is (want_id is not None and want_id != "b1"), body
    await asyncio.sleep(0.1)
    # Every request: one outcome record; those that reached the device, a request record before that.
    outcomes = [r for r in routed.audit if r.stage is None]
    requests = [r for r in routed.audit if r.stage == "request"]
    assert len(outcomes) == len(odd) and len(requests) == len(routed.asked) == len(odd) - 1
    assert all(routed.audited_before), "a command ran before its audit record was written"
    assert "not JSON" in (outcomes[0].error or "") and outcomes[0].raw is not None
    assert outcomes[-1].ok is False and "the device link broke" in (outcomes[-1].error or "")
    for record in routed.audit:
        json.loads(record.to_json())


async def test_a_set_is_audited_before_the_write_and_a_huge_payload_is_refused_unread(routed: Routed) -> None:
    reply = await routed.sub.request(f"{PREFIX}/d/set/sp", b'{"value": 5}')
    assert reply.json() == {"ok": True, "value": 5, "error": None}
    assert routed.audited_before == [True]
    reply = await routed.sub.request(f"{PREFIX}/d/set/sp", b"[" + b"1," * 40_000 + b"1]")
    assert reply.json()["ok"] is False and "at most 65536" in reply.json()["error"]
    assert len(routed.asked) == 1
    (refused,) = [r for r in routed.audit if r.stage is None and r.ok is False]
    assert refused.raw is not None and len(json.loads(refused.to_json())["payload"]) == 256


async def test_a_flood_of_requests_for_unknown_devices_leaves_at_most_burst_plus_rate_records(routed: Routed) -> None:
    router, clock, sub = routed.router, routed.clock, routed.sub
    for i in range(100):
        sub.publish(f"{PREFIX}/ghost-{i}/set/x", "1")
        sub.publish(f"{PREFIX}/m/cmd", '{"name": "go"}')  # known, but takes no commands: the same bucket
    received = routed.sink.stats.received
    await sub.wait_for(lambda _: routed.sink.stats.received >= received + 200, timeout=10)
    await asyncio.sleep(0.2)  # the request tasks run
    assert len(routed.audit) == 20  # the burst; the clock did not move
    assert router.dropped_requests == {"local": 180}
    clock.now += 1.0  # a second later: ten more
    for i in range(50):
        sub.publish(f"{PREFIX}/ghost-{i}/cmd", '{"name": "go"}')
    await sub.wait_for(lambda _: routed.sink.stats.received >= received + 250, timeout=10)
    await asyncio.sleep(0.2)
    assert len(routed.audit) == 30 and router.dropped_requests == {"local": 220}
    # Dropped requests get no answer either (an answer per request would be the flood, turned around).
    assert len(sub.on(f"{PREFIX}/m/cmd/result")) + len(sub.on(f"{PREFIX}/ghost-0/set/x/result")) <= 30
    # A device that takes commands is not held up by the others' limit.
    reply = await sub.request(f"{PREFIX}/d/cmd", '{"name": "go", "id": "after"}', timeout=5)
    assert reply.json() == {"id": "after", "ok": True, "result": {"done": "go"}, "error": None}


async def test_a_flood_over_a_devices_own_rate_is_bounded_in_the_audit_log_too(routed: Routed) -> None:
    router, sub = routed.router, routed.sub
    received = routed.sink.stats.received
    for i in range(100):
        sub.publish(f"{PREFIX}/r/cmd", json.dumps({"name": "go", "id": i}))
    await sub.wait_for(lambda _: routed.sink.stats.received >= received + 100, timeout=10)
    await asyncio.sleep(0.2)
    # The device's burst reached it; of the rest, the sink's burst was refused (audited, answered), the rest dropped.
    assert len(routed.asked) == 2
    outcomes = [r for r in routed.audit if r.stage is None]
    assert len(outcomes) == 22 and sum(1 for r in outcomes if r.ok) == 2
    assert all("rate limited: r takes at most 1 commands/s" in (r.error or "") for r in outcomes if not r.ok)
    assert router.dropped_requests == {"local": 78}


_ANY_TEXT = st.text(st.characters(blacklist_categories=()), max_size=12)  # surrogates and controls included
_ANY_VALUE = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-(10**500), max_value=10**500),
    st.floats(allow_nan=True, allow_infinity=True),
    _ANY_TEXT,
)


@settings(max_examples=150, deadline=None)
@given(
    samples=st.lists(
        st.tuples(
            st.one_of(st.integers(), st.integers(min_value=10**300, max_value=10**500), st.just(-(10**400))),
            st.dictionaries(_ANY_TEXT, _ANY_VALUE, max_size=6),
        ),
        min_size=1,
        max_size=4,
    )
)
def test_whatever_reaches_the_router_encodes_for_mqtt_and_the_status_page(
    samples: list[tuple[int, dict[str, Any]]],
) -> None:
    router = Router([], [DeviceProfile("d", every_sample=True, full_every=0.0)])
    for ts, values in samples:
        router.on_sample(Sample("d", ts, values))
    for message in router.retained_state():
        message.topic.encode("utf-8")
        loads_strict(message.payload)
    view = router.devices["d"]
    html = StatusPage._values("d", view.latest) + _age(1_800_000_000_000, view.latest_ts)
    html.encode("utf-8")  # the page is sent as UTF-8: every piece of it must encode
