"""A paho MQTT 5 client for tests: a requester or subscriber that sees each message's properties."""

from __future__ import annotations

import threading
import time
from typing import Any

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties


class Client5:
    """A paho MQTT 5 client on its own thread: what it received, with each message's properties."""

    def __init__(self, port: int, *topics: str) -> None:
        self.got: list[tuple[str, bytes, Any]] = []
        self._lock = threading.Lock()
        self.c = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=f"v5-{time.monotonic_ns()}", protocol=mqtt.MQTTv5)
        self.c.on_message = self._on_message
        self.c.connect("127.0.0.1", port)
        self.c.loop_start()
        for topic in topics:
            self.c.subscribe(topic, qos=1)
        time.sleep(0.2)  # SUBACK before anything is published

    def _on_message(self, _c: Any, _ud: Any, msg: mqtt.MQTTMessage) -> None:
        with self._lock:
            self.got.append((msg.topic, bytes(msg.payload), msg.properties))

    def on(self, topic: str) -> list[tuple[bytes, Any]]:
        """What arrived on `topic`: payload and properties."""
        with self._lock:
            return [(p, props) for t, p, props in self.got if t == topic]

    def publish(self, topic: str, payload: bytes, **props: Any) -> None:
        """Publish QoS 1 with the given MQTT 5 properties (ResponseTopic=..., UserProperty=[...])."""
        properties = Properties(PacketTypes.PUBLISH)  # type: ignore[no-untyped-call]
        for key, value in props.items():
            setattr(properties, key, value)
        self.c.publish(topic, payload, qos=1, properties=properties).wait_for_publish(5)

    def stop(self) -> None:
        """Disconnect and end the thread."""
        self.c.disconnect()
        self.c.loop_stop()
