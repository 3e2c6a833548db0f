"""The sink's reconnect policy: full-jitter back-off, the round robin over a cluster's nodes, take-over detection,
first as pure functions (hypothesis), then in MqttSink's connect loop against a real Mosquitto."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
from typing import Any

import paho.mqtt.client as mqtt
import pytest
from hypothesis import given
from hypothesis import strategies as st
from paho.mqtt.enums import CallbackAPIVersion

import bridge.sink
from bridge.sink import MqttSink
from bridge.sink_reconnect import Nodes, TakeoverWatch, backoff
from gateway.metrics_topic import metrics_payload
from gateway.status_page import StatusPage
from gateway.utilisation import Utilisation

from helpers import free_port, until
from mosquitto import Mosquitto
from sink_metrics import scrape, snapshot_of

unit = st.floats(min_value=0.0, max_value=1.0, exclude_max=True)
seconds = st.floats(min_value=0.001, max_value=3600.0)


@given(attempt=st.integers(min_value=0, max_value=10_000), base=seconds, cap=seconds, r=unit)
def test_each_wait_is_within_zero_and_the_capped_exponential(attempt: int, base: float, cap: float, r: float) -> None:
    """Every wait is uniform in [0, min(cap, base * 2**attempt)]: the dice times that ceiling, never above the cap."""
    wait = backoff(attempt, base, cap, rand=lambda: r)
    ceiling = min(cap, base * 2.0 ** min(attempt, 64))
    assert 0.0 <= wait <= ceiling <= cap
    assert wait == pytest.approx(ceiling * r)


@given(attempt=st.integers(min_value=0, max_value=200), base=seconds, cap=seconds)
def test_the_ceiling_doubles_until_the_cap(attempt: int, base: float, cap: float) -> None:
    """With the dice at their top, the ceiling of retry n+1 is twice that of retry n until the cap holds it."""
    top = 1.0 - 2**-53

    def ceiling(n: int) -> float:
        return backoff(n, base, cap, rand=lambda: top) / top

    assert ceiling(attempt + 1) == pytest.approx(min(cap, 2 * ceiling(attempt)))


def test_the_first_retry_is_jittered_too_and_the_defaults_are_1s_and_60s() -> None:
    """Retry 0 draws from [0, 1 s]: not a fixed first wait, which a whole fleet would share."""
    assert backoff(0, rand=lambda: 0.0) == 0.0
    assert backoff(0, rand=lambda: 0.5) == 0.5
    assert backoff(0, rand=lambda: 0.999) == pytest.approx(0.999)
    assert backoff(6, rand=lambda: 0.999) == pytest.approx(59.94)  # 64 s capped at 60
    assert backoff(10**6, rand=lambda: 0.5) == 30.0  # no overflow far past the cap


def test_nodes_go_round_robin_and_stay_put_until_advanced() -> None:
    """The current node is kept until the sink moves on; moving on wraps around; ports default per scheme."""
    nodes = Nodes(("mqtt://a", "mqtts://b:9000", "mqtts://c"))
    assert [nodes.current.url] * 2 == [nodes.current.url, nodes.current.url] == ["mqtt://a"] * 2
    assert [nodes.advance().url, nodes.advance().url, nodes.advance().url] == [
        "mqtts://b:9000",
        "mqtts://c",
        "mqtt://a",
    ]
    assert (nodes.current.port, Nodes(("mqtts://c",)).current.port, nodes.any_tls) == (1883, 8883, True)
    with pytest.raises(ValueError):
        Nodes(())


class FakeClock:
    """A monotonic clock the test moves."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def session(watch: TakeoverWatch, clock: FakeClock, lasted: float, then: float = 0.5) -> bool:
    """One session that lasted `lasted` s and was closed by the broker, then `then` s until the next connect."""
    watch.connected()
    clock.now += lasted
    started = watch.dropped()
    clock.now += then
    return started


def test_a_take_over_is_three_quick_drops_within_a_minute_and_is_reported_once_per_episode() -> None:
    """Quick drops count; the third starts an episode (reported once however long it lasts); a session that lasts
    ends it, and the next run of quick drops is a new episode."""
    clock = FakeClock()
    watch = TakeoverWatch(clock=clock)
    assert [session(watch, clock, 0.2) for _ in range(8)] == [False, False, True] + [False] * 5
    assert not session(watch, clock, 600.0)  # a session that lasted: the other gateway is gone
    assert not watch.in_episode
    assert [session(watch, clock, 0.2) for _ in range(3)] == [False, False, True]


def test_drops_after_a_while_or_spread_over_more_than_a_minute_are_no_take_over() -> None:
    """A broker restarting now and then is not a take-over: neither slow drops nor quick ones far apart."""
    clock = FakeClock()
    watch = TakeoverWatch(clock=clock)
    assert [session(watch, clock, 6.0) for _ in range(10)] == [False] * 10
    assert [session(watch, clock, 0.2, then=40.0) for _ in range(10)] == [False] * 10
    assert not watch.dropped()  # a drop without a connect (a failed attempt) counts for nothing


# --- in the connect loop ---------------------------------------------------------------------------


@pytest.mark.parametrize("stable_after", [0.0, 3600.0])
async def test_the_connect_loop_draws_each_wait_from_the_back_off_and_a_lasting_connection_resets_it(
    mosquitto: Mosquitto, monkeypatch: pytest.MonkeyPatch, stable_after: float
) -> None:
    """Retries while the broker is away ask the back-off for attempts 0, 1, 2, ... (the first retry too) with the
    sink's base and cap; after a connection that lasted STABLE_AFTER the retries start from attempt 0 again, after
    a shorter one (a broker that accepts and then closes) they go on counting, so it is not retried at once."""
    monkeypatch.setattr(bridge.sink, "STABLE_AFTER", stable_after)
    asked: list[tuple[int, float, float]] = []

    def spy(attempt: int, base: float, cap: float, rand: Any) -> float:
        asked.append((attempt, base, cap))
        return backoff(attempt, base, cap, rand)

    monkeypatch.setattr(bridge.sink, "backoff", spy)
    sink = MqttSink(
        "up", mosquitto.url, "fg/t", client_id="reconnect-spy", reconnect_base=0.02, reconnect_cap=0.1, rand=lambda: 1.0
    )
    mosquitto.kill()
    await sink.start()
    try:
        await until(lambda: len(asked) >= 4, 10, "four retries")
        mosquitto.start()
        assert await sink.wait_connected(10)
        before = len(asked)
        assert [a for a, _, _ in asked[:before]] == list(range(before))
        assert {(b, c) for _, b, c in asked} == {(0.02, 0.1)}
        mosquitto.kill()
        await until(lambda: len(asked) >= before + 2, 10, "retries after the drop")
        expected = [0, 1] if stable_after == 0 else [before, before + 1]
        assert [a for a, _, _ in asked[before : before + 2]] == expected
    finally:
        await sink.stop()


async def test_a_second_client_with_our_id_is_reported_once_as_a_take_over(
    mosquitto: Mosquitto, caplog: pytest.LogCaptureFixture
) -> None:
    """Another client that keeps connecting with the sink's client id (a second gateway with the same id): the
    broker closes our session right after each connect; the sink logs one ERROR naming the id and broker, and
    counts one take-over, not one per drop, which P/metrics and /metrics show (the broker as a string, no label;
    on the status page on hover)."""
    client_id = f"fieldgate-twin-{free_port()}"
    sink = MqttSink("cloud", mosquitto.url, "fg/t", client_id=client_id, reconnect_base=0.05, reconnect_cap=0.2)
    stop = threading.Event()

    def twin() -> None:
        # The other gateway: connects with the same id again and again, as its own reconnect loop would.
        while not stop.is_set():
            c = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=client_id)
            with contextlib.suppress(OSError):
                c.connect("127.0.0.1", mosquitto.port)
                c.loop_start()
                stop.wait(0.4)
                c.loop_stop()
                c.disconnect()

    caplog.set_level(logging.INFO, logger="bridge.sink")
    await sink.start()
    thread = asyncio.create_task(asyncio.to_thread(twin))
    try:
        assert await sink.wait_connected(10)
        await until(lambda: sink.stats.takeovers >= 1, 20, "a take-over")
        drops = sink.stats.disconnects
        await until(lambda: sink.stats.disconnects >= drops + 3, 20, "more drops in the same episode")
        assert sink.stats.takeovers == 1
    finally:
        stop.set()
        await thread
        await sink.stop()
    errors = [
        r.getMessage() for r in caplog.records if r.levelno == logging.ERROR and "another gateway" in r.getMessage()
    ]
    snap = snapshot_of(sink)
    shown = metrics_payload(snap)["sinks"]
    assert isinstance(shown, dict)
    assert (shown["cloud"]["takeovers"], shown["cloud"]["broker"]) == (1, mosquitto.url)  # P/metrics
    page = StatusPage(snap, Utilisation(), []).render()
    assert f'<span title="{mosquitto.url}"><span class="offline">disconnected</span></span>' in page  # stopped
    scraped = scrape(snap)
    assert scraped[("fieldgate_sink_takeovers_total", frozenset({("sink", "cloud")}))] == 1
    assert all(set(dict(labels)) <= {"sink"} for name, labels in scraped if name.startswith("fieldgate_sink_"))
    assert errors == [
        f"sink cloud: another gateway uses the client id {client_id} on {mosquitto.url}: the broker closed this "
        "session 3 times within 5 s of connecting (give each gateway its own gateway.id, or the sink its own client_id)"
    ]


class RefusingSubscribe:
    """A TCP relay to a broker that drops the connection when the client sends SUBSCRIBE (as a RabbitMQ 3.10 cluster
    does when the node holding the subscription's durable queue is down): CONNACK, then the close."""

    def __init__(self, target: int) -> None:
        self.target = target
        self.port = free_port()
        self.cut = 0
        self._server: asyncio.Server | None = None

    async def start(self) -> None:
        """Accept connections."""
        self._server = await asyncio.start_server(self._handle, "127.0.0.1", self.port)

    async def close(self) -> None:
        """Stop accepting."""
        if self._server is not None:
            self._server.close()

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        up_reader, up_writer = await asyncio.open_connection("127.0.0.1", self.target)

        async def pump(src: asyncio.StreamReader, dst: asyncio.StreamWriter, upstream: bool) -> None:
            with contextlib.suppress(OSError):
                while data := await src.read(65536):
                    if upstream and data[0] >> 4 == 8:  # packet type 8: SUBSCRIBE
                        self.cut += 1
                        break
                    dst.write(data)
                    await dst.drain()
            writer.transport.abort()
            up_writer.transport.abort()

        await asyncio.gather(pump(reader, up_writer, True), pump(up_reader, writer, False))


async def test_a_broker_that_drops_the_connection_at_subscribe_is_no_take_over(
    mosquitto: Mosquitto, caplog: pytest.LogCaptureFixture
) -> None:
    """Closed right after CONNACK, before the SUBACK, again and again: the broker refused the subscription (a cluster
    node down), not another gateway with our client id. No take-over is counted or said; each drop says why."""
    relay = RefusingSubscribe(mosquitto.port)
    await relay.start()
    caplog.set_level(logging.WARNING, logger="bridge.sink")
    sink = MqttSink(
        "cloud",
        f"mqtt://127.0.0.1:{relay.port}",
        "fg/t",
        client_id="refused-subscribe",
        subscriptions=("+/set/+",),
        reconnect_base=0.05,
        reconnect_cap=0.1,
    )
    await sink.start()
    try:
        await until(lambda: relay.cut >= 5 and sink.stats.disconnects >= 5, 20, "five drops at SUBSCRIBE")
    finally:
        await sink.stop()
        await relay.close()
    assert sink.stats.takeovers == 0
    said = [r.getMessage() for r in caplog.records]
    assert not [m for m in said if "another gateway" in m]
    assert any("before it acknowledged the subscriptions" in m for m in said)
