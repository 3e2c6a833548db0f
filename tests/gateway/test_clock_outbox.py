"""What the router and a sink's outbox make of a clock set while data waits (issue 16, clocks), on a real MqttSink,
SQLite spool and embedded broker: spooled samples go out dated by the set clock, in the order they were taken, a
clock stepped back never lets an older retained value win, and what went out before the sync is counted.

The process clock (gateway.types.CLOCK) is faked: its wall clock is the machine's moved by an offset the test sets,
its sync state the test's. The machine's clock is never touched.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

import bridge.sink
from bridge.broker import EmbeddedBroker
from bridge.buffer import MemoryBuffer
from bridge.outbox import Outbox
from bridge.spool import SQLiteSpool
from gateway.router import Router, restamp
from gateway.types import CLOCK, DeviceProfile, Sample, now_ms

from helpers import Subscriber, down_sink, until

P = "fg/clock"
TEN_YEARS = 10 * 365 * 86400.0


class FakeWall:
    """The machine's wall clock moved by `offset` seconds: the test steps it by changing the offset."""

    def __init__(self, offset: float) -> None:
        self.offset = offset

    def __call__(self) -> float:
        return time.time() + self.offset


@pytest.fixture
def wall(monkeypatch: pytest.MonkeyPatch) -> Iterator[FakeWall]:
    """The process clock, ten years behind and known not synchronised (a Pi booted before NTP); restored after."""
    fake = FakeWall(-TEN_YEARS)
    monkeypatch.setattr(CLOCK, "wall", fake)
    monkeypatch.setattr(CLOCK, "synchronized", False)
    yield fake


@pytest.fixture(autouse=True)
def prompt_reconnect(monkeypatch: pytest.MonkeyPatch) -> None:
    """The sink retries every 0.1 s (the real back-off is jittered up to 60 s)."""
    monkeypatch.setattr(bridge.sink, "backoff", lambda _attempt, **_: 0.1)


def telemetry(sub: Subscriber) -> list[tuple[int, int]]:
    """(ts, value v) of each telemetry message the subscriber saw, in arrival order."""
    out = []
    for m in sub.messages:
        if m.topic == f"{P}/dev/telemetry":
            body = m.json()
            assert isinstance(body, dict)
            out.append((body["ts"], body["values"]["v"]))
    return out


async def test_spooled_samples_go_out_on_the_set_clock_in_order_and_only_those_sent_before_it_are_counted(
    broker: EmbeddedBroker, port: int, subscriber: Subscriber, tmp_path: Path, wall: FakeWall
) -> None:
    """Booted ten years behind and unsynchronised: a sample sent then goes out with its unchecked ts and is counted;
    samples spooled while the broker is away, one of them after the clock stepped back an hour, go out once the
    clock is set dated on the set clock, in the order they were taken, not counted; the retained value left on the
    broker is the last one taken, although the clock said it was older."""
    async with down_sink(port, P) as (sink, link):
        box = Outbox(sink, SQLiteSpool(tmp_path / "spool.db", min_free_bytes=0), commit_window=0.01, restamp=restamp)
        router = Router([box], [DeviceProfile("dev", every_sample=True)])
        await box.start()
        try:
            await link.start()
            await until(lambda: sink.connected, 10, "the sink to connect")
            before = time.time()
            await router.deliver(Sample("dev", now_ms(), {"v": 1}))
            await until(lambda: telemetry(subscriber), 10, "the first sample live")
            await until(lambda: box.stats.unsynchronised == 2, 10, "telemetry and dev/v counted")
            [(ts, _)] = telemetry(subscriber)
            assert abs(ts / 1000 - (before - TEN_YEARS)) < 60  # what went out before the sync is not rewritten

            await link.close()
            await until(lambda: not sink.connected, 10, "the sink to see the broker gone")
            taken = [time.time()]
            await router.deliver(Sample("dev", now_ms(), {"v": 2}))
            wall.offset -= 3600  # the clock steps back an hour: v=3 is stamped earlier than v=2
            taken.append(time.time())
            await router.deliver(Sample("dev", now_ms(), {"v": 3}))
            assert box.backlog >= 4  # two telemetry and two dev/v, spooled

            wall.offset = 0.0  # NTP sets the clock
            CLOCK.synchronized = True
            await link.start()
            await until(lambda: len(telemetry(subscriber)) == 3, 20, "the spooled samples replayed")
            replayed = telemetry(subscriber)[1:]
            assert [v for _, v in replayed] == [2, 3]
            for (ts, _), real in zip(replayed, taken, strict=True):
                assert abs(ts / 1000 - real) < 5, "dated on the set clock"
            assert replayed[0][0] < replayed[1][0], "in the order they were taken"
            assert box.stats.unsynchronised == 2

            late = Subscriber(port, (f"{P}/dev/v",))
            await asyncio.to_thread(late.start)  # off the loop the broker runs on
            try:
                # amqtt also hands a new subscription retained messages of other topics: only dev/v is looked at.
                mine = lambda: [m.payload for m in late.messages if m.retain and m.topic == f"{P}/dev/v"]  # noqa: E731
                assert set(await until(mine, 10, "the retained dev/v")) == {b"3"}
            finally:
                late.stop()
        finally:
            await box.stop()


async def test_a_devices_own_ts_is_never_moved_by_the_gateways_steps(
    broker: EmbeddedBroker, port: int, subscriber: Subscriber, wall: FakeWall
) -> None:
    """An MCP device's own ts is its clock's, not the gateway's: spooled while the gateway's clock was ten years
    behind, it goes out as the device sent it when that clock is set; the gateway-stamped sample beside it moves."""
    async with down_sink(port, P) as (sink, link):
        box = Outbox(sink, MemoryBuffer(), commit_window=0.01, restamp=restamp)
        router = Router([box], [DeviceProfile("dev", every_sample=True)])
        await box.start()
        try:
            device_ts = int(time.time() * 1000)  # a device whose clock is right
            await router.deliver(Sample("dev", device_ts, {"v": 1}, device_clock=True))
            await router.deliver(Sample("dev", now_ms(), {"v": 2}))
            wall.offset = 0.0
            CLOCK.synchronized = True
            await link.start()
            await until(lambda: len(telemetry(subscriber)) == 2, 20, "both samples replayed")
            [(own, v1), (stamped, v2)] = telemetry(subscriber)
            assert (v1, v2) == (1, 2) and own == device_ts
            assert abs(stamped / 1000 - time.time()) < 60
        finally:
            await box.stop()
