"""The outbox's bounds and first answers: what flush says at once, that a first failure is logged at once
whatever the interval, that the replay's refusal counts stay bounded and keep dropping what is refused.

Real parts: an Outbox on a real SQLiteSpool file and a real MqttSink to the embedded broker, cut off by a
relay (`down_sink`) until the test opens it.
"""

from __future__ import annotations

import asyncio
import logging
import threading
from dataclasses import asdict
from pathlib import Path
from typing import Any

import pytest

from bridge import outbox_limits as outbox_module
from bridge.broker import EmbeddedBroker
from bridge.buffer import Buffer, MemoryBuffer
from bridge.outbox import Outbox
from bridge.spool import SpoolStorageError, SQLiteSpool
from gateway.config.schema import SpoolConfig
from gateway.supervise import Supervisor
from gateway.types import Message

from helpers import Subscriber, down_sink, spool_rows, until

P = "fg/bounds"
#: Longer than any machine has been up: an interval that never ends within a test.
FOREVER = 1e12


def msg(i: int, topic: str = "seq") -> Message:
    """Message number i."""
    return Message(topic, b"%d" % i, ts=1_000_000 + i)


async def test_flush_is_false_while_a_live_message_waits_in_the_queue(broker: EmbeddedBroker, port: int) -> None:
    async with down_sink(port, P) as (sink, link):
        box = Outbox(sink)
        await box.start()
        try:
            await link.start()
            assert await sink.wait_connected(10)
            box.put(msg(1))  # live: in the queue until the drain's next step hands it to the sink
            assert len(box) == 1
            assert await box.flush(0) is False
            assert await box.flush(30) is True
        finally:
            await box.stop()


class BrokenTakes(SQLiteSpool):
    """A real spool whose takes fail as a broken disk makes them fail."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.takes = 0

    def take(self, n: int) -> Any:
        self.takes += 1
        raise SpoolStorageError("spool s: cannot read: disk I/O error")


async def test_the_first_failure_of_the_replay_is_logged_at_once_whatever_the_interval(
    broker: EmbeddedBroker,
    port: int,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    monkeypatch.setattr(outbox_module, "LOOP_PAUSE", 0.01)
    monkeypatch.setattr(outbox_module, "REFUSAL_LOG_INTERVAL", FOREVER)
    caplog.set_level(logging.ERROR, logger="bridge.outbox")
    path = tmp_path / "spool.db"
    spool = SQLiteSpool(path, min_free_bytes=0)
    spool.add([(msg(1), 1)])
    spool.close()
    async with down_sink(port, P) as (sink, link):
        spool = BrokenTakes(path, min_free_bytes=0)
        box = Outbox(sink, spool)
        await box.start()
        try:
            await link.start()
            await until(lambda: spool.takes >= 3, 10, "the replay to try again and again")
        finally:
            await box.stop()
    paused = [r.getMessage() for r in caplog.records if "replay paused" in r.getMessage()]
    assert paused == ["sink up: replay paused: spool s: cannot read: disk I/O error"]


async def test_the_first_refusal_is_logged_at_once_whatever_the_interval(
    broker: EmbeddedBroker,
    port: int,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    monkeypatch.setattr(outbox_module, "REFUSAL_LOG_INTERVAL", FOREVER)
    caplog.set_level(logging.WARNING, logger="bridge.outbox")
    async with down_sink(port, P) as (sink, _link):
        box = Outbox(sink, SQLiteSpool(tmp_path / "spool.db", min_free_bytes=0), commit_window=0.01)
        await box.start()
        try:
            for i in range(2):
                with pytest.raises(Exception, match="int64"):
                    await box.put(Message("seq", b"%d" % i, ts=2**64 - 1), awaited=True)
        finally:
            await box.stop()
    lines = [r.getMessage() for r in caplog.records if "not spooled" in r.getMessage()]
    assert len(lines) == 1 and lines[0].startswith("sink up: 1 message(s) not spooled (1 so far): ")


async def test_refusal_counts_of_dropped_entries_are_forgotten_so_every_refused_entry_is_dropped(
    broker: EmbeddedBroker, port: int, subscriber: Subscriber, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # One entry per replay step and room for 10 refusal counts: a dropped entry's count left behind would fill
    # the room after 10 drops, and the 11th refused entry would never be counted, so never dropped.
    monkeypatch.setattr(outbox_module, "REPLAY_BATCH", 1)
    path = tmp_path / "spool.db"
    spool = SQLiteSpool(path, min_free_bytes=0)
    bad = 12
    spool.add([(Message(f"bad/+/{i}", b"x"), i) for i in range(bad)] + [(msg(1), bad)])  # paho refuses wildcards
    spool.close()
    async with down_sink(port, P) as (sink, link):
        box = Outbox(sink, SQLiteSpool(path, min_free_bytes=0), replay_rate=10_000)
        await box.start()
        try:
            await link.start()
            await subscriber.wait_for(lambda _: subscriber.on(f"{P}/seq"), 20)
            await until(lambda: box.backlog == 0, 10, "the backlog to drain")
        finally:
            await box.stop()
    assert box.stats.undeliverable == bad
    assert spool_rows(path) == []


async def test_a_window_of_64_publishes_is_in_flight_at_most_by_default(broker: EmbeddedBroker, port: int) -> None:
    async with down_sink(port, P) as (sink, link):
        offers: list[Message] = []
        real = sink.try_publish

        def counting(message: Message) -> Any:
            offers.append(message)
            return real(message)

        sink.try_publish = counting  # type: ignore[method-assign]
        box = Outbox(sink)
        await box.start()
        try:
            await link.start()
            assert await sink.wait_connected(10)
            link.downstream.clear()  # connected, but no PUBACK comes back: every publish stays in flight
            for i in range(100):
                box.put(msg(i))
            await until(lambda: len(offers) >= 64, 10, "the window to fill")
            await asyncio.sleep(0.1)  # the drain hands on in one step while the window has room: none has
            assert len(offers) == 64
            assert len(box) == 100 and box.backlog == 0  # the rest waits live, not in the spool
        finally:
            link.downstream.set()
            await box.stop()


async def test_by_default_the_live_queue_takes_10000_messages_and_spools_the_next(
    broker: EmbeddedBroker, port: int, tmp_path: Path
) -> None:
    async with down_sink(port, P) as (sink, link):
        box = Outbox(sink, SQLiteSpool(tmp_path / "spool.db", min_free_bytes=0))
        await box.start()
        try:
            await link.start()
            assert await sink.wait_connected(10)
            for i in range(10_000):  # handed over in one step: the drain has not taken any yet
                box.put(msg(i))
            assert box.backlog == 0  # the high-water mark of the README: 10,000 messages
            box.put(msg(10_000))
            assert box.backlog == 1
        finally:
            await box.stop()


async def test_an_outbox_built_without_them_takes_the_configurations_defaults(port: int) -> None:
    async with down_sink(port, P) as (sink, _link):
        box = Outbox(sink)
        spool = SpoolConfig()
        assert (box.commit_window, box.replay_rate, box.order) == (spool.commit_window, spool.replay_rate, spool.order)


async def test_health_names_only_the_outboxs_own_loops_not_other_tasks_of_its_supervisor(port: int) -> None:
    supervisor = Supervisor(restart_min=3600.0)  # the failed task waits for its restart for the whole test

    async def dies() -> None:
        raise RuntimeError("another part of the gateway failed")

    other = supervisor.spawn("gateway:other", dies)
    async with down_sink(port, P) as (sink, _link):
        box = Outbox(sink, supervisor=supervisor)
        await box.start()
        try:
            await until(lambda: supervisor.problems(), 10, "the other task's failure")
            assert box.health() is None
        finally:
            await box.stop()
            await supervisor.stop(other)


class Monotonic:
    """The outbox's monotonic clock, set by the test."""

    def __init__(self, now: float) -> None:
        self.now = now

    def monotonic(self) -> float:
        """The time the test set."""
        return self.now


async def test_a_refusal_is_logged_again_once_a_whole_interval_has_passed(
    port: int, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    clock = Monotonic(1000.0)
    caplog.set_level(logging.WARNING, logger="bridge.outbox")
    interval = outbox_module.REFUSAL_LOG_INTERVAL
    async with down_sink(port, P) as (sink, _link):
        box = Outbox(
            sink, SQLiteSpool(tmp_path / "spool.db", min_free_bytes=0), commit_window=0.01, monotonic=clock.monotonic
        )
        await box.start()
        try:
            for i, now in enumerate([1000.0, 1000.0 + interval / 2, 1000.0 + interval]):
                clock.now = now
                with pytest.raises(Exception, match="int64"):
                    await box.put(Message("seq", b"%d" % i, ts=2**64 - 1), awaited=True)
        finally:
            await box.stop()
    lines = [r.getMessage() for r in caplog.records if "not spooled" in r.getMessage()]
    assert [line.split(":")[1] for line in lines] == [
        " 1 message(s) not spooled (1 so far)",
        " 2 message(s) not spooled (3 so far)",  # the one held back, counted with the next
    ]


class ClockedBrokenTakes(BrokenTakes):
    """Takes that fail, each at the next time of `times` on the outbox's monotonic clock."""

    def __init__(self, *args: Any, clock: Monotonic, times: list[float], **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.clock = clock
        self.times = times

    def take(self, n: int) -> Any:
        self.clock.now = self.times[min(self.takes, len(self.times) - 1)]
        return super().take(n)


async def test_a_failing_replay_is_logged_again_once_a_whole_interval_has_passed(
    broker: EmbeddedBroker,
    port: int,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    clock = Monotonic(1000.0)
    monkeypatch.setattr(outbox_module, "LOOP_PAUSE", 0.01)
    caplog.set_level(logging.ERROR, logger="bridge.outbox")
    interval = outbox_module.REFUSAL_LOG_INTERVAL
    path = tmp_path / "spool.db"
    spool = SQLiteSpool(path, min_free_bytes=0)
    spool.add([(msg(1), 1)])
    spool.close()
    times = [1000.0, 1000.0 + interval / 2, 1000.0 + interval, 1000.0 + interval]
    async with down_sink(port, P) as (sink, link):
        spool = ClockedBrokenTakes(path, min_free_bytes=0, clock=clock, times=times)
        box = Outbox(sink, spool, monotonic=clock.monotonic)
        await box.start()
        try:
            await link.start()
            await until(lambda: spool.takes >= len(times), 10, "the replay to fail at each time")
        finally:
            await box.stop()
    paused = [r.getMessage() for r in caplog.records if "replay paused" in r.getMessage()]
    assert len(paused) == 2  # at 1000 and 1000 + interval; not half-way, nor twice at the same time


@pytest.mark.parametrize("kind", ["memory", "sqlite"])
async def test_figures_right_after_start_count_what_the_spool_held_from_before(
    port: int, tmp_path: Path, kind: str
) -> None:
    buffer: Buffer = MemoryBuffer() if kind == "memory" else SQLiteSpool(tmp_path / "spool.db", min_free_bytes=0)
    buffer.add([(msg(1), 1), (msg(2), 2)])
    async with down_sink(port, P) as (sink, _link):
        box = Outbox(sink, buffer)
        await box.start()
        try:
            figures = asdict(box.snapshot())  # before any loop of the outbox has run
            assert (figures["spool_messages"], figures["spool_bytes"]) == (2, buffer.stats().bytes)
        finally:
            await box.stop()


class LoopWatchingSpool(SQLiteSpool):
    """A real spool that notes each call of stats() made on the event loop's thread (I/O there stalls the loop)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.loop_thread = threading.get_ident()
        self.on_loop = 0

    def stats(self) -> Any:
        self.on_loop += threading.get_ident() == self.loop_thread
        return super().stats()


async def test_figures_of_a_spool_that_does_io_never_call_it_on_the_event_loop(port: int, tmp_path: Path) -> None:
    spool = LoopWatchingSpool(tmp_path / "spool.db", min_free_bytes=0)
    async with down_sink(port, P) as (sink, _link):
        box = Outbox(sink, spool, commit_window=0.01)
        await box.start()
        try:
            await box.put(msg(1), awaited=True)
            assert await box.flush(10)
            assert box.snapshot().spool_messages == 1
        finally:
            await box.stop()
    assert spool.on_loop == 0


@pytest.mark.parametrize("kind", ["memory", "sqlite"])
async def test_the_background_removal_of_older_states_is_counted_and_leaves_no_task_nor_warning_behind(
    broker: EmbeddedBroker,
    port: int,
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
    monkeypatch: pytest.MonkeyPatch,
    kind: str,
) -> None:
    monkeypatch.setattr(outbox_module, "HOUSEKEEPING_INTERVAL", 3600.0)  # its refresh would hide a missing one
    caplog.set_level(logging.WARNING, logger="bridge.outbox")
    async with down_sink(port, P) as (sink, link):
        spool: Buffer = MemoryBuffer() if kind == "memory" else SQLiteSpool(tmp_path / "spool.db", min_free_bytes=0)
        box = Outbox(sink, spool, commit_window=0.01, replay_rate=0.01)  # the replay never reaches the 10
        await box.start()
        try:
            await box.put(Message("seq", b"0", ts=1), awaited=True)  # the replay's one take now: this one
            await box.put(Message("value", b"10", ts=10, retain=True), awaited=True)
            await link.start()
            assert await sink.wait_connected(10)
            # out live: 10 is removed behind it
            await box.put(Message("value", b"11", ts=11, retain=True), awaited=True)
            await until(lambda: spool.newest_retained() == {}, 10, "the removal of 10")
            await until(lambda: not box._spool.side_tasks, 10, "the side task to be let go")
            assert box.snapshot().spool_messages == 0 and box.backlog == 0
        finally:
            await box.stop()
    assert [r.getMessage() for r in caplog.records if r.name == "bridge.outbox"] == []


async def test_refusal_counts_of_delivered_entries_are_forgotten_so_a_later_refused_entry_is_dropped(
    broker: EmbeddedBroker, port: int, subscriber: Subscriber, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Room for 10 refusal counts; 11 entries refused once, then delivered: counts left behind would fill the
    # room, and the refused entry after them would never be counted, so never dropped.
    monkeypatch.setattr(outbox_module, "REPLAY_BATCH", 1)
    path = tmp_path / "spool.db"
    spool = SQLiteSpool(path, min_free_bytes=0)
    spool.add([(msg(i), i) for i in range(11)] + [(Message("bad/+/topic", b"x"), 11), (msg(99), 12)])
    spool.close()
    async with down_sink(port, P) as (sink, link):
        real = sink.try_publish
        refused_once: set[bytes] = set()

        def once(message: Message) -> Any:
            if message.topic == "seq" and message.payload not in refused_once:
                refused_once.add(message.payload)
                raise ValueError("not now")  # refused by the connection, once
            return real(message)

        sink.try_publish = once  # type: ignore[method-assign]
        box = Outbox(sink, SQLiteSpool(path, min_free_bytes=0), replay_rate=10_000)
        await box.start()
        try:
            await link.start()
            await subscriber.wait_for(lambda _: len(subscriber.on(f"{P}/seq")) >= 12, 20)
            await until(lambda: box.backlog == 0, 10, "the backlog to drain")
        finally:
            await box.stop()
    assert (box.stats.replayed, box.stats.undeliverable) == (12, 1)


class AcceptFailsOnce(SQLiteSpool):
    """A real spool whose first removal of delivered entries fails as a full disk makes it fail."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.failed = False

    def accept(self, ids: Any) -> None:
        if not self.failed:
            self.failed = True
            raise SpoolStorageError("spool s: cannot write: database or disk is full")
        super().accept(ids)


async def test_delivered_entries_the_spool_cannot_remove_go_out_again_and_the_replay_only_pauses(
    broker: EmbeddedBroker,
    port: int,
    subscriber: Subscriber,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    monkeypatch.setattr(outbox_module, "LOOP_PAUSE", 0.01)
    caplog.set_level(logging.ERROR, logger="bridge.outbox")
    path = tmp_path / "spool.db"
    spool = SQLiteSpool(path, min_free_bytes=0)
    spool.add([(msg(1), 1), (msg(2), 2)])
    spool.close()
    async with down_sink(port, P) as (sink, link):
        box = Outbox(sink, AcceptFailsOnce(path, min_free_bytes=0), replay_rate=10_000)
        await box.start()
        try:
            await link.start()
            await until(lambda: box.backlog == 0, 20, "the backlog to drain")
        finally:
            await box.stop()
    assert [m.payload for m in subscriber.on(f"{P}/seq")] == [b"1", b"2", b"1", b"2"]  # at least once
    assert spool_rows(path) == []
    errors = [r.getMessage() for r in caplog.records]
    assert errors == ["sink up: replay paused: spool s: cannot write: database or disk is full"]


class TakeRecorder(SQLiteSpool):
    """A real spool that notes how many entries each take asks for."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.asked: list[int] = []

    def take(self, n: int) -> Any:
        self.asked.append(n)
        return super().take(n)


@pytest.mark.parametrize(("rate", "batch"), [(500.0, 50), (5.0, 1), (0.5, 1), (5000.0, 100), (20_000.0, 100)])
async def test_a_replay_step_takes_a_tenth_of_a_seconds_worth_at_least_one_at_most_replay_batch(
    broker: EmbeddedBroker, port: int, subscriber: Subscriber, tmp_path: Path, rate: float, batch: int
) -> None:
    path = tmp_path / "spool.db"
    spool = SQLiteSpool(path, min_free_bytes=0)
    spool.add([(msg(1), 1)])
    spool.close()
    async with down_sink(port, P) as (sink, link):
        spool = TakeRecorder(path, min_free_bytes=0)
        box = Outbox(sink, spool, replay_rate=rate)
        await box.start()
        try:
            await link.start()
            await subscriber.wait_for(lambda _: subscriber.on(f"{P}/seq"), 10)
        finally:
            await box.stop()
    assert spool.asked[0] == batch
