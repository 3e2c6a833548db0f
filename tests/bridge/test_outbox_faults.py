"""No message stops an outbox: batches the spool cannot store, entries the broker refuses, failures in its loops.

Real parts: an Outbox on a real SQLiteSpool file and a real MqttSink whose broker (the embedded amqtt of
conftest) is cut off by a relay that is not accepting, so everything goes through the spool.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
from pathlib import Path
from typing import Any

import pytest

from bridge import outbox_limits as outbox_module
from bridge.broker import EmbeddedBroker
from bridge.buffer import MemoryBuffer
from bridge.outbox import Outbox
from bridge.outbox_limits import SPLIT_ADDS
from bridge.spool import SpoolError, SQLiteSpool
from gateway.errors import SinkError
from gateway.supervise import Supervisor
from gateway.types import Message

from helpers import Subscriber, down_sink, spool_rows, until

P = "fg/faults"
#: A `ts` an MCP device sent: 2**64 - 1, beyond SQLite's INTEGER (int64).
HUGE_TS = 18446744073709551615


def msg(i: int, topic: str = "seq", ts: int | None = None) -> Message:
    """Message number i, sampled at 1,000,000 + i unless `ts` says otherwise."""
    return Message(topic, b"%d" % i, ts=1_000_000 + i if ts is None else ts)


class CountingSpool(SQLiteSpool):
    """A real spool that counts its add() calls and can fail chosen calls with an unexpected error."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.adds = 0
        self.fail_adds: set[int] = set()  # the add() calls (1-based) that raise RuntimeError
        self.fail_takes = 0  # take() calls to fail, from now on

    def add(self, items: Any) -> list[int]:
        self.adds += 1
        if self.adds in self.fail_adds:
            raise RuntimeError("a bug in the buffer")
        return super().add(items)

    def take(self, n: int) -> Any:
        if self.fail_takes:
            self.fail_takes -= 1
            raise RuntimeError("a bug in take")
        return super().take(n)


async def test_a_ts_beyond_int64_fails_only_its_own_message(broker: EmbeddedBroker, port: int, tmp_path: Path) -> None:
    path = tmp_path / "spool.db"
    async with down_sink(port, P) as (sink, _link):
        box = Outbox(sink, SQLiteSpool(path, min_free_bytes=0), commit_window=0.05)
        await box.start()
        # One commit window: the bad message sits between good ones in the same batch.
        good = [box.put(msg(i), awaited=True) for i in range(5)]
        bad = box.put(msg(99, ts=HUGE_TS), awaited=True)
        good += [box.put(msg(i), awaited=True) for i in range(5, 10)]
        await asyncio.wait_for(asyncio.gather(*good), 5)
        with pytest.raises(SinkError, match="int"):
            await asyncio.wait_for(bad, 5)
        # The commit loop goes on: the next batch is stored and its waiter answered.
        await asyncio.wait_for(box.put(msg(10), awaited=True), 5)
        assert box.health() is None
        assert (box.stats.spooled, box.stats.refused) == (11, 1)
        await box.stop()
    assert [ts for _, ts in spool_rows(path)] == [1_000_000 + i for i in range(11)]


@pytest.mark.parametrize(
    ("bad", "kind"),
    [
        (Message("seq", b"x", ts=-(2**63) - 1), "sqlite"),  # below int64
        (Message("seq/\ud800", b"x", ts=5), "sqlite"),  # a topic that cannot be UTF-8
        (Message("seq/\ud800", b"x", ts=5), "memory"),
        (Message("seq", b"x" * 5000, ts=5), "sqlite"),  # larger than max_size: can never be buffered
    ],
    ids=["ts-below-int64", "surrogate-topic", "surrogate-topic-memory", "larger-than-max-size"],
)
async def test_a_message_no_buffer_can_store_fails_alone(
    broker: EmbeddedBroker, port: int, tmp_path: Path, bad: Message, kind: str
) -> None:
    buffer = SQLiteSpool(tmp_path / "s.db", min_free_bytes=0, max_size=4096) if kind == "sqlite" else MemoryBuffer()
    async with down_sink(port, P) as (sink, _link):
        box = Outbox(sink, buffer, commit_window=0.05)
        await box.start()
        good = [box.put(msg(i), awaited=True) for i in range(3)]
        failing = box.put(bad, awaited=True)
        good += [box.put(msg(i), awaited=True) for i in range(3, 6)]
        await asyncio.wait_for(asyncio.gather(*good), 5)
        with pytest.raises(SinkError):
            await asyncio.wait_for(failing, 5)
        assert (box.stats.spooled, box.stats.refused) == (6, 1)
        await box.stop()


async def test_stop_keeps_what_it_can_and_never_raises(broker: EmbeddedBroker, port: int, tmp_path: Path) -> None:
    path = tmp_path / "spool.db"
    async with down_sink(port, P) as (sink, _link):
        box = Outbox(sink, SQLiteSpool(path, min_free_bytes=0), commit_window=0.05)
        await box.start()
        futures = [box.put(m, awaited=True) for m in (msg(0), msg(1, ts=HUGE_TS), msg(2, ts=-(2**70)))]
        box.put(msg(3))
        await box.stop()  # the bad ones are still pending: stop commits them with the rest, and returns
        done = [f.exception() for f in futures]
    assert done[0] is None and isinstance(done[1], SinkError) and isinstance(done[2], SinkError)
    assert [ts for _, ts in spool_rows(path)] == [1_000_000, 1_000_003]


async def test_the_spool_names_the_bad_messages_and_the_rest_goes_in_with_one_more_add(
    broker: EmbeddedBroker, port: int, tmp_path: Path
) -> None:
    async with down_sink(port, P) as (sink, _link):
        spool = CountingSpool(tmp_path / "spool.db", min_free_bytes=0)
        box = Outbox(sink, spool, commit_window=0.05)
        await box.start()
        futures = [box.put(msg(i, ts=HUGE_TS if i in (3, 321) else None), awaited=True) for i in range(500)]
        await asyncio.wait(futures, timeout=10)
        assert [i for i, f in enumerate(futures) if f.exception() is not None] == [3, 321]
        assert spool.adds == 2  # one fsync for the 498 good ones, as without the bad ones
        spool.adds = 0
        futures = [box.put(msg(i, ts=HUGE_TS), awaited=True) for i in range(1000)]
        await asyncio.wait(futures, timeout=10)
        assert all(isinstance(f.exception(), SinkError) for f in futures)
        assert spool.adds == 1
        await box.stop()


class PoisonSpool(CountingSpool):
    """Refuses any batch holding a `poison` message without saying which (as an SQLite constraint might)."""

    def add(self, items: Any) -> list[int]:
        if any(m.topic == "poison" for m, _ in items):
            self.adds += 1
            raise SpoolError("spool: a row broke a constraint")
        return super().add(items)


async def test_a_refusal_that_names_no_item_is_halved_until_the_bad_ones_fail_within_a_bound(
    broker: EmbeddedBroker, port: int, tmp_path: Path
) -> None:
    async with down_sink(port, P) as (sink, _link):
        spool = PoisonSpool(tmp_path / "spool.db", min_free_bytes=0)
        box = Outbox(sink, spool, commit_window=0.05)
        await box.start()
        futures = [box.put(msg(i, topic="poison" if i == 321 else "seq"), awaited=True) for i in range(500)]
        await asyncio.wait(futures, timeout=10)
        assert [i for i, f in enumerate(futures) if f.exception() is not None] == [321]
        assert spool.adds <= 2 * math.ceil(math.log2(500)) + 1
        # Every message bad: the halving stops at SPLIT_ADDS; each half still waiting is tried once more.
        spool.adds = 0
        futures = [box.put(msg(i, topic="poison"), awaited=True) for i in range(1000)]
        await asyncio.wait(futures, timeout=10)
        assert all(isinstance(f.exception(), SinkError) for f in futures)
        assert SPLIT_ADDS <= spool.adds <= SPLIT_ADDS + math.ceil(math.log2(1000)) + 1  # the budget, all of it
        await asyncio.wait_for(box.put(msg(1000), awaited=True), 5)
        assert box.stats.spooled == 500
        await box.stop()


async def test_an_unexpected_error_of_the_spool_fails_that_batch_and_the_loop_goes_on(
    broker: EmbeddedBroker, port: int, tmp_path: Path
) -> None:
    async with down_sink(port, P) as (sink, _link):
        spool = CountingSpool(tmp_path / "spool.db", min_free_bytes=0)
        spool.fail_adds = {1}
        box = Outbox(sink, spool, commit_window=0.02)
        await box.start()
        with pytest.raises(SinkError, match="a bug in the buffer"):
            await asyncio.wait_for(box.put(msg(0), awaited=True), 5)
        await asyncio.wait_for(box.put(msg(1), awaited=True), 5)
        assert box.health() is None
        await box.stop()


async def test_replay_drops_an_entry_the_broker_connection_refuses_and_delivers_the_rest(
    broker: EmbeddedBroker, port: int, subscriber: Subscriber, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    path = tmp_path / "spool.db"
    spool = SQLiteSpool(path, min_free_bytes=0)
    # A topic paho will not publish (a wildcard), left in the spool between good entries.
    spool.add([(msg(0), 1), (Message("bad/+/topic", b"x"), 2), (msg(1), 3)])
    spool.close()
    async with down_sink(port, P) as (sink, link):
        box = Outbox(sink, SQLiteSpool(path, min_free_bytes=0), commit_window=0.02, replay_rate=50)
        await box.start()
        await link.start()
        await subscriber.wait_for(lambda _: len(subscriber.on(f"{P}/seq")) >= 2, 10)
        await until(lambda: box.backlog == 0, 10, "the backlog to drain")
        assert box.stats.undeliverable == 1 and box.stats.replayed == 2
        assert box.health() is None
        await box.stop()
    assert spool_rows(path) == []
    assert "dropped spooled message" in caplog.text


async def test_a_full_table_of_refusal_counts_still_counts_a_new_refusal_and_drops_it(
    broker: EmbeddedBroker, port: int, subscriber: Subscriber, tmp_path: Path
) -> None:
    """Counts left by refused entries that were evicted or expired since must not stop the counting."""
    path = tmp_path / "spool.db"
    spool = SQLiteSpool(path, min_free_bytes=0)
    spool.add([(msg(0), 1), (Message("bad/+/topic", b"x"), 2), (msg(1), 3)])
    spool.close()
    async with down_sink(port, P) as (sink, link):
        box = Outbox(sink, SQLiteSpool(path, min_free_bytes=0), commit_window=0.02, replay_rate=50)
        # What a long outage leaves: a full table of counts for ids no longer in the spool.
        box._replay.refusals.update((-n, 1) for n in range(1, outbox_module.REPLAY_FAILURES_KEPT + 1))
        await box.start()
        await link.start()
        await subscriber.wait_for(lambda _: len(subscriber.on(f"{P}/seq")) >= 2, 10)
        await until(lambda: box.backlog == 0, 10, "the refused entry to be dropped and the backlog to drain")
        assert box.stats.undeliverable == 1 and box.stats.replayed == 2
        assert len(box._replay.refusals) <= outbox_module.REPLAY_FAILURES_KEPT
        await box.stop()
    assert spool_rows(path) == []


async def test_the_replay_loop_survives_an_unexpected_error(
    broker: EmbeddedBroker, port: int, subscriber: Subscriber, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(outbox_module, "LOOP_PAUSE", 0.05, raising=False)
    path = tmp_path / "spool.db"
    async with down_sink(port, P) as (sink, link):
        spool = CountingSpool(path, min_free_bytes=0)
        box = Outbox(sink, spool, commit_window=0.02)
        await box.start()
        await asyncio.gather(*(box.put(msg(i), awaited=True) for i in range(3)))
        spool.fail_takes = 2
        await link.start()
        await subscriber.wait_for(lambda _: len(subscriber.on(f"{P}/seq")) >= 3, 10)
        assert box.health() is None
        await box.stop()


async def test_a_refusal_flood_is_logged_once_per_interval(
    broker: EmbeddedBroker, port: int, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.ERROR, logger="bridge.outbox")
    async with down_sink(port, P) as (sink, _link):
        box = Outbox(sink, SQLiteSpool(tmp_path / "spool.db", min_free_bytes=0), commit_window=0.01)
        await box.start()
        for i in range(20):
            with contextlib.suppress(SinkError):
                await asyncio.wait_for(box.put(msg(i, ts=HUGE_TS), awaited=True), 5)
        await box.stop()
    assert box.stats.refused == 20
    assert sum("not spooled" in r.getMessage() for r in caplog.records) == 1


async def test_under_a_supervisor_a_loop_that_dies_anyway_is_restarted_and_reported(
    broker: EmbeddedBroker, port: int, tmp_path: Path
) -> None:
    supervisor = Supervisor(restart_min=0.05)
    async with down_sink(port, P) as (sink, _link):
        box = Outbox(sink, SQLiteSpool(tmp_path / "s.db", min_free_bytes=0), commit_window=0.02, supervisor=supervisor)
        await box.start()
        dead = supervisor.running("outbox:up:commit")
        assert dead is not None
        dead.cancel()  # as a bug would end it
        await until(lambda: any("outbox:up:commit" in p for p in supervisor.problems()), 2, "the report")
        await until(lambda: supervisor.running("outbox:up:commit") not in (None, dead), 2, "the restart")
        await asyncio.wait_for(box.put(msg(1), awaited=True), 5)
        assert supervisor.problems() == [] and box.health() is None
        await box.stop()
    assert supervisor.tasks == [] and box.health() == "stopped"


def _running(name: str) -> asyncio.Task[Any] | None:
    return next((t for t in asyncio.all_tasks() if t.get_name() == name and not t.done()), None)


async def test_alone_a_loop_that_dies_is_restarted_by_a_supervisor_of_its_own_and_named_by_health(
    broker: EmbeddedBroker, port: int, tmp_path: Path
) -> None:
    async with down_sink(port, P) as (sink, _link):
        box = Outbox(sink, SQLiteSpool(tmp_path / "s.db", min_free_bytes=0), commit_window=0.02)
        await box.start()
        dead = _running("outbox:up:commit")
        assert dead is not None and box.health() is None
        dead.cancel()  # as a bug would end it
        await until(lambda: (box.health() or "").startswith("task outbox:up:commit: cancelled"), 2, "the report")
        # The supervisor's first back-off is 1 s.
        await until(lambda: _running("outbox:up:commit") not in (None, dead), 3, "the restart")
        await asyncio.wait_for(box.put(msg(1), awaited=True), 5)
        assert box.health() is None
        await box.stop()
    assert box.health() == "stopped" and _running("outbox:up:commit") is None


async def stored_and_adds(port: int, spool: CountingSpool, messages: list[Message]) -> tuple[list[bool], int]:
    """Hand `messages` over in one commit window: whether each was stored, and the spool's add() calls for them."""
    async with down_sink(port, P) as (sink, _link):
        box = Outbox(sink, spool, commit_window=0.05)
        await box.start()
        try:
            futures = [box.put(m, awaited=True) for m in messages]
            await asyncio.wait(futures, timeout=10)
            return [f.exception() is None for f in futures], spool.adds
        finally:
            await box.stop()


@pytest.mark.parametrize(
    ("budget", "stored", "adds"),
    [(1, [False, False], 1), (2, [True, False], 2)],
    ids=["no-add-left-to-split", "one-add-left"],
)
async def test_a_refusal_naming_its_item_is_split_only_while_the_budget_lasts(
    broker: EmbeddedBroker,
    port: int,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    budget: int,
    stored: list[bool],
    adds: int,
) -> None:
    monkeypatch.setattr(outbox_module, "SPLIT_ADDS", budget)
    spool = CountingSpool(tmp_path / "spool.db", min_free_bytes=0)
    assert await stored_and_adds(port, spool, [msg(0), msg(1, ts=HUGE_TS)]) == (stored, adds)


@pytest.mark.parametrize(("budget", "adds"), [(1, 1), (2, 3)], ids=["no-add-left-to-split", "one-split"])
async def test_a_refusal_naming_no_item_is_halved_only_while_the_budget_lasts(
    broker: EmbeddedBroker, port: int, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, budget: int, adds: int
) -> None:
    monkeypatch.setattr(outbox_module, "SPLIT_ADDS", budget)
    spool = PoisonSpool(tmp_path / "spool.db", min_free_bytes=0)
    poison = [Message("poison", b"%d" % i, ts=i) for i in range(2)]
    assert await stored_and_adds(port, spool, poison) == ([False, False], adds)


async def test_a_full_spool_refuses_a_whole_batch_in_one_add(broker: EmbeddedBroker, port: int, tmp_path: Path) -> None:
    spool = CountingSpool(tmp_path / "spool.db", min_free_bytes=0, when_full="reject", max_size=2000)
    spool.add([(Message("big", b"x" * 1900, ts=1), 1)])
    spool.adds = 0
    assert await stored_and_adds(port, spool, [msg(i) for i in range(8)]) == ([False] * 8, 1)
