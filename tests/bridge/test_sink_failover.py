"""A sink on the nodes of one cluster (`urls`): two real Mosquitto processes, an Outbox on a real spool, paho
subscribers on each node. The sink fails over when its node dies, stays on the node that works, and the spool and
outbox (which see one sink) lose nothing across the failover."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest

import bridge.sink
from bridge.outbox import Outbox
from bridge.sink import MqttSink
from bridge.sink_reconnect import backoff
from bridge.spool import SQLiteSpool
from gateway.app import Gateway
from gateway.config import load_config
from gateway.types import Message

from configs import sink, write
from helpers import Subscriber, free_port, subscribed, until
from mcp_peer import mcp_gateway_config
from mosquitto import Mosquitto

P = "fg/cluster"
CAP = 1.0  # the test's back-off cap: the sink must be on the other node within it (plus a connect)


def msg(i: int) -> Message:
    """Message number i on `P/seq`, QoS 1."""
    return Message("seq", b"%d" % i, ts=1_000_000 + i, qos=1)


def got(sub: Subscriber) -> list[int]:
    """The message numbers the subscriber saw on `P/seq`, in arrival order."""
    return [int(m.payload) for m in sub.on(f"{P}/seq")]


@pytest.fixture
def nodes(tmp_path: Path) -> Iterator[tuple[Mosquitto, Mosquitto]]:
    """Two Mosquitto processes on free ports: the nodes of one (unclustered) cluster; stopped afterwards."""
    pair = (Mosquitto(tmp_path / "node1", free_port()), Mosquitto(tmp_path / "node2", free_port()))
    try:
        for node in pair:
            node.start()
        yield pair
    finally:
        for node in pair:
            node.stop()


@contextlib.asynccontextmanager
async def sink_with_outbox(urls: tuple[str, ...], spool: Path) -> AsyncIterator[tuple[MqttSink, Outbox]]:
    """A started MqttSink on `urls` (a short back-off) and an Outbox on a spool file in front of it."""
    sink = MqttSink(
        "cloud",
        urls[0],
        P,
        client_id=f"failover-{time.monotonic_ns()}",
        urls=urls,
        reconnect_base=0.1,
        reconnect_cap=CAP,
    )
    box = Outbox(sink, SQLiteSpool(spool, min_free_bytes=0), commit_window=0.01)
    await sink.start()
    await box.start()
    try:
        yield sink, box
    finally:
        await box.stop()
        await sink.stop()


async def on_node(sink: MqttSink, node: Mosquitto, since: float) -> float:
    """Wait until the sink is connected to `node`; the seconds since `since`."""
    await until(lambda: sink.connected and sink.stats.broker == node.url, 20, f"the sink on {node.url}")
    return time.monotonic() - since


async def test_a_sink_fails_over_to_the_next_node_and_back_and_loses_nothing(
    nodes: tuple[Mosquitto, Mosquitto], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Node 1 killed: the sink's first retry (one back-off draw, attempt 0: within the cap) is on node 2, and
    node 2's subscriber gets every message put after the kill, once each, spooled ones included; node 1 back and
    node 2 killed: the sink is back on node 1 and node 1's new subscriber gets every message put after that kill."""
    n1, n2 = nodes
    asked: list[int] = []

    def spy(attempt: int, base: float, cap: float, rand: Any) -> float:
        asked.append(attempt)
        return backoff(attempt, base, cap, rand)

    monkeypatch.setattr(bridge.sink, "backoff", spy)
    monkeypatch.setattr(bridge.sink, "STABLE_AFTER", 0.0)  # each connection here lasts a moment, and counts as up
    took: list[float] = []
    async with (
        subscribed(n1.port, f"{P}/seq") as sub1,
        subscribed(n2.port, f"{P}/seq") as sub2,
        sink_with_outbox((n1.url, n2.url), tmp_path / "spool.db") as (sink, box),
    ):
        await on_node(sink, n1, time.monotonic())
        for i in range(10):
            box.put(msg(i))
        await until(lambda: sorted(got(sub1)) == list(range(10)), 10, "messages 0-9 on node 1")
        assert got(sub2) == []  # one sink, one node at a time

        killed, asked_before = time.monotonic(), len(asked)
        n1.kill()
        for i in range(10, 30):  # while the sink finds out and moves: live, handed back or spooled, none lost
            box.put(msg(i))
            await asyncio.sleep(0.01)
        took.append(await on_node(sink, n2, killed))
        assert asked[asked_before:] == [0]  # one jittered wait of at most the base, then node 2 took it
        for i in range(30, 40):
            box.put(msg(i))
        await until(lambda: set(range(10, 40)) <= set(got(sub2)), 20, "messages 10-39 on node 2")
        assert sorted(got(sub2)) == list(range(10, 40))  # each once: node 1 was dead, nothing came through twice

        n1.start()
        async with subscribed(n1.port, f"{P}/seq") as sub1_again:
            await asyncio.sleep(0.5)  # the sink stays on node 2 while it works, node 1 back or not
            assert sink.stats.broker == n2.url and sink.connected
            killed, asked_before = time.monotonic(), len(asked)
            n2.kill()
            for i in range(40, 60):
                box.put(msg(i))
                await asyncio.sleep(0.01)
            took.append(await on_node(sink, n1, killed))
            assert asked[asked_before:] == [0]
            await until(lambda: set(range(40, 60)) <= set(got(sub1_again)), 20, "messages 40-59 on node 1")
            assert sorted(got(sub1_again)) == list(range(40, 60))
        assert await box.flush(10)
        assert box.backlog == 0
    print(f"failover: on the other node {took[0]:.2f} s and {took[1]:.2f} s after the kill")


async def test_a_gateways_json_and_sparkplug_sinks_take_urls_and_their_back_off_from_the_config(
    mosquitto: Mosquitto, tmp_path: Path
) -> None:
    """A config's `urls` (first node dead) and `reconnect_*` reach both kinds of sink: each moves on to the live
    node, says so in its stats, and publishes there (status online; the Sparkplug node's NBIRTH)."""
    dead = f"mqtt://127.0.0.1:{free_port()}"
    urls = [dead, mosquitto.url]
    back_off = {"reconnect_base": "50ms", "reconnect_cap": "200ms"}
    sinks = [
        sink("cloud", None, urls=urls, **back_off),
        sink("scada", None, urls=urls, format="sparkplug", sparkplug={"group_id": "plant"}, **back_off),
    ]
    path = write(mcp_gateway_config(free_port(), free_port(), northbound=sinks), tmp_path)
    async with subscribed(mosquitto.port, "fieldgate/m1/status", "spBv1.0/plant/NBIRTH/#") as sub:
        gw = Gateway(load_config(path))
        await gw.start()
        try:
            for s in gw.sinks:
                await until(lambda s=s: s.stats.broker == mosquitto.url and s.connected, 20, f"{s.name} on node 2")
            await sub.wait_for(lambda ms: {m.topic for m in ms} >= {"fieldgate/m1/status", "spBv1.0/plant/NBIRTH/m1"})
        finally:
            await gw.stop()
