"""A sink's side of what comes from the broker: requests on its subscriptions, SUBACKs, answers; and its counters.

A request left retained on the broker is ignored (it would be carried out again at every subscribe); one that
cannot be read or handled costs itself only (never an exception into paho's read loop, which would leave it
unacknowledged and have the broker deliver it again and again).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable, Coroutine
from dataclasses import dataclass, field
from typing import Any

import paho.mqtt.client as mqtt

from bridge import sink_mqtt5 as v5
from bridge.sink_requests5 import Requests5
from gateway.errors import SinkError, SinkOffline
from gateway.types import Message, RequestMeta, now_ms

log = logging.getLogger("bridge.sink")

#: Called for each message received on a subscribed topic: (topic relative to the prefix, payload, its age limit,
#: age and response topic).
RequestHandler = Callable[[str, bytes, RequestMeta], None]
#: Called after every (re)connect, once `status` is online: the gateway re-publishes its retained state.
ConnectHandler = Callable[[], Coroutine[Any, Any, None]]
#: The message the broker publishes for us when the connection dies: made afresh for each connection.
WillMaker = Callable[[], Message]

#: The gateway's own last will and goodbye (topic contract: `P/status`).
OFFLINE = Message("status", b"offline", retain=True, qos=1)


@dataclass
class SinkStats:
    """Counters of one sink."""

    published: int = 0
    unacked_at_disconnect: int = 0  # handed back to the outbox when a connection dropped
    connects: int = 0
    disconnects: int = 0
    received: int = 0
    retained_requests: int = 0  # set/cmd requests found retained on the broker: ignored
    bad_requests: int = 0  # requests whose topic was not UTF-8, or whose handling failed
    takeovers: int = 0  # episodes of the broker closing each session right after connect: our client id in use
    broker: str = ""  # the url of the node the sink is on (or tries next): a string, not a counter
    broker_refusals: dict[str, int] = field(default_factory=dict)  # "PUBACK Not authorized" -> times
    duplicate_requests: int = 0  # MQTT 5: requests a resumed session delivered again after they were handed over


class Inbound:
    """The inbound half of a sink (mixed into MqttSink, which sets these attributes)."""

    name: str
    prefix: str
    qos: int
    stats: SinkStats
    _client: mqtt.Client
    _connected: asyncio.Event
    _on_request: RequestHandler | None
    _retained_ok: Callable[[str], bool] | None
    _v5: bool
    _max_request_age: float
    _reasons: v5.Reasons
    _requests5: Requests5
    _responses: dict[int, str]  # message id -> response topic of an answer in flight
    _pending: dict[int, asyncio.Future[None]]  # message id -> the future its PUBACK resolves
    _subacked: bool

    def _handle_puback(self, client: mqtt.Client, _ud: Any, mid: int, reason: Any, _props: Any) -> None:
        if client is not self._client or self._answer_acked(mid, reason):
            return
        fut = self._pending.pop(mid, None)
        if fut is None or fut.done():
            return
        if v5.failed(reason):
            # MQTT 5: acknowledged, and refused. For now (a quota): kept, and sent again later, as if unacknowledged;
            # for good (not authorized, a bad payload): the outbox's refusal path.
            self._reasons.refused("PUBACK", reason)
            transient = getattr(reason, "value", None) in v5.TRANSIENT
            error = SinkOffline if transient else SinkError
            fut.set_exception(error(f"sink {self.name}: the broker refused the message: {reason}"))
            return
        self.stats.published += 1
        fut.set_result(None)

    def _handle_suback(self, client: mqtt.Client, _ud: Any, _mid: int, reasons: Any, _props: Any) -> None:
        if client is not self._client:
            return
        self._subacked = True
        for reason in reasons:
            if v5.failed(reason):  # set/cmd requests will not reach this gateway through this broker
                self._reasons.refused("SUBACK", reason, "the set/cmd subscriptions")

    def respond(self, topic: str, correlation: bytes | None, body: bytes) -> None:
        """MQTT 5: an answer on a request's response topic (best effort: the `/result` topic is the kept one)."""
        if self._connected.is_set() and topic not in self._requests5.bad_topics:
            props = v5.response_properties(correlation)
            with contextlib.suppress(ValueError, TypeError):
                info = self._client.publish(topic, body, qos=1, properties=props)
                self._responses[info.mid] = topic  # its PUBACK says whether the broker took it

    def _answer_acked(self, mid: int, reason: Any) -> bool:
        """The PUBACK of an answer (True): a refusal is counted, and its topic not answered on again."""
        topic = self._responses.pop(mid, None)
        if topic is None:
            return False
        if v5.failed(reason):
            self._reasons.refused("PUBACK", reason, f"an answer on {topic}")
            self._requests5.refused_answer(topic)
        return True

    def _handle_message(self, client: mqtt.Client, _ud: Any, msg: mqtt.MQTTMessage) -> None:
        if client is not self._client:
            return
        self.stats.received += 1
        try:
            topic = msg.topic
        except UnicodeDecodeError:
            # paho decodes the topic on access; a broker that passed on bad UTF-8 must not reach paho's read loop.
            self.stats.bad_requests += 1
            return
        relative = topic[len(self.prefix) + 1 :] if topic.startswith(self.prefix + "/") else None
        if msg.retain and not (relative is not None and self._retained_ok and self._retained_ok(relative)):
            # A request left retained on the broker would be carried out again at every (re)subscribe.
            self.stats.retained_requests += 1
            if self.stats.retained_requests == 1:
                log.warning(
                    "sink %s: ignoring a retained request on %s (publish requests without retain)", self.name, topic
                )
            return
        if self._on_request and relative is not None:
            try:
                payload = bytes(msg.payload)
                if self._v5:
                    now = time.monotonic()
                    if self._requests5.redelivered(relative, payload, msg.properties, msg.dup, now):
                        self.stats.duplicate_requests += 1
                        return
                    meta = self._requests5.meta(msg.properties, now_ms(), now)
                else:
                    meta = RequestMeta(max_age=self._max_request_age)
                self._on_request(relative, payload, meta)
            except Exception:
                # Raised into paho's read loop, the request is never acknowledged and the broker delivers it again
                # after the reconnect, and again: one bad request must cost itself only.
                self.stats.bad_requests += 1
                log.exception("sink %s: handling a request on %s failed", self.name, topic)
