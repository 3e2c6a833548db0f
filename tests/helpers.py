"""Test helpers that build real parts: free ports, a recording paho subscriber, a gateway process, an MCP sender."""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import itertools
import json
import os
import signal
import sqlite3
import struct
import subprocess
import sys
import threading
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion

from bridge.broker import EmbeddedBroker
from bridge.broker_acl import BrokerAuth, default_access
from bridge.sink import MqttSink
from drivers.mcp.client import McpClient, McpClientError, McpNacked
from gateway.types import now_ms as now_ms  # re-exported: tests import it from here
from hil.ports import PORT_RANGE as PORT_RANGE  # re-exported: tests and benches share one port scheme
from hil.ports import free_port as free_port
from hil.scenarios import Recorder as Recorder  # re-exported: the bus tests and the HIL rig share one


@dataclass
class Received:
    """One MQTT message as a subscriber saw it."""

    topic: str
    payload: bytes
    retain: bool
    at: float

    def json(self) -> object:
        """The payload parsed as JSON."""
        return json.loads(self.payload)


class Subscriber:
    """A paho client on its own thread that records every message on its subscriptions."""

    def __init__(self, port: int, topics: tuple[str, ...] = ("#",)) -> None:
        self.port = port
        self.messages: list[Received] = []
        self._lock = threading.Lock()
        self._connected = threading.Event()
        c = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=f"test-sub-{port}-{id(self)}")
        c.on_message = self._on_message
        c.on_connect = lambda cl, *_: [cl.subscribe(t, qos=1) for t in topics] and self._connected.set()
        c.on_subscribe = lambda *_: self._connected.set()
        self.client = c

    def _on_message(self, _c: mqtt.Client, _u: object, m: mqtt.MQTTMessage) -> None:
        with self._lock:
            self.messages.append(Received(m.topic, m.payload, bool(m.retain), time.monotonic()))

    def start(self) -> None:
        """Connect (retrying while the broker comes up) and subscribe."""
        deadline = time.monotonic() + 10
        while True:
            try:
                self.client.connect("127.0.0.1", self.port, keepalive=30)
                break
            except OSError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.1)
        self.client.loop_start()
        if not self._connected.wait(10):
            raise TimeoutError("subscriber did not connect")
        time.sleep(0.1)  # let the SUBACK settle

    def stop(self) -> None:
        """Disconnect."""
        self.client.disconnect()
        self.client.loop_stop()

    def on(self, topic: str) -> list[Received]:
        """Every message seen on one topic, oldest first."""
        with self._lock:
            return [m for m in self.messages if m.topic == topic]

    def clear(self) -> None:
        """Forget what was received so far."""
        with self._lock:
            self.messages.clear()

    async def wait_for(self, predicate: Callable[[list[Received]], object], timeout: float = 10.0) -> object:
        """Wait until predicate(messages) is truthy; return its value."""
        deadline = time.monotonic() + timeout
        while True:
            with self._lock:
                snapshot = list(self.messages)
            result = predicate(snapshot)
            if result:
                return result
            if time.monotonic() > deadline:
                topics = sorted({m.topic for m in snapshot})
                raise AssertionError(f"timed out after {timeout}s; topics seen: {topics}")
            await asyncio.sleep(0.05)

    async def next_on(self, topic: str, timeout: float = 10.0, after: float = 0.0) -> Received:
        """The first message on `topic` received after monotonic time `after`."""
        result = await self.wait_for(
            lambda ms: next((m for m in ms if m.topic == topic and m.at > after), None), timeout
        )
        assert isinstance(result, Received)
        return result

    def publish(self, topic: str, payload: bytes | str, *, retain: bool = False) -> None:
        """Publish with QoS 1 (as a dashboard would); does not wait, so it is safe on the broker's loop."""
        self.client.publish(topic, payload, qos=1, retain=retain)

    async def request(self, topic: str, payload: bytes | str, timeout: float = 10.0) -> Received:
        """Publish a request and return the first `<topic>/result` that follows it."""
        sent = time.monotonic()
        self.publish(topic, payload)
        return await self.next_on(f"{topic}/result", timeout, after=sent)


class TcpRelay:
    """A TCP relay client → broker that can hold the broker → client direction, delay or cut."""

    def __init__(self, target: int, *, delay: float = 0.0) -> None:
        self.port = free_port()
        self.target = target
        self.delay = delay  # added to every chunk, each direction (a slow link)
        self.downstream = asyncio.Event()  # cleared: broker → client bytes are held back
        self.downstream.set()
        self.upstream = asyncio.Event()  # cleared: client → broker bytes are held back (the client's buffers fill)
        self.upstream.set()
        self.connections = 0
        self._server: asyncio.Server | None = None
        self._writers: list[asyncio.StreamWriter] = []

    async def start(self) -> None:
        """Accept connections (again)."""
        self._server = await asyncio.start_server(self._handle, "127.0.0.1", self.port)

    async def close(self) -> None:
        """Stop accepting and reset every relayed connection (no DISCONNECT reaches the broker)."""
        if self._server is not None:
            self._server.close()
            self._server = None
        for w in self._writers:
            w.transport.abort()
        self._writers.clear()
        await asyncio.sleep(0)

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        try:
            b_reader, b_writer = await asyncio.open_connection("127.0.0.1", self.target)
        except OSError:
            writer.transport.abort()
            return
        self._writers += [writer, b_writer]

        async def pump(src: asyncio.StreamReader, dst: asyncio.StreamWriter, gate: asyncio.Event | None) -> None:
            try:
                while data := await src.read(65536):
                    if self.delay:
                        await asyncio.sleep(self.delay)
                    if gate is not None:
                        await gate.wait()
                    dst.write(data)
                    await dst.drain()
            except OSError:
                pass
            finally:
                dst.transport.abort()

        with contextlib.suppress(asyncio.CancelledError):
            await asyncio.gather(pump(reader, b_writer, self.upstream), pump(b_reader, writer, self.downstream))


@contextlib.asynccontextmanager
async def subscribed(port: int, *topics: str) -> AsyncIterator[Subscriber]:
    """A Subscriber to `topics` (default `#`), connected and stopped off the event loop (a broker may run on it)."""
    sub = Subscriber(port, topics or ("#",))
    await asyncio.to_thread(sub.start)
    try:
        yield sub
    finally:
        await asyncio.to_thread(sub.stop)


class GatewayProcess:
    """`python -m gateway ARGS` as a process of its own, its output in `log`; a context manager that stops it with
    SIGTERM (SIGKILL after `stop_timeout`) if it still runs at the end."""

    def __init__(
        self, args: list[str], log: Path, *, cwd: Path, env: dict[str, str] | None = None, stop_timeout: float = 15.0
    ) -> None:
        self.log = log
        self.stop_timeout = stop_timeout
        with log.open("ab") as out:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "gateway", *args], cwd=cwd, env=env, stdout=out, stderr=subprocess.STDOUT
            )

    def output(self) -> str:
        """What it wrote so far."""
        return self.log.read_text(errors="replace")

    async def logged(self, text: str, timeout: float = 20.0) -> None:
        """Wait until `text` appears in its output (failing at once if it exits)."""
        deadline = time.monotonic() + timeout
        while text not in self.output():
            assert self.proc.poll() is None, self.output()
            assert time.monotonic() < deadline, f"never logged {text!r}:\n" + self.output()
            await asyncio.sleep(0.05)

    def stop(self) -> int:
        """SIGTERM, then SIGKILL if it does not exit in time; its exit code (a kill raises TimeoutError)."""
        if self.proc.poll() is not None:
            return self.proc.returncode
        self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(timeout=self.stop_timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
            raise TimeoutError(f"the gateway did not stop within {self.stop_timeout:g} s") from None

    def __enter__(self) -> GatewayProcess:
        return self

    def __exit__(self, *exc: object) -> None:
        if self.proc.poll() is None:
            with contextlib.suppress(TimeoutError):
                self.stop()


def spool_rows(path: Path) -> list[tuple[str, int]]:
    """(topic, sampled_ms) of every message in a spool file, read as it lies on disk."""
    db = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
    try:
        return [(topic, ts) for topic, ts in db.execute("SELECT topic, sampled_ms FROM messages ORDER BY id")]
    finally:
        db.close()


class Sender:
    """MCP DATA frames `{"n": k}` with strictly increasing ts, at most `depth` unanswered at once.

    `depth` stays below the client's window, so frames leave in the order they were created.
    """

    def __init__(self, client: McpClient, *, interval: float = 0.02, depth: int = 8, filler: str = "") -> None:
        self.client = client
        self.interval = interval
        self.depth = depth
        self.filler = filler
        self.sent: list[int] = []  # ts, in send order
        self.acked: dict[int, int] = {}  # ts -> n
        self.nacked: dict[int, McpNacked] = {}  # ts -> the NACK
        self._tasks: set[asyncio.Task[None]] = set()
        self._runner: asyncio.Task[None] | None = None
        self._last_ts = 0

    def _next_ts(self) -> int:
        self._last_ts = max(self._last_ts + 1, now_ms())
        return self._last_ts

    async def _one(self, ts: int, n: int) -> None:
        values: dict[str, Any] = {"n": n}
        if self.filler:
            values["s"] = self.filler
        try:
            await self.client.send(values, ts=ts)
        except McpNacked as exc:
            self.nacked[ts] = exc
        except McpClientError:
            pass  # the client was stopped before an answer came: neither promised nor refused
        else:
            self.acked[ts] = n

    def _spawn(self) -> asyncio.Task[None]:
        ts = self._next_ts()
        self.sent.append(ts)
        task = asyncio.create_task(self._one(ts, len(self.sent)))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    async def send(self) -> int:
        """Send one frame and wait for its answer; its ts."""
        task = self._spawn()
        await task
        return self.sent[-1]

    async def burst(self, count: int) -> list[int]:
        """Send `count` frames back to back (up to `depth` unanswered) and wait for every answer; their ts."""
        tasks = []
        for _ in range(count):
            while len(self._tasks) >= self.depth:
                await asyncio.wait(self._tasks, return_when=asyncio.FIRST_COMPLETED)
            tasks.append(self._spawn())
        await asyncio.gather(*tasks)
        return self.sent[-count:]

    def start(self) -> None:
        """Keep sending in the background until `stop`."""

        async def run() -> None:
            while True:
                while len(self._tasks) >= self.depth:
                    await asyncio.wait(self._tasks, return_when=asyncio.FIRST_COMPLETED)
                self._spawn()
                await asyncio.sleep(self.interval)

        self._runner = asyncio.create_task(run())

    async def stop(self, timeout: float = 10.0) -> None:
        """Send no more; wait for the answers to what was sent."""
        if self._runner is not None:
            self._runner.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._runner
            self._runner = None
        if self._tasks:
            await asyncio.wait(self._tasks, timeout=timeout)

    @property
    def last_acked_n(self) -> int:
        """The value of the newest ACKed frame."""
        return self.acked[max(self.acked)]


async def until(condition: Callable[[], Any], timeout: float = 10.0, what: str = "", *, every: float = 0.01) -> Any:
    """Wait for `condition()` to be truthy and return its value; fail naming `what` after `timeout` seconds.

    `condition` may be a coroutine function (e.g. a scrape of /metrics): the coroutine it returns is awaited
    (only a coroutine: a task it returns is a value, as truthy as any). It is asked every `every` seconds.
    """
    deadline = time.monotonic() + timeout
    while True:
        result = condition()
        if inspect.iscoroutine(result):
            result = await result
        if result:
            return result
        if time.monotonic() > deadline:
            named = what or getattr(condition, "__qualname__", repr(condition))
            raise AssertionError(f"timed out after {timeout:g} s waiting for {named}")
        await asyncio.sleep(every)


def record_queued(outbox: Any) -> list[Any]:
    """From now on, every message handed to `outbox` (live or queued) is also appended to the returned list."""
    queued: list[Any] = []
    real: Callable[..., object] = outbox.put

    def record(message: Any, **kwargs: Any) -> object:
        queued.append(message)
        return real(message, **kwargs)

    outbox.put = record
    return queued


@contextlib.asynccontextmanager
async def down_sink(port: int, prefix: str) -> AsyncIterator[tuple[MqttSink, TcpRelay]]:
    """A started MqttSink named "up" whose way to the broker on `port` is cut: a relay that does not accept yet
    (`link.start()` opens it)."""
    link = TcpRelay(port)
    sink = MqttSink("up", f"mqtt://127.0.0.1:{link.port}", prefix, client_id=f"down-{time.monotonic_ns()}")
    await sink.start()
    try:
        yield sink, link
    finally:
        await sink.stop()
        await link.close()


_login_ids = itertools.count()


def _mqtt_string(text: str) -> bytes:
    raw = text.encode()
    return struct.pack(">H", len(raw)) + raw


async def mqtt_login(
    port: int, user: str | None, password: str | None, *, timeout: float = 30.0, source: str = "127.0.0.1"
) -> int | None:
    """The CONNACK return code a broker answers one MQTT 3.1.1 login with (None: it closed without one).

    Written on a bare socket, so a test can send many at once from a chosen source address and see the
    broker's own answer; each login has a fresh client id.
    """
    flags = 0x02 | (0x80 if user is not None else 0) | (0x40 if password is not None else 0)
    body = _mqtt_string("MQTT") + bytes([4, flags]) + struct.pack(">H", 30)
    body += _mqtt_string(f"login-{os.getpid()}-{next(_login_ids)}")
    for field_ in (user, password):
        body += _mqtt_string(field_) if field_ is not None else b""
    assert len(body) < 128, "one length byte"
    reader, writer = await asyncio.open_connection("127.0.0.1", port, local_addr=(source, 0))
    try:
        writer.write(bytes([0x10, len(body)]) + body)
        await writer.drain()
        try:
            return (await asyncio.wait_for(reader.readexactly(4), timeout))[3]
        except asyncio.IncompleteReadError:
            return None
    finally:
        writer.close()


@contextlib.asynccontextmanager
async def broker_with_users(users: Path) -> AsyncIterator[int]:
    """An in-process embedded broker on a free port with `users` and the default rules for prefix `fg`."""
    port = free_port()
    auth = BrokerAuth(str(users), default=default_access(["fg"]), internal_password="internal-secret-0001")
    broker = EmbeddedBroker([f"tcp://127.0.0.1:{port}"], auth=auth)
    await broker.start()
    try:
        yield port
    finally:
        await broker.stop()
