"""The Mosquitto fixtures run a real broker: QoS 1 gets through, stop refuses, restart and TLS client certs work."""

from __future__ import annotations

import itertools
import queue
import socket
import threading
import time
from pathlib import Path

import paho.mqtt.client as mqtt
import pytest
from paho.mqtt.enums import CallbackAPIVersion
from paho.mqtt.reasoncodes import ReasonCode

from helpers import free_port
from mosquitto import Mosquitto, MosquittoError, find_mosquitto

_ids = itertools.count()


class Peer:
    """A paho client on its own network thread that records its CONNACK, its disconnect and its messages."""

    def __init__(self, broker: Mosquitto, *, client_cert: bool = True) -> None:
        self.broker = broker
        self.accepted = threading.Event()
        self.gone = threading.Event()
        self.messages: queue.Queue[mqtt.MQTTMessage] = queue.Queue()
        self.subscribed = threading.Event()
        # No reconnecting: a probe reports the drop, and paho's reconnect wait (1 s steps) would stall close().
        c = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=f"fixture-test-{next(_ids)}", reconnect_on_failure=False)
        if broker.tls is not None:
            c.tls_set_context(broker.tls.client_context(with_cert=client_cert))
        c.on_connect = self._on_connect
        c.on_disconnect = lambda *_: self.gone.set()
        c.on_message = lambda _c, _u, m: self.messages.put(m)
        c.on_subscribe = lambda *_: self.subscribed.set()
        self.client = c

    def _on_connect(self, _c: mqtt.Client, _u: object, _f: object, rc: ReasonCode, _p: object) -> None:
        if not rc.is_failure:
            self.accepted.set()
        else:
            self.gone.set()

    def connect(self, timeout: float = 1.5) -> bool:
        """True once the broker accepted the session; False if it refused or dropped it first (raises if TCP fails)."""
        try:
            self.client.connect("127.0.0.1", self.broker.port, keepalive=10)
        except ConnectionRefusedError:
            raise
        except OSError:  # TLS handshake refused
            return False
        self.client.loop_start()
        deadline = time.monotonic() + timeout
        while not (self.accepted.is_set() or self.gone.is_set()) and time.monotonic() < deadline:
            time.sleep(0.01)
        return self.accepted.is_set()

    def subscribe(self, topic: str) -> None:
        """Subscribe with QoS 1 and wait for the SUBACK."""
        self.client.subscribe(topic, qos=1)
        assert self.subscribed.wait(1.5), "no SUBACK"

    def close(self) -> None:
        """Disconnect and stop the network thread."""
        self.client.disconnect()
        self.client.loop_stop()


def round_trip(broker: Mosquitto, topic: str = "fieldgate/test/x") -> mqtt.MQTTMessage:
    """Publish one QoS 1 message from one client to a subscribed other; return what the subscriber got."""
    sub, pub = Peer(broker), Peer(broker)
    try:
        assert sub.connect(), f"subscriber refused; log:\n{broker.log_tail()}"
        sub.subscribe(topic)
        assert pub.connect(), f"publisher refused; log:\n{broker.log_tail()}"
        info = pub.client.publish(topic, b"42", qos=1)
        info.wait_for_publish(1.5)
        assert info.is_published(), "no PUBACK"
        return sub.messages.get(timeout=1.5)
    finally:
        sub.close()
        pub.close()


def test_qos1_publish_reaches_a_subscriber(mosquitto: Mosquitto) -> None:
    """A QoS 1 message goes through the real broker and arrives with QoS 1."""
    assert mosquitto.running and mosquitto.url == f"mqtt://127.0.0.1:{mosquitto.port}"
    m = round_trip(mosquitto)
    assert (m.topic, m.payload, m.qos) == ("fieldgate/test/x", b"42", 1)


def test_stopped_broker_refuses_connections(mosquitto: Mosquitto) -> None:
    """After stop() nothing listens on the port."""
    mosquitto.stop()
    assert not mosquitto.running
    with pytest.raises(ConnectionRefusedError):
        socket.create_connection(("127.0.0.1", mosquitto.port), timeout=1).close()
    with pytest.raises(ConnectionRefusedError):
        Peer(mosquitto).connect()


def test_restart_serves_again_on_the_same_port(mosquitto: Mosquitto) -> None:
    """restart() brings the broker back on its port, and connected clients see the stop."""
    port, peer = mosquitto.port, Peer(mosquitto)
    assert peer.connect()
    mosquitto.restart()
    assert peer.gone.wait(1.5), "the client did not notice the broker going away"
    peer.close()
    assert mosquitto.running and mosquitto.port == port and mosquitto.starts == 2
    assert round_trip(mosquitto).payload == b"42"


def test_killed_broker_starts_again_on_the_same_port(mosquitto: Mosquitto) -> None:
    """kill() drops the broker like a crash; start() on the same port works at once (no TIME_WAIT trouble)."""
    peer = Peer(mosquitto)
    assert peer.connect()
    pid = mosquitto.pid
    mosquitto.kill()
    assert not mosquitto.running and mosquitto.pid is None
    assert peer.gone.wait(1.5)
    peer.close()
    mosquitto.start()
    assert mosquitto.pid not in (None, pid)
    assert round_trip(mosquitto).payload == b"42"


@pytest.mark.tls
def test_tls_client_with_certificate_gets_through(mosquitto_tls: Mosquitto) -> None:
    """A client presenting a certificate signed by the test CA connects over TLS and round-trips QoS 1."""
    assert mosquitto_tls.url == f"mqtts://127.0.0.1:{mosquitto_tls.port}"
    assert round_trip(mosquitto_tls).qos == 1


@pytest.mark.tls
def test_tls_client_without_certificate_is_refused(mosquitto_tls: Mosquitto) -> None:
    """require_certificate holds: no client certificate, no session."""
    peer = Peer(mosquitto_tls, client_cert=False)
    try:
        assert not peer.connect()
    finally:
        peer.close()
    assert mosquitto_tls.running


def test_start_failure_reports_the_log(tmp_path: Path) -> None:
    """A broker that exits on start raises with the log's tail, which says why."""
    broker = Mosquitto(tmp_path, free_port(), extra_config="no_such_option 1")
    with pytest.raises(MosquittoError, match="no_such_option"):
        broker.start()
    assert not broker.running


def test_start_refuses_a_port_that_is_taken(mosquitto: Mosquitto, tmp_path: Path) -> None:
    """A second broker on a busy port fails instead of taking the first one's listener for its own."""
    with pytest.raises(MosquittoError, match="already taken"):
        Mosquitto(tmp_path / "second", mosquitto.port).start()


def test_missing_mosquitto_says_to_run_make_test(monkeypatch: pytest.MonkeyPatch) -> None:
    """Without the executable the helper tells how to install it, so the fixtures fail instead of skipping."""
    monkeypatch.setattr("mosquitto.shutil.which", lambda *_a, **_k: None)
    with pytest.raises(MosquittoError, match="make test"):
        find_mosquitto()
