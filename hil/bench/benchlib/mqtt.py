"""Loopback MQTT for the benches: free ports, a test subscriber, the embedded broker in a process of its own,
and a Mosquitto process."""

from __future__ import annotations

import asyncio
import os
import shutil
import socket
import subprocess
import threading
import time
from collections.abc import Callable
from multiprocessing.connection import Connection
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any

from hil.mosquitto_conf import base_config
from hil.ports import free_port

from .children import serve_pipe
from .procs import quiet_logs

if TYPE_CHECKING:
    import paho.mqtt.client as mqtt

__all__ = ["Mosquitto", "broker_child", "free_port", "subscribe", "subscriber_child"]


def subscribe(port: int, topic: str, on_message: Callable[[Any, Any, Any], None], timeout: float) -> mqtt.Client:
    """A paho client (MQTT 3.1.1, QoS 1, its network loop on a thread) subscribed to `topic` on the loopback
    broker at `port`; returns once the SUBACK came (TimeoutError after `timeout` s). Stop it with
    disconnect() and loop_stop()."""
    import paho.mqtt.client as mqtt
    from paho.mqtt.enums import CallbackAPIVersion

    subscribed = threading.Event()
    c = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=f"bench-sub-{os.getpid()}", protocol=mqtt.MQTTv311)
    c.max_inflight_messages_set(100)
    c.on_connect = lambda cl, *_: cl.subscribe(topic, qos=1)
    c.on_subscribe = lambda *_: subscribed.set()
    c.on_message = on_message
    c.connect("127.0.0.1", port, keepalive=60)
    c.loop_start()
    if not subscribed.wait(timeout):
        raise TimeoutError("the bench subscriber did not subscribe")
    return c


def subscriber_child(port: int, topic: str, conn: Connection) -> None:
    """A Child target: a paho subscriber (QoS 1, its network loop on a thread) counting messages on `topic`;
    "count" answers (messages so far, time.monotonic())."""
    count = 0

    def on_message(_c: Any, _u: Any, _m: Any) -> None:
        nonlocal count
        count += 1

    c = subscribe(port, topic, on_message, timeout=20)
    conn.send(("ok", os.getpid()))
    while True:
        cmd, _ = conn.recv()
        if cmd == "count":
            conn.send(("ok", (count, time.monotonic())))
        elif cmd == "stop":
            c.disconnect()
            c.loop_stop()
            conn.send(("ok", None))
            return


def broker_child(listeners: list[str], conn: Connection) -> None:
    """A Child target: bridge/broker.py's EmbeddedBroker on its own event loop, as the gateway starts it."""
    from bridge.broker import EmbeddedBroker

    quiet_logs()  # after the import, which resets amqtt's level

    async def serve() -> None:
        broker = EmbeddedBroker(listeners)
        await broker.start()
        conn.send(("ok", os.getpid()))
        await serve_pipe(conn, {})
        await broker.stop()

    asyncio.run(serve())
    conn.send(("ok", None))


class Mosquitto:
    """A Mosquitto process on 127.0.0.1:`port`, anonymous, without persistence or queue limits, its config and
    log in `workdir` (the settings the tests' broker has)."""

    def __init__(self, workdir: Path, port: int) -> None:
        found = shutil.which("mosquitto") or shutil.which("mosquitto", path="/usr/sbin:/usr/local/sbin")
        if found is None:
            raise RuntimeError("mosquitto is not installed: run `make test` once (it installs Debian's package)")
        self.executable = found
        self.workdir, self.port = workdir, port
        self.log = workdir / "mosquitto.log"
        self._proc: subprocess.Popen[bytes] | None = None
        self._log_file: IO[bytes] | None = None

    def _config_text(self) -> str:
        return "\n".join(base_config(self.port)) + "\n"

    @property
    def url(self) -> str:
        """The broker's address as the gateway's sink config takes it."""
        return f"mqtt://127.0.0.1:{self.port}"

    @property
    def pid(self) -> int | None:
        """The process id while running."""
        return self._proc.pid if self._proc is not None and self._proc.poll() is None else None

    def start(self, timeout: float = 5.0) -> None:
        """Spawn mosquitto and return once its port accepts connections."""
        self.workdir.mkdir(parents=True, exist_ok=True)
        config = self.workdir / "mosquitto.conf"
        config.write_text(self._config_text())
        self._log_file = self.log.open("ab")
        self._proc = subprocess.Popen(
            [self.executable, "-c", str(config)],
            stdin=subprocess.DEVNULL,
            stdout=self._log_file,
            stderr=self._log_file,
            cwd=self.workdir,
        )
        deadline = time.monotonic() + timeout
        while not self._accepts():
            if self._proc.poll() is not None or time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"mosquitto did not start on {self.port}:\n{self.log.read_text(errors='replace')}")
            time.sleep(0.01)

    def _accepts(self) -> bool:
        try:
            with socket.create_connection(("127.0.0.1", self.port), timeout=0.2):
                return True
        except OSError:
            return False

    def stop(self, timeout: float = 5.0) -> None:
        """SIGTERM and wait for the exit (SIGKILL after `timeout`)."""
        if self._proc is not None and self._proc.poll() is None:
            self._proc.terminate()
            try:
                self._proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self._proc.kill()
                self._proc.wait()
        self._proc = None
        if self._log_file is not None:
            self._log_file.close()
            self._log_file = None
