"""The outbox's contract at its edges, on a real MqttSink and the embedded broker: flush's answer, the figures
it reports, how often a refused spooled entry is offered, the rate of its error logs, and its side tasks.

test_outbox.py and test_outbox_faults.py cover the ways messages take; these hold the figures and limits
that those leave free.
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
from bridge.buffer import BufferFull, MemoryBuffer
from bridge.outbox import Outbox
from bridge.outbox_limits import REPLAY_ATTEMPTS
from bridge.spool import SpoolStorageError, SQLiteSpool
from gateway.errors import SinkError
from gateway.types import Message

from helpers import Subscriber, down_sink, until

P = "fg/contract"


def msg(i: int, topic: str = "seq", **kw: Any) -> Message:
    """Message number i."""
    return Message(topic, b"%d" % i, ts=1_000_000 + i, **kw)


class Clock:
    """A wall clock the test sets."""

    def __init__(self, now: float) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


async def test_health_says_not_started_then_nothing_then_stopped(broker: EmbeddedBroker, port: int) -> None:
    async with down_sink(port, P) as (sink, _link):
        box = Outbox(sink, MemoryBuffer())
        assert box.health() == "not started"
        await box.start()
        assert box.health() is None
        await box.stop()
        assert box.health() == "stopped"


async def test_flush_is_false_while_a_commit_still_waits_and_true_once_it_is_done(
    broker: EmbeddedBroker, port: int, tmp_path: Path
) -> None:
    async with down_sink(port, P) as (sink, _link):
        box = Outbox(sink, SQLiteSpool(tmp_path / "spool.db", min_free_bytes=0), commit_window=1.0)
        await box.start()
        try:
            stored = box.put(msg(1), awaited=True)  # offline: waits for the commit, 1 s of gathering away
            assert await box.flush(0.05) is False
            assert not stored.done()
            assert await box.flush(30) is True
            assert stored.done() and stored.exception() is None  # True means stored, at once
        finally:
            await box.stop()


async def test_flush_is_never_true_while_a_message_handed_over_before_it_is_not_stored_yet(
    broker: EmbeddedBroker, port: int
) -> None:
    async with down_sink(port, P) as (sink, _link):
        # A memory spool commits within one step of the loop: every step from the hand-over on is looked at.
        box = Outbox(sink, MemoryBuffer(), commit_window=0)
        await box.start()
        try:
            stored = box.put(msg(1), awaited=True)  # offline: to the spool

            async def look() -> tuple[bool, bool]:
                """Whether the message was stored, and flush's answer, seen in one step of the loop."""
                done = stored.done()
                return done, await box.flush(0)  # answers from what it sees, before any await

            looks = []
            for _ in range(200):  # a look in every turn of the loop until the commit is done
                looks.append(asyncio.ensure_future(look()))
                if stored.done():
                    break
                await asyncio.sleep(0)
            answers = await asyncio.gather(*looks)
            assert stored.done() and stored.exception() is None
            early = [step for step, (done, flushed) in enumerate(answers) if flushed and not done]
            assert early == [], "flush() said everything was stored while the message was still on its way"
        finally:
            await box.stop()


@pytest.mark.parametrize("kind", ["memory", "sqlite"])
async def test_figures_are_the_outboxs_counts_and_its_spools(
    broker: EmbeddedBroker, port: int, tmp_path: Path, kind: str
) -> None:
    spool_clock = Clock(5000.0)
    buffer = (
        MemoryBuffer(clock=spool_clock)
        if kind == "memory"
        else SQLiteSpool(tmp_path / "spool.db", min_free_bytes=0, clock=spool_clock)
    )
    box_clock = Clock(5012.34)
    async with down_sink(port, P) as (sink, _link):
        box = Outbox(sink, buffer, commit_window=0.01, clock=box_clock)
        await box.start()
        try:
            await asyncio.gather(*(box.put(msg(i), awaited=True) for i in range(3)))
            assert await box.flush(10)  # the commit's bookkeeping is done too
            st = buffer.stats()
            figures = asdict(box.snapshot())
            assert figures == {
                "queued": 0,
                "spool_messages": 3,
                "spool_bytes": st.bytes,
                "spool_oldest_age_s": 12.3,  # the outbox's now less the oldest entry's queue time
                "dropped": 0,
                "spool_commits": st.commits,
                "spool_fsyncs": st.fsyncs,
                "spool_bytes_written": st.bytes_written,
                "live": 0,
                "spooled": 3,
                "replayed": 0,
                "coalesced": 0,
                "refused": 0,
                "undeliverable": 0,
            }
            assert st.bytes > 0 and (kind == "memory" or st.commits >= 1)
            box_clock.now = 4000.0  # a clock stepped back: an age is never negative
            assert box.snapshot().spool_oldest_age_s == 0.0
        finally:
            await box.stop()


async def test_a_refused_spooled_entry_is_offered_exactly_replay_attempts_times(
    broker: EmbeddedBroker, port: int, subscriber: Subscriber, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    path = tmp_path / "spool.db"
    spool = SQLiteSpool(path, min_free_bytes=0)
    spool.add([(msg(0), 1), (Message("bad/+/topic", b"x"), 2), (msg(1), 3)])  # paho will not publish a wildcard
    spool.close()
    offers: list[str] = []
    async with down_sink(port, P) as (sink, link):
        real = sink.try_publish

        def counting(message: Message) -> Any:
            offers.append(message.topic)
            return real(message)

        sink.try_publish = counting  # type: ignore[method-assign]
        box = Outbox(sink, SQLiteSpool(path, min_free_bytes=0), commit_window=0.02, replay_rate=50)
        await box.start()
        try:
            await link.start()
            await subscriber.wait_for(lambda _: len(subscriber.on(f"{P}/seq")) >= 2, 10)
            await until(lambda: box.backlog == 0, 10, "the backlog to drain")
        finally:
            await box.stop()
    assert offers.count("bad/+/topic") == REPLAY_ATTEMPTS
    assert box.stats.undeliverable == 1 and box.snapshot().dropped == 1
    [line] = [r for r in caplog.records if "dropped spooled message" in r.getMessage()]
    assert line.levelno == logging.ERROR
    assert line.getMessage() == (
        f"sink up: dropped spooled message 2 to 'bad/+/topic': refused {REPLAY_ATTEMPTS} times: "
        f"sink up: cannot publish to {P}/bad/+/topic: Publish topic cannot contain wildcards."  # what paho said
    )


class FailingSpool(SQLiteSpool):
    """A real spool whose chosen calls fail as a full or broken disk makes them fail."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.takes = 0
        self.fail_takes = False
        self.fail_forget = False

    def take(self, n: int) -> Any:
        self.takes += 1
        if self.fail_takes:
            raise SpoolStorageError("spool s: cannot read: disk I/O error")
        return super().take(n)

    def forget_retained(self, topic: str, through_id: int) -> int:
        if self.fail_forget:
            raise SpoolStorageError("spool s: cannot write: database or disk is full")
        return super().forget_retained(topic, through_id)


async def test_a_spool_that_keeps_failing_the_replay_is_logged_once_per_interval(
    broker: EmbeddedBroker,
    port: int,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    monkeypatch.setattr(outbox_module, "LOOP_PAUSE", 0.01)
    caplog.set_level(logging.ERROR, logger="bridge.outbox")
    async with down_sink(port, P) as (sink, link):
        spool = FailingSpool(tmp_path / "spool.db", min_free_bytes=0)
        box = Outbox(sink, spool, commit_window=0.01)
        await box.start()
        try:
            await box.put(msg(1), awaited=True)
            spool.fail_takes = True
            await link.start()
            await until(lambda: spool.takes >= 5, 10, "the replay to try again and again")
            paused = [r.getMessage() for r in caplog.records if "replay paused" in r.getMessage()]
            assert paused == ["sink up: replay paused: spool s: cannot read: disk I/O error"]
            assert box.health() is None  # the loop goes on, it is not dead
            monkeypatch.setattr(outbox_module, "REFUSAL_LOG_INTERVAL", 0.0)
            takes = spool.takes
            await until(lambda: spool.takes >= takes + 2, 10, "two more tries")
            assert sum("replay paused" in r.getMessage() for r in caplog.records) >= 2  # every time, with no interval
            spool.fail_takes = False
            await until(lambda: box.backlog == 0, 10, "the replay once the spool reads again")
        finally:
            await box.stop()


async def test_a_failing_removal_of_older_retained_states_is_logged_and_delivery_goes_on(
    broker: EmbeddedBroker, port: int, subscriber: Subscriber, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger="bridge.outbox")
    async with down_sink(port, P) as (sink, link):
        spool = FailingSpool(tmp_path / "spool.db", min_free_bytes=0)
        box = Outbox(sink, spool, commit_window=0.01, replay_rate=0.5)
        await box.start()
        try:
            await box.put(msg(10, "value", retain=True), awaited=True)  # spooled: the link is down
            spool.fail_forget = True
            await link.start()
            assert await sink.wait_connected(10)
            # Acknowledged live, newer than the spooled state: the older one is removed in the background.
            await asyncio.wait_for(box.put(msg(20, "value", retain=True), awaited=True), 10)
            await until(lambda: any("disk is full" in r.getMessage() for r in caplog.records), 10, "the warning")
            assert [r.getMessage() for r in caplog.records if "disk is full" in r.getMessage()] == [
                "sink up: spool s: cannot write: database or disk is full"
            ]
            await asyncio.wait_for(box.put(msg(21, "other"), awaited=True), 10)
            assert box.health() is None
        finally:
            await box.stop()


async def test_a_replay_batch_skips_superseded_retained_states_and_sends_all_the_rest(
    broker: EmbeddedBroker, port: int, subscriber: Subscriber, tmp_path: Path
) -> None:
    path = tmp_path / "spool.db"
    spool = SQLiteSpool(path, min_free_bytes=0)
    spool.add(
        [
            (msg(0, "value", retain=True), 1),  # an older state: superseded by the next one
            (msg(1, "value", retain=True), 2),
            (msg(2), 3),
            (msg(3), 4),
        ]
    )
    spool.close()
    async with down_sink(port, P) as (sink, link):
        box = Outbox(sink, SQLiteSpool(path, min_free_bytes=0), commit_window=0.01, replay_rate=500)  # one batch
        await box.start()
        try:
            await link.start()
            await subscriber.wait_for(lambda _: len(subscriber.on(f"{P}/seq")) >= 2, 10)
            await until(lambda: box.backlog == 0, 10, "the whole batch to be settled")
            assert [m.payload for m in subscriber.on(f"{P}/value")] == [b"1"]
            assert [m.payload for m in subscriber.on(f"{P}/seq")] == [b"2", b"3"]
            assert box.stats.replayed == 3
        finally:
            await box.stop()


async def test_refusals_are_logged_with_their_counts_and_a_full_spool_only_as_a_warning(
    broker: EmbeddedBroker, port: int, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger="bridge.outbox")
    huge = 2**64 - 1  # a ts beyond SQLite's int64: this message alone is refused
    async with down_sink(port, P) as (sink, _link):
        spool = SQLiteSpool(tmp_path / "spool.db", min_free_bytes=0, when_full="reject", max_size=2000)
        box = Outbox(sink, spool, commit_window=0.01)
        await box.start()
        try:
            for i in range(3):
                with pytest.raises(Exception, match="int64"):
                    await asyncio.wait_for(box.put(Message("seq", b"%d" % i, ts=huge), awaited=True), 10)
            await asyncio.wait_for(box.put(Message("big", b"x" * 1200, ts=1), awaited=True), 10)  # stored
            monkeypatch.setattr(outbox_module, "REFUSAL_LOG_INTERVAL", 0.0)
            with pytest.raises(BufferFull):  # no room left, and when_full: reject
                await asyncio.wait_for(box.put(Message("big", b"x" * 1200, ts=2), awaited=True), 10)
        finally:
            await box.stop()
    lines = [(r.levelno, r.getMessage()) for r in caplog.records if "not spooled" in r.getMessage()]
    assert [level for level, _ in lines] == [logging.ERROR, logging.WARNING]
    assert lines[0][1].startswith("sink up: 1 message(s) not spooled (1 so far): ")
    assert "int64" in lines[0][1]
    # The two refusals held back within the interval are counted in the next line, with the full one.
    assert lines[1][1].startswith("sink up: 3 message(s) not spooled (4 so far): ")
    assert box.stats.refused == 4


async def test_a_retained_state_the_spool_refuses_leaves_the_older_stored_one_to_be_sent(
    broker: EmbeddedBroker, port: int, subscriber: Subscriber, tmp_path: Path
) -> None:
    async with down_sink(port, P) as (sink, link):
        box = Outbox(sink, SQLiteSpool(tmp_path / "spool.db", min_free_bytes=0), commit_window=0.01)
        await box.start()
        try:
            await asyncio.wait_for(box.put(msg(10, "value", retain=True), awaited=True), 10)  # stored: the link is down
            with pytest.raises(Exception, match="int64"):  # a ts beyond SQLite's int64: this state is refused
                await asyncio.wait_for(box.put(Message("value", b"11", ts=2**64 - 1, retain=True), awaited=True), 10)
            await asyncio.wait_for(box.put(msg(12), awaited=True), 10)  # stored behind it: replayed after it
            await link.start()
            await subscriber.wait_for(lambda _: bool(subscriber.on(f"{P}/seq")), 10)
            # The broker accepted nothing newer than 10: that is the state it must end with.
            assert [m.payload for m in subscriber.on(f"{P}/value")] == [b"10"]
        finally:
            await box.stop()


class GatedSpool(SQLiteSpool):
    """A real spool whose takes wait at a gate while `gated`, holding the replay back."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.gated = False
        self.gate = threading.Event()

    def take(self, n: int) -> Any:
        if self.gated:
            self.gate.wait(30)
        return super().take(n)


async def test_a_retained_state_the_broker_connection_refuses_leaves_the_older_stored_one_to_be_sent(
    broker: EmbeddedBroker, port: int, subscriber: Subscriber, tmp_path: Path
) -> None:
    async with down_sink(port, P) as (sink, link):
        real = sink.try_publish

        def refusing(message: Message) -> Any:
            if message.payload == b"11":
                raise ValueError("payload refused")  # as paho refuses what it will not publish
            return real(message)

        sink.try_publish = refusing  # type: ignore[method-assign]
        spool = GatedSpool(tmp_path / "spool.db", min_free_bytes=0)
        box = Outbox(sink, spool, commit_window=0.01)
        await box.start()
        try:
            await asyncio.wait_for(box.put(msg(10, "value", retain=True), awaited=True), 10)  # stored: the link is down
            spool.gated = True  # the replay of 10 waits until the newer state has been refused
            await link.start()
            assert await sink.wait_connected(10)
            with pytest.raises(SinkError, match="payload refused"):
                await asyncio.wait_for(box.put(msg(11, "value", retain=True), awaited=True), 10)
            spool.gate.set()
            await until(lambda: box.backlog == 0, 10, "the replay")
            # after the replay's PUBACK: behind it at the broker
            await asyncio.wait_for(box.put(msg(12), awaited=True), 10)
            await subscriber.wait_for(lambda _: bool(subscriber.on(f"{P}/seq")), 10)
            assert [m.payload for m in subscriber.on(f"{P}/value")] == [b"10"]
        finally:
            spool.gate.set()
            await box.stop()
