"""Load fleets: many MCP devices in one client process (raw codec senders or drivers/mcp/client.py's McpClient),
each keeping a full window of DATA frames outstanding, and a bare paho publisher of the same telemetry.

Both are Child targets (benchlib.children) and answer the same commands: "go" starts sending, "progress"
and "collect" return what was answered so far, "mark" starts counting again. The clients' "connect" opens
every device's session first.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import os
import time
import uuid
from collections.abc import Iterator, Sequence
from multiprocessing.connection import Connection
from typing import Any

from drivers.mcp.codec import Decoder, Frame, FrameType, encode
from gateway.types import now_ms

from .children import Child, serve_pipe
from .procs import quiet_logs, raise_nofile

CONNECT_CONCURRENCY = 200  # connects in progress per client process (the listen backlog is 100)
NACK_BACKOFF = 1.0  # s a device waits before using a NACKed frame's window slot again ("retries later")
HEARTBEAT_S = 3600  # in HELLO: idle sessions must survive the longest run, and devices send no periodic heartbeat


def hello_frame(seq: int, device_id: str, token: str, *, boot_id: str, heartbeat_s: int | None = None) -> bytes:
    """An encoded HELLO for a device (with `heartbeat_s` when given, else the gateway's default heartbeat)."""
    body: dict[str, Any] = {"boot_id": boot_id, "device_id": device_id, "token": token}
    if heartbeat_s is not None:
        body["heartbeat_s"] = heartbeat_s
    return encode(Frame.json(FrameType.HELLO, seq, body))


def clients_child(impl: str, devices: list[tuple[str, str]], window: int, changing: int, conn: Connection) -> None:
    """Device clients for `devices`: raw-codec senders, or McpClient with `window` senders each."""
    quiet_logs()
    raise_nofile()
    asyncio.run(_clients(impl, devices, window, changing, conn))


def data_values(seq: int, changing: int) -> dict[str, Any]:
    """A DATA body's values: `changing` of them move on every frame, one (`running`) never does."""
    flow = round(12.5 + (seq % 1000) * 0.01, 2) if changing else 12.5
    values: dict[str, Any] = {"flow_lpm": flow}
    values.update({f"flow{i}": flow for i in range(1, changing)})
    values["running"] = True
    return values


class Fleet:
    """Counters shared by every device of one client process."""

    def __init__(self) -> None:
        self.go = asyncio.Event()
        self.acked = 0
        self.nacked = 0
        self.lost = 0
        self.latencies: list[float] = []
        self.tasks: list[asyncio.Task[None]] = []
        self.writers: list[asyncio.StreamWriter] = []
        self.clients: list[Any] = []


async def _clients(impl: str, devices: list[tuple[str, str]], window: int, changing: int, conn: Connection) -> None:
    fleet = Fleet()
    loop = asyncio.get_running_loop()

    async def raw_device(dev: str, token: str, port: int) -> None:
        reader, writer = await asyncio.wait_for(asyncio.open_connection("127.0.0.1", port), 60)
        fleet.writers.append(writer)
        writer.write(hello_frame(1, dev, token, boot_id=uuid.uuid4().hex, heartbeat_s=HEARTBEAT_S))
        decoder = Decoder()
        events: list[Any] = []
        async with asyncio.timeout(60):
            while not events:
                data = await reader.read(65536)
                if not data:
                    raise ConnectionError("closed before the HELLO ACK")
                events = decoder.feed(data)
        if not isinstance(events[0], Frame) or events[0].type != FrameType.ACK:
            raise ConnectionError(f"HELLO answered with {events[0]}")
        # Until the first frame after HELLO the gateway still applies its 10 s HELLO timeout (not 3 x heartbeat_s),
        # so an idle device would be dropped 10 s after its HELLO: one HEARTBEAT now keeps idle sessions up.
        writer.write(encode(Frame(FrameType.HEARTBEAT, 2)))
        fleet.tasks.append(asyncio.create_task(raw_loop(reader, writer, decoder)))

    async def raw_loop(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, decoder: Decoder) -> None:
        await fleet.go.wait()
        sent: dict[int, float] = {}  # seq -> loop time of the write, in send order
        seq = 2  # HELLO 1, HEARTBEAT 2
        held = 0  # window slots waiting out a NACK's back-off

        def send_more() -> None:
            nonlocal seq
            out = []
            while len(sent) + held < window:
                seq += 1
                body = {"ts": now_ms(), "values": data_values(seq, changing)}
                out.append(encode(Frame.json(FrameType.DATA, seq, body)))
                sent[seq] = loop.time()
            if out and not writer.is_closing():
                writer.write(b"".join(out))

        def release() -> None:
            nonlocal held
            held -= 1
            send_more()

        send_more()
        try:
            while True:
                data = await reader.read(65536)
                if not data:
                    fleet.lost += 1
                    return
                now = loop.time()
                for ev in decoder.feed(data):
                    if not isinstance(ev, Frame):
                        continue
                    t = sent.pop(ev.seq, None)
                    if t is None:
                        continue
                    if ev.type == FrameType.ACK:
                        fleet.acked += 1
                        fleet.latencies.append(now - t)
                    else:  # NACK 8, overloaded: "the device retries later"
                        fleet.nacked += 1
                        held += 1
                        loop.call_later(NACK_BACKOFF, release)
                send_more()
                await writer.drain()
        except (ConnectionError, OSError):
            fleet.lost += 1

    async def mcp_device(dev: str, token: str, port: int) -> None:
        from drivers.mcp.client import McpClient

        # No retransmission within the bench: with thousands of frames queued an ACK may take long.
        client = McpClient(
            "127.0.0.1", port, dev, token, heartbeat_s=HEARTBEAT_S, ack_timeout=3600.0, retries=0, window=window
        )
        fleet.clients.append(client)
        await client.start()
        if not await client.wait_connected(60):
            raise ConnectionError(f"McpClient {dev}: no session: {client.last_error}")
        counter = itertools.count(1)  # one per device, so that its values move from frame to frame
        for _ in range(window):
            fleet.tasks.append(asyncio.create_task(mcp_sender(client, counter)))

    async def mcp_sender(client: Any, counter: Iterator[int]) -> None:
        from drivers.mcp.client import McpClientError

        await fleet.go.wait()
        while True:
            t = loop.time()
            try:
                await client.send(data_values(next(counter), changing), ts=now_ms())
            except McpClientError:
                fleet.nacked += 1
                if client._stopped:
                    return
                await asyncio.sleep(NACK_BACKOFF)
                continue
            fleet.acked += 1
            fleet.latencies.append(loop.time() - t)

    async def on_connect(port: int) -> dict[str, Any]:
        sem = asyncio.Semaphore(CONNECT_CONCURRENCY)
        opener = raw_device if impl == "raw" else mcp_device

        async def one(dev: str, token: str) -> None:
            async with sem:
                await opener(dev, token, port)

        t0 = time.monotonic()
        results = await asyncio.gather(*(one(d, t) for d, t in devices), return_exceptions=True)
        errors = [r for r in results if isinstance(r, BaseException)]
        return {
            "connected": len(results) - len(errors),
            "failed": len(errors),
            "first_error": repr(errors[0]) if errors else "",
            "seconds": time.monotonic() - t0,
        }

    async def on_go(_: Any) -> None:
        fleet.go.set()

    async def on_progress(_: Any) -> dict[str, Any]:
        return {"acked": fleet.acked, "nacked": fleet.nacked, "lost": fleet.lost}

    async def on_mark(_: Any) -> None:
        fleet.acked = fleet.nacked = 0
        fleet.latencies = []

    async def on_collect(_: Any) -> dict[str, Any]:
        return {"acked": fleet.acked, "nacked": fleet.nacked, "lost": fleet.lost, "latencies": fleet.latencies}

    conn.send(("ok", os.getpid()))
    await serve_pipe(
        conn,
        {"connect": on_connect, "go": on_go, "progress": on_progress, "mark": on_mark, "collect": on_collect},
    )
    for task in fleet.tasks:
        task.cancel()
    for writer in fleet.writers:
        writer.close()
    for client in fleet.clients:
        with contextlib.suppress(Exception):
            await asyncio.wait_for(client.stop(), 2)
    conn.send(("ok", None))


def publisher_child(port: int, topic: str, window: int, changing: int, conn: Connection) -> None:
    """A bare paho publisher of the telemetry the fleet's DATA frames become, on `topic`: QoS 1, `window`
    PUBLISHes in flight, its network loop in this thread."""
    import paho.mqtt.client as mqtt
    from paho.mqtt.enums import CallbackAPIVersion

    from gateway.jsonsafe import dumps_safe

    def telemetry_payload(seq: int) -> bytes:
        # What the router publishes for one DATA frame, built the same way (its encoder is dumps_safe).
        return dumps_safe({"ts": now_ms(), "values": data_values(seq, changing)})

    sent: dict[int, float] = {}
    latencies: list[float] = []
    acked = 0

    def on_publish(_c: Any, _u: Any, mid: int, _rc: Any, _p: Any) -> None:
        nonlocal acked
        t = sent.pop(mid, None)
        if t is not None:
            acked += 1
            latencies.append(time.monotonic() - t)

    c = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=f"bench-bare-{os.getpid()}", protocol=mqtt.MQTTv311)
    c.max_inflight_messages_set(window)
    c.max_queued_messages_set(0)
    c.on_publish = on_publish
    c.connect("127.0.0.1", port, keepalive=60)
    deadline = time.monotonic() + 20
    while not c.is_connected():
        c.loop(0.05)
        if time.monotonic() > deadline:
            raise TimeoutError("the bare publisher did not connect")
    conn.send(("ok", os.getpid()))
    running = False
    seq = 0
    while True:
        if conn.poll():
            cmd, _ = conn.recv()
            if cmd == "go":
                running = True
                conn.send(("ok", None))
            elif cmd == "progress":
                conn.send(("ok", {"acked": acked, "nacked": 0, "lost": 0}))
            elif cmd == "mark":
                acked, latencies = 0, []
                conn.send(("ok", None))
            elif cmd == "collect":
                conn.send(("ok", {"acked": acked, "nacked": 0, "lost": 0, "latencies": latencies}))
            elif cmd == "stop":
                c.disconnect()
                conn.send(("ok", None))
                return
        if running:
            while len(sent) < window:
                seq += 1
                info = c.publish(topic, telemetry_payload(seq), qos=1)
                sent[info.mid] = time.monotonic()
        c.loop(0.01)


def warm_up(drivers: Sequence[Child], target: int, min_s: float, max_s: float) -> tuple[float, bool]:
    """Run until `target` frames were answered since go (each device's first window: latencies are then steady);
    False when `max_s` passed first."""
    t0 = time.monotonic()
    while True:
        time.sleep(0.25)
        answered = 0
        for d in drivers:
            got = d.call("progress")
            answered += got["acked"] + got["nacked"]
        elapsed = time.monotonic() - t0
        if elapsed < min_s:
            continue
        if answered >= target:
            return elapsed, True
        if elapsed >= max_s:
            return elapsed, False
