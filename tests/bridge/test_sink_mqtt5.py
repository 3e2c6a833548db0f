"""A sink speaking MQTT 5 (`protocol: 5`) to a real Mosquitto 2, seen by a real paho MQTT 5 client.

The session outlives a short drop (requests sent meanwhile arrive), telemetry carries its sample `ts` and what is
left of the spool's max_age as message expiry, a request's response topic, correlation data, expiry and `ts` reach
the gateway, and the broker's refusals (reason codes) are counted and fail the message instead of passing as sent.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest
from mqtt5 import Client5
from sink_metrics import scrape, snapshot_of

from bridge.sink import MqttSink
from gateway.errors import SinkError
from gateway.metrics_topic import metrics_payload
from gateway.types import Message, RequestMeta, now_ms

from helpers import TcpRelay, free_port, until
from mosquitto import Mosquitto

P = "fg/v5"


@pytest.fixture
def broker(tmp_path: Path) -> Iterator[Mosquitto]:
    """Mosquitto 2 (speaks MQTT 5); anonymous clients may not publish under `denied/`."""
    acl = tmp_path / "acl"
    acl.write_text("topic readwrite fg/#\ntopic readwrite replies/#\ntopic read denied/#\n")
    m = Mosquitto(tmp_path / "mosquitto", free_port(), extra_config=f"acl_file {acl}")
    m.start()
    try:
        yield m
    finally:
        m.stop()


@contextlib.contextmanager
def client5(port: int, *topics: str) -> Iterator[Client5]:
    """A connected Client5 subscribed to `topics`, stopped at the end."""
    c = Client5(port, *topics)
    try:
        yield c
    finally:
        c.stop()


@contextlib.asynccontextmanager
async def sink5(port: int, **kwargs: Any) -> AsyncIterator[MqttSink]:
    """A started, connected MQTT 5 sink to 127.0.0.1:port under P."""
    kwargs.setdefault("protocol", "5")
    sink = MqttSink("up", f"mqtt://127.0.0.1:{port}", P, client_id=f"sink5-{time.monotonic_ns()}", **kwargs)
    await sink.start()
    try:
        assert await sink.wait_connected(10)
        yield sink
    finally:
        await sink.stop()


async def until_subscribed(requester: Client5, seen: list[Any]) -> None:
    """Send pings (`ping/set/x`) until the sink has one (it does not await its SUBACK), then forget them."""
    for _ in range(100):
        requester.publish(f"{P}/ping/set/x", b"ping")
        await asyncio.sleep(0.1)
        if seen:
            break
    assert seen, "the sink never received a request: not subscribed"
    await asyncio.sleep(0.2)  # pings still on their way
    seen.clear()


def user(props: Any) -> dict[str, str]:
    """A message's user properties as a dict."""
    return dict(getattr(props, "UserProperty", None) or [])


async def test_telemetry_carries_its_sample_ts_and_expires_when_the_spool_would_have_dropped_it(
    broker: Mosquitto,
) -> None:
    """ts as a user property on every timed message; message expiry = max_age - age on non-retained ones only."""
    ten_minutes_ago = now_ms() - 600_000
    with client5(broker.port, f"{P}/#") as sub:
        async with sink5(broker.port, message_expiry=3600.0) as sink:
            await sink.publish(Message("d1/telemetry", b"{}", ts=ten_minutes_ago))
            await sink.publish(Message("d1/temp", b"21.5", retain=True, ts=ten_minutes_ago))
            await sink.publish(Message("status", b"online", retain=True))
            await until(lambda: len(sub.on(f"{P}/d1/temp")) == 1)
        (_, telemetry), (_, value) = sub.on(f"{P}/d1/telemetry")[0], sub.on(f"{P}/d1/temp")[0]
        assert user(telemetry) == {"ts": str(ten_minutes_ago)} and user(value) == {"ts": str(ten_minutes_ago)}
        assert 2990 <= telemetry.MessageExpiryInterval <= 3000  # 3600 s less the 600 s it is old
        assert not hasattr(value, "MessageExpiryInterval")  # a retained value is state: it does not expire
        assert user(sub.on(f"{P}/status")[-1][1]) == {}  # no sample time, no ts


async def test_a_3_1_1_sink_sends_no_properties(broker: Mosquitto) -> None:
    """protocol 3.1.1 (the default) has none of it: no ts property, no expiry."""
    with client5(broker.port, f"{P}/#") as sub:
        async with sink5(broker.port, protocol="3.1.1", message_expiry=3600.0) as sink:
            await sink.publish(Message("d1/telemetry", b"{}", ts=now_ms()))
            await until(lambda: len(sub.on(f"{P}/d1/telemetry")) == 1)
        props = sub.on(f"{P}/d1/telemetry")[0][1]
        assert user(props) == {} and not hasattr(props, "MessageExpiryInterval")


async def test_a_request_brings_its_expiry_age_and_response_topic_and_the_answer_goes_there(
    broker: Mosquitto,
) -> None:
    """MessageExpiryInterval is the age limit, the `ts` property the age; the answer carries the correlation data."""
    metas: list[tuple[str, RequestMeta]] = []
    with client5(broker.port, "replies/#") as requester:
        async with sink5(
            broker.port, subscriptions=("+/set/+",), on_request=lambda t, _p, m: metas.append((t, m))
        ) as sink:
            await until_subscribed(requester, metas)
            requester.publish(
                f"{P}/d1/set/sp",
                b"5",
                ResponseTopic="replies/me",
                CorrelationData=b"\x00req-1",
                MessageExpiryInterval=20,
                UserProperty=[("ts", str(now_ms() - 5000))],
            )
            requester.publish(f"{P}/d1/set/sp", b"6")  # no properties: the sink's own limit, no age, no answer
            await until(lambda: len(metas) == 2)
            (topic, first), (_, second) = metas
            assert topic == "d1/set/sp" and first.expiry_given and 19 <= first.max_age <= 20
            assert 4.5 <= first.age <= 30 and first.respond is not None
            assert second == RequestMeta(max_age=30.0)
            first.respond(b'{"ok": true}')
            await until(lambda: len(requester.on("replies/me")) == 1)
            body, props = requester.on("replies/me")[0]
            assert body == b'{"ok": true}' and props.CorrelationData == b"\x00req-1"
        assert sink.stats.bad_requests == 0


async def test_odd_request_properties_are_ignored_not_trusted(broker: Mosquitto) -> None:
    """A `ts` that is no number, a wildcard response topic: no age, no answer; the request itself still comes."""
    metas: list[RequestMeta] = []
    with client5(broker.port) as requester:
        async with sink5(broker.port, subscriptions=("+/set/+",), on_request=lambda _t, _p, m: metas.append(m)):
            await until_subscribed(requester, metas)
            requester.publish(f"{P}/d1/set/sp", b"5", ResponseTopic="x/#", UserProperty=[("ts", "-1e9")])
            requester.publish(f"{P}/d1/set/sp", b"5", UserProperty=[("ts", "9" * 40)])
            requester.publish(f"{P}/d1/set/sp", b"5", UserProperty=[("ts", str(now_ms() + 86_400_000))])
            await until(lambda: len(metas) == 3)
    assert [(m.age, m.respond) for m in metas] == [(0.0, None)] * 3


async def test_the_session_outlives_a_short_drop_and_requests_sent_meanwhile_arrive(broker: Mosquitto) -> None:
    """Session expiry: a set published while the sink's connection is down reaches it after the reconnect."""
    got: list[bytes] = []
    link = TcpRelay(broker.port)
    await link.start()
    try:
        with client5(broker.port) as requester:
            async with sink5(
                link.port,
                session_expiry=60.0,
                subscriptions=("+/set/+",),
                on_request=lambda _t, p, _m: got.append(p),
                reconnect_base=0.1,
                reconnect_cap=0.2,
            ) as sink:
                await until_subscribed(requester, got)
                await link.close()
                await until(lambda: not sink.connected)
                requester.publish(f"{P}/d1/set/sp", b"while-away")
                await link.start()
                await until(lambda: got == [b"while-away"], timeout=10)
    finally:
        await link.close()


async def test_a_publish_the_broker_refuses_fails_and_its_reason_is_counted(broker: Mosquitto) -> None:
    """PUBACK with a failure reason (not authorized): the message fails (never counted sent), the reason counted."""
    async with sink5(broker.port) as sink:
        with pytest.raises(SinkError, match="Not authorized"):
            fut = sink.try_publish(Message("/denied/x", b"1", qos=1))
            assert fut is not None
            await fut
        await sink.publish(Message("fine", b"1", qos=1))
        assert sink.stats.broker_refusals == {"PUBACK Not authorized": 1} and sink.stats.published == 1
        snap = snapshot_of(sink)
        assert metrics_payload(snap)["sinks"]["up"]["broker_refusals"] == {"PUBACK Not authorized": 1}  # type: ignore[index]
        labels = frozenset({("sink", "up"), ("reason", "PUBACK Not authorized")})
        assert scrape(snap)[("fieldgate_sink_refusals_total", labels)] == 1
