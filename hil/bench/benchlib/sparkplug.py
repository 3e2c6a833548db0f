"""What sparkplug_bench.py runs in processes of their own: the gateway counting the field samples it routes, MCP
devices sending DATA at a paced rate, a subscriber weighing (and decoding) what reaches the broker, and the shipped
config's simulator outside the gateway, so that /proc's CPU of the gateway process is the gateway's alone.

All are benchlib Child targets: they answer "ok" once ready, then serve the orchestrator's commands until "stop".
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import threading
import time
import uuid
from collections import Counter
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

from drivers.mcp.codec import Decoder, Frame, FrameType, encode
from drivers.mcp.protocol import MAX_OUTSTANDING
from gateway.types import now_ms

from .children import serve_pipe
from .fleet import HEARTBEAT_S, data_values, hello_frame
from .procs import quiet_logs, raise_nofile
from .profiling import self_time_per_message

#: Where a cProfile's self time goes, by path: the parts the JSON and the Sparkplug paths differ in come first.
PROFILE_PARTS: tuple[tuple[str, str], ...] = (
    ("bridge/sparkplug/", "bridge/sparkplug"),
    ("google/protobuf", "protobuf runtime"),
    ("gateway/sparkplug_sinks", "gateway/sparkplug_sinks"),
    ("gateway/router", "router"),
    ("bridge/outbox", "outbox"),
    ("bridge/spool", "spool"),
    ("bridge/sink", "bridge/sink (MqttSink)"),
    ("/paho/", "paho"),
    ("drivers/mcp/", "MCP server/codec"),
    ("drivers/modbus/", "Modbus driver"),
    ("/pymodbus/", "pymodbus"),
    ("gateway/jsonsafe", "JSON encoding"),
    ("/json/", "JSON encoding"),
    ("/asyncio/", "asyncio"),
    ("/selectors.py", "asyncio"),
    ("/sqlite3/", "spool"),
)


# --- the gateway, counting field samples ------------------------------------------------------------------


class _ConnectTimes(logging.Handler):
    """Notes when the sink's "connected" line is logged (time.monotonic: one clock for every process here)."""

    def __init__(self) -> None:
        super().__init__(logging.INFO)
        self.times: list[float] = []

    def emit(self, record: logging.LogRecord) -> None:
        """Keep the moment of each connect."""
        if "connected to" in record.getMessage():
            self.times.append(time.monotonic())


def counted_gateway_child(config_path: str, conn: Connection) -> None:
    """The gateway as `fieldgate run` builds it from a config file, counting the samples its router is handed;
    answers "status" (its CPU, samples, values, MCP frames, publishes, queue, connects) and "profile" (cProfile)."""
    quiet_logs()
    raise_nofile()
    asyncio.run(_counted_gateway(config_path, conn))


async def _counted_gateway(config_path: str, conn: Connection) -> None:
    from gateway.app import Gateway
    from gateway.config import load_config
    from gateway.router import Router

    quiet_logs()  # again: importing bridge.broker resets amqtt's level
    connects = _ConnectTimes()
    sink_log = logging.getLogger("bridge.sink")
    sink_log.setLevel(logging.INFO)
    sink_log.propagate = False  # INFO for the handler only, not on the report
    sink_log.addHandler(connects)

    counts = Counter[str]()
    on_sample, deliver = Router.on_sample, Router.deliver

    # Wrapped at the class, before the gateway builds its router: one count per field sample, whichever path.
    def counted_on_sample(self: Router, sample: Any) -> None:
        counts["samples"] += 1
        counts["values"] += len(sample.values)
        on_sample(self, sample)

    def counted_deliver(self: Router, sample: Any) -> Any:
        counts["samples"] += 1
        counts["values"] += len(sample.values)
        return deliver(self, sample)

    Router.on_sample = counted_on_sample  # type: ignore[method-assign]
    Router.deliver = counted_deliver  # type: ignore[method-assign]

    gw = Gateway(load_config(config_path))
    await gw.start()
    if not await gw.sinks[0].wait_connected(30):
        raise RuntimeError("the gateway's sink did not connect to its broker")

    def status() -> dict[str, Any]:
        mcp = gw.mcp.totals if gw.mcp is not None else None
        return {
            "time": time.monotonic(),
            # The process's user + sys CPU to the nanosecond, every thread's (ended ones too): /proc's 10 ms ticks
            # are too coarse for the demo config's load (under 1 % of a core).
            "cpu": time.process_time(),
            "samples": counts["samples"],
            "values": counts["values"],
            "frames_in": mcp.frames_in if mcp else 0,
            "published": sum(s.stats.published for s in gw.sinks),
            "queued": sum(len(o) for o in gw.outboxes),
            "connects": list(connects.times),
            "sessions": len(gw.mcp.sessions) if gw.mcp is not None else 0,
        }

    async def on_status(_: Any) -> dict[str, Any]:
        return status()

    async def on_profile(seconds: float) -> dict[str, Any]:
        import cProfile

        before = status()
        prof = cProfile.Profile()
        prof.enable()
        await asyncio.sleep(seconds)
        prof.disable()
        after = status()
        samples = after["samples"] - before["samples"]
        return self_time_per_message(prof, samples, after["time"] - before["time"], PROFILE_PARTS, "benchlib")

    conn.send(("ok", {"pid": os.getpid(), "mcp_port": gw.mcp.port if gw.mcp is not None else None}))
    try:
        await serve_pipe(conn, {"status": on_status, "profile": on_profile})
    finally:
        with contextlib.suppress(Exception):
            async with asyncio.timeout(15):
                await gw.stop()
    conn.send(("ok", None))


# --- MCP devices at a paced rate --------------------------------------------------------------------------

TICK = 0.01  # s between the pacer's rounds


def paced_child(devices: list[tuple[str, str]], rate: float, changing: int, conn: Connection) -> None:
    """MCP devices (raw codec) that together send `rate` DATA frames/s, round robin, each never more than
    MAX_OUTSTANDING unanswered; "go" sends one frame per device at once, then the paced rate."""
    quiet_logs()
    raise_nofile()
    asyncio.run(_paced(devices, rate, changing, conn))


class _Device:
    """One connected device: its socket, next seq and unanswered frames."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader, self.writer = reader, writer
        self.seq = 2  # HELLO 1, HEARTBEAT 2
        self.outstanding: set[int] = set()

    def send(self, changing: int) -> bool:
        """One DATA frame, unless its window is full."""
        if len(self.outstanding) >= MAX_OUTSTANDING or self.writer.is_closing():
            return False
        self.seq += 1
        self.outstanding.add(self.seq)
        body = {"ts": now_ms(), "values": data_values(self.seq, changing)}
        self.writer.write(encode(Frame.json(FrameType.DATA, self.seq, body)))
        return True


async def _paced(devices: list[tuple[str, str]], rate: float, changing: int, conn: Connection) -> None:
    counts = Counter[str]()
    conns: list[_Device] = []
    tasks: list[asyncio.Task[None]] = []

    async def open_one(dev: str, token: str, port: int) -> _Device:
        reader, writer = await asyncio.wait_for(asyncio.open_connection("127.0.0.1", port), 60)
        writer.write(hello_frame(1, dev, token, boot_id=uuid.uuid4().hex, heartbeat_s=HEARTBEAT_S))
        decoder = Decoder()
        async with asyncio.timeout(60):
            events: list[Any] = []
            while not events:
                data = await reader.read(65536)
                if not data:
                    raise ConnectionError(f"{dev}: closed before the HELLO ACK")
                events = decoder.feed(data)
        if not isinstance(events[0], Frame) or events[0].type != FrameType.ACK:
            raise ConnectionError(f"{dev}: HELLO answered with {events[0]}")
        writer.write(encode(Frame(FrameType.HEARTBEAT, 2)))  # past the 10 s HELLO timeout (fleet.py says why)
        d = _Device(reader, writer)
        tasks.append(asyncio.create_task(read_answers(d, decoder)))
        return d

    async def read_answers(d: _Device, decoder: Decoder) -> None:
        with contextlib.suppress(ConnectionError, OSError):
            while data := await d.reader.read(65536):
                for ev in decoder.feed(data):
                    if isinstance(ev, Frame) and ev.seq in d.outstanding:
                        d.outstanding.discard(ev.seq)
                        counts["acked" if ev.type == FrameType.ACK else "nacked"] += 1
        counts["lost"] += 1

    async def pace() -> None:
        for d in conns:  # one frame each at once: every device has values (and, for Sparkplug, a birth)
            counts["sent"] += d.send(changing)
        if rate <= 0:
            return
        t0, due, turn = time.monotonic(), 0, 0
        while True:
            await asyncio.sleep(TICK)
            target = int((time.monotonic() - t0) * rate)
            while due < target:
                due += 1
                d = conns[turn % len(conns)]
                turn += 1
                if d.send(changing):
                    counts["sent"] += 1
                else:
                    counts["held"] += 1  # its window is full: the gateway is behind

    async def on_connect(port: int) -> dict[str, Any]:
        results = await asyncio.gather(*(open_one(d, t, port) for d, t in devices), return_exceptions=True)
        errors = [r for r in results if isinstance(r, BaseException)]
        conns.extend(r for r in results if isinstance(r, _Device))
        return {"connected": len(conns), "failed": len(errors), "first_error": repr(errors[0]) if errors else ""}

    async def on_go(_: Any) -> None:
        tasks.append(asyncio.create_task(pace()))

    async def on_count(_: Any) -> dict[str, Any]:
        return {**counts, "time": time.monotonic()}

    conn.send(("ok", os.getpid()))
    await serve_pipe(conn, {"connect": on_connect, "go": on_go, "count": on_count})
    for task in tasks:
        task.cancel()
    for d in conns:
        d.writer.close()
    conn.send(("ok", None))


# --- what reaches the broker ------------------------------------------------------------------------------


def publish_bytes(topic_len: int, payload_len: int, qos: int) -> int:
    """An MQTT 3.1.1 PUBLISH packet's size: fixed header, remaining length, topic, packet id at QoS > 0, payload."""
    remaining = 2 + topic_len + (2 if qos else 0) + payload_len
    length_bytes = 1 if remaining < 128 else 2 if remaining < 16_384 else 3 if remaining < 2_097_152 else 4
    return 1 + length_bytes + remaining


class Wire:
    """Counts of what a subscriber received, by kind (Sparkplug message type, or the JSON topic's last level)."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.msgs = Counter[str]()
        self.bytes = Counter[str]()  # topic + payload
        self.packets = Counter[str]()  # whole PUBLISH packets, at the QoS they came with
        self.metrics = Counter[str]()  # Sparkplug metrics, or JSON telemetry values
        self.historical = 0
        self.births: list[tuple[str, str, float, int]] = []  # (type, device, time.monotonic(), metrics)
        self.errors = 0

    def take(self, topic: str, payload: bytes, qos: int, at: float) -> None:
        """Weigh one message and decode it (our pb2 for Sparkplug, json for the topic contract's telemetry)."""
        parts = topic.split("/")
        if parts[0] == "spBv1.0" and len(parts) >= 4:
            kind = parts[2]
            metrics = 0
            if kind != "STATE":
                from bridge.sparkplug.sparkplug_b_pb2 import Payload

                try:
                    p = Payload.FromString(payload)
                except Exception:
                    p = None
                if p is None:
                    self.errors += 1
                else:
                    metrics = len(p.metrics)
                    hist = sum(1 for m in p.metrics if m.is_historical)
                    with self.lock:
                        self.historical += hist
            if kind in ("NBIRTH", "DBIRTH"):
                with self.lock:
                    self.births.append((kind, parts[4] if len(parts) > 4 else "", at, metrics))
        else:
            kind = parts[-1] if parts[-1] in ("telemetry", "status", "metrics") else "point"
            metrics = 1 if kind == "point" else 0
            if kind == "telemetry":
                try:
                    metrics = len(json.loads(payload)["values"])
                except (ValueError, KeyError, TypeError):
                    self.errors += 1
        with self.lock:
            self.msgs[kind] += 1
            self.bytes[kind] += len(topic.encode()) + len(payload)
            self.packets[kind] += publish_bytes(len(topic.encode()), len(payload), qos)
            self.metrics[kind] += metrics

    def snapshot(self) -> dict[str, Any]:
        """The counters now."""
        with self.lock:
            return {
                "time": time.monotonic(),
                "msgs": dict(self.msgs),
                "bytes": dict(self.bytes),
                "packets": dict(self.packets),
                "metrics": dict(self.metrics),
                "historical": self.historical,
                "births": list(self.births),
                "errors": self.errors,
            }


def wire_child(port: int, topic: str, conn: Connection) -> None:
    """A paho subscriber (QoS 1) on `topic` weighing and decoding every message; it reconnects within ~50 ms when
    the broker comes back (so that it is there before the gateway's sink). "count" answers Wire.snapshot();
    "publish" (topic, payload, qos, retain) sends a message (a host's NCMD or STATE)."""
    import paho.mqtt.client as mqtt
    from paho.mqtt.enums import CallbackAPIVersion

    wire = Wire()
    subscribed = threading.Event()
    c = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=f"bench-wire-{os.getpid()}", protocol=mqtt.MQTTv311)
    c.reconnect_delay_set(min_delay=0.05, max_delay=0.05)  # type: ignore[arg-type]
    c.on_connect = lambda cl, *_: cl.subscribe(topic, qos=1)
    c.on_subscribe = lambda *_: subscribed.set()
    c.on_message = lambda _c, _u, m: wire.take(m.topic, bytes(m.payload), m.qos, time.monotonic())
    c.connect("127.0.0.1", port, keepalive=60)
    c.loop_start()
    if not subscribed.wait(20):
        raise TimeoutError("the wire subscriber did not subscribe")
    conn.send(("ok", os.getpid()))
    while True:
        cmd, arg = conn.recv()
        if cmd == "count":
            conn.send(("ok", wire.snapshot()))
        elif cmd == "connected":
            conn.send(("ok", c.is_connected()))
        elif cmd == "publish":
            t, payload, qos, retain = arg
            c.publish(t, payload, qos=qos, retain=retain).wait_for_publish(10)
            conn.send(("ok", time.monotonic()))
        elif cmd == "stop":
            c.disconnect()
            c.loop_stop()
            conn.send(("ok", None))
            return


# --- the shipped config's simulator, outside the gateway ----------------------------------------------------


def simulator_child(config_path: str, conn: Connection) -> None:
    """The `simulator` section of a config (its virtual line, Modbus TCP endpoint and, on "mcp" with the gateway's
    MCP port, its MCP devices) as `fieldgate run` would start it, in a process of its own."""
    logging.basicConfig(level=logging.ERROR)
    asyncio.run(_simulator(config_path, conn))


async def _simulator(config_path: str, conn: Connection) -> None:
    from gateway.config import load_config
    from gateway.simulation import start_mcp_simulation, start_simulation

    quiet_logs()
    loaded = load_config(config_path)
    cfg = loaded.config
    sim = await start_simulation(cfg, Path(loaded.path).resolve().parent)

    async def on_mcp(port: int) -> None:
        await start_mcp_simulation(cfg, sim, port)

    conn.send(("ok", os.getpid()))
    try:
        await serve_pipe(conn, {"mcp": on_mcp})
    finally:
        await sim.stop()
    conn.send(("ok", None))
