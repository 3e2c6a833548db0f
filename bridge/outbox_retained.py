"""What the outbox knows of each retained topic: where its newest state is, and the older states held back.

Retained topics (per-point values, device statuses) carry state, not history. A retained message waiting in the
live queue is replaced by a newer one of its topic, and a spooled one is replayed only if it is still the newest
of its topic, so a replay never sets a retained topic back. The older spooled states of a topic (up to
RETAINED_FALLBACKS) stay in the spool until a newer state is delivered: if the newest is refused, the newest older
one the broker takes is sent instead.

No I/O here: the outbox's parts ask and tell, and do what the answers say (the spool ids to remove or to offer
again).
"""

from __future__ import annotations

import bisect
from collections.abc import Collection, Sequence

from bridge import outbox_limits as limits
from bridge.buffer import Entry
from bridge.delivery import Delivery


class RetainedTopics:
    """The newest state of each retained topic, its newest spooled state, and the older ones the replay holds back."""

    def __init__(self) -> None:
        # topic -> what holds its newest retained message: a Delivery (live queue, pending) or a spool id.
        self.newest: dict[str, Delivery | int] = {}
        # topic -> the newest retained entry of it committed to the spool: what the broker is to get if a newer
        # state is refused (by the spool or the broker), so that a refusal never sets the topic back further.
        self.newest_spooled: dict[str, int] = {}
        # topic -> ids (ascending) of older retained entries the replay took and holds back while a newer state is
        # on its way: removed once a newer state is delivered, offered again if the newer one never is.
        self.held_back: dict[str, list[int]] = {}
        self.last_id = 0  # the newest spool id this outbox committed

    def learn(self, newest_in_spool: dict[str, int]) -> None:
        """Take in what the spool holds from an earlier run: the newest retained entry of each topic."""
        for topic, entry_id in newest_in_spool.items():
            self.newest.setdefault(topic, entry_id)
        self.newest_spooled.update(newest_in_spool)
        self.last_id = max(newest_in_spool.values(), default=0)

    def handed_over(self, delivery: Delivery, in_flight: Collection[Delivery]) -> bool:
        """A retained message is handed over: it is its topic's newest. True if it supersedes an older one."""
        topic = delivery.message.topic
        older = self.newest.get(topic)
        superseded = False
        if isinstance(older, Delivery) and not older.awaited and not older.settled and older not in in_flight:
            older.superseded = superseded = True
        self.newest[topic] = delivery
        return superseded

    def stored(self, deliveries: Sequence[Delivery], ids: Sequence[int]) -> None:
        """A committed add: the spool ids now hold these messages."""
        self.last_id = max(self.last_id, *ids)
        for delivery, entry_id in zip(deliveries, ids, strict=True):
            if delivery.message.retain:
                topic = delivery.message.topic
                self.newest_spooled[topic] = max(entry_id, self.newest_spooled.get(topic, 0))
                if self.newest.get(topic) is delivery:
                    self.newest[topic] = entry_id

    def acknowledged_live(self, delivery: Delivery) -> bool:
        """The broker acknowledged a live message; True if its topic's older states in the spool are to be removed."""
        topic = delivery.message.topic
        if delivery.message.retain and self.newest.get(topic) is delivery:
            del self.newest[topic]  # the broker has the newest: nothing to replay
            if topic in self.newest_spooled:
                # Older states of the topic in the spool must not come back after a restart either.
                self.newest_spooled.pop(topic, None)
                self.held_back.pop(topic, None)  # held back in the spool: the removal takes them
                return True
        return False

    def lost(self, delivery: Delivery) -> list[int]:
        """A message that will not reach the broker; the held-back ids the replay is to take again, if any."""
        if delivery.message.retain and self.newest.get(delivery.message.topic) is delivery:
            return self.fall_back(delivery.message.topic)
        return []

    def fall_back(self, topic: str) -> list[int]:
        """The topic's newest state on its way is lost: the newest stored one is to be sent instead.

        Returns the ids the replay holds back that it is to take again (that newest stored state, when held back).
        """
        newest = self.newest_spooled.get(topic)
        if newest is None:
            del self.newest[topic]
            return []
        self.newest[topic] = newest
        held = self.held_back.get(topic)
        if held and held[-1] == newest:
            held.pop()
            if not held:
                del self.held_back[topic]
            return [newest]
        return []

    def newest_of(self, e: Entry) -> Delivery | int | None:
        """What holds the newest state of a spooled entry's topic (the entry's own id if not retained)."""
        return self.newest.get(e.message.topic) if e.message.retain else e.id

    def hold_back(self, e: Entry) -> list[int]:
        """Hold back an older retained state of a topic whose newer state is on its way; the ids to remove now."""
        held = self.held_back.setdefault(e.message.topic, [])
        if e.id not in held:  # taken again after a failed step of the replay: held once
            bisect.insort(held, e.id)
        if len(held) > limits.RETAINED_FALLBACKS:
            return [held.pop(0)]  # the oldest is let go: it is needed only if every newer state is refused
        return []

    def delivered(self, e: Entry) -> list[int]:
        """A retained state the broker acknowledged from the spool: the older ones held back are to be removed."""
        topic = e.message.topic
        if self.newest.get(topic) == e.id:
            del self.newest[topic]
        held = self.held_back.get(topic, [])
        cut = bisect.bisect(held, e.id)
        older, rest = held[:cut], held[cut:]
        if rest:
            self.held_back[topic] = rest
        else:
            self.held_back.pop(topic, None)
        return older

    def given_up(self, e: Entry) -> list[int]:
        """A retained state dropped as undeliverable: the ids held back that the replay is to take again."""
        if not e.message.retain:
            return []
        topic = e.message.topic
        if self.newest_spooled.get(topic) == e.id:
            # The newest stored state is now the newest one held back (older ones were all taken before it).
            held = self.held_back.get(topic)
            if held:
                self.newest_spooled[topic] = held[-1]
            else:
                del self.newest_spooled[topic]
        if self.newest.get(topic) == e.id:
            return self.fall_back(topic)
        return []
