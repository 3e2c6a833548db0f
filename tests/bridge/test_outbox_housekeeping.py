"""The outbox's housekeeping: waited-on messages a stalled broker holds are spooled (those in flight and those
still queued behind them, not the ones no one waits on), and a spool that fails it is logged and retried.

Real parts: an Outbox on a real SQLiteSpool file and a real MqttSink to the embedded broker through a relay
whose broker-to-sink direction the test can hold (a stalled broker).
"""

from __future__ import annotations

import asyncio
import logging
import re
from pathlib import Path
from typing import Any

import pytest

from bridge import outbox_limits as outbox_module
from bridge.broker import EmbeddedBroker
from bridge.outbox import Outbox
from bridge.spool import SpoolError, SpoolStorageError, SQLiteSpool
from gateway.types import Message

from helpers import Subscriber, down_sink, spool_rows, until

P = "fg/housekeeping"


def msg(i: int) -> Message:
    """Message number i."""
    return Message("seq", b"%d" % i, ts=1_000_000 + i)


@pytest.mark.parametrize("unwaited", [True, False], ids=["with-one-no-one-waits-on", "only-waited-ones"])
async def test_a_stalled_broker_gets_waited_on_messages_spooled_in_flight_or_queued_not_the_others(
    unwaited: bool,
    broker: EmbeddedBroker,
    port: int,
    subscriber: Subscriber,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    monkeypatch.setattr(outbox_module, "LIVE_WAIT_MAX", 0.3)
    monkeypatch.setattr(outbox_module, "HOUSEKEEPING_INTERVAL", 0.05)
    caplog.set_level(logging.WARNING, logger="bridge.outbox")
    async with down_sink(port, P) as (sink, link):
        box = Outbox(sink, SQLiteSpool(tmp_path / "spool.db", min_free_bytes=0), window=1, commit_window=0.01)
        await box.start()
        try:
            await link.start()
            assert await sink.wait_connected(10)
            link.downstream.clear()  # connected, but nothing comes back: a stalled broker
            in_flight = box.put(msg(1), awaited=True)  # the one publish the window allows
            queued = box.put(msg(2), awaited=True)  # waits behind it in the queue
            if unwaited:
                box.put(msg(3))  # no one waits on it: it keeps its place in the queue
            await asyncio.wait_for(asyncio.gather(in_flight, queued), 10)  # answered by the spool's commit
            assert box.stats.spooled == 2
            # Once the commit is counted: 1 still with the sink (it may arrive twice), 3 still queued.
            await until(lambda: len(box) == 1 + unwaited and box.backlog == 2, 10, "the commit to be counted")
            warnings = [r.getMessage() for r in caplog.records if "not acknowledged" in r.getMessage()]
            # One round of housekeeping may find 1 stale and the next round 2 (handed over microseconds later).
            counted = [
                re.fullmatch(r"sink up: broker has not acknowledged (\d) message\(s\) for 0 s: spooled", w)
                for w in warnings
            ]
            assert all(counted) and sum(int(m[1]) for m in counted if m) == 2, warnings
            link.downstream.set()
            sent = {b"1", b"2", b"3"} if unwaited else {b"1", b"2"}
            await subscriber.wait_for(lambda got: sent <= {m.payload for m in got}, 10)
            await until(lambda: box.backlog == 0 and len(box) == 0, 10, "everything to be settled")
        finally:
            link.downstream.set()
            await box.stop()


class ExpireFails(SQLiteSpool):
    """A real spool whose expire() fails: first as a full disk makes it fail, then with a bug, then not."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.expires = 0

    def expire(self, now: float) -> int:
        self.expires += 1
        if self.expires <= 3:
            raise SpoolStorageError("spool s: cannot write: database or disk is full")
        if self.expires == 4:
            raise RuntimeError("a bug in expire")
        return super().expire(now)


async def test_a_failing_housekeeping_is_logged_and_goes_on(
    port: int, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setattr(outbox_module, "HOUSEKEEPING_INTERVAL", 0.01)
    caplog.set_level(logging.ERROR, logger="bridge.outbox")
    async with down_sink(port, P) as (sink, _link):
        spool = ExpireFails(tmp_path / "spool.db", min_free_bytes=0)
        box = Outbox(sink, spool, commit_window=0.01)
        await box.start()
        try:
            await until(lambda: spool.expires >= 6, 10, "housekeeping to go on after its failures")
            assert box.health() is None
            await asyncio.wait_for(box.put(msg(1), awaited=True), 10)  # the spool is fine again
            await until(lambda: box.snapshot().spool_messages == 1, 10, "the figures to follow")
        finally:
            await box.stop()
    lines = [(r.getMessage(), r.exc_info is not None) for r in caplog.records]
    assert lines == [
        ("sink up: spool s: cannot write: database or disk is full", False),  # once: the next two within the interval
        ("sink up: housekeeping failed", True),
    ]


async def test_a_spilled_message_whose_connection_then_drops_is_stored_once(
    broker: EmbeddedBroker, port: int, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(outbox_module, "LIVE_WAIT_MAX", 0.2)
    monkeypatch.setattr(outbox_module, "HOUSEKEEPING_INTERVAL", 0.05)
    path = tmp_path / "spool.db"
    async with down_sink(port, P) as (sink, link):
        box = Outbox(sink, SQLiteSpool(path, min_free_bytes=0), commit_window=1.0)  # a long gathering
        await box.start()
        try:
            await link.start()
            assert await sink.wait_connected(10)
            link.downstream.clear()  # a stalled broker
            waited = box.put(msg(1), awaited=True)
            await until(lambda: box.backlog == 1, 10, "the message to be spilled")  # waiting for the commit
            await link.close()  # the connection drops before the commit: the sink gives the message back
            await asyncio.wait_for(waited, 10)
            assert await box.flush(10)
        finally:
            await box.stop()
    assert spool_rows(path) == [("seq", 1_000_001)]  # once


class StatsFail(SQLiteSpool):
    """A real spool whose figures cannot be read while `failing` (its adds still work)."""

    failing = False

    def stats(self) -> Any:
        if self.failing:
            raise SpoolStorageError("spool s: cannot read: disk I/O error")
        return super().stats()


async def test_a_commit_whose_figures_cannot_be_read_counts_what_it_stored(
    port: int, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(outbox_module, "HOUSEKEEPING_INTERVAL", 3600.0)  # its refresh would hide a wrong count
    async with down_sink(port, P) as (sink, _link):
        spool = StatsFail(tmp_path / "spool.db", min_free_bytes=0)
        box = Outbox(sink, spool, commit_window=0.01)
        await box.start()
        try:
            spool.failing = True  # start() read them already
            await asyncio.wait_for(box.put(msg(1), awaited=True), 10)
            await until(lambda: len(box) == 0, 10, "the commit to be counted")
            assert box.backlog == 1
            with pytest.raises(Exception, match="int64"):  # refused: nothing stored, nothing counted
                await asyncio.wait_for(box.put(Message("seq", b"2", ts=2**64 - 1), awaited=True), 10)
            await until(lambda: len(box) == 0, 10, "the refusal to be counted")
            assert box.backlog == 1
        finally:
            spool.failing = False
            await box.stop()


class PoisonStatsFail(StatsFail):
    """StatsFail that also refuses any batch holding a `poison` message without saying which."""

    def add(self, items: Any) -> list[int]:
        if any(m.topic == "poison" for m, _ in items):
            raise SpoolError("spool s: a row broke a constraint")
        return super().add(items)


async def test_a_commit_split_in_several_adds_whose_figures_cannot_be_read_counts_all_it_stored(
    port: int, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(outbox_module, "HOUSEKEEPING_INTERVAL", 3600.0)  # its refresh would hide a wrong count
    async with down_sink(port, P) as (sink, _link):
        spool = PoisonStatsFail(tmp_path / "spool.db", min_free_bytes=0)
        box = Outbox(sink, spool, commit_window=0.05)
        await box.start()
        try:
            spool.failing = True  # start() read them already
            batch = [msg(1), Message("poison", b"x", ts=2), msg(3), msg(4)]  # one commit window: halved
            futures = [box.put(m, awaited=True) for m in batch]
            await asyncio.wait(futures, timeout=10)
            assert [f.exception() is None for f in futures] == [True, False, True, True]
            await until(lambda: len(box) == 0, 10, "the commit to be counted")
            assert box.backlog == 3
        finally:
            spool.failing = False
            await box.stop()
