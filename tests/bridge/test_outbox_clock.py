"""What a sink's outbox keeps of a message's anchor (issue 16, clocks) on its way into the spool: through a
Sparkplug sink's `prepare` (which may remake or redate the message), and for a message the outbox dates itself.
A real MqttSink whose broker is away, a MemoryBuffer read back; the process clock's sync state and wall clock set
by the test.
"""

from __future__ import annotations

import json
from collections.abc import Iterator

import pytest

from bridge.broker import EmbeddedBroker
from bridge.buffer import MemoryBuffer
from bridge.outbox import Outbox
from bridge.sparkplug.prepare import Prepare
from gateway.types import CLOCK, Message

from helpers import down_sink

P = "fg/oc"
MS_AHEAD = 5_000  # the clock prepare dates by, this far ahead of the moment it is asked about


@pytest.fixture
def unsynchronised(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """The process clock known not synchronised (restored after)."""
    monkeypatch.setattr(CLOCK, "synchronized", False)
    yield


def telemetry(ts: int, **values: object) -> bytes:
    """A telemetry payload as the router writes it."""
    return json.dumps({"ts": ts, "values": values}, separators=(",", ":")).encode()


async def test_prepare_keeps_the_anchor_of_what_it_remakes_and_anchors_what_it_dates(
    broker: EmbeddedBroker, port: int, unsynchronised: None
) -> None:
    """A Sparkplug sink's prepare keeps only the changed values (a new message): its anchor is the one the router
    gave. A status it dates by its own clock gets an anchor for that ts; a message of a device's own ts (no anchor)
    gets none."""
    spooled = MemoryBuffer()
    prepare = Prepare(lambda: [], lambda: CLOCK.now_ms() + MS_AHEAD)
    async with down_sink(port, P) as (sink, _link):
        box = Outbox(sink, spooled, commit_window=0.01, prepare=prepare.prepare)
        await box.start()
        try:
            now = CLOCK.now_ms()
            anchor = CLOCK.anchor(now)
            assert anchor is not None
            box.put(Message("d/telemetry", telemetry(now, a=1, b=2), ts=now, anchor=anchor))
            box.put(Message("d/telemetry", telemetry(now + 10, a=1, b=3), ts=now + 10, anchor=anchor + 10))
            box.put(Message("d/status", b"online", retain=True))
            box.put(Message("e/telemetry", telemetry(123_000, x=1), ts=123_000))  # a device's own ts
            assert await box.flush(10)
            # The broker is away: nothing takes from the spool but this.
            entries = {(e.message.topic, e.sampled_ms): e.message for e in spooled.take(100)}
        finally:
            await box.stop()
    subset = entries[("d/telemetry", now + 10)]
    assert json.loads(subset.payload)["values"] == {"b": 3} and subset.anchor == anchor + 10
    [status] = [m for (topic, _), m in entries.items() if topic == "d/status"]
    assert status.ts is not None and status.anchor is not None
    assert abs(status.ts - status.anchor - CLOCK.offset_ms()) <= 1  # anchored for the ts prepare gave it
    assert entries[("e/telemetry", 123_000)].anchor is None


async def test_a_message_the_outbox_dates_is_anchored_only_while_the_clock_is_known_unsynchronised(
    broker: EmbeddedBroker, port: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An undated message (a status, a result) is dated by the outbox: with an anchor while the clock is known not
    synchronised, without one while it is synchronised or unknown (and then its ts stays unset, as before)."""
    spooled = MemoryBuffer()
    async with down_sink(port, P) as (sink, _link):
        box = Outbox(sink, spooled, commit_window=0.01)
        await box.start()
        try:
            for state in (False, True, None):
                monkeypatch.setattr(CLOCK, "synchronized", state)
                box.put(Message(f"r{state}/result", b"{}"))
            assert await box.flush(10)
            kept = {e.message.topic: e.message for e in spooled.take(10)}
        finally:
            await box.stop()
    unsynced = kept["rFalse/result"]
    assert unsynced.anchor is not None and unsynced.ts is not None
    assert abs(unsynced.ts - unsynced.anchor - CLOCK.offset_ms()) <= 1
    assert (kept["rTrue/result"].anchor, kept["rNone/result"].anchor) == (None, None)
