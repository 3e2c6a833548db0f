"""MqttSink against a real embedded amqtt broker over real sockets.

Where a test needs to hold, slow down or cut the traffic between the sink and the broker it puts
a small TCP relay (`TcpRelay`, tests/helpers.py) in between; the broker, the sink and the paho subscriber stay real.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import time
from collections.abc import AsyncIterator
from typing import Any

import pytest

from bridge.broker import EmbeddedBroker
from bridge.sink import MqttSink
from gateway.errors import SinkError, SinkOffline
from gateway.supervise import Supervisor
from gateway.types import Message

from helpers import Received, Subscriber, TcpRelay, free_port, subscribed

P = "fg/t1"


# --- helpers ---------------------------------------------------------------------------------


@contextlib.asynccontextmanager
async def running(port: int, **kwargs: Any) -> AsyncIterator[MqttSink]:
    """A started sink to 127.0.0.1:port (not necessarily connected yet)."""
    kwargs.setdefault("client_id", f"sink-{port}-{time.monotonic_ns()}")
    sink = MqttSink("up", f"mqtt://127.0.0.1:{port}", P, **kwargs)
    await sink.start()
    try:
        yield sink
    finally:
        await sink.stop()


@pytest.fixture
def sub(subscriber: Subscriber) -> Subscriber:
    """conftest's subscriber to `#` on the test broker, under a short name."""
    return subscriber


def payloads(sub: Subscriber, topic: str) -> list[bytes]:
    """Every payload seen on `P/topic`, oldest first."""
    return [m.payload for m in sub.on(f"{P}/{topic}")]


async def retained(port: int, topic: str) -> Received:
    """What a subscriber that arrives now gets as the retained message of `topic`."""
    async with subscribed(port, topic) as late:
        got = await late.next_on(topic, timeout=5)
    assert got.retain, f"{topic}: {got.payload!r} was not delivered as a retained message"
    return got


async def connected(sink: MqttSink, sub: Subscriber) -> None:
    """Wait for the session and for `status online` to be through the broker (so subscriptions are too)."""
    assert await sink.wait_connected(5), "sink did not connect"
    await sub.wait_for(lambda ms: any(m.topic == f"{P}/status" and m.payload == b"online" for m in ms), 5)


def kill_socket(sink: MqttSink) -> None:
    """Shut the sink's TCP connection down under paho: no DISCONNECT goes out."""
    sock = sink._client.socket()
    assert isinstance(sock, socket.socket)
    sock.shutdown(socket.SHUT_RDWR)


async def not_done_for(task: asyncio.Task[Any], seconds: float) -> None:
    """Let the loop run for a while and check that `task` is still waiting."""
    await asyncio.sleep(seconds)
    assert not task.done(), f"returned early: {task}"


# --- publish semantics -------------------------------------------------------------------------


async def test_qos1_publish_returns_only_once_the_puback_is_in(
    broker: EmbeddedBroker, port: int, sub: Subscriber
) -> None:
    relay = TcpRelay(port)
    await relay.start()
    try:
        async with running(relay.port) as sink:
            await connected(sink, sub)
            relay.downstream.clear()  # the broker's PUBACK will be held in the relay
            task = asyncio.create_task(sink.publish(Message("v", b"1")))
            # The broker has the message (it reached the subscriber): the PUBACK is on its way.
            await sub.next_on(f"{P}/v", timeout=5)
            await not_done_for(task, 0.3)
            assert sink.stats.published == 0
            relay.downstream.set()
            await asyncio.wait_for(task, 5)
            assert sink.stats.published == 1
            assert payloads(sub, "v") == [b"1"]
    finally:
        await relay.close()


async def test_qos0_returns_without_waiting_for_the_broker_and_qos_is_per_message(
    broker: EmbeddedBroker, port: int, sub: Subscriber
) -> None:
    relay = TcpRelay(port)
    await relay.start()
    try:
        async with running(relay.port, qos=0) as sink:
            await connected(sink, sub)
            relay.downstream.clear()  # nothing comes back from the broker
            await asyncio.wait_for(sink.publish(Message("q0", b"a")), 2)
            assert sink.stats.published == 1
            assert (await sub.next_on(f"{P}/q0")).payload == b"a"
            # A message that asks for QoS 1 on a QoS 0 sink still waits for its PUBACK.
            task = asyncio.create_task(sink.publish(Message("q1", b"b", qos=1)))
            await sub.next_on(f"{P}/q1")
            await not_done_for(task, 0.2)
            relay.downstream.set()
            await asyncio.wait_for(task, 5)
            assert sink.stats.published == 2
    finally:
        await relay.close()


async def test_a_qos0_message_paho_has_not_written_when_the_connection_drops_is_handed_back(
    broker: EmbeddedBroker, port: int, sub: Subscriber
) -> None:
    """A QoS 0 publish is delivered once written to the socket, not once handed to paho: one still in paho's queue
    when the connection drops fails with SinkOffline, so the outbox spools it (a Sparkplug sink is all QoS 0)."""
    relay = TcpRelay(port)
    await relay.start()
    try:
        async with running(relay.port, qos=0) as sink:
            await connected(sink, sub)
            relay.upstream.clear()  # the link stalls: the socket's buffers fill and paho keeps the rest
            fut = sink.try_publish(Message("big", b"x" * (32 * 1024 * 1024)))
            assert fut is not None
            await not_done_for(fut, 0.5)
            await relay.close()
            with pytest.raises(SinkOffline):
                await asyncio.wait_for(fut, 10)
            assert sink.stats.published == 0
    finally:
        await relay.close()


async def test_many_concurrent_qos1_publishes_all_arrive_in_order(
    broker: EmbeddedBroker, port: int, sub: Subscriber
) -> None:
    async with running(port, max_inflight=20) as sink:
        await connected(sink, sub)
        await asyncio.wait_for(asyncio.gather(*(sink.publish(Message("n", b"%d" % i)) for i in range(300))), 20)
        assert sink.stats.published == 300
        await sub.wait_for(lambda ms: len([m for m in ms if m.topic == f"{P}/n"]) >= 300)
        assert payloads(sub, "n") == [b"%d" % i for i in range(300)]


# --- status and last will ----------------------------------------------------------------------


async def test_status_online_is_retained_on_connect(broker: EmbeddedBroker, port: int, sub: Subscriber) -> None:
    async with running(port) as sink:
        await connected(sink, sub)
        assert (await retained(port, f"{P}/status")).payload == b"online"


async def test_last_will_says_offline_when_the_connection_dies_without_disconnect(
    broker: EmbeddedBroker, port: int, sub: Subscriber
) -> None:
    relay = TcpRelay(port)
    await relay.start()
    async with running(relay.port) as sink:
        await connected(sink, sub)
        sent = time.monotonic()
        await relay.close()  # reset both sides; reconnects are refused from now on
        msg = await sub.next_on(f"{P}/status", after=sent, timeout=5)
        assert msg.payload == b"offline"
        assert (await retained(port, f"{P}/status")).payload == b"offline"
        assert not sink.connected


async def test_killed_socket_gives_will_then_reconnect_online_and_hook_again(
    broker: EmbeddedBroker, port: int, sub: Subscriber
) -> None:
    calls: list[bool] = []

    async def hook() -> None:
        calls.append(sink.connected)
        await sink.publish(Message("state", b"%d" % len(calls), retain=True))

    async with running(port, on_connect=hook) as sink:
        await connected(sink, sub)
        await sub.wait_for(lambda ms: any(m.topic == f"{P}/state" for m in ms))
        assert calls == [True]
        mark = time.monotonic()
        # Kill the TCP connection under paho: no DISCONNECT goes out.
        kill_socket(sink)

        await sub.wait_for(
            lambda ms: (
                [m.payload for m in ms if m.topic == f"{P}/status" and m.at > mark][:2] == [b"offline", b"online"]
            ),
            8,
        )
        await sub.wait_for(lambda ms: any(m.topic == f"{P}/state" and m.payload == b"2" for m in ms), 5)
        assert calls == [True, True], "on_connect runs again, after `online`, on every reconnect"
        assert sink.stats.connects == 2 and sink.stats.disconnects == 1
        assert (await retained(port, f"{P}/status")).payload == b"online"


async def test_clean_stop_says_offline_once_and_no_will_follows(
    broker: EmbeddedBroker, port: int, sub: Subscriber
) -> None:
    sink = MqttSink("up", f"mqtt://127.0.0.1:{port}", P, client_id="clean-stop")
    await sink.start()
    await connected(sink, sub)
    mark = time.monotonic()
    await sink.stop()
    assert not sink.connected
    await sub.next_on(f"{P}/status", after=mark)
    # A will would follow a connection closed without DISCONNECT. No barrier can be put behind it: the broker
    # publishes it when it sees the connection end, on its own schedule, and no client's message is ordered
    # after that. So a long wait instead, well beyond what the broker takes to see a closed socket.
    await asyncio.sleep(2.0)
    assert [m.payload for m in sub.on(f"{P}/status") if m.at > mark] == [b"offline"]
    assert (await retained(port, f"{P}/status")).payload == b"offline"
    with pytest.raises(SinkError):
        await asyncio.wait_for(sink.publish(Message("late", b"x")), 2)


# --- requests ----------------------------------------------------------------------------------


async def test_subscribed_requests_reach_on_request_with_the_relative_topic(
    broker: EmbeddedBroker, port: int, sub: Subscriber
) -> None:
    got: list[tuple[str, bytes]] = []
    async with running(
        port, subscriptions=("+/set/+", "+/cmd"), on_request=lambda t, p, _m: got.append((t, p))
    ) as sink:
        await connected(sink, sub)
        for topic, payload in [
            (f"{P}/boiler/set/sp", b"12.5"),
            (f"{P}/boiler/set/sp/result", b"{}"),  # not subscribed
            ("elsewhere/boiler/set/sp", b"1"),  # another prefix
            (f"{P}/pump/cmd", b'{"name": "reset"}'),
        ]:
            await asyncio.to_thread(sub.publish, topic, payload)
        await sub.wait_for(lambda _: len(got) >= 2)
        await asyncio.sleep(0.2)
        assert got == [("boiler/set/sp", b"12.5"), ("pump/cmd", b'{"name": "reset"}')]
        assert sink.stats.received == 2


async def test_a_retained_request_is_not_carried_out_again_at_every_subscribe(
    broker: EmbeddedBroker, port: int, sub: Subscriber
) -> None:
    got: list[str] = []
    # Left retained on the broker before the gateway subscribes (a dashboard's mistake).
    await asyncio.to_thread(sub.publish, f"{P}/boiler/set/sp", b"99", retain=True)
    await sub.wait_for(lambda ms: any(m.topic == f"{P}/boiler/set/sp" for m in ms))
    async with running(port, subscriptions=("+/set/+",), on_request=lambda t, _p, _m: got.append(t)) as sink:
        await connected(sink, sub)
        await asyncio.to_thread(sub.publish, f"{P}/boiler/set/sp", b"12.5")  # a live request still works
        await sub.wait_for(lambda _: len(got) >= 1)
        await asyncio.sleep(0.2)
        assert got == ["boiler/set/sp"] and sink.stats.retained_requests >= 1  # amqtt may send it twice


# --- broker away and back ----------------------------------------------------------------------


async def test_publish_while_the_broker_is_down_completes_when_it_is_back() -> None:
    port = free_port()
    first = EmbeddedBroker([f"tcp://127.0.0.1:{port}"])
    await first.start()
    hooks: list[float] = []
    requests: list[str] = []

    async def hook() -> None:
        hooks.append(time.monotonic())

    second: EmbeddedBroker | None = None
    try:
        async with running(
            port, subscriptions=("+/set/+",), on_request=lambda t, _p, _m: requests.append(t), on_connect=hook
        ) as sink:
            assert await sink.wait_connected(5)
            await first.stop()
            for _ in range(100):
                if not sink.connected:
                    break
                await asyncio.sleep(0.02)
            assert not sink.connected
            task = asyncio.create_task(sink.publish(Message("kept", b"42", retain=True)))
            await not_done_for(task, 0.5)

            second = EmbeddedBroker([f"tcp://127.0.0.1:{port}"])
            await second.start()
            await asyncio.wait_for(task, 10)
            assert len(hooks) == 2, "on_connect runs again after the reconnect"
            assert (await retained(port, f"{P}/kept")).payload == b"42"
            assert (await retained(port, f"{P}/status")).payload == b"online"
            # The new session has the subscriptions again.
            async with subscribed(port) as s2:
                await asyncio.to_thread(s2.publish, f"{P}/dev/set/p", b"1")
                await s2.wait_for(lambda _: requests, 5)
            assert requests == ["dev/set/p"]
    finally:
        if second is not None:
            await second.stop()
        await first.stop()


# --- regressions: each of these was a bug once -------------------------------------------------


async def test_an_idle_connected_sink_does_not_burn_cpu(
    broker: EmbeddedBroker, port: int, sub: Subscriber, monkeypatch: pytest.MonkeyPatch
) -> None:
    # paho runs on our loop: a socket left registered for writing makes every select() return at once and the
    # loop spin. Its wake-ups are counted, not its CPU seconds: a spinning loop on a busy machine gets less CPU
    # (its CPU time says little there), but every one of its turns is a select() call.
    selector = asyncio.get_running_loop()._selector  # type: ignore[attr-defined]
    real_select = selector.select
    selects = 0

    def counting_select(timeout: float | None = None) -> list[object]:
        nonlocal selects
        selects += 1
        return real_select(timeout)  # type: ignore[no-any-return]

    async with running(port) as sink:
        await connected(sink, sub)
        await sink.publish(Message("one", b"1"))
        await asyncio.sleep(0.2)
        monkeypatch.setattr(selector, "select", counting_select)
        cpu, wall = time.process_time(), time.monotonic()
        await asyncio.sleep(1.0)  # nothing to send, nothing to receive
        used, took = time.process_time() - cpu, time.monotonic() - wall
        monkeypatch.undo()
        # Idle, the loop (the sink and the broker of this test) wakes a few dozen times in a second; spinning,
        # tens of thousands of times (each turn is microseconds).
        assert selects < 200 * took, f"{selects} loop wake-ups in {took:.2f} s of idling: the loop is spinning"
        # CPU as a second witness, bound loosely: idle uses ~0.01 s.
        assert used < 0.5 * took, f"{used:.2f} s of CPU in {took:.2f} s of idling"


async def test_a_publish_in_flight_at_a_disconnect_is_delivered_once(
    broker: EmbeddedBroker, port: int, sub: Subscriber
) -> None:
    async with running(port) as sink:
        await connected(sink, sub)
        tasks = [asyncio.create_task(sink.publish(Message(f"m/{i}", b"x"))) for i in range(5)]
        await asyncio.sleep(0)  # each publish is now in paho's outgoing messages, no PUBACK yet
        kill_socket(sink)
        await asyncio.wait_for(asyncio.gather(*tasks), 10)
        await asyncio.sleep(0.5)
        counts = {i: len(sub.on(f"{P}/m/{i}")) for i in range(5)}
        assert counts == {i: 1 for i in range(5)}, f"deliveries per message: {counts}"


async def test_stop_fails_a_publish_that_waits_for_the_connection() -> None:
    sink = MqttSink("up", f"mqtt://127.0.0.1:{free_port()}", P, client_id="nobody-home")
    await sink.start()
    task = asyncio.create_task(sink.publish(Message("v", b"1")))
    await asyncio.sleep(0.2)
    await sink.stop()
    with pytest.raises(SinkError):
        await asyncio.wait_for(task, 1)


async def test_connects_over_a_link_with_a_round_trip_above_half_a_second(broker: EmbeddedBroker, port: int) -> None:
    relay = TcpRelay(port, delay=0.35)  # 0.7 s round trip: a satellite or a poor cellular link
    await relay.start()
    try:
        async with running(relay.port) as sink:
            assert await sink.wait_connected(2.5), f"never connected over {relay.connections} TCP connections"
    finally:
        await relay.close()


async def test_an_invalid_topic_fails_with_sink_error(broker: EmbeddedBroker, port: int, sub: Subscriber) -> None:
    async with running(port) as sink:
        await connected(sink, sub)
        with pytest.raises(SinkError):
            await sink.publish(Message("boiler/+/x", b"1"))


# --- supervision and hostile requests -----------------------------------------------------------------


async def test_a_connect_loop_that_fails_with_a_non_os_error_is_restarted_and_reported(
    broker: EmbeddedBroker, port: int, sub: Subscriber
) -> None:
    # A DNS label over 63 characters: the resolver raises UnicodeError, not OSError (this once ended the loop).
    supervisor = Supervisor(restart_min=0.1, restart_max=0.2)
    sink = MqttSink("up", f"mqtt://{'a' * 64}.invalid:{port}", P, client_id="bad-host", supervisor=supervisor)
    await sink.start()
    try:
        deadline = time.monotonic() + 5
        while not supervisor.problems():
            assert time.monotonic() < deadline, "the failure never showed"
            await asyncio.sleep(0.02)
        assert supervisor.problems()[0].startswith("task sink:up:connect: failed: UnicodeError(")
        sink._host = "127.0.0.1"  # the name resolves again (a fixed config, a DNS back up)
        await connected(sink, sub)
        assert supervisor.problems() == []
    finally:
        await sink.stop()
    assert supervisor.tasks == []  # stop() ended its tasks for good


async def test_a_request_handler_that_raises_costs_that_request_only(
    broker: EmbeddedBroker, port: int, sub: Subscriber
) -> None:
    seen: list[str] = []

    def handler(topic: str, payload: bytes, _meta: object) -> None:
        seen.append(topic)
        if payload == b"boom":
            raise RuntimeError("a bug in a handler")

    async with running(port, subscriptions=("+/cmd",), on_request=handler) as sink:
        await connected(sink, sub)
        sub.publish(f"{P}/a/cmd", b"boom")
        sub.publish(f"{P}/b/cmd", b"fine")
        deadline = time.monotonic() + 5
        while len(seen) < 2:
            assert time.monotonic() < deadline, f"the request after the failing one never came: {seen}"
            await asyncio.sleep(0.02)
        assert seen == ["a/cmd", "b/cmd"] and sink.stats.bad_requests == 1 and sink.connected
