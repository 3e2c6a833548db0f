"""The live path's answers: what a waiter is told when the broker connection refuses its message or gives
up on it, and what a live PUBACK of a retained state does to the states behind it.

Real parts: an Outbox on a real SQLiteSpool file and a real MqttSink to the embedded broker; where the test
needs to choose the broker connection's answer, the sink hands back a future the test settles.
"""

from __future__ import annotations

import asyncio
import logging
import threading
from pathlib import Path
from typing import Any

import pytest

from bridge.broker import EmbeddedBroker
from bridge.outbox import Outbox
from bridge.sink import MqttSink
from bridge.spool import SQLiteSpool
from gateway.errors import SinkError, SinkOffline
from gateway.types import Message

from helpers import Subscriber, down_sink, spool_rows, until

P = "fg/live"


def msg(i: int, topic: str = "seq", **kw: Any) -> Message:
    """Message number i."""
    return Message(topic, b"%d" % i, ts=1_000_000 + i, **kw)


def answered_by_test(sink: MqttSink) -> list[asyncio.Future[None]]:
    """From now on, each publish of the sink is answered by a future the test settles; the futures, in order."""
    answers: list[asyncio.Future[None]] = []

    def publish(_message: Message) -> asyncio.Future[None]:
        answers.append(asyncio.get_running_loop().create_future())
        return answers[-1]

    sink.try_publish = publish  # type: ignore[method-assign]
    return answers


async def test_a_publish_the_connection_cancels_is_kept_in_the_spool(
    broker: EmbeddedBroker, port: int, tmp_path: Path
) -> None:
    path = tmp_path / "spool.db"
    async with down_sink(port, P) as (sink, link):
        await link.start()
        assert await sink.wait_connected(10)
        answers = answered_by_test(sink)
        box = Outbox(sink, SQLiteSpool(path, min_free_bytes=0), commit_window=0.01)
        await box.start()
        try:
            waited = box.put(msg(1), awaited=True)
            await until(lambda: answers, 10, "the publish")
            answers[0].cancel()  # not acknowledged, not refused: kept
            await asyncio.wait_for(waited, 10)  # answered by the spool's commit
            assert box.stats.spooled == 1 and box.stats.refused == 0
        finally:
            await box.stop()
    assert spool_rows(path) == [("seq", 1_000_001)]


async def test_a_refused_live_message_fails_its_waiter_with_what_the_connection_said_and_logs_it(
    broker: EmbeddedBroker, port: int, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger="bridge.outbox")
    async with down_sink(port, P) as (sink, link):
        await link.start()
        assert await sink.wait_connected(10)
        answers = answered_by_test(sink)
        box = Outbox(sink)
        await box.start()
        try:
            odd, refused = box.put(msg(1), awaited=True), box.put(msg(2), awaited=True)
            await until(lambda: len(answers) == 2, 10, "both publishes")
            answers[0].set_exception(ValueError("payload too large"))  # not a SinkError: named as the sink's
            said = SinkError("sink up: not authorized")
            answers[1].set_exception(said)
            with pytest.raises(SinkError) as first:
                await asyncio.wait_for(odd, 10)
            assert str(first.value) == "sink up: payload too large"
            with pytest.raises(SinkError) as second:
                await asyncio.wait_for(refused, 10)
            assert second.value is said  # passed on as it came
        finally:
            await box.stop()
    # Counted as given up, and said once a minute with a count (a refused topic comes at the data's rate).
    assert box.stats.undeliverable == 2
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING and r.name == "bridge.outbox"]
    assert warnings == ["sink up: payload too large (1 refused since the last such line)"]


class GatedSpool(SQLiteSpool):
    """A real spool whose takes wait at a gate: the replay holds still until the test opens it."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.gate = threading.Event()

    def take(self, n: int) -> Any:
        self.gate.wait(30)
        return super().take(n)


async def test_a_live_puback_of_an_older_retained_state_leaves_the_newer_spooled_one_to_be_sent(
    broker: EmbeddedBroker, port: int, subscriber: Subscriber, tmp_path: Path
) -> None:
    async with down_sink(port, P) as (sink, link):
        await link.start()
        assert await sink.wait_connected(10)
        # One message live at most: while 10 waits for its PUBACK, 11 goes to the spool.
        spool = GatedSpool(tmp_path / "spool.db", min_free_bytes=0)
        box = Outbox(sink, spool, commit_window=0.01, high_water=1)
        await box.start()
        try:
            link.downstream.clear()  # no PUBACK comes back for now
            box.put(msg(10, "value", retain=True))
            await subscriber.wait_for(lambda _: subscriber.on(f"{P}/value"), 10)  # 10 is out; its PUBACK is held
            box.put(msg(11, "value", retain=True))
            await until(lambda: box.backlog == 1 and len(box) == 1, 10, "11 to be spooled")
            link.downstream.set()  # 10's PUBACK comes while the replay holds still: 11, newer, is still to be sent
            await until(lambda: box.stats.live == 1, 10, "10's PUBACK")
            spool.gate.set()
            await subscriber.wait_for(lambda _: len(subscriber.on(f"{P}/value")) >= 2, 10)
            await until(lambda: box.backlog == 0, 10, "the replay of 11")
            assert [m.payload for m in subscriber.on(f"{P}/value")] == [b"10", b"11"]
        finally:
            link.downstream.set()
            spool.gate.set()
            await box.stop()


async def test_with_strict_order_a_live_message_waits_behind_a_replay_batch_still_in_flight(
    broker: EmbeddedBroker, port: int, subscriber: Subscriber, tmp_path: Path
) -> None:
    path = tmp_path / "spool.db"
    spool = SQLiteSpool(path, min_free_bytes=0)
    spool.add([(msg(1), 1), (msg(2), 2)])
    spool.close()
    async with down_sink(port, P) as (sink, link):
        real = sink.try_publish
        held: list[asyncio.Future[None]] = []

        def publish(message: Message) -> Any:
            if message.payload == b"1" and not held:
                held.append(asyncio.get_running_loop().create_future())  # 1's answer is the test's
                return held[0]
            return real(message)

        sink.try_publish = publish  # type: ignore[method-assign]
        box = Outbox(sink, SQLiteSpool(path, min_free_bytes=0), commit_window=0.01, replay_rate=10_000, order="strict")
        await box.start()
        try:
            await link.start()
            await subscriber.wait_for(lambda _: subscriber.on(f"{P}/seq"), 10)  # 2 is out; 1 is still in flight
            later = box.put(msg(3), awaited=True)  # the whole backlog is in this batch: 3 still waits behind it
            held[0].set_exception(SinkOffline("sink up: connection lost before the broker acknowledged"))
            await asyncio.wait_for(later, 10)
            await subscriber.wait_for(lambda _: len(subscriber.on(f"{P}/seq")) >= 3, 10)
            await until(lambda: box.backlog == 0, 10, "the backlog to drain")
            assert [m.payload for m in subscriber.on(f"{P}/seq")][-1] == b"3"
        finally:
            await box.stop()


async def test_a_message_without_a_sample_time_is_stamped_with_the_outboxs_clock_in_ms(
    port: int, tmp_path: Path
) -> None:
    path = tmp_path / "spool.db"
    async with down_sink(port, P) as (sink, _link):
        box = Outbox(sink, SQLiteSpool(path, min_free_bytes=0), commit_window=0.01, clock=lambda: 1_700_000_000.1234)
        await box.start()
        try:
            await asyncio.wait_for(box.put(Message("seq", b"1"), awaited=True), 10)  # offline: stored
        finally:
            await box.stop()
        with pytest.raises(SinkError) as stopped:
            box.put(msg(2))
    assert spool_rows(path) == [("seq", 1_700_000_000_123)]
    assert str(stopped.value) == "sink up: outbox stopped"
