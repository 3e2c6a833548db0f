"""What an MQTT 5 sink knows of the requests it takes, across its connections.

- A request's age limit is its message expiry as the broker counted it down (that countdown already holds the time
  it waited at the broker), else the sink's `max_request_age` against its age: its own `ts` user property, or, for
  one that may have waited in the resumed session (it came within RESUMED_WINDOW of a CONNACK that found the
  session), at least how long the sink was away.
- An answer goes to the request's response topic only if that is not a request topic (any gateway's `…/set/…`,
  `…/cmd`, Sparkplug's), not under the sink's own prefix and not `$…`; a topic the broker refused an answer on is
  not answered on again (Mosquitto closes the connection after such a refusal).
- A request the resumed session delivers again (DUP) after it was handed over is not handed over twice: its PUBACK
  may have been lost with the connection.
"""

from __future__ import annotations

import hashlib
import logging
from collections import OrderedDict
from collections.abc import Callable
from typing import Any

from gateway.types import RequestMeta

log = logging.getLogger("bridge.sink")

#: A `ts` user property of a request is read only if it is this short (a unix ms time is 13 digits).
MAX_TS_DIGITS = 16
#: After a CONNACK that found the session, requests arriving this long (s) may be ones the session held.
RESUMED_WINDOW = 2.0
#: Requests remembered (by digest) to know a redelivery; and response topics the broker refused.
RECENT_KEPT = 1024
BAD_TOPICS_KEPT = 256
#: Topic levels of requests (the topic contract's and Sparkplug's): never a response topic.
REQUEST_LEVELS = frozenset({"set", "cmd", "NCMD", "DCMD", "STATE"})

Respond = Callable[[str, bytes | None, bytes], None]


def response_topic_ok(topic: object, prefix: str) -> bool:
    """Whether a requester's response topic may be published on: a topic of its own, not somebody's request."""
    if not isinstance(topic, str) or not topic or "+" in topic or "#" in topic or topic.startswith("$"):
        return False
    if topic == prefix or topic.startswith(prefix + "/") or topic.startswith("spBv1.0/"):
        return False
    return not REQUEST_LEVELS.intersection(topic.split("/"))


def _ts_age(props: Any, now_ms: int) -> float | None:
    """Seconds since the request's `ts` user property (ASCII digits only), None without one."""
    for key, value in getattr(props, "UserProperty", None) or ():
        if (
            key == "ts"
            and isinstance(value, str)
            and value.isascii()
            and value.isdigit()
            and len(value) <= MAX_TS_DIGITS
        ):
            return max(0.0, (now_ms - int(value)) / 1000)  # a requester's clock ahead of ours: no younger than new
    return None


class Requests5:
    """The requests an MQTT 5 sink took: their limits, answers and redeliveries."""

    def __init__(self, sink: str, prefix: str, max_request_age: float, respond: Respond) -> None:
        self.sink = sink
        self.prefix = prefix
        self.max_request_age = max_request_age
        self._respond = respond
        self.recent: OrderedDict[bytes, float] = OrderedDict()  # digest -> when handed over (monotonic)
        self.bad_topics: OrderedDict[str, None] = OrderedDict()
        self._dropped_at: float | None = None
        self._resumed_age = 0.0
        self._resumed_until = float("-inf")
        self._connected_at = 0.0

    def connected(self, session_present: bool, now: float) -> None:
        """A CONNACK: if it found the session, what it delivers first may have waited since the drop."""
        self._connected_at = now
        if session_present and self._dropped_at is not None:
            self._resumed_age, self._resumed_until = now - self._dropped_at, now + RESUMED_WINDOW
        else:
            self._resumed_age, self._resumed_until = 0.0, float("-inf")

    def dropped(self, now: float) -> None:
        """The connection ended."""
        self._dropped_at = now

    def refused_answer(self, topic: str) -> None:
        """The broker refused an answer on `topic`: not answered there again."""
        self.bad_topics[topic] = None
        while len(self.bad_topics) > BAD_TOPICS_KEPT:
            self.bad_topics.popitem(last=False)

    def redelivered(self, topic: str, payload: bytes, props: Any, dup: bool, now: float) -> bool:
        """Remember a request; True if it is one already handed over, delivered again (DUP) by the session."""
        while self.recent and now - next(iter(self.recent.values())) > self.max_request_age:
            self.recent.popitem(last=False)  # older than any request may be: a redelivery of it would be refused
        correlation = getattr(props, "CorrelationData", None) or b""
        digest = hashlib.blake2b(b"\0".join((topic.encode(), payload, bytes(correlation))), digest_size=16).digest()
        if dup and digest in self.recent:
            log.info("sink %s: a request on %s delivered again by the session: already handed over", self.sink, topic)
            return True
        self.recent[digest] = now
        self.recent.move_to_end(digest)
        while len(self.recent) > RECENT_KEPT:
            self.recent.popitem(last=False)
        return False

    def meta(self, props: Any, now_ms: int, now: float) -> RequestMeta:
        """What a request's properties say: how old it may get, how old it is, and where its answer goes too."""
        expiry = getattr(props, "MessageExpiryInterval", None) if props is not None else None
        if isinstance(expiry, int):
            # Counted down by the broker while the request waited there: its age starts now.
            max_age, age = float(expiry), 0.0
        else:
            max_age, age = self.max_request_age, _ts_age(props, now_ms) or 0.0
            if now < self._resumed_until:
                age = max(age, self._resumed_age + now - self._connected_at)
        topic = getattr(props, "ResponseTopic", None) if props is not None else None
        answer: Callable[[bytes], None] | None = None
        if response_topic_ok(topic, self.prefix) and topic not in self.bad_topics:
            correlation = getattr(props, "CorrelationData", None)
            data = bytes(correlation) if isinstance(correlation, bytes | bytearray) else None
            answer = lambda body: self._respond(str(topic), data, body)  # noqa: E731  (a closure over this request)
        return RequestMeta(max_age=max_age, age=age, respond=answer, expiry_given=isinstance(expiry, int))
