"""Outbox through a real MqttSink and a real embedded amqtt broker.

"The broker is unreachable" is made with a TCP relay (tests/helpers.py) between the sink and the broker
that is started only when the test wants the sink to get through; the subscriber stays connected
to the broker all along, so it sees everything the sink publishes once it is through.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator
from typing import Any

import pytest

from bridge.broker import EmbeddedBroker
from bridge.outbox import Outbox
from bridge.sink import MqttSink
from gateway.errors import SinkError
from gateway.types import Message

from helpers import Subscriber, TcpRelay

P = "fg/t1"


@pytest.fixture
def sub(subscriber: Subscriber) -> Subscriber:
    """conftest's subscriber to `#` on the test broker, under a short name."""
    return subscriber


@contextlib.asynccontextmanager
async def sink_on(port: int, **kwargs: Any) -> AsyncIterator[MqttSink]:
    """A started sink to 127.0.0.1:port."""
    sink = MqttSink("up", f"mqtt://127.0.0.1:{port}", P, client_id=f"outbox-{time.monotonic_ns()}", **kwargs)
    await sink.start()
    try:
        yield sink
    finally:
        await sink.stop()


@contextlib.asynccontextmanager
async def outbox_of(sink: MqttSink, *, start: bool = True, **kwargs: Any) -> AsyncIterator[Outbox]:
    """An outbox of `sink`, stopped at the end."""
    box = Outbox(sink, **kwargs)
    if start:
        await box.start()
    try:
        yield box
    finally:
        await box.stop()


def seq(sub: Subscriber, topic: str = "seq") -> list[int]:
    """The integer payloads seen on `P/topic`, in arrival order."""
    return [int(m.payload) for m in sub.on(f"{P}/{topic}")]


def msg(i: int, topic: str = "seq") -> Message:
    """Message number i."""
    return Message(topic, b"%d" % i)


async def online(sub: Subscriber) -> None:
    """Wait until the sink's `status online` went through the broker."""
    await sub.wait_for(lambda ms: any(m.topic == f"{P}/status" and m.payload == b"online" for m in ms), 10)


async def test_fifo_order_is_kept_through_the_sink_with_a_window_in_flight(
    broker: EmbeddedBroker, port: int, sub: Subscriber
) -> None:
    async with sink_on(port) as sink, outbox_of(sink, window=64) as box:
        assert await sink.wait_connected(5)
        for i in range(600):
            box.submit(msg(i))
        last = asyncio.create_task(box.publish(msg(600)))
        assert await box.flush(20)
        await asyncio.wait_for(last, 1)
        await sub.wait_for(lambda _: len(seq(sub)) >= 601)
        assert seq(sub) == list(range(601))
        assert box.dropped == 0 and len(box) == 0


async def test_overflow_drops_the_oldest_counts_it_and_fails_its_publish(
    broker: EmbeddedBroker, port: int, sub: Subscriber
) -> None:
    async with sink_on(port) as sink, outbox_of(sink, start=False, capacity=5) as box:
        first = asyncio.create_task(box.publish(msg(0)))
        await asyncio.sleep(0)  # queued now
        assert len(box) == 1
        for i in range(1, 8):
            box.submit(msg(i))
        assert box.dropped == 3 and len(box) == 5
        with pytest.raises(SinkError, match="full"):
            await asyncio.wait_for(first, 1)

        await online(sub)
        await box.start()
        assert await box.flush(10)
        await sub.wait_for(lambda _: len(seq(sub)) >= 5)
        await asyncio.sleep(0.2)
        assert seq(sub) == [3, 4, 5, 6, 7]
        assert box.dropped == 3


async def test_overflow_while_the_broker_is_unreachable(broker: EmbeddedBroker, port: int, sub: Subscriber) -> None:
    link = TcpRelay(port)
    try:
        async with sink_on(link.port) as sink, outbox_of(sink, capacity=3, window=2) as box:
            for i in range(10):
                box.submit(msg(i))
                await asyncio.sleep(0.01)  # let the drain take what its window allows
            # 0 and 1 are in flight (waiting for the connection); the queue kept the 3 newest.
            assert len(box) == 3 and box.dropped == 5
            assert not await box.flush(0.3)

            await link.start()
            assert await box.flush(10)
            await sub.wait_for(lambda _: len(seq(sub)) >= 5)
            await asyncio.sleep(0.2)
            assert seq(sub) == [0, 1, 7, 8, 9]
            assert sink.stats.published == 5
    finally:
        await link.close()


async def test_flush_returns_once_every_message_is_acknowledged(
    broker: EmbeddedBroker, port: int, sub: Subscriber
) -> None:
    async with sink_on(port) as sink, outbox_of(sink, window=16) as box:
        for i in range(300):
            box.submit(msg(i))
        assert await box.flush(20)
        # Every message has had its PUBACK when flush() returns, not merely left the queue.
        assert sink.stats.published == 300
        assert len(box) == 0
        await sub.wait_for(lambda _: len(seq(sub)) >= 300)


async def test_stop_fails_what_is_queued_or_in_flight_and_none_of_it_goes_out_later(
    broker: EmbeddedBroker, port: int, sub: Subscriber
) -> None:
    link = TcpRelay(port)
    try:
        async with sink_on(link.port) as sink:
            box = Outbox(sink, window=2)
            await box.start()
            waiting = [asyncio.create_task(box.publish(msg(i))) for i in range(5)]
            await asyncio.sleep(0.1)
            assert len(box) == 3  # 2 in flight, 3 queued
            await box.stop()
            results = await asyncio.wait_for(asyncio.gather(*waiting, return_exceptions=True), 2)
            assert all(isinstance(r, SinkError) for r in results), results
            assert len(box) == 0

            await link.start()
            assert await sink.wait_connected(5)
            await online(sub)
            await asyncio.sleep(0.3)
            assert seq(sub) == []
            assert sink.stats.published == 0
    finally:
        await link.close()


# --- regressions: each of these was a bug once -------------------------------------------------


async def test_publish_after_stop_fails_instead_of_waiting_forever(broker: EmbeddedBroker, port: int) -> None:
    async with sink_on(port) as sink:
        box = Outbox(sink)
        await box.start()
        await box.stop()
        with pytest.raises(SinkError):
            await asyncio.wait_for(box.publish(msg(1)), 1)


async def test_publish_fails_when_the_sink_raises_something_unexpected(broker: EmbeddedBroker, port: int) -> None:
    async with sink_on(port) as sink, outbox_of(sink) as box:
        assert await sink.wait_connected(5)
        with pytest.raises(Exception) as caught:
            await asyncio.wait_for(box.publish(Message("bad/+/topic", b"1")), 1)
        assert not isinstance(caught.value, TimeoutError), "publish() never returned"


async def test_a_full_outbox_refuses_an_awaited_message_instead_of_evicting(broker: EmbeddedBroker, port: int) -> None:
    async with sink_on(port) as sink, outbox_of(sink, start=False, capacity=2) as box:
        box.submit(Message("a", b"1"))
        waited = box.enqueue(Message("b", b"2"))
        with pytest.raises(SinkError, match="outbox full"):
            box.enqueue(Message("c", b"3"))
        assert box.dropped == 0 and len(box) == 2 and not waited.done()
