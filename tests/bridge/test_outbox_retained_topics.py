"""The outbox's retained-topic bookkeeping in memory: no broker, no spool, no sleeps.

`RetainedTopics` decides which state of a retained topic may still go out; the outbox's parts do what its
answers say. test_outbox_retained.py proves the same rules end to end through a broker and a spool.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterator

import pytest

from bridge.buffer import Entry
from bridge.delivery import Delivery
from bridge.outbox_limits import RETAINED_FALLBACKS
from bridge.outbox_retained import RetainedTopics
from gateway.types import Message

TOPIC = "plc/value"


@pytest.fixture
def loop() -> Iterator[asyncio.AbstractEventLoop]:
    """A loop to make the deliveries' futures on (never run)."""
    loop = asyncio.new_event_loop()
    yield loop
    loop.close()


def state(n: int) -> Message:
    """Retained state number n of TOPIC."""
    return Message(TOPIC, b"%d" % n, ts=n, retain=True)


def entry(entry_id: int, message: Message | None = None) -> Entry:
    """A spooled entry holding `message` (state `entry_id` of TOPIC by default)."""
    message = message or state(entry_id)
    return Entry(entry_id, message, message.ts or 0, 0.0, 10)


@pytest.mark.parametrize(
    ("awaited", "in_flight", "settled", "superseded"),
    [
        (False, False, False, True),  # waiting in the queue or for a commit: replaced
        (True, False, False, False),  # someone awaits it: it goes out all the same
        (False, True, False, False),  # the sink has it already
        (False, False, True, False),  # acknowledged, spooled or failed already
    ],
)
def test_a_newer_state_replaces_an_older_one_only_while_it_waits_unawaited(
    loop: asyncio.AbstractEventLoop, awaited: bool, in_flight: bool, settled: bool, superseded: bool
) -> None:
    topics = RetainedTopics()
    older = Delivery(state(1), 1, loop.create_future(), awaited=awaited, seq=1, since=0.0)
    older.settled = settled
    assert topics.handed_over(older, set()) is False
    newer = Delivery(state(2), 2, loop.create_future(), awaited=False, seq=2, since=0.0)
    assert topics.handed_over(newer, {older} if in_flight else set()) is superseded
    assert older.superseded is superseded and topics.newest[TOPIC] is newer


def test_a_lost_newest_state_falls_back_to_the_newest_spooled_one_held_back(loop: asyncio.AbstractEventLoop) -> None:
    topics = RetainedTopics()
    topics.learn({TOPIC: 5})  # a state stored by an earlier run
    newer = Delivery(state(6), 6, loop.create_future(), awaited=False, seq=1, since=0.0)
    topics.handed_over(newer, set())
    assert topics.hold_back(entry(5)) == []  # the replay took it while the newer one is on its way
    assert topics.lost(newer) == [5]  # refused: 5 is to be taken again
    assert topics.newest[TOPIC] == 5 and TOPIC not in topics.held_back


def test_a_lost_state_with_nothing_spooled_forgets_the_topic(loop: asyncio.AbstractEventLoop) -> None:
    topics = RetainedTopics()
    only = Delivery(state(1), 1, loop.create_future(), awaited=False, seq=1, since=0.0)
    topics.handed_over(only, set())
    assert topics.lost(only) == [] and TOPIC not in topics.newest


def test_the_held_back_states_are_bounded_and_the_oldest_goes_first() -> None:
    topics = RetainedTopics()
    let_go = [topics.hold_back(entry(i)) for i in range(1, RETAINED_FALLBACKS + 3)]
    assert let_go == [[]] * RETAINED_FALLBACKS + [[1], [2]]
    assert topics.held_back[TOPIC] == list(range(3, RETAINED_FALLBACKS + 3))


def test_a_delivered_state_removes_the_older_ones_held_back_and_keeps_the_newer() -> None:
    topics = RetainedTopics()
    topics.learn({TOPIC: 9})
    for i in (2, 4, 7, 8):
        topics.hold_back(entry(i))
    assert topics.delivered(entry(5)) == [2, 4]
    assert topics.held_back[TOPIC] == [7, 8] and topics.newest[TOPIC] == 9
    assert topics.delivered(entry(9)) == [7, 8]
    assert TOPIC not in topics.held_back and TOPIC not in topics.newest


def test_a_newest_spooled_state_given_up_falls_back_to_the_newest_held_back() -> None:
    topics = RetainedTopics()
    topics.learn({TOPIC: 9})
    for i in (3, 6):
        topics.hold_back(entry(i))
    assert topics.given_up(entry(9)) == [6]  # 6 is the newest state left: the replay takes it again
    assert topics.newest_spooled[TOPIC] == 6 and topics.newest[TOPIC] == 6 and topics.held_back[TOPIC] == [3]


def test_a_live_acknowledgement_of_the_newest_state_removes_the_spooled_ones(loop: asyncio.AbstractEventLoop) -> None:
    topics = RetainedTopics()
    topics.learn({TOPIC: 4})
    topics.hold_back(entry(2))
    newest = Delivery(state(5), 5, loop.create_future(), awaited=False, seq=1, since=0.0)
    topics.handed_over(newest, set())
    assert topics.acknowledged_live(newest) is True  # the caller removes the topic's states through last_id
    assert TOPIC not in topics.newest and TOPIC not in topics.newest_spooled and TOPIC not in topics.held_back
    again = Delivery(state(6), 6, loop.create_future(), awaited=False, seq=2, since=0.0)
    topics.handed_over(again, set())
    assert topics.acknowledged_live(again) is False  # nothing left in the spool to remove
