"""Routing rules on a real broker: deadband, snapshots, retained per-point values, re-publication."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import pytest

from bridge.broker import EmbeddedBroker
from bridge.outbox import Outbox
from bridge.sink import MqttSink
from gateway.errors import SinkError
from gateway.router import SUBSCRIPTIONS, Router, encode_json
from gateway.types import DeviceProfile, DeviceState, Sample, Value

from helpers import Subscriber


class Clock:
    """A hand-driven monotonic clock, so snapshot periods need no sleeping."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
async def routed(
    broker: EmbeddedBroker, port: int, subscriber: Subscriber
) -> AsyncIterator[tuple[Router, Clock, Subscriber]]:
    """A router publishing through a real sink to the test broker."""
    router_box: list[Router] = []
    sink = MqttSink(
        "local",
        f"mqtt://127.0.0.1:{port}",
        "fieldgate/r",
        client_id="router-test",
        subscriptions=SUBSCRIPTIONS,
        on_request=lambda t, p, m: router_box[0].on_request(outbox, t, p, m),
    )
    outbox = Outbox(sink)
    clock = Clock()
    router = Router(
        [outbox],
        [DeviceProfile("d", full_every=60.0, deadbands={"t": 0.5}), DeviceProfile("m")],
        clock=clock,
    )
    router_box.append(router)
    await outbox.start()
    await sink.start()
    assert await sink.wait_connected(5)
    try:
        yield router, clock, subscriber
    finally:
        await outbox.flush(2)
        await outbox.stop()
        await sink.stop()


async def telemetry(sub: Subscriber, n: int) -> list[dict]:  # type: ignore[type-arg]
    """The first n telemetry payloads of device d."""
    await sub.wait_for(lambda ms: len([m for m in ms if m.topic == "fieldgate/r/d/telemetry"]) >= n, timeout=5)
    return [m.json() for m in sub.on("fieldgate/r/d/telemetry")]  # type: ignore[misc]


async def test_deadband_and_full_snapshots(routed: tuple[Router, Clock, Subscriber]) -> None:
    router, clock, sub = routed

    async def sample(ts: int, values: dict[str, Value]) -> None:
        router.on_sample(Sample("d", ts, values))
        # Out before the next one: a retained value still queued would be replaced by the next (coalesced).
        assert await router.outboxes[0].flush(2)

    await sample(1, {"t": 20.0, "s": "a"})  # first: a full snapshot
    clock.now += 1
    await sample(2, {"t": 20.4, "s": "a"})  # within deadband, unchanged: nothing
    clock.now += 1
    await sample(3, {"t": 20.6, "s": "a"})  # 0.6 from the last published 20.0
    clock.now += 1
    await sample(4, {"t": 20.7, "s": "b"})  # only s moved
    clock.now += 60
    await sample(5, {"t": 20.8, "s": "b"})  # snapshot due: everything, latest values
    got = await telemetry(sub, 4)
    assert got == [
        {"ts": 1, "values": {"t": 20.0, "s": "a"}},
        {"ts": 3, "values": {"t": 20.6}},
        {"ts": 4, "values": {"s": "b"}},
        {"ts": 5, "values": {"t": 20.8, "s": "b"}},
    ]
    # Per-point topics carry only what moved, and are retained.
    await sub.wait_for(lambda ms: len([m for m in ms if m.topic == "fieldgate/r/d/t"]) >= 2)
    assert [m.json() for m in sub.on("fieldgate/r/d/t")] == [20.0, 20.6]
    late = Subscriber(sub.port, ("fieldgate/r/d/t",))
    await asyncio.to_thread(late.start)
    try:
        msg = await late.next_on("fieldgate/r/d/t")
        assert msg.retain and msg.json() == 20.6
    finally:
        late.stop()


async def test_status_and_republication(routed: tuple[Router, Clock, Subscriber]) -> None:
    router, _, sub = routed
    router.on_state(DeviceState("d", True))
    router.on_sample(Sample("d", 7, {"t": 1.5, "bits.alarm": True}))
    router.on_state(DeviceState("m", False, "no response"))
    retained = {m.topic: m.payload for m in router.retained_state()}
    assert retained == {"d/status": b"online", "d/t": b"1.5", "d/bits.alarm": b"true", "m/status": b"offline"}
    status = await sub.next_on("fieldgate/r/m/status")
    assert status.payload == b"offline"


async def test_requests_for_devices_that_cannot_take_them(routed: tuple[Router, Clock, Subscriber]) -> None:
    _, _, sub = routed
    r = await sub.request("fieldgate/r/m/set/x", "1")
    assert r.json() == {"ok": False, "value": None, "error": "m takes no writes"}
    r = await sub.request("fieldgate/r/d/set/x", "{not json")
    assert r.json()["ok"] is False and "not JSON" in r.json()["error"]
    sub.publish("fieldgate/r/d/cmd", '{"name": "reset", "id": "c1"}')
    r = await sub.next_on("fieldgate/r/d/cmd/result")
    assert r.json() == {"id": "c1", "ok": False, "result": None, "error": "d takes no commands"}


def test_json_payloads_are_compact_and_never_invalid() -> None:
    assert encode_json({"a": 1.5, "b": float("nan"), "c": float("inf")}) == b'{"a":1.5,"b":null,"c":null}'
    assert encode_json("°C") == '"°C"'.encode()


async def test_deliver_refuses_what_no_sink_would_keep() -> None:
    # An MCP ACK promises the data is kept: a device the router does not know (yet), or no sink at all, is a NACK.
    router = Router([], [DeviceProfile("d", every_sample=True)])
    for device in ("d", "stranger"):
        fut = router.deliver(Sample(device, 1, {"v": 1}))
        with pytest.raises(SinkError, match="no sink takes data"):
            await fut
