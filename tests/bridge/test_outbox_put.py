"""Outbox.put, the one way to hand a message over: its future may be awaited or ignored.

Real parts: an Outbox on a MemoryBuffer and a real MqttSink whose way to the embedded broker stays cut
(`down_sink`), so that every message goes to the buffer.
"""

from __future__ import annotations

import asyncio

import pytest

from bridge.broker import EmbeddedBroker
from bridge.buffer import BufferFull, MemoryBuffer, entry_size
from bridge.outbox import Outbox
from gateway.types import Message

from helpers import down_sink

P = "fg/put"


def msg(i: int, topic: str = "seq", *, retain: bool = False) -> Message:
    """Message number i."""
    return Message(topic, b"%d" % i, ts=1_000_000 + i, retain=retain)


async def test_a_refused_message_nobody_awaits_leaves_no_unretrieved_exception(
    broker: EmbeddedBroker, port: int
) -> None:
    async with down_sink(port, P) as (sink, _link):
        box = Outbox(sink, MemoryBuffer(max_size=entry_size(msg(0)), when_full="reject"))
        await box.start()
        try:
            await asyncio.wait_for(box.put(msg(0), awaited=True), 5)  # the buffer is full now
            ignored = box.put(msg(1))  # refused with the next one; nobody looks at its future
            awaited = box.put(msg(2), awaited=True)
            with pytest.raises(BufferFull):
                await asyncio.wait_for(awaited, 5)  # who awaits still gets the failure
            assert ignored.done() and box.stats.refused == 2
            # The flag asyncio reads when the future is collected: set, it logs "exception was never retrieved".
            assert ignored._log_traceback is False
        finally:
            await box.stop()


async def test_a_retained_state_replaced_before_it_went_out_resolves_its_future(
    broker: EmbeddedBroker, port: int
) -> None:
    buffer = MemoryBuffer()
    async with down_sink(port, P) as (sink, _link):
        box = Outbox(sink, buffer)
        await box.start()
        try:
            older = box.put(msg(1, "value", retain=True))
            newer = box.put(msg(2, "value", retain=True))  # before the commit: the older state is not stored
            await asyncio.wait_for(asyncio.gather(older, newer), 5)
            assert box.stats.coalesced == 1 and buffer.stats().count == 1
        finally:
            await box.stop()
