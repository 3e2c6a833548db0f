"""The embedded amqtt broker: listener settings, the gateway's own URL, real listeners, `$` topics."""

from __future__ import annotations

import asyncio
import shutil
import socket
import subprocess
import threading
import time
from pathlib import Path
from typing import Literal

import paho.mqtt.client as mqtt
import pytest
from paho.mqtt.enums import CallbackAPIVersion

from bridge.broker import EmbeddedBroker
from bridge.broker_listeners import client_url, listener_config
from bridge.sink import MqttSink
from gateway.config import parse_config
from gateway.errors import ConfigError, FieldgateError
from gateway.types import Message

from configs import sink
from configs import text as yaml_text  # `text` names the YAML of the tests above
from helpers import Subscriber, free_port


@pytest.fixture
def sub(subscriber: Subscriber) -> Subscriber:
    """conftest's subscriber to `#` on the test broker, under a short name."""
    return subscriber


def paho_publish(port: int, topics: list[str], *, transport: Literal["tcp", "websockets"] = "tcp") -> None:
    """Connect a paho client (blocking; run it off the loop), publish QoS 1 to each topic in turn, disconnect."""
    c = mqtt.Client(
        CallbackAPIVersion.VERSION2, client_id=f"pub-{transport}-{time.monotonic_ns()}", transport=transport
    )
    up = threading.Event()
    c.on_connect = lambda *_: up.set()
    c.connect("127.0.0.1", port)
    c.loop_start()
    try:
        assert up.wait(5), "paho did not connect"
        for topic in topics:
            info = c.publish(topic, topic.encode(), qos=1)
            info.wait_for_publish(5)
            assert info.is_published()
    finally:
        c.disconnect()
        c.loop_stop()


# --- listener_config / client_url ----------------------------------------------------------------


@pytest.mark.parametrize(
    ("url", "expected"),
    [
        ("tcp://127.0.0.1:1883", {"type": "tcp", "bind": "127.0.0.1:1883"}),
        ("mqtt://0.0.0.0:1883/", {"type": "tcp", "bind": "0.0.0.0:1883"}),
        ("tcp://:1883", {"type": "tcp", "bind": "0.0.0.0:1883"}),
        ("tcp://[::1]:1883", {"type": "tcp", "bind": "::1:1883"}),
        ("ws://127.0.0.1:9001", {"type": "ws", "bind": "127.0.0.1:9001"}),
        (
            "mqtts://0.0.0.0:8883",
            {"type": "tcp", "bind": "0.0.0.0:8883", "ssl": True, "certfile": "c.pem", "keyfile": "k.pem"},
        ),
        (
            "wss://0.0.0.0:9443",
            {"type": "ws", "bind": "0.0.0.0:9443", "ssl": True, "certfile": "c.pem", "keyfile": "k.pem"},
        ),
    ],
)
def test_listener_config(url: str, expected: dict[str, object]) -> None:
    assert listener_config(url, "c.pem", "k.pem") == expected


@pytest.mark.parametrize(
    "url", ["127.0.0.1:1883", "http://127.0.0.1:80", "tcp://127.0.0.1", "tcp://127.0.0.1:x", "tcp://a/b:1"]
)
def test_listener_config_rejects_what_is_not_scheme_host_port(url: str) -> None:
    with pytest.raises(FieldgateError, match="SCHEME://HOST:PORT"):
        listener_config(url)


@pytest.mark.parametrize(
    ("listeners", "expected"),
    [
        (["tcp://127.0.0.1:1883"], "mqtt://127.0.0.1:1883"),
        (
            ["ws://0.0.0.0:9001", "mqtts://0.0.0.0:8883", "tcp://10.0.0.5:1884", "tcp://127.0.0.1:1885"],
            "mqtt://10.0.0.5:1884",
        ),
        (["tcp://0.0.0.0:1883"], "mqtt://127.0.0.1:1883"),
        (["mqtt://:1883"], "mqtt://127.0.0.1:1883"),
    ],
)
def test_client_url_is_the_first_tcp_listener_reachable_locally(listeners: list[str], expected: str) -> None:
    assert client_url(listeners) == expected


def test_client_url_needs_a_tcp_listener() -> None:
    with pytest.raises(FieldgateError, match="tcp://"):
        client_url(["ws://127.0.0.1:9001", "mqtts://127.0.0.1:8883"])


# --- real listeners ----------------------------------------------------------------------------


async def test_a_ws_listener_serves_paho_over_websockets() -> None:
    tcp, ws = free_port(), free_port()
    broker = EmbeddedBroker([f"tcp://127.0.0.1:{tcp}", f"ws://127.0.0.1:{ws}"])
    await broker.start()
    try:
        s = Subscriber(tcp)
        await asyncio.to_thread(s.start)
        try:
            await asyncio.to_thread(paho_publish, ws, ["dash/ws"], transport="websockets")
            assert (await s.next_on("dash/ws", timeout=5)).payload == b"dash/ws"
        finally:
            await asyncio.to_thread(s.stop)
    finally:
        await broker.stop()


@pytest.mark.skipif(shutil.which("openssl") is None, reason="needs the openssl command to make a certificate")
async def test_an_mqtts_listener_serves_the_sink_over_tls(tmp_path: Path) -> None:
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    subprocess.run(
        [
            "openssl",
            "req",
            "-x509",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-days",
            "1",
            "-subj",
            "/CN=127.0.0.1",
            "-addext",
            "subjectAltName=IP:127.0.0.1",
            "-keyout",
            str(key),
            "-out",
            str(cert),
        ],
        check=True,
        capture_output=True,
    )
    tcp, tls = free_port(), free_port()
    broker = EmbeddedBroker([f"tcp://127.0.0.1:{tcp}", f"mqtts://127.0.0.1:{tls}"], cert=str(cert), key=str(key))
    await broker.start()
    try:
        s = Subscriber(tcp)
        await asyncio.to_thread(s.start)
        sink = MqttSink("tls", f"mqtts://127.0.0.1:{tls}", "fg/tls", client_id="tls-sink", ca=str(cert))
        await sink.start()
        try:
            assert await sink.wait_connected(5), "the sink did not get through TLS"
            await asyncio.wait_for(sink.publish(Message("v", b"1")), 5)
            assert (await s.next_on("fg/tls/v", timeout=5)).payload == b"1"
        finally:
            await sink.stop()
            await asyncio.to_thread(s.stop)
        # Plain MQTT on the TLS port does not get a session.
        plain = MqttSink("plain", f"mqtt://127.0.0.1:{tls}", "fg/plain", client_id="plain-sink")
        await plain.start()
        try:
            assert not await plain.wait_connected(1)
        finally:
            await plain.stop()
    finally:
        await broker.stop()


async def test_a_port_in_use_is_a_fieldgate_error_naming_the_listener() -> None:
    port = free_port()
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", port))
        taken.listen()
        broker = EmbeddedBroker([f"tcp://127.0.0.1:{port}"])
        with pytest.raises(FieldgateError) as caught:
            await broker.start()
    text = str(caught.value)
    assert f"tcp://127.0.0.1:{port}" in text and "in use" in text, text
    await broker.stop()  # harmless after a failed start


async def test_the_broker_can_be_stopped_and_started_again_on_the_same_port() -> None:
    port = free_port()
    for _ in range(2):
        broker = EmbeddedBroker([f"tcp://127.0.0.1:{port}"])
        await broker.start()
        try:
            s = Subscriber(port)
            await asyncio.to_thread(s.start)
            await asyncio.to_thread(paho_publish, port, ["again"])
            await s.next_on("again", timeout=5)
            await asyncio.to_thread(s.stop)
        finally:
            await broker.stop()


def _has_ipv6_loopback() -> bool:
    try:
        with socket.socket(socket.AF_INET6) as s:
            s.bind(("::1", 0))
    except OSError:
        return False
    return True


@pytest.mark.skipif(not _has_ipv6_loopback(), reason="no IPv6 loopback here")
@pytest.mark.parametrize("host", ["[::1]", "[::]"])
async def test_the_sink_reaches_an_ipv6_listener_through_client_url(host: str) -> None:
    listeners = [f"tcp://{host}:{free_port()}"]
    broker = EmbeddedBroker(listeners)
    await broker.start()
    try:
        sink = MqttSink("local", client_url(listeners), "fg/v6", client_id="v6-sink")
        await sink.start()
        try:
            assert await sink.wait_connected(3), f"{client_url(listeners)} does not reach {listeners[0]}"
        finally:
            await sink.stop()
    finally:
        await broker.stop()


async def test_a_failed_start_releases_the_listeners_it_had_bound() -> None:
    free, taken_port = free_port(), free_port()
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", taken_port))
        taken.listen()
        with pytest.raises(FieldgateError):
            await EmbeddedBroker([f"tcp://127.0.0.1:{free}", f"tcp://127.0.0.1:{taken_port}"]).start()
    retry = EmbeddedBroker([f"tcp://127.0.0.1:{free}"])
    await retry.start()  # e.g. the supervisor retrying after the other port was freed
    await retry.stop()


# --- `$` topics ----------------------------------------------------------------------------------
#
# amqtt black-holes a client that publishes under `$` (STACK-NOTES, amqtt 2): it keeps PUBACKing
# and delivers nothing more from that client. The gateway therefore never publishes under `$`:
# every sink publishes under its topic prefix, and config validation refuses a prefix starting
# with `$` as well as `$` at the start of the names that make the other topic levels.

BASE = "gateway: {id: gw1}\n"


def config_errors(text: str) -> list[str]:
    """The errors parse_config reports for `text` (empty when it is valid)."""
    try:
        parse_config(text, env={})
    except ConfigError as exc:
        return exc.errors
    return []


def prefix_of(text: str) -> str:
    """The topic prefix of the first sink of a valid config."""
    cfg = parse_config(text, env={}).config
    return cfg.prefix_for(cfg.northbound[0])


def test_the_default_prefix_does_not_start_with_dollar() -> None:
    assert prefix_of(BASE) == "fieldgate/gw1"
    assert prefix_of(BASE + "northbound: [{name: up, topic_prefix: /plant/gw1/}]") == "plant/gw1"


@pytest.mark.parametrize(
    ("text", "where"),
    [
        (BASE + 'northbound: [{name: up, topic_prefix: "$SYS/gw1"}]', "northbound[0].topic_prefix"),
        (BASE + 'northbound: [{name: up, topic_prefix: "$gw"}]', "northbound[0].topic_prefix"),
        (BASE + 'homeassistant: {enabled: true, discovery_prefix: "$ha"}', "homeassistant.discovery_prefix"),
        ('gateway: {id: "$gw1"}', "gateway.id"),
        (
            BASE + 'modbus: {buses: [{name: b, port: /dev/null, devices: [{name: "$plc", unit: 1, points: []}]}]}',
            "modbus.buses[0].devices[0].name",
        ),
    ],
)
def test_config_refuses_topics_that_would_start_with_dollar(text: str, where: str) -> None:
    errors = config_errors(text)
    assert any(where in e and "$" in e for e in errors), errors


@pytest.mark.parametrize("prefix", ["/$SYS/gw1", "//$gw"])
def test_a_leading_slash_does_not_smuggle_a_dollar_prefix_in(prefix: str) -> None:
    errors = config_errors(yaml_text({"gateway": {"id": "gw1"}, "northbound": [sink("up", topic_prefix=prefix)]}))
    assert errors, f"accepted: the sink would publish under {prefix.strip('/')!r}"


async def test_amqtt_black_holes_a_client_after_it_publishes_under_dollar(
    broker: EmbeddedBroker, port: int, sub: Subscriber
) -> None:
    """Pins the amqtt trap the validation above exists for; if this fails, amqtt fixed it."""
    await asyncio.to_thread(paho_publish, port, ["before", "$gw/x", "after"])
    await sub.next_on("before")
    await asyncio.sleep(0.5)
    assert [m.topic for m in sub.messages] == ["before"]
