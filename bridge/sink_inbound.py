"""A sink's side of what comes from the broker: requests on its subscriptions, SUBACKs, answers; and its counters.

A request left retained on the broker is ignored (it would be carried out again at every subscribe); one that
cannot be read or handled costs itself only (never an exception into paho's read loop, which would leave it
unacknowledged and have the broker deliver it again and again).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable, Coroutine
from dataclasses import dataclass, field
from typing import Any

import paho.mqtt.client as mqtt

from bridge import sink_mqtt5 as v5
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

    def _handle_suback(self, client: mqtt.Client, _ud: Any, _mid: int, reasons: Any, _props: Any) -> None:
        if client is not self._client:
            return
        for reason in reasons:
            if v5.failed(reason):  # set/cmd requests will not reach this gateway through this broker
                self._reasons.refused("SUBACK", reason, "the set/cmd subscriptions")

    def respond(self, topic: str, correlation: bytes | None, body: bytes) -> None:
        """MQTT 5: an answer on a request's response topic (best effort: the `/result` topic is the kept one)."""
        if self._connected.is_set():
            props = v5.response_properties(correlation)
            with contextlib.suppress(ValueError, TypeError):
                self._client.publish(topic, body, qos=1 if self.qos else 0, properties=props)

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
                if self._v5:
                    meta = v5.request_meta(msg.properties, self._max_request_age, now_ms(), self.respond)
                else:
                    meta = RequestMeta(max_age=self._max_request_age)
                self._on_request(relative, bytes(msg.payload), meta)
            except Exception:
                # Raised into paho's read loop, the request is never acknowledged and the broker delivers it again
                # after the reconnect, and again: one bad request must cost itself only.
                self.stats.bad_requests += 1
                log.exception("sink %s: handling a request on %s failed", self.name, topic)
