"""Outbox through a real MqttSink and a real embedded amqtt broker, with each kind of buffer behind it.

"The broker is unreachable" is made with a TCP relay (tests/helpers.py) between the sink and the broker
that is started only when the test wants the sink to get through (and closed to cut it again); the
subscriber stays connected to the broker all along, so it sees everything the sink publishes.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import pytest

import bridge.outbox_replay as outbox_replay
from bridge.broker import EmbeddedBroker
from bridge.buffer import Buffer, BufferFull, MemoryBuffer
from bridge.outbox import Outbox
from bridge.sink import MqttSink
from bridge.spool import SpoolError, SQLiteSpool
from gateway.config.schema import SinkConfig
from gateway.errors import SinkError
from gateway.sinks import REPLAY_DELAY, replay_delay
from gateway.types import Message

from helpers import Subscriber, TcpRelay, until

P = "fg/t1"

BufferFactory = Callable[..., Buffer]


pytestmark = pytest.mark.usefixtures("no_loop_failure")


@pytest.fixture(params=["memory", "sqlite"])
def make_buffer(request: pytest.FixtureRequest, tmp_path: Path) -> BufferFactory:
    """Builds the buffer under test; the SQLite one reopens the same file on each call."""

    def build(**limits: Any) -> Buffer:
        if request.param == "memory":
            return MemoryBuffer(**limits)
        return SQLiteSpool(tmp_path / "spool.sqlite", min_free_bytes=0, **limits)

    build.kind = request.param  # type: ignore[attr-defined]
    return build


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
async def outbox_of(sink: MqttSink, buffer: Buffer, **kwargs: Any) -> AsyncIterator[Outbox]:
    """A started outbox of `sink`, stopped at the end."""
    kwargs.setdefault("commit_window", 0.02)
    box = Outbox(sink, buffer, **kwargs)
    await box.start()
    try:
        yield box
    finally:
        await box.stop()


@contextlib.asynccontextmanager
async def cut_link(port: int) -> AsyncIterator[TcpRelay]:
    """A relay to the broker that is not accepting yet: `await link.start()` lets the sink through."""
    link = TcpRelay(port)
    try:
        yield link
    finally:
        await link.close()


def seq(sub: Subscriber, topic: str = "seq") -> list[int]:
    """The integer payloads seen on `P/topic`, in arrival order."""
    return [int(m.payload) for m in sub.on(f"{P}/{topic}")]


def msg(i: int, topic: str = "seq", **kw: Any) -> Message:
    """Message number i."""
    return Message(topic, b"%d" % i, ts=1_000_000 + i, **kw)


async def test_online_fifo_goes_straight_out_and_writes_nothing(
    broker: EmbeddedBroker, port: int, sub: Subscriber, make_buffer: BufferFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    import bridge.outbox_limits as outbox_module

    # The waited-on last message is spooled if its PUBACK takes LIVE_WAIT_MAX (a loaded machine can take 5 s
    # for 600 messages): it would then be replayed beside the live queue, out of order. That spill has its own
    # test; here only the order of the live queue is looked at, whatever the machine's speed.
    monkeypatch.setattr(outbox_module, "LIVE_WAIT_MAX", 3600.0)
    buf = make_buffer()
    async with sink_on(port) as sink, outbox_of(sink, buf, window=64) as box:
        assert await sink.wait_connected(5)
        for i in range(600):
            box.put(msg(i))
        last = box.put(msg(600), awaited=True)
        assert await box.flush(20)
        await asyncio.wait_for(last, 1)
        await sub.wait_for(lambda _: len(seq(sub)) >= 601)
        assert seq(sub) == list(range(601))
        assert len(box) == 0 and box.stats.live == 601 and box.stats.spooled == 0
        assert buf.stats().commits == 0  # no backlog, connected: the SD card is not written


async def test_offline_messages_are_spooled_committed_then_delivered_in_order(
    broker: EmbeddedBroker, port: int, sub: Subscriber, make_buffer: BufferFactory
) -> None:
    buf = make_buffer()
    async with cut_link(port) as link, sink_on(link.port) as sink, outbox_of(sink, buf, commit_window=0.1) as box:
        waited = [box.put(msg(i), awaited=True) for i in range(300)]
        # Durable once committed to the spool, long before any broker is there.
        await asyncio.wait_for(asyncio.gather(*waited), 5)
        assert buf.stats().count == 300 and box.stats.spooled == 300
        if getattr(make_buffer, "kind", "") == "sqlite":
            assert buf.stats().commits <= 3, "a burst shares its commits (group commit)"

        await link.start()
        await sub.wait_for(lambda _: len(seq(sub)) >= 300)
        assert seq(sub) == list(range(300))
        await until(lambda: buf.stats().count == 0)
        assert box.stats.replayed == 300 and box.stats.live == 0


async def test_a_spool_survives_stop_and_the_next_outbox_replays_it(
    broker: EmbeddedBroker, port: int, sub: Subscriber, tmp_path: Path
) -> None:
    async with cut_link(port) as link, sink_on(link.port) as sink:
        async with outbox_of(sink, SQLiteSpool(tmp_path / "s.sqlite", min_free_bytes=0)) as box:
            for i in range(50):
                box.put(msg(i))
            await asyncio.sleep(0.05)
        # stop() spooled whatever had not gone out and closed the file; a new run picks it up.
        again = SQLiteSpool(tmp_path / "s.sqlite", min_free_bytes=0)
        assert again.stats().count == 50
        again.close()
        await link.start()
        async with outbox_of(sink, SQLiteSpool(tmp_path / "s.sqlite", min_free_bytes=0)):
            await sub.wait_for(lambda _: len(seq(sub)) >= 50)
        assert seq(sub) == list(range(50))


async def test_live_data_flows_while_the_backlog_drains_at_the_replay_rate(
    broker: EmbeddedBroker, port: int, sub: Subscriber, make_buffer: BufferFactory
) -> None:
    async with cut_link(port) as link, sink_on(link.port) as sink:
        async with outbox_of(sink, make_buffer(), replay_rate=100) as box:
            for i in range(100):
                box.put(msg(i))
            await until(lambda: box.backlog == 100 and not len(box))
            await link.start()
            assert await sink.wait_connected(5)
            started = time.monotonic()
            box.put(msg(1000, "live"))
            got = await sub.next_on(f"{P}/live", 5)
            assert got.payload == b"1000"
            assert len(seq(sub)) < 60, "live data went out at once, ahead of most of the backlog"
            await sub.wait_for(lambda _: len(seq(sub)) >= 100, 10)
            took = time.monotonic() - started
            assert seq(sub) == list(range(100))
            assert took >= 0.7, f"100 messages at 100/s drained in {took:.2f} s"


async def test_strict_order_makes_live_data_wait_behind_the_backlog(
    broker: EmbeddedBroker, port: int, sub: Subscriber, make_buffer: BufferFactory
) -> None:
    async with cut_link(port) as link, sink_on(link.port) as sink:
        async with outbox_of(sink, make_buffer(), replay_rate=200, order="strict") as box:
            for i in range(60):
                box.put(msg(i))
            await until(lambda: box.backlog == 60)
            await link.start()
            assert await sink.wait_connected(5)
            for i in range(60, 80):
                box.put(msg(i))
            await sub.wait_for(lambda _: len(seq(sub)) >= 80, 10)
            assert seq(sub) == list(range(80))


async def test_replay_never_sets_a_retained_topic_back(
    broker: EmbeddedBroker, port: int, sub: Subscriber, make_buffer: BufferFactory
) -> None:
    async with cut_link(port) as link, sink_on(link.port) as sink:
        async with outbox_of(sink, make_buffer(), replay_rate=5) as box:
            for i in range(5):
                box.put(msg(i, "value", retain=True))
                box.put(msg(i, "telemetry"))
            await until(lambda: box.backlog == 6)  # 4 of the 5 retained values coalesced away
            assert box.stats.coalesced == 4
            await link.start()
            assert await sink.wait_connected(5)
            # Newer than anything spooled: out at once, while the replay (1 message per 0.2 s) has not
            # reached the spooled value 4 (fifth in the spool).
            box.put(msg(99, "value", retain=True))
            await sub.wait_for(lambda _: len(seq(sub, "telemetry")) >= 5, 10)
            await asyncio.sleep(0.2)
        assert seq(sub, "telemetry") == list(range(5))  # telemetry (history) is all replayed
        assert seq(sub, "value") == [99]  # the spooled 4 was older than the live 99: never published
    late = Subscriber(sub.port, (f"{P}/value",))
    await asyncio.to_thread(late.start)
    try:
        got = await late.next_on(f"{P}/value")
        assert got.retain and got.payload == b"99"
    finally:
        late.stop()


async def test_the_newest_spooled_retained_value_is_replayed_retained(
    broker: EmbeddedBroker, port: int, sub: Subscriber, make_buffer: BufferFactory
) -> None:
    async with cut_link(port) as link, sink_on(link.port) as sink, outbox_of(sink, make_buffer()) as box:
        box.put(msg(1, "value", retain=True))
        await until(lambda: box.backlog == 1)
        box.put(msg(2, "value", retain=True))
        await until(lambda: box.backlog == 2)  # committed apart: both spooled, 2 the newest
        await link.start()
        await sub.wait_for(lambda _: seq(sub, "value") == [2], 10)
        await until(lambda: box.backlog == 0)
        assert seq(sub, "value") == [2]
    late = Subscriber(sub.port, (f"{P}/value",))
    await asyncio.to_thread(late.start)
    try:
        got = await late.next_on(f"{P}/value")
        assert got.retain and got.payload == b"2"
    finally:
        late.stop()


async def test_messages_in_flight_at_a_cut_are_spooled_and_arrive(
    broker: EmbeddedBroker, port: int, sub: Subscriber, make_buffer: BufferFactory
) -> None:
    async with cut_link(port) as link, sink_on(link.port) as sink, outbox_of(sink, make_buffer(), window=32) as box:
        await link.start()
        assert await sink.wait_connected(5)
        link.downstream.clear()  # PUBACKs held back: everything stays in flight
        waited = [box.put(msg(i), awaited=True) for i in range(100)]
        await until(lambda: len(box._live.in_flight) == 32)
        await link.close()  # the connection dies before any PUBACK
        # Every waiter is settled by the spool commit, not left hanging on the dead connection.
        await asyncio.wait_for(asyncio.gather(*waited), 5)
        assert box.backlog == 100
        link.downstream.set()
        await link.start()
        await sub.wait_for(lambda _: set(range(100)) <= set(seq(sub)), 10)
        got = seq(sub)
        # At least once; after dropping repeats, in order.
        assert list(dict.fromkeys(got)) == list(range(100))
        await until(lambda: box.backlog == 0)


async def test_past_high_water_an_awaited_message_waits_for_its_puback_while_others_are_spooled(
    broker: EmbeddedBroker, port: int, sub: Subscriber, make_buffer: BufferFactory
) -> None:
    async with cut_link(port) as link, sink_on(link.port) as sink:
        async with outbox_of(sink, make_buffer(), window=4, high_water=4) as box:
            await link.start()
            assert await sink.wait_connected(5)
            link.downstream.clear()  # the broker is there but slow: no PUBACK gets back for now
            waited = [box.put(msg(i), awaited=True) for i in range(20)]
            for i in range(20, 30):
                box.put(msg(i))
            await until(lambda: box.backlog == 10)  # nobody waits on these: spooled past the high-water mark
            await asyncio.sleep(0.3)
            # The awaited ones were not spooled (an ACK at disk speed would take in more than the broker gets):
            # they wait for their PUBACKs, which is the devices' back-pressure.
            assert not any(f.done() for f in waited) and box.stats.spooled == 10
            link.downstream.set()
            await asyncio.wait_for(asyncio.gather(*waited), 10)
            await sub.wait_for(lambda _: set(range(30)) <= set(seq(sub)), 10)
            assert box.stats.live == 20


async def test_reject_when_full_fails_the_awaited_publish_and_keeps_what_was_accepted(
    broker: EmbeddedBroker, port: int, sub: Subscriber, make_buffer: BufferFactory
) -> None:
    size = len(b"seq") + 1 + 32  # entry_size of a one-digit message
    buf = make_buffer(max_size=5 * size, when_full="reject")
    async with cut_link(port) as link, sink_on(link.port) as sink, outbox_of(sink, buf) as box:
        accepted = [box.put(msg(i), awaited=True) for i in range(5)]
        await asyncio.wait_for(asyncio.gather(*accepted), 5)
        refused = box.put(msg(7), awaited=True)
        with pytest.raises(BufferFull):
            await asyncio.wait_for(refused, 5)
        assert box.snapshot().dropped == 1 and box.stats.refused == 1
        await link.start()
        await sub.wait_for(lambda _: len(seq(sub)) >= 5, 10)
        await asyncio.sleep(0.1)
        assert seq(sub) == [0, 1, 2, 3, 4]


async def test_drop_oldest_counts_what_it_dropped(
    broker: EmbeddedBroker, port: int, sub: Subscriber, make_buffer: BufferFactory
) -> None:
    size = len(b"seq") + 1 + 32
    buf = make_buffer(max_size=3 * size)
    async with cut_link(port) as link, sink_on(link.port) as sink, outbox_of(sink, buf) as box:
        for i in range(8):
            await box.put(msg(i), awaited=True)  # each its own commit
        await until(lambda: box.snapshot().dropped == 5)
        await link.start()
        await sub.wait_for(lambda _: len(seq(sub)) >= 3, 10)
        await asyncio.sleep(0.1)
        assert seq(sub) == [5, 6, 7]


async def test_max_age_drops_what_waited_too_long(
    broker: EmbeddedBroker, port: int, sub: Subscriber, make_buffer: BufferFactory
) -> None:
    now = [1000.0]
    buf = make_buffer(max_age=60.0, clock=lambda: now[0])
    async with cut_link(port) as link, sink_on(link.port) as sink:
        async with outbox_of(sink, buf, clock=lambda: now[0]) as box:
            for i in range(3):
                await box.put(msg(i), awaited=True)
            now[0] += 61
            for i in range(3, 5):
                await box.put(msg(i), awaited=True)
            # Expiry runs in the outbox's housekeeping, once a second.
            await until(lambda: box.snapshot().dropped == 3, 3)
            await link.start()
            await sub.wait_for(lambda _: len(seq(sub)) >= 2, 10)
            await asyncio.sleep(0.1)
        assert seq(sub) == [3, 4]


class _FailingSpool(MemoryBuffer):
    """A buffer whose storage fails like a full or broken disk."""

    def add(self, items: Any) -> list[int]:
        raise SpoolError("spool: cannot write: [Errno 28] No space left on device")


async def test_a_spool_that_cannot_write_fails_the_publish_and_nothing_else(
    broker: EmbeddedBroker, port: int, sub: Subscriber
) -> None:
    async with cut_link(port) as link, sink_on(link.port) as sink, outbox_of(sink, _FailingSpool()) as box:
        with pytest.raises(SinkError, match="No space left"):
            await asyncio.wait_for(box.put(msg(1), awaited=True), 5)
        box.put(msg(2))  # no waiter: counted, logged, not raised
        await until(lambda: box.stats.refused == 2)
        await link.start()
        assert await sink.wait_connected(5)
        # The outbox still works once the broker is back: live messages need no spool.
        await box.put(msg(3), awaited=True)
        await sub.wait_for(lambda _: seq(sub) == [3], 5)


# --- regressions: each of these was a bug once -------------------------------------------------


async def test_publish_after_stop_fails_instead_of_waiting_forever(broker: EmbeddedBroker, port: int) -> None:
    async with sink_on(port) as sink:
        box = Outbox(sink)
        await box.start()
        await box.stop()
        with pytest.raises(SinkError):
            await asyncio.wait_for(box.put(msg(1), awaited=True), 1)


async def test_publish_fails_when_the_topic_is_invalid(broker: EmbeddedBroker, port: int) -> None:
    async with sink_on(port) as sink, outbox_of(sink, MemoryBuffer()) as box:
        assert await sink.wait_connected(5)
        with pytest.raises(SinkError):
            await asyncio.wait_for(box.put(Message("bad/+/topic", b"1"), awaited=True), 1)


async def test_a_connection_lost_while_stopping_still_leaves_everything_in_the_spool(
    broker: EmbeddedBroker, port: int, tmp_path: Path
) -> None:
    async with cut_link(port) as link, sink_on(link.port) as sink:
        box = Outbox(sink, SQLiteSpool(tmp_path / "s.sqlite", min_free_bytes=0), commit_window=0.02)
        await box.start()
        await link.start()
        assert await sink.wait_connected(5)
        link.downstream.clear()  # no PUBACKs: everything stays in flight
        for i in range(10):
            box.put(msg(i))
        await until(lambda: len(box) == 10)
        # The connection drops just as stop() begins: the sink hears of it while stop() waits for its tasks.
        await link.close()
        await asyncio.wait_for(box.stop(), 10)
    again = SQLiteSpool(tmp_path / "s.sqlite", min_free_bytes=0)
    try:
        assert [e.message.payload for e in again.take(20)] == [b"%d" % i for i in range(10)]
    finally:
        again.close()


async def test_a_retained_state_acknowledged_live_removes_its_older_spooled_states(
    broker: EmbeddedBroker, port: int, sub: Subscriber, tmp_path: Path
) -> None:
    path = tmp_path / "s.sqlite"
    async with cut_link(port) as link, sink_on(link.port) as sink:
        # One entry per 100 s: the replay never reaches the 10, which only the live PUBACK of 20 can remove.
        async with outbox_of(sink, SQLiteSpool(path, min_free_bytes=0), replay_rate=0.01) as box:
            for i in range(5):
                box.put(msg(i, "telemetry"))
            box.put(msg(10, "value", retain=True))
            await until(lambda: box.backlog == 6)
            await link.start()
            assert await sink.wait_connected(5)
            box.put(msg(20, "value", retain=True))  # out at once, long before the replay reaches the 10
            await sub.wait_for(lambda _: seq(sub, "value") == [20], 5)
        # Stopped mid-drain (a restart, a power cut): the spool must not hold the older state any more,
        # or the next run would replay it over the newer one.
    again = SQLiteSpool(path, min_free_bytes=0)
    try:
        assert again.newest_retained() == {}
        assert all(not e.message.retain for e in again.take(10))
    finally:
        again.close()


async def test_a_stalled_broker_holds_an_awaited_message_for_a_bounded_time(
    broker: EmbeddedBroker, port: int, sub: Subscriber, make_buffer: BufferFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    import bridge.outbox_limits as outbox_module

    monkeypatch.setattr(outbox_module, "LIVE_WAIT_MAX", 0.5)
    monkeypatch.setattr(outbox_module, "HOUSEKEEPING_INTERVAL", 0.1)
    async with cut_link(port) as link, sink_on(link.port) as sink, outbox_of(sink, make_buffer()) as box:
        await link.start()
        assert await sink.wait_connected(5)
        link.downstream.clear()  # connected, but nothing comes back: a stalled broker
        waited = box.put(msg(1), awaited=True)
        started = time.monotonic()
        await asyncio.wait_for(waited, 5)  # answered by the spool commit, not by the PUBACK
        assert 0.4 < time.monotonic() - started < 2.0
        assert box.stats.spooled == 1 and sink.connected
        link.downstream.set()
        await sub.wait_for(lambda _: 1 in seq(sub), 10)  # delivered (maybe twice: at least once)


# --- the replay's random delay after a (re)connect (`spool.replay_delay`) ---------------------------------------
# A fleet that a broker restart brought back together must not start every backlog in the same second: each connect
# draws a delay in [0, replay_delay] before the backlog goes out, while live data (order `live`) flows at once.


async def test_after_a_connect_the_backlog_waits_its_delay_while_live_data_flows(
    broker: EmbeddedBroker, port: int, subscriber: Subscriber, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """Drawn the longest delay, the backlog stays in the spool (nothing lost) while live messages go straight out."""
    drawn: list[float] = []
    monkeypatch.setattr(outbox_replay, "draw_delay", lambda limit: drawn.append(limit) or limit)
    buf = SQLiteSpool(tmp_path / "s.sqlite", min_free_bytes=0)
    async with cut_link(port) as link, sink_on(link.port) as sink:
        async with outbox_of(sink, buf, replay_delay=3600.0) as box:
            for i in range(20):
                box.put(msg(i))
            await until(lambda: buf.stats().count == 20)
            await link.start()
            assert await sink.wait_connected(10)
            for i in range(100, 105):
                box.put(msg(i, "live"))
            await subscriber.wait_for(lambda _: len(seq(subscriber, "live")) >= 5)
            await until(lambda: box._replay.holding_off > 0)
            await asyncio.sleep(0.5)  # a replay that did not hold off would have sent its first batch by now
            assert seq(subscriber) == [] and drawn == [3600.0]
        again = SQLiteSpool(tmp_path / "s.sqlite", min_free_bytes=0)
        assert again.stats().count == 20  # still there for the next run
        again.close()


async def test_each_connect_draws_a_delay_of_its_own_and_the_backlog_then_drains_in_order(
    broker: EmbeddedBroker, port: int, subscriber: Subscriber, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Two drops, two draws (each over [0, replay_delay]); after each the whole backlog arrives, in order."""
    drawn: list[float] = []
    monkeypatch.setattr(outbox_replay, "draw_delay", lambda limit: drawn.append(limit) or 0.2)
    buf = MemoryBuffer()
    async with cut_link(port) as link, sink_on(link.port) as sink, outbox_of(sink, buf, replay_delay=7.0) as box:
        await link.start()
        assert await sink.wait_connected(10)
        for round_, first in enumerate((0, 50)):
            await link.close()
            await until(lambda: not sink.connected)
            for i in range(first, first + 50):
                box.put(msg(i))
            await until(lambda: buf.stats().count == 50)
            await link.start()
            await subscriber.wait_for(lambda _, n=first + 50: len(seq(subscriber)) >= n, timeout=20)
            assert drawn == [7.0] * (round_ + 1)
        assert seq(subscriber) == list(range(100))


async def test_no_delay_configured_replays_at_once_without_drawing(
    broker: EmbeddedBroker, port: int, subscriber: Subscriber, monkeypatch: pytest.MonkeyPatch
) -> None:
    """replay_delay 0 (the embedded broker's default) draws nothing and replays as soon as the sink is back."""
    drawn: list[float] = []
    monkeypatch.setattr(outbox_replay, "draw_delay", lambda limit: drawn.append(limit) or limit)
    buf = MemoryBuffer()
    async with cut_link(port) as link, sink_on(link.port) as sink, outbox_of(sink, buf) as box:
        for i in range(30):
            box.put(msg(i))
        await until(lambda: buf.stats().count == 30)
        await link.start()
        await subscriber.wait_for(lambda _: len(seq(subscriber)) >= 30)
        assert seq(subscriber) == list(range(30)) and drawn == []


def test_the_default_delay_is_for_brokers_a_fleet_shares_not_for_the_embedded_one() -> None:
    """No replay_delay given: REPLAY_DELAY on a sink with a url or urls, none on the embedded broker; a value wins."""
    remote = SinkConfig.model_validate({"name": "up", "url": "mqtt://mq.example"})
    cluster = SinkConfig.model_validate({"name": "up", "urls": ["mqtt://a.example", "mqtt://b.example"]})
    local = SinkConfig.model_validate({"name": "local"})
    given = SinkConfig.model_validate({"name": "up", "url": "mqtt://mq.example", "spool": {"replay_delay": "2s"}})
    assert REPLAY_DELAY == 10.0
    assert [replay_delay(s) for s in (remote, cluster, local, given)] == [10.0, 10.0, 0.0, 2.0]
