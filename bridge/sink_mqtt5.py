"""What a sink does differently when it speaks MQTT 5 (`protocol: 5`): its properties, and what the broker says back.

- CONNECT: a session expiry, and no clean start, so that the set/cmd subscriptions (and requests sent meanwhile)
  survive a short reconnect.
- PUBLISH: the sample time as the user property `ts`; a non-retained message with a sample time gets a message
  expiry of what is left of the spool's `max_age` (a subscriber away for longer does not get data older than the
  gateway itself would keep).
- A request: see `sink_requests5` (its age, its answer on its response topic, a redelivery).
- What the broker says in its CONNACK: Receive Maximum bounds the publishes in flight, Maximum Packet Size the
  messages sent (a larger one is refused here, not sent to be dropped with the connection); CONNECT says ours.
- Reason codes of refusals (CONNACK, PUBACK, SUBACK, DISCONNECT) are logged and counted per packet and reason.
"""

from __future__ import annotations

import logging
from typing import Any

import paho.mqtt.client as mqtt
from paho.mqtt import properties as paho_props
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from gateway.types import Message

log = logging.getLogger("bridge.sink")

#: MQTT 5 carries at most this as a message expiry (a four-byte integer of seconds).
MAX_INTERVAL = 0xFFFFFFFF
#: Distinct (packet, reason) pairs counted per sink: a broker cannot grow the table without bound.
MAX_REASONS = 64


#: The largest packet an MQTT 5 sink takes from its broker (CONNECT's Maximum Packet Size; a broker drops larger
#: ones): requests are small, and paho parses a packet's properties in time quadratic in their count, on the event
#: loop (30,000 user properties in one request held it for seconds).
MAX_PACKET_IN = 16 * 1024
#: Reason codes of a PUBACK that say "not now" rather than "never": the message is kept and sent again later.
TRANSIENT = frozenset({0x80, 0x83, 0x97})  # unspecified error, implementation specific error, quota exceeded


def connect_properties(session_expiry: float) -> Properties:
    """CONNECT's properties: the session outlives the connection by `session_expiry` seconds; packets we take."""
    props = _properties(PacketTypes.CONNECT)
    props.SessionExpiryInterval = min(MAX_INTERVAL, int(session_expiry))
    props.MaximumPacketSize = MAX_PACKET_IN
    return props


def connack_limits(props: Any) -> tuple[int | None, int | None]:
    """What a CONNACK's properties bound: (Receive Maximum, Maximum Packet Size), None where it says nothing."""
    receive = getattr(props, "ReceiveMaximum", None) if props is not None else None
    packet = getattr(props, "MaximumPacketSize", None) if props is not None else None
    return (receive if isinstance(receive, int) else None), (packet if isinstance(packet, int) else None)


def _properties(packet: int) -> Properties:
    """An empty property set of one packet type (paho's constructor is untyped)."""
    return Properties(packet)  # type: ignore[no-untyped-call]


class _Packed(Properties):
    """PUBLISH properties packed when made, by paho's own field encoders: paho's generic Properties builds its
    name tables per instance and looks every property up when packing, which cost more than the publish itself."""

    def __init__(self, packed: bytes) -> None:  # noqa: D107  (no super().__init__: the point is not to build tables)
        object.__setattr__(self, "packetType", PacketTypes.PUBLISH)
        object.__setattr__(self, "packed", packed)

    packed: bytes

    def pack(self) -> bytes:
        """The packed properties (paho calls this when it writes the PUBLISH)."""
        return self.packed


def _varint(n: int) -> bytes:
    return paho_props.VariableByteIntegers.encode(n)  # type: ignore[no-any-return,no-untyped-call]


def _utf8(text: str) -> bytes:
    return paho_props.writeUTF(text)  # type: ignore[no-any-return,no-untyped-call]


def _int32(n: int) -> bytes:
    return paho_props.writeInt32(n)  # type: ignore[no-any-return,no-untyped-call]


_TEMPLATE = _properties(PacketTypes.PUBLISH)
_EXPIRY = _varint(_TEMPLATE.names["Message Expiry Interval"])
_USER = _varint(_TEMPLATE.names["User Property"]) + _utf8("ts")


def publish_properties(message: Message, max_age: float | None, now_ms: int) -> Properties | None:
    """PUBLISH's properties of one message: its sample `ts`, and for a non-retained one what is left of `max_age`."""
    if message.ts is None:
        return None
    packed = b""
    if max_age is not None and not message.retain:
        # A retained message is state: it stays the topic's value however old, as it does on a 3.1.1 sink. One older
        # by its ts than max_age gets none: the spool, which ages its rows on its own clock (a ts may be a device's,
        # or of a boot whose clock was not set), still had it, so the broker must not drop it at once.
        left = max_age - max(0, now_ms - message.ts) / 1000
        if left >= 1:
            packed = _EXPIRY + _int32(min(MAX_INTERVAL, int(left)))
    packed += _USER + _utf8(str(message.ts))
    return _Packed(_varint(len(packed)) + packed)


def too_large(topic: str, payload: bytes, props: Properties | None, limit: int) -> bool:
    """Whether a PUBLISH would be over the broker's Maximum Packet Size (fixed header of up to 5 bytes, the topic,
    a packet id, the properties, the payload)."""
    packed = props.pack() if props is not None else b"\0"  # type: ignore[no-untyped-call]
    size = 5 + 2 + len(topic.encode()) + 2 + len(packed) + len(payload)
    return size > limit


def response_properties(correlation: bytes | None) -> Properties | None:
    """PUBLISH's properties of an answer on a response topic: the request's correlation data, if it gave any."""
    if correlation is None:
        return None
    props = _properties(PacketTypes.PUBLISH)
    props.CorrelationData = correlation
    return props


class Reasons:
    """The broker's refusals by packet and reason (MQTT 5 reason codes; a 3.1.1 CONNACK's return code too)."""

    def __init__(self, sink: str, counts: dict[str, int]) -> None:
        self.sink = sink
        self.counts = counts  # "PUBACK Not authorized" -> times (the sink's stats hold it)

    def refused(self, packet: str, reason: Any, about: str = "") -> None:
        """Count and log one refusal (`reason` a paho ReasonCode, or anything that says itself)."""
        key = f"{packet} {reason}"
        if key in self.counts or len(self.counts) < MAX_REASONS:
            self.counts[key] = self.counts.get(key, 0) + 1
        first = self.counts.get(key) == 1
        log.log(
            logging.ERROR if first else logging.DEBUG,
            "sink %s: the broker refused %s%s: %s (reason code %s)%s",
            self.sink,
            packet,
            f" of {about}" if about else "",
            reason,
            getattr(reason, "value", "?"),
            "" if first else " (again)",
        )


def failed(reason: Any) -> bool:
    """Whether a paho reason code (or a 3.1.1 return code) says the broker refused."""
    return bool(getattr(reason, "is_failure", False))


PROTOCOLS = {"3.1.1": mqtt.MQTTv311, "5": mqtt.MQTTv5}
