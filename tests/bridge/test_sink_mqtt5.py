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
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.reasoncodes import ReasonCode

from bridge.buffer import MemoryBuffer
from bridge.outbox import Outbox
from bridge.sink import MqttSink
from gateway.errors import SinkError, SinkOffline
from gateway.metrics_topic import metrics_payload
from gateway.types import Message, RequestMeta, now_ms

from helpers import TcpRelay, free_port, until
from mosquitto import Mosquitto
from mqtt5 import Client5
from sink_metrics import scrape, snapshot_of

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


class Requests:
    """What a sink hands over (topic, payload, meta), pings (`ping/set/x`) apart."""

    def __init__(self) -> None:
        self.got: list[tuple[str, bytes, RequestMeta]] = []
        self.pings = 0

    def __call__(self, topic: str, payload: bytes, meta: RequestMeta) -> None:
        if topic.startswith("ping/"):
            self.pings += 1
        else:
            self.got.append((topic, payload, meta))

    @property
    def metas(self) -> list[RequestMeta]:
        """The metas, in arrival order."""
        return [m for _, _, m in self.got]


def session_sink(link: TcpRelay, on_request: Any) -> contextlib.AbstractAsyncContextManager[MqttSink]:
    """An MQTT 5 sink through `link` with a 60 s session, taking set requests, reconnecting within 0.2 s."""
    return sink5(
        link.port,
        session_expiry=60.0,
        subscriptions=("+/set/+",),
        on_request=on_request,
        reconnect_base=0.1,
        reconnect_cap=0.2,
    )


async def until_subscribed(requester: Client5, requests: Requests) -> None:
    """Send pings until the sink has one (it does not await its SUBACK): its subscriptions are in place."""
    for _ in range(100):
        requester.publish(f"{P}/ping/set/x", b"ping")
        await asyncio.sleep(0.1)
        if requests.pings:
            return
    raise AssertionError("the sink never received a request: not subscribed")


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
            await sink.publish(Message("d2/telemetry", b"{}", ts=100_000))  # 1970: older than max_age by its ts
            await until(lambda: len(sub.on(f"{P}/d2/telemetry")) == 1)
        (_, telemetry), (_, value) = sub.on(f"{P}/d1/telemetry")[0], sub.on(f"{P}/d1/temp")[0]
        assert user(telemetry) == {"ts": str(ten_minutes_ago)} and user(value) == {"ts": str(ten_minutes_ago)}
        assert 2990 <= telemetry.MessageExpiryInterval <= 3000  # 3600 s less the 600 s it is old
        assert not hasattr(value, "MessageExpiryInterval")  # a retained value is state: it does not expire
        assert user(sub.on(f"{P}/status")[-1][1]) == {}  # no sample time, no ts
        # Still in the spool (which ages rows on its own clock), so not to be dropped by the broker at once.
        assert not hasattr(sub.on(f"{P}/d2/telemetry")[0][1], "MessageExpiryInterval")


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
    """MessageExpiryInterval (counted down by the broker, so the age starts at 0) is the limit; without one the sink's
    max_request_age against the `ts` property's age; the answer goes to the response topic with the correlation data."""
    requests = Requests()
    with client5(broker.port, "replies/#") as requester:
        async with sink5(broker.port, subscriptions=("+/set/+",), on_request=requests) as sink:
            await until_subscribed(requester, requests)
            five_s_ago = [("ts", str(now_ms() - 5000))]
            requester.publish(
                f"{P}/d1/set/sp",
                b"5",
                ResponseTopic="replies/me",
                CorrelationData=b"\x00req-1",
                MessageExpiryInterval=20,
                UserProperty=five_s_ago,
            )
            requester.publish(f"{P}/d1/set/sp", b"6", UserProperty=five_s_ago)
            requester.publish(f"{P}/d1/set/sp", b"7")  # no properties: the sink's own limit, no age, no answer
            await until(lambda: len(requests.got) == 3)
            first, second, third = requests.metas
            assert requests.got[0][:2] == ("d1/set/sp", b"5")
            assert first.expiry_given and 19 <= first.max_age <= 20 and first.age == 0 and first.respond is not None
            assert not second.expiry_given and second.max_age == 30 and 4.5 <= second.age <= 30
            assert third == RequestMeta(max_age=30.0)
            first.respond(b'{"ok": true}')
            await until(lambda: len(requester.on("replies/me")) == 1)
            body, props = requester.on("replies/me")[0]
            assert body == b'{"ok": true}' and props.CorrelationData == b"\x00req-1"
        assert sink.stats.bad_requests == 0


async def test_odd_request_properties_are_ignored_not_trusted(broker: Mosquitto) -> None:
    """A `ts` that is no number (or digits Python reads but are not ASCII), one far ahead: no age; a wildcard
    response topic: no answer; the request itself still comes, and nothing raises."""
    requests = Requests()
    with client5(broker.port) as requester:
        async with sink5(broker.port, subscriptions=("+/set/+",), on_request=requests) as sink:
            await until_subscribed(requester, requests)
            requester.publish(f"{P}/d1/set/sp", b"5", ResponseTopic="x/#", UserProperty=[("ts", "-1e9")])
            requester.publish(f"{P}/d1/set/sp", b"5", UserProperty=[("ts", "9" * 40)])
            requester.publish(f"{P}/d1/set/sp", b"5", UserProperty=[("ts", str(now_ms() + 86_400_000))])
            requester.publish(f"{P}/d1/set/sp", b"5", UserProperty=[("ts", "\u00b2"), ("ts", "\uff11\uff12")])
            await until(lambda: len(requests.got) == 4)
            assert sink.stats.bad_requests == 0
    assert [(m.age, m.respond) for m in requests.metas] == [(0.0, None)] * 4


@pytest.mark.parametrize(
    "topic",
    [
        f"{P}/d2/set/other",  # under the sink's own prefix: it would come back as a request
        "fieldgate/gw2/pump/set/speed",  # another gateway's set topic: a write there in the gateway's name
        "fieldgate/gw2/pump/cmd",
        "spBv1.0/plant/DCMD/gw2/pump",
        "$SYS/broker/x",
        "",
    ],
)
async def test_an_answer_never_goes_to_a_request_topic_or_the_gateways_own(broker: Mosquitto, topic: str) -> None:
    """A response topic that is somebody's request topic (or ours, or $SYS) gets no answer: a requester must not make
    the gateway publish a `{"ok": true, "value": …}` where a gateway takes it as a write."""
    requests = Requests()
    with client5(broker.port) as requester:
        async with sink5(broker.port, subscriptions=("+/set/+",), on_request=requests):
            await until_subscribed(requester, requests)
            requester.publish(f"{P}/d1/set/sp", b"5", ResponseTopic=topic)
            await until(lambda: len(requests.got) == 1)
    assert requests.metas[0].respond is None


async def test_a_response_topic_the_broker_refuses_is_counted_and_not_answered_on_again(broker: Mosquitto) -> None:
    """The answer on a topic the broker denies: its PUBACK's refusal counted (Mosquitto then drops the connection);
    the next request naming that topic gets no answer there."""
    requests = Requests()
    with client5(broker.port) as requester:
        async with sink5(
            broker.port, subscriptions=("+/set/+",), on_request=requests, reconnect_base=0.05, reconnect_cap=0.1
        ) as sink:
            await until_subscribed(requester, requests)
            requester.publish(f"{P}/d1/set/sp", b"5", ResponseTopic="denied/answers")
            await until(lambda: len(requests.got) == 1)
            respond = requests.metas[0].respond
            assert respond is not None
            respond(b"{}")
            await until(lambda: sink.stats.broker_refusals.get("PUBACK Not authorized") == 1)
            assert await sink.wait_connected(10)
            await until_subscribed(requester, requests)
            requester.publish(f"{P}/d1/set/sp", b"6", ResponseTopic="denied/answers")
            await until(lambda: len(requests.got) == 2)
            assert requests.metas[1].respond is None


async def test_the_session_outlives_a_short_drop_and_requests_sent_meanwhile_arrive_no_younger_than_the_drop(
    broker: Mosquitto,
) -> None:
    """Session expiry: a set published while the sink's connection is down reaches it after the reconnect, with an
    age of at least the time the sink was away (it may have waited that long at the broker)."""
    requests = Requests()
    link = TcpRelay(broker.port)
    await link.start()
    try:
        with client5(broker.port) as requester:
            async with session_sink(link, requests) as sink:
                await until_subscribed(requester, requests)
                await link.close()
                await until(lambda: not sink.connected)
                requester.publish(f"{P}/d1/set/sp", b"while-away")
                await asyncio.sleep(1.5)
                await link.start()
                await until(lambda: [p for _, p, _ in requests.got] == [b"while-away"], timeout=10)
                assert requests.metas[0].age >= 1.5
    finally:
        await link.close()


async def test_a_request_the_session_delivers_again_is_handed_over_once(broker: Mosquitto) -> None:
    """Its PUBACK lost with the connection, the resumed session delivers the request again (DUP): not again to the
    gateway, counted."""
    requests = Requests()
    link = TcpRelay(broker.port)
    await link.start()
    try:
        with client5(broker.port) as requester:

            def hold_the_puback(topic: str, payload: bytes, meta: RequestMeta) -> None:
                requests(topic, payload, meta)
                if payload == b"once":
                    link.upstream.clear()  # the PUBACK paho writes after this returns never reaches the broker

            async with session_sink(link, hold_the_puback) as sink:
                await until_subscribed(requester, requests)
                requester.publish(f"{P}/d1/set/sp", b"once")
                await until(lambda: len(requests.got) == 1)
                await asyncio.sleep(0.2)
                await link.close()
                link.upstream.set()
                await until(lambda: not sink.connected)
                await link.start()
                await until(lambda: sink.stats.duplicate_requests == 1, timeout=10)
                await asyncio.sleep(0.3)
                assert [p for _, p, _ in requests.got] == [b"once"]
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


async def test_the_brokers_limits_from_its_connack_bound_what_the_sink_sends(tmp_path: Path) -> None:
    """Receive Maximum bounds the publishes in flight; a message over the Maximum Packet Size is refused here, and
    the connection stays up (sent, the broker would drop the connection, and the replay would send it again)."""
    m = Mosquitto(tmp_path / "limits", free_port(), extra_config="max_inflight_messages 5\nmax_packet_size 2000")
    m.start()
    try:
        async with sink5(m.port) as sink:
            assert sink._client._max_inflight_messages == 5
            with pytest.raises(SinkError, match="over the broker's maximum packet size"):
                await sink.publish(Message("d1/telemetry", b"x" * 3000, ts=now_ms()))
            await sink.publish(Message("d1/telemetry", b"x" * 1000, ts=now_ms()))
            assert sink.stats.disconnects == 0 and sink.stats.published >= 1
    finally:
        m.stop()


async def test_a_request_over_the_packet_size_the_sink_takes_never_reaches_it(broker: Mosquitto) -> None:
    """CONNECT's Maximum Packet Size: a request of 20 KiB (or one with 30,000 user properties, which paho would
    parse for seconds on the event loop) is dropped by the broker; the small one after it arrives."""
    requests = Requests()
    with client5(broker.port) as requester:
        async with sink5(broker.port, subscriptions=("+/set/+",), on_request=requests):
            await until_subscribed(requester, requests)
            requester.publish(f"{P}/d1/set/sp", b"1" * 20_000)
            requester.publish(f"{P}/d1/set/sp", b"2", UserProperty=[("k", "v")] * 30_000)
            requester.publish(f"{P}/d1/set/sp", b"3")
            await until(lambda: len(requests.got) >= 1)
            await asyncio.sleep(0.3)
    assert [p for _, p, _ in requests.got] == [b"3"]


async def test_a_refusal_for_now_keeps_the_message_and_one_for_good_fails_it(broker: Mosquitto) -> None:
    """PUBACK 0x97 (quota exceeded) fails the publish as unacknowledged (the outbox keeps it and sends it later);
    0x87 (not authorized) as refused. Each counted by its reason."""
    async with sink5(broker.port) as sink:
        loop = asyncio.get_running_loop()
        futures: list[asyncio.Future[None]] = []
        for mid, code in ((60001, 0x97), (60002, 0x87)):
            futures.append(fut := loop.create_future())
            sink._pending[mid] = fut
            sink._handle_puback(sink._client, None, mid, ReasonCode(PacketTypes.PUBACK, identifier=code), None)
        quota, denied = (f.exception() for f in futures)
        assert isinstance(quota, SinkOffline) and "Quota exceeded" in str(quota)
        assert isinstance(denied, SinkError) and not isinstance(denied, SinkOffline)
        assert set(sink.stats.broker_refusals) == {"PUBACK Quota exceeded", "PUBACK Not authorized"}


async def test_a_live_message_the_broker_refuses_is_counted_as_given_up(
    broker: Mosquitto, caplog: pytest.LogCaptureFixture
) -> None:
    """Refused live messages are counted (undeliverable, so in `dropped`) and logged once a minute, not per message."""
    async with sink5(broker.port, reconnect_base=0.05, reconnect_cap=0.1) as sink:
        box = Outbox(sink, MemoryBuffer())
        await box.start()
        try:
            for i in range(3):
                # One at a time: Mosquitto 2.0.11 drops the connection after each refusal (what was in flight then
                # is kept, as unacknowledged).
                assert await sink.wait_connected(10)
                with pytest.raises(SinkError, match="Not authorized"):
                    await asyncio.wait_for(box.put(Message("/denied/x", b"%d" % i, ts=now_ms()), awaited=True), 10)
            assert box.stats.undeliverable == 3
        finally:
            await box.stop()
    said = [r for r in caplog.records if "refused since the last such line" in r.getMessage()]
    assert len(said) == 1
