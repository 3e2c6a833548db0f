"""A gateway on a real clustered broker: three RabbitMQ nodes (tests/rabbitmq.py), a `fieldgate run` process whose
sink has `urls: [node1, node2]`, a Modbus device and an MCP device publishing all along, nodes taken away under it.

The third node is not in the sink's urls: it keeps the cluster's majority (RabbitMQ's MQTT client-id tracker and
quorum queues need one) while one of the other two is away, as the README's "What the cluster must guarantee" asks
of a production cluster.

What the gateway promised is known exactly. The Modbus device (a pymodbus simulator on a pty, in this process)
answers the n-th read of its point with n, so every poll's sample is numbered and a missing one is a gap. The MCP
device (`Sender`) numbers its DATA frames and records which were ACKed. A witness is a paho QoS 1 subscriber with a
persistent session (a quorum queue) on the node the gateway fails over to, subscribed before the failover, and one on
the third node for the whole run; each must receive every sample read and every frame ACKed since it subscribed,
each once, in order per device. The one exception is the in-flight window: a message the
gateway had handed to the node that went away, whose PUBACK had not come back when the connection dropped, is sent
again on the next node and may arrive twice (the old node had passed it on before it went). So a number may come
twice only if it was among the sink's in-flight limit's worth of numbers before the node went away or made until the
gateway was on the next node, and no more of them than that limit per loss; a second delivery the broker itself marks
DUP (its own at-least-once to the subscriber) is not the gateway's.
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import json
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import cast

import paho.mqtt.client as mqtt
import pytest
from paho.mqtt.enums import CallbackAPIVersion

from bridge.sink import MqttSink
from drivers.mcp.client import McpClient
from drivers.modbus.codec import PointCodec
from drivers.sim.line import VirtualLine
from drivers.sim.modbus import ModbusSimulator, SimPoint, SimSlave
from drivers.sim.waves import Wave
from gateway.types import Value

import configs
from helpers import GatewayProcess, Received, Sender, Subscriber, free_port, until
from rabbitmq import RabbitCluster, RabbitError, RabbitNode, find_rabbitmq

ROOT = Path(__file__).resolve().parents[2]
GATEWAY_ID = "rc"
P = f"fieldgate/{GATEWAY_ID}"
PUMP, PLC, METRICS = f"{P}/pump-1/telemetry", f"{P}/plc/telemetry", f"{P}/metrics"
BASE, CAP = 0.2, 1.0  # the sink's back-off: each retry waits at most CAP
# Seeing the drop, one back-off wait, a CONNECT to the next node and our 50 ms look at the log: a loaded machine
# takes seconds for what takes milliseconds here, so the margin is generous; a sink that never tries the next node
# (or waits for the dead one to come back) takes far longer.
MARGIN = 10.0
#: The in-flight window: QoS 1 messages a sink has handed to a node and not yet had PUBACKed, at most.
INFLIGHT = int(inspect.signature(MqttSink).parameters["max_inflight"].default)


class Counting:
    """A simulated point's wave whose n-th read answers n: each poll's sample carries its own number."""

    def __init__(self) -> None:
        self.reads = 0

    def at(self, t: float, seed: int = 0) -> Value:
        """The next number (the simulator asks once at start and once per read)."""
        self.reads += 1
        return self.reads


@pytest.fixture
def cluster(tmp_path: Path) -> Iterator[RabbitCluster]:
    """Three clustered RabbitMQ nodes on loopback; every process gone at the end, whatever the test did."""
    try:
        find_rabbitmq()
    except RabbitError as exc:
        pytest.skip(str(exc))  # under CI=true a skip fails (tests/conftest.py): `make test` installs it
    c = RabbitCluster(tmp_path / "rabbitmq", size=3)
    with c:
        print(f"rabbitmq: 3 nodes booted and clustered in {c.boot_seconds:.1f} s")
        yield c


@contextlib.asynccontextmanager
async def modbus_device(link: Path) -> AsyncIterator[Counting]:
    """A Modbus slave (unit 1, holding 0-1 a uint32 read counter) on a virtual serial line linked at `link`."""
    line = VirtualLine(link)
    line.start()
    wave = Counting()
    sim = ModbusSimulator(
        line.device_port,
        [SimSlave(1, [SimPoint("n", "holding", 0, PointCodec("uint32"), cast(Wave, wave))])],
        baudrate=115200,
    )
    await sim.start()
    try:
        yield wave
    finally:
        await sim.stop()
        line.close()


def write_config(tmp_path: Path, nodes: list[RabbitNode], mcp_port: int) -> Path:
    """The gateway: sink `cloud` on the nodes' urls (QoS 1, short back-off, strict order), plc polled every 50 ms."""
    plc = configs.device("plc", 1, poll="50ms", points=[configs.point("n", "holding", 0, "uint32")])
    cloud = configs.sink(
        "cloud",
        None,
        urls=[n.url for n in nodes],
        qos=1,
        reconnect_base=f"{int(BASE * 1000)}ms",
        reconnect_cap=f"{int(CAP * 1000)}ms",
        spool={"order": "strict", "commit_window": "50ms", "replay_rate": 5000},
    )
    cfg = configs.config(
        id=GATEWAY_ID,
        broker=configs.broker(enabled=False),
        northbound=[cloud],
        # A read that times out is a number the gateway never sees: on a pty an answer takes microseconds, so two
        # seconds are room for a loaded machine, not for a slow line.
        buses=[configs.line("line", str(tmp_path / "ttyA"), plc, timeout="2s")],
        mcp=configs.mcp(mcp_port, devices=[configs.mcp_device("pump-1")]),
    )
    return configs.write(cfg, tmp_path)


@contextlib.asynccontextmanager
async def mcp_device(port: int) -> AsyncIterator[Sender]:
    """MCP device pump-1 with a session up, sending numbered DATA frames in the background until the end."""
    client = McpClient("127.0.0.1", port, "pump-1", configs.TOKEN, ack_timeout=10.0, backoff_start=0.1, backoff_max=0.5)
    await client.start()
    sender = Sender(client, interval=0.005, depth=16)
    try:
        assert await client.wait_connected(20), f"no MCP session: {client.last_error}"
        sender.start()
        yield sender
    finally:
        await sender.stop(timeout=5)
        await client.stop()


class Durable(Subscriber):
    """A Subscriber with a persistent session (clean session off), as the README recommends for consumers that must
    not miss data: RabbitMQ gives its QoS 1 subscription a quorum queue, replicated on the nodes (a clean session's
    is a classic queue on one node). It records which deliveries the broker marked DUP."""

    def __init__(self, port: int, topics: tuple[str, ...]) -> None:
        self.redelivered: set[int] = set()  # which of `messages` the broker marked DUP: its own redelivery to us
        super().__init__(port, topics)
        clean: mqtt.Client = self.client  # type: ignore[has-type]  # helpers.py leaves it to inference
        self.client = mqtt.Client(
            CallbackAPIVersion.VERSION2, client_id=f"witness-{port}-{id(self)}", clean_session=False
        )
        self.client.on_message, self.client.on_connect = clean.on_message, clean.on_connect
        self.client.on_subscribe = clean.on_subscribe

    def _on_message(self, _c: mqtt.Client, _u: object, m: mqtt.MQTTMessage) -> None:
        with self._lock:
            if m.dup:
                self.redelivered.add(len(self.messages))
            self.messages.append(Received(m.topic, m.payload, bool(m.retain), time.monotonic()))

    def numbered(self, topic: str) -> list[tuple[int, float, bool]]:
        """(number, arrival, marked DUP) of each message on a device's telemetry topic, in arrival order."""
        with self._lock:
            return [
                (int(json.loads(m.payload)["values"]["n"]), m.at, i in self.redelivered)
                for i, m in enumerate(self.messages)
                if m.topic == topic
            ]


@contextlib.asynccontextmanager
async def witness(node: RabbitNode) -> AsyncIterator[Durable]:
    """A paho QoS 1 subscriber with a persistent session on `node` to the two devices' telemetry and P/metrics."""
    sub = Durable(node.mqtt_port, (PUMP, PLC, METRICS))
    await asyncio.to_thread(sub.start)
    try:
        yield sub
    finally:
        await asyncio.to_thread(sub.stop)


@dataclass
class Window:
    """What a witness must have seen: the samples and frames after `read`/`sent` (taken once the gateway's messages
    reached it) up to now."""

    name: str
    sub: Durable
    read: int  # the counter's last read at the window's start: later reads are published after it
    sent: int  # frames sent before the window's start
    dups: dict[str, list[int]] = field(default_factory=dict)  # numbers the gateway sent twice
    redelivered: dict[str, list[int]] = field(default_factory=dict)  # numbers the broker delivered us again (DUP)

    def __post_init__(self) -> None:
        WINDOWS.append(self)


#: Every witness of the test, so that a failure can say which of them had what one missed.
WINDOWS: list[Window] = []


def numbers(sub: Durable, topic: str) -> list[tuple[int, float]]:
    """(number, arrival) of each message on a device's telemetry topic, in arrival order."""
    return [(n, at) for n, at, _ in sub.numbered(topic)]


def metrics(sub: Durable) -> list[dict[str, object]]:
    """Every P/metrics body the witness received."""
    return [json.loads(m.payload) for m in sub.on(METRICS)]


def expected(w: Window, wave: Counting, sender: Sender) -> dict[str, set[int]]:
    """The numbers the gateway owes the witness now: every sample read after its subscribe time but the newest
    (whose read may still be on the line), and every frame sent after it and ACKed."""
    return {
        PLC: set(range(w.read + 1, wave.reads)),
        PUMP: {n for n in sender.acked.values() if n > w.sent},
    }


Loss = dict[str, range]  # per topic: the numbers that may have been in flight when a node went away


def loss_begins(wave: Counting, sender: Sender) -> Loss:
    """The numbers a node going away now could hold unacknowledged: at most the INFLIGHT last ones and those to come
    until the gateway is on the next node (`moved`)."""
    return {PLC: range(max(0, wave.reads - INFLIGHT), 0), PUMP: range(max(0, len(sender.sent) - INFLIGHT), 0)}


def moved(loss: Loss, wave: Counting, sender: Sender) -> Loss:
    """The loss's numbers up to now, when the gateway is on the next node: nothing made later was in flight."""
    return {PLC: range(loss[PLC].start, wave.reads + 1), PUMP: range(loss[PUMP].start, len(sender.sent) + 1)}


def failed_reads(w: Window) -> int:
    """The reads the line counts as failed (timed out, bad CRC, an error), as the newest P/metrics at `w` says."""
    bodies = metrics(w.sub)
    if not bodies:
        return 0
    line = bodies[-1]["buses"]["line"]  # type: ignore[index]
    return int(line["timeouts"]) + int(line["crc_errors"]) + int(line["errors"])


async def check(w: Window, wave: Counting, sender: Sender, losses: list[Loss]) -> None:
    """Every owed number arrives at the witness; each once unless it may have been in flight at one of `losses`
    (at most INFLIGHT per loss), or the broker marked its second delivery DUP; in order per device."""
    owed = expected(w, wave, sender)

    def missing() -> dict[str, list[int]]:
        got = {topic: {n for n, _ in numbers(w.sub, topic)} for topic in owed}
        gone = {topic: sorted(owed[topic] - got[topic]) for topic in owed if owed[topic] - got[topic]}
        if len(gone.get(PLC, ())) <= failed_reads(w):
            gone.pop(PLC, None)  # each read that failed on the line (counted there) took a number and made no sample
        return {topic: ns[:10] for topic, ns in gone.items()}

    try:
        await until(lambda: not missing(), 30, f"every owed sample and ACKed frame at the witness on {w.name}")
    except AssertionError as exc:
        gone = missing()
        elsewhere = {
            o.name: {t: [n for n, _ in numbers(o.sub, t) if n in ns] for t, ns in gone.items()} for o in WINDOWS
        }
        line = [m["buses"] for m in metrics(w.sub)][-1:]  # a read that timed out (counted there) has no sample
        raise AssertionError(
            f"{exc}; missing (the first 10 of each): {gone}; the others had: {elsewhere}; the line: {line}"
        ) from None
    start = {PLC: w.read, PUMP: w.sent}
    for topic in (PLC, PUMP):
        seen = [(n, at, dup) for n, at, dup in w.sub.numbered(topic) if n > start[topic]]
        first: dict[int, float] = {}
        order: list[int] = []
        twice: list[int] = []
        again: list[int] = []
        for n, at, dup in seen:
            if n not in first:
                first[n] = at
                order.append(n)
            elif dup:
                again.append(n)  # the broker's own at-least-once to this subscriber, not the gateway's doing
            else:
                twice.append(n)
                assert any(n in loss[topic] for loss in losses), f"{topic} {n} came twice at {w.name}, not in flight"
        assert order == sorted(order), f"{topic}: out of order at {w.name}: {order}"
        w.dups[topic], w.redelivered[topic] = twice, again
    assert sum(len(t) for t in w.dups.values()) <= INFLIGHT * len(losses), f"more than in flight: {w.dups}"


async def moved_to(gw: GatewayProcess, node: RabbitNode, connects: int, since: float) -> float:
    """Wait until the gateway logs its next connect and that it is to `node`; seconds since `since`."""
    line = f"sink cloud: connected to {node.url}"

    def connected() -> bool:
        return gw.output().count("sink cloud: connected to ") > connects

    await until(connected, CAP + MARGIN, f"the sink connected again within {CAP + MARGIN:g} s")
    took = time.monotonic() - since
    last = gw.output().rsplit("sink cloud: connected to ", 1)[1].split()[0]
    assert f"sink cloud: connected to {last}" == line, f"the sink went to {last}, not to {node.url}"
    return took


async def reported_on(sub: Durable, node: RabbitNode, after_ms: int) -> None:
    """P/metrics, taken after `after_ms`, names `node` as the sink's broker, connected."""

    def says() -> bool:
        return any(
            int(m["ts"]) > after_ms  # type: ignore[call-overload]
            and m["sinks"]["cloud"]["broker"] == node.url  # type: ignore[index]
            and m["sinks"]["cloud"]["connected"]  # type: ignore[index]
            for m in metrics(sub)
        )

    await until(says, 30, f"P/metrics naming {node.url} as the sink's broker")


async def routed(sub: Durable) -> None:
    """Wait until `sub` gets the gateway's stream. A SUBACK on a node does not mean the node the gateway publishes
    through routes to the new queue yet: a witness's window starts once messages reach it."""
    await until(lambda: numbers(sub, PLC) and numbers(sub, PUMP), 30, "the gateway's messages at a new witness")


def connects(gw: GatewayProcess) -> int:
    """How many connects the gateway has logged so far."""
    return gw.output().count("sink cloud: connected to ")


@pytest.mark.timeout(300)
async def test_a_gateway_on_a_rabbitmq_cluster_loses_nothing_when_a_node_is_stopped_or_killed(
    cluster: RabbitCluster, tmp_path: Path
) -> None:
    """Node 1 stopped under the gateway: within the back-off cap (plus a margin) it is on node 2, and node 2's
    subscriber has every sample and ACKed frame once (the in-flight window aside), in order per device. Node 1 back
    (the gateway stays on node 2), node 2 stopped: the same on node 1. Node 2 back, node 1 hung (SIGSTOP, so that
    what the gateway hands it stays unacknowledged) and killed (SIGKILL): the same on node 2, the unacknowledged
    messages included. P/metrics names the node the sink is on after each move."""
    n1, n2, n3 = cluster.nodes
    mcp_port = free_port()
    path = write_config(tmp_path, [n1, n2], mcp_port)
    took: list[float] = []
    async with modbus_device(tmp_path / "ttyA") as wave, witness(n3) as sub3, witness(n2) as sub2:
        w0 = Window("node 3, the whole run", sub3, read=wave.reads, sent=0)
        w1 = Window("node 2", sub2, read=wave.reads, sent=0)
        with GatewayProcess(["run", "-c", str(path)], tmp_path / "gateway.log", cwd=ROOT, stop_timeout=15) as gw:
            await until(lambda: connects(gw) == 1, 30, "the sink connected")
            assert f"sink cloud: connected to {n1.url}" in gw.output()  # the first of its urls
            async with mcp_device(mcp_port) as sender:
                await until(lambda: len(sender.acked) >= 50 and wave.reads >= 20, 30, "data flowing")

                # 1. node 1 stopped (gracefully) mid-stream: the gateway moves to node 2.
                before, lost, lost_ms = connects(gw), time.monotonic(), int(time.time() * 1000)
                loss1 = loss_begins(wave, sender)
                await asyncio.to_thread(n1.stop)
                took.append(await moved_to(gw, n2, before, lost))
                loss1 = moved(loss1, wave, sender)
                await until(lambda: len(sender.acked) >= 150, 30, "data flowing after the move")
                restart = asyncio.create_task(asyncio.to_thread(n1.start))
                await check(w1, wave, sender, [loss1])
                await reported_on(sub2, n2, lost_ms)
                await restart

                # 2. node 1 back: the gateway stays on node 2; node 2 stopped: it moves to node 1.
                async with witness(n1) as sub1:
                    await routed(sub1)
                    w2 = Window("node 1", sub1, read=wave.reads, sent=len(sender.sent))
                    await until(lambda: wave.reads > w2.read + 20, 30, "data flowing to node 1's witness")
                    assert connects(gw) == before + 1, "the sink left node 2 while it worked"
                    before, lost, lost_ms = connects(gw), time.monotonic(), int(time.time() * 1000)
                    loss2 = loss_begins(wave, sender)
                    await asyncio.to_thread(n2.stop)
                    took.append(await moved_to(gw, n1, before, lost))
                    loss2 = moved(loss2, wave, sender)
                    await until(lambda: wave.reads > w2.read + 60, 30, "data flowing after the move")
                    restart = asyncio.create_task(asyncio.to_thread(n2.start))
                    await check(w2, wave, sender, [loss2])
                    await reported_on(sub1, n1, lost_ms)
                    await restart

                    # 3. node 2 back; node 1 hangs, then is killed (SIGKILL: no goodbye) mid-stream: what the gateway
                    # handed it meanwhile is in flight, never PUBACKed, and must go out again on node 2.
                    async with witness(n2) as sub2b:
                        await routed(sub2b)
                        w3 = Window("node 2 (again)", sub2b, read=wave.reads, sent=len(sender.sent))
                        await until(lambda: wave.reads > w3.read + 20, 30, "data flowing to node 2's witness")
                        loss3 = loss_begins(wave, sender)
                        n1.freeze()
                        hung = wave.reads
                        await until(lambda: wave.reads > hung + 10, 30, "samples read while node 1 hangs")
                        before, lost, lost_ms = connects(gw), time.monotonic(), int(time.time() * 1000)
                        n1.kill()
                        took.append(await moved_to(gw, n2, before, lost))
                        loss3 = moved(loss3, wave, sender)
                        await until(lambda: wave.reads > w3.read + 60, 30, "data flowing after the move")
                        await check(w3, wave, sender, [loss3])
                        await check(w0, wave, sender, [loss1, loss2, loss3])
                        await reported_on(sub2b, n2, lost_ms)
            assert not sender.nacked, sender.nacked
        assert "Traceback" not in gw.output(), gw.output()[-3000:]
    dups = {w.name: {t.rsplit("/", 2)[1]: len(d) for t, d in w.dups.items()} for w in (w0, w1, w2, w3)}
    again = {w.name: {t.rsplit("/", 2)[1]: len(d) for t, d in w.redelivered.items()} for w in (w0, w1, w2, w3)}
    print(f"failover: on the next node {', '.join(f'{t:.2f}' for t in took)} s after the loss; duplicates {dups}")
    print(f"redelivered by the broker (DUP): {again}")
    for t in took:
        assert t <= CAP + MARGIN
