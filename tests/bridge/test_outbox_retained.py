"""Retained state only moves forward, also when its newest state cannot be delivered.

When the broker connection refuses the newest retained state of a topic (offered REPLAY_ATTEMPTS times from the
spool, or refused once live), the broker must still end with the newest stored state of that topic it can take,
and never get an older state after a newer one. Real parts: an Outbox on a real SQLiteSpool file and a real
MqttSink to the embedded broker; the refusals are the sink's, as paho refuses what it will not publish.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import pytest

from bridge import outbox_limits as outbox_module
from bridge.broker import EmbeddedBroker
from bridge.outbox import Outbox
from bridge.outbox_limits import REPLAY_ATTEMPTS, RETAINED_FALLBACKS
from bridge.sink import MqttSink
from bridge.spool import SQLiteSpool
from gateway.errors import SinkError
from gateway.types import Message

from helpers import Subscriber, down_sink, subscribed, until

P = "fg/retained"
VALUE = f"{P}/value"


pytestmark = pytest.mark.usefixtures("no_loop_failure")


def state(i: int, topic: str = "value") -> Message:
    """Retained state number i of `topic`, sampled at 1,000,000 + i."""
    return Message(topic, b"%d" % i, ts=1_000_000 + i, retain=True)


def spooled(path: Path, messages: Iterable[Message]) -> None:
    """A spool file left by an earlier run, holding `messages` in this order."""
    spool = SQLiteSpool(path, min_free_bytes=0)
    spool.add([(m, m.ts or 0) for m in messages])
    spool.close()


def refusing(sink: MqttSink, refused: Callable[[Message], bool]) -> list[bytes]:
    """Make the sink refuse the messages `refused` picks, as paho refuses what it will not publish; the payloads
    of every message offered to it, in order."""
    offers: list[bytes] = []
    real = sink.try_publish

    def publish(message: Message) -> Any:
        offers.append(message.payload)
        if refused(message):
            raise ValueError(f"payload {message.payload!r} refused")
        return real(message)

    sink.try_publish = publish  # type: ignore[method-assign]
    return offers


async def retained_at(port: int, topic: str) -> set[bytes]:
    """What a new subscriber to `topic` gets as its retained message (amqtt may send it more than once)."""
    async with subscribed(port, topic) as sub:
        await sub.wait_for(lambda _: any(m.retain for m in sub.on(topic)), 10)
        return {m.payload for m in sub.on(topic) if m.retain}


async def drained(box: Outbox, spool: SQLiteSpool, subscriber: Subscriber) -> None:
    """Wait until the outbox has settled everything its spool held and the subscriber got all it sent."""
    await until(lambda: box.backlog == 0 and spool.stats().count == 0, 20, "the spool to drain")
    # A marker sent after it on the same connection: once it is in, everything before it is (the broker
    # acknowledging a publish does not mean the subscriber has it yet).
    await asyncio.wait_for(box.put(Message("drained", b""), awaited=True), 10)
    await subscriber.wait_for(lambda _: subscriber.on(f"{P}/drained"), 10)


async def test_a_newest_state_the_replay_gives_up_on_leaves_the_newest_older_one_to_the_broker(
    broker: EmbeddedBroker, port: int, subscriber: Subscriber, tmp_path: Path
) -> None:
    path = tmp_path / "spool.db"
    spooled(path, [state(10), state(11), state(12), Message("seq", b"13", ts=1_000_013)])
    async with down_sink(port, P) as (sink, link):
        offers = refusing(sink, lambda m: m.payload == b"12")
        spool = SQLiteSpool(path, min_free_bytes=0)
        box = Outbox(sink, spool, commit_window=0.01, replay_rate=10_000)
        await box.start()
        try:
            await link.start()
            await drained(box, spool, subscriber)
            assert [m.payload for m in subscriber.on(VALUE)] == [b"11"]
            assert await retained_at(port, VALUE) == {b"11"}
        finally:
            await box.stop()
    assert offers.count(b"12") == REPLAY_ATTEMPTS
    assert b"10" not in offers  # older than what the broker got: never offered
    assert (box.stats.undeliverable, box.stats.replayed) == (1, 2)  # 11 and the seq message


async def test_each_refused_newest_state_hands_the_topic_to_the_next_older_one(
    broker: EmbeddedBroker, port: int, subscriber: Subscriber, tmp_path: Path
) -> None:
    path = tmp_path / "spool.db"
    spooled(path, [state(10), state(11), state(12), state(5, "other"), state(6, "other")])
    async with down_sink(port, P) as (sink, link):
        offers = refusing(sink, lambda m: m.payload in (b"11", b"12"))
        spool = SQLiteSpool(path, min_free_bytes=0)
        box = Outbox(sink, spool, commit_window=0.01, replay_rate=10_000)
        await box.start()
        try:
            await link.start()
            await drained(box, spool, subscriber)
            assert [m.payload for m in subscriber.on(VALUE)] == [b"10"]
            assert [m.payload for m in subscriber.on(f"{P}/other")] == [b"6"]  # another topic goes its own way
            assert await retained_at(port, VALUE) == {b"10"}
        finally:
            await box.stop()
    assert (offers.count(b"12"), offers.count(b"11")) == (REPLAY_ATTEMPTS, REPLAY_ATTEMPTS)
    assert box.stats.undeliverable == 2


@pytest.mark.parametrize("delivered", [1, 0], ids=["the-oldest-held-back", "none-held-back"])
async def test_at_most_retained_fallbacks_older_states_are_held_back_per_topic(
    broker: EmbeddedBroker, port: int, subscriber: Subscriber, tmp_path: Path, delivered: int
) -> None:
    # States 0 .. K+1: the newest and K older ones are kept while the newest is on its way; state 0 is let go.
    # Every state newer than `delivered` is refused.
    newest = RETAINED_FALLBACKS + 1
    path = tmp_path / "spool.db"
    spooled(path, [state(i) for i in range(newest + 1)])
    async with down_sink(port, P) as (sink, link):
        offers = refusing(sink, lambda m: m.topic == "value" and int(m.payload) > delivered)
        spool = SQLiteSpool(path, min_free_bytes=0)
        box = Outbox(sink, spool, commit_window=0.01, replay_rate=10_000)
        await box.start()
        try:
            await link.start()
            await drained(box, spool, subscriber)
        finally:
            await box.stop()
    got = [m.payload for m in subscriber.on(VALUE)]
    assert got == ([b"1"] if delivered else [])
    assert b"0" not in offers
    assert box.stats.undeliverable == newest - (1 if delivered else 0)


class GatedSpool(SQLiteSpool):
    """A real spool whose takes wait at a gate, and that tells when the replay settled what it took."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.gate = threading.Event()
        self.taken = 0
        self.settled = threading.Event()  # set by the first stats() after a take: the replay's refresh

    def take(self, n: int) -> Any:
        self.gate.wait(30)
        entries = super().take(n)
        self.taken += len(entries)
        return entries

    def stats(self) -> Any:
        if self.taken:
            self.settled.set()
        return super().stats()


def answered_by_the_test(sink: MqttSink, payload: bytes) -> asyncio.Future[None]:
    """The connection's outcome for the publish of `payload`: a future the test settles (refuse or PUBACK)."""
    real = sink.try_publish
    outcome: asyncio.Future[None] = asyncio.get_running_loop().create_future()

    def publish(message: Message) -> Any:
        return outcome if message.payload == payload else real(message)

    sink.try_publish = publish  # type: ignore[method-assign]
    return outcome


async def test_a_live_state_refused_after_the_replay_held_back_the_stored_one_sends_the_stored_one(
    broker: EmbeddedBroker, port: int, subscriber: Subscriber, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(outbox_module, "HOUSEKEEPING_INTERVAL", 3600.0)  # its stats() would look like the replay's
    path = tmp_path / "spool.db"
    spooled(path, [state(10)])
    async with down_sink(port, P) as (sink, link):
        refusal = answered_by_the_test(sink, b"11")
        spool = GatedSpool(path, min_free_bytes=0)
        box = Outbox(sink, spool, commit_window=0.01, replay_rate=10_000)
        await box.start()
        try:
            await link.start()
            assert await sink.wait_connected(10)
            newer = box.put(state(11), awaited=True)  # live, in flight: the broker has not answered yet
            await until(lambda: len(box) == 1, 10, "the newer state to be in flight")
            spool.gate.set()  # the replay takes 10 while 11 is on its way: 10 is not to be sent now
            assert await asyncio.to_thread(spool.settled.wait, 10)
            refusal.set_exception(SinkError("sink up: payload refused"))  # the broker connection refuses 11
            with pytest.raises(SinkError, match="refused"):
                await asyncio.wait_for(newer, 10)
            await drained(box, spool, subscriber)
            assert [m.payload for m in subscriber.on(VALUE)] == [b"10"]
        finally:
            spool.gate.set()
            await box.stop()


class ForgetFails(SQLiteSpool):
    """A real spool that cannot remove older retained states (a full disk), and whose takes wait at a gate."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.gate = threading.Event()

    def take(self, n: int) -> Any:
        self.gate.wait(30)
        return super().take(n)

    def forget_retained(self, topic: str, through_id: int) -> int:
        raise SinkError("spool s: cannot write: database or disk is full")


async def test_an_older_state_the_replay_meets_after_a_newer_one_went_out_live_is_dropped_unsent(
    broker: EmbeddedBroker, port: int, subscriber: Subscriber, tmp_path: Path
) -> None:
    path = tmp_path / "spool.db"
    # In one replay batch with the 10: a topic whose older state waits for its newer one, and telemetry.
    spooled(path, [state(10), state(5, "other"), state(6, "other"), Message("seq", b"0", ts=1)])
    async with down_sink(port, P) as (sink, link):
        spool = ForgetFails(path, min_free_bytes=0)
        box = Outbox(sink, spool, commit_window=0.01, replay_rate=10_000)
        await box.start()
        try:
            await link.start()
            assert await sink.wait_connected(10)
            await asyncio.wait_for(box.put(state(11), awaited=True), 10)  # out live; 10 could not be removed behind it
            spool.gate.set()  # the replay meets 10 now
            await drained(box, spool, subscriber)
            await asyncio.wait_for(box.put(Message("seq", b"1"), awaited=True), 10)  # behind anything the replay sent
            await subscriber.wait_for(lambda _: len(subscriber.on(f"{P}/seq")) >= 2, 10)
            assert [m.payload for m in subscriber.on(VALUE)] == [b"11"]
            assert [m.payload for m in subscriber.on(f"{P}/other")] == [b"6"]
            assert [m.payload for m in subscriber.on(f"{P}/seq")] == [b"0", b"1"]
        finally:
            spool.gate.set()
            await box.stop()


@pytest.mark.parametrize("how", ["not-sent", "cancelled"])
async def test_a_replay_batch_cut_by_a_lost_connection_is_sent_once_it_is_back(
    broker: EmbeddedBroker, port: int, subscriber: Subscriber, tmp_path: Path, how: str
) -> None:
    path = tmp_path / "spool.db"
    spooled(path, [Message("seq", b"%d" % i, ts=i) for i in range(1, 4)] + [state(10)])
    async with down_sink(port, P) as (sink, link):
        real = sink.try_publish
        cut: list[bytes] = []

        def publish(message: Message) -> Any:
            if message.payload == b"2" and not cut:
                cut.append(message.payload)
                if how == "not-sent":
                    return None  # the connection is gone just as 2 is to go out: 2 and what follows go back
                gone: asyncio.Future[None] = asyncio.get_running_loop().create_future()
                gone.cancel()  # handed over, then neither acknowledged nor refused
                return gone
            return real(message)

        sink.try_publish = publish  # type: ignore[method-assign]
        spool = SQLiteSpool(path, min_free_bytes=0)
        box = Outbox(sink, spool, commit_window=0.01, replay_rate=10_000)
        await box.start()
        try:
            await link.start()
            await drained(box, spool, subscriber)
            await subscriber.wait_for(lambda _: subscriber.on(VALUE), 10)
            got = [m.payload for m in subscriber.on(f"{P}/seq")]
            # 3 went out in the same batch as the cancelled 2, which is sent again after it
            assert (got if how == "not-sent" else sorted(got)) == [b"1", b"2", b"3"]
        finally:
            await box.stop()


async def test_a_refused_live_state_with_a_newer_one_on_its_way_leaves_the_topic_to_the_newer_one(
    broker: EmbeddedBroker, port: int, subscriber: Subscriber, tmp_path: Path
) -> None:
    path = tmp_path / "spool.db"
    spooled(path, [state(10)])
    async with down_sink(port, P) as (sink, link):
        refusal = answered_by_the_test(sink, b"11")
        spool = GatedSpool(path, min_free_bytes=0)  # the replay holds still until the end
        box = Outbox(sink, spool, commit_window=0.01, replay_rate=10_000)
        await box.start()
        try:
            await link.start()
            assert await sink.wait_connected(10)
            # both live, both in flight
            older, newer = box.put(state(11), awaited=True), box.put(state(12), awaited=True)
            await asyncio.wait_for(newer, 10)  # 12 is at the broker
            refusal.set_exception(SinkError("sink up: payload refused"))  # then 11 is refused: 12 stays the newest
            with pytest.raises(SinkError):
                await asyncio.wait_for(older, 10)
            spool.gate.set()
            await drained(box, spool, subscriber)
            await asyncio.wait_for(box.put(Message("seq", b"1"), awaited=True), 10)  # behind anything the replay sent
            await subscriber.wait_for(lambda _: subscriber.on(f"{P}/seq"), 10)
            assert [m.payload for m in subscriber.on(VALUE)] == [b"12"]
        finally:
            spool.gate.set()
            await box.stop()


async def test_a_newer_state_spooled_while_an_older_one_is_replayed_is_sent_after_it(
    broker: EmbeddedBroker, port: int, subscriber: Subscriber, tmp_path: Path
) -> None:
    path = tmp_path / "spool.db"
    spooled(path, [state(10)])
    async with down_sink(port, P) as (sink, link):
        spool = SQLiteSpool(path, min_free_bytes=0)
        # high_water 0: every message no one waits on goes to the spool, also while connected
        box = Outbox(sink, spool, commit_window=0.01, replay_rate=10_000, high_water=0)
        await box.start()
        try:
            await link.start()
            assert await sink.wait_connected(10)
            link.downstream.clear()  # 10's PUBACK is held back
            await subscriber.wait_for(lambda _: subscriber.on(VALUE), 10)  # the replay sent 10
            box.put(state(11))
            await until(lambda: box.stats.spooled == 1, 10, "11 to be stored")
            link.downstream.set()  # 10 is acknowledged: 11 is still to go
            await drained(box, spool, subscriber)
            await subscriber.wait_for(lambda _: len(subscriber.on(VALUE)) >= 2, 10)
            assert [m.payload for m in subscriber.on(VALUE)] == [b"10", b"11"]
        finally:
            link.downstream.set()
            await box.stop()


async def test_an_entry_given_up_on_leaves_the_others_of_its_batch_to_be_sent_again(
    broker: EmbeddedBroker, port: int, subscriber: Subscriber, tmp_path: Path
) -> None:
    path = tmp_path / "spool.db"
    spooled(path, [Message("seq", b"1", ts=1), Message("bad/+/topic", b"x", ts=2)])  # paho refuses a wildcard
    async with down_sink(port, P) as (sink, link):
        real = sink.try_publish
        cancelled: list[int] = []

        def publish(message: Message) -> Any:
            if message.payload == b"1" and len(cancelled) < outbox_module.REPLAY_ATTEMPTS:
                cancelled.append(1)  # neither acknowledged nor refused, in each batch with the bad entry
                gone: asyncio.Future[None] = asyncio.get_running_loop().create_future()
                gone.cancel()
                return gone
            return real(message)

        sink.try_publish = publish  # type: ignore[method-assign]
        spool = SQLiteSpool(path, min_free_bytes=0)
        box = Outbox(sink, spool, commit_window=0.01, replay_rate=10_000)
        await box.start()
        try:
            await link.start()
            await drained(box, spool, subscriber)
            assert [m.payload for m in subscriber.on(f"{P}/seq")] == [b"1"]
            assert box.stats.undeliverable == 1
        finally:
            await box.stop()
