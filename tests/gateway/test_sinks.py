"""Several northbound sinks: a dead one holds up neither the others nor the MCP ACKs beyond its spool commit."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

from bridge.spool import read_stats
from drivers.mcp.codec import Frame, FrameType
from gateway.app import Gateway
from gateway.config import load_config

from configs import sink, write
from helpers import Subscriber, free_port, now_ms
from mcp_peer import RawPeer, mcp_gateway_config


async def test_a_dead_sink_does_not_hold_up_the_live_one_or_the_acks(tmp_path: Path) -> None:
    mqtt, mcp, nobody = free_port(), free_port(), free_port()
    sinks = [sink("local"), sink("dead", f"mqtt://127.0.0.1:{nobody}", spool={"commit_window": "50ms"})]
    path = write(mcp_gateway_config(mqtt, mcp, max_sessions=10, northbound=sinks), tmp_path)
    gw = Gateway(load_config(path))
    await gw.start()
    sub = Subscriber(mqtt)
    await asyncio.to_thread(sub.start)
    reader, writer = await asyncio.open_connection("127.0.0.1", mcp)
    peer = RawPeer(reader, writer)
    try:
        assert (await peer.hello()).type == FrameType.ACK
        took = []
        t0 = now_ms()
        for seq in range(2, 12):
            sent = time.monotonic()
            await peer.send(Frame.json(FrameType.DATA, seq, {"ts": t0 + seq, "values": {"flow": seq}}))
            ack = await peer.recv()
            took.append(time.monotonic() - sent)
            assert (ack.type, ack.seq) == (FrameType.ACK, seq)
        # ACKed once the live sink had the PUBACK and the dead one's spool had the commit (50 ms window).
        assert max(took) < 1.0, took
        await sub.wait_for(lambda ms: len([m for m in ms if m.topic == "fieldgate/m1/pump-1/telemetry"]) >= 10)
        assert [m.json()["ts"] for m in sub.on("fieldgate/m1/pump-1/telemetry")] == [t0 + s for s in range(2, 12)]
        dead = next(o for o in gw.outboxes if o.sink.name == "dead")
        assert dead.backlog >= 10 and not dead.sink.connected
    finally:
        peer.close()
        sub.stop()
        await gw.stop()
    # What the dead sink never delivered is in its spool file for the next run.
    held = read_stats(tmp_path / "state" / "spool" / "dead.sqlite")
    assert held.count >= 10 + 1  # the telemetry and the retained values / statuses
