"""The gateway's MCP server on real sockets, with the embedded broker and a subscriber."""

from __future__ import annotations

import asyncio
import itertools
import json
import time
from dataclasses import replace

import crcmod.predefined
import pytest

from drivers.mcp import server as server_module
from drivers.mcp import session as session_module
from drivers.mcp.codec import Frame, FrameType, encode

from mcp_peer import McpGateway

HELLO = bytes.fromhex(
    "55aa55aa010300000001000000527b22626f6f745f6964223a226231222c226465766963655f6964223a2270756d702d31222c"
    "226865617274626561745f73223a33302c22746f6b656e223a227333637265742d746f6b656e2d30303031227d6adc"
)
DATA = bytes.fromhex(
    "55aa55aa0102000000020000003e7b227473223a313736373232353630303030302c2276616c756573223a7b22666c6f775f6c"
    "706d223a31322e352c2272756e6e696e67223a747275657d7dcb01"
)
NACK_CRC_2 = bytes.fromhex(
    "55aa55aa010700000002000000227b22636f6465223a312c22726561736f6e223a22637263206d69736d61746368227d9e35"
)

#: docs/mcp.md §1: CRC-16/CCITT-FALSE over version .. end of payload (crcmod's name for it).
CRC_CCITT_FALSE = crcmod.predefined.mkCrcFun("crc-ccitt-false")

T0 = 1_767_225_600_000  # 2026-01-01T00:00Z: DATA ts must lie between 2000-01-01 and tomorrow


def nack(frame: Frame) -> tuple[int, str]:
    """(code, reason) of a NACK frame."""
    assert frame.type == FrameType.NACK, frame
    body = frame.body()
    return body["code"], body["reason"]


async def test_hello_data_ack_bytes_and_telemetry_with_device_ts(mcp_gateway: McpGateway, connect) -> None:  # type: ignore[no-untyped-def]
    peer = await connect()
    await peer.send(HELLO)
    ack = await peer.recv()
    assert encode(ack) == encode(Frame.json(FrameType.ACK, 1, {"heartbeat_s": 30}))
    await peer.send(DATA)
    ack = await peer.recv()
    # The ACK's bytes on their own, CRC included: the algorithm of docs/mcp.md §1 through crcmod (checked on its
    # check value), not through encode().
    header = bytes.fromhex("55aa55aa01060000000200000000")
    assert CRC_CCITT_FALSE(b"123456789") == 0x29B1
    assert encode(ack) == header + CRC_CCITT_FALSE(header[4:]).to_bytes(2, "big")
    assert ack == Frame(FrameType.ACK, 2)
    sub = mcp_gateway.sub
    tele = await sub.next_on("fieldgate/m1/pump-1/telemetry")
    assert tele.json() == {"ts": 1767225600000, "values": {"flow_lpm": 12.5, "running": True}}
    # The ACK came after the broker had it: the message is on the broker by now.
    assert (await sub.next_on("fieldgate/m1/pump-1/flow_lpm")).json() == 12.5
    status = await sub.next_on("fieldgate/m1/pump-1/status")
    assert status.payload == b"online"
    metrics = mcp_gateway.gw.metrics()["mcp"]
    assert isinstance(metrics, dict) and metrics["sessions"] == 1
    assert metrics["devices"]["pump-1"]["frames_in"] == 2 and metrics["devices"]["pump-1"]["frames_out"] == 2


@pytest.mark.parametrize(
    ("device_id", "token"),
    [("pump-1", "wrong-token-00000"), ("pump-9", "s3cret-token-0001")],
    ids=["bad token", "unknown device"],
)
async def test_failed_authentication_is_nack_7_and_close(connect, device_id: str, token: str) -> None:  # type: ignore[no-untyped-def]
    peer = await connect()
    reply = await peer.hello(device_id=device_id, token=token)
    assert nack(reply) == (7, "authentication failed")
    assert await peer.closed()


async def test_frame_before_hello_is_nack_6_and_close(connect) -> None:  # type: ignore[no-untyped-def]
    peer = await connect()
    await peer.send(DATA)
    reply = await peer.recv()
    assert reply.seq == 2 and nack(reply) == (6, "not registered")
    assert await peer.closed()


async def test_bad_crc_mid_stream_keeps_the_session(mcp_gateway: McpGateway, connect) -> None:  # type: ignore[no-untyped-def]
    peer = await connect()
    await peer.hello()
    bad = bytearray(DATA)
    bad[-1] ^= 0xFF
    good = encode(Frame.json(FrameType.DATA, 3, {"ts": T0 + 5, "values": {"x": 1}}))
    await peer.send(bytes(bad) + good)
    reply = await peer.recv()
    assert encode(reply) == NACK_CRC_2  # byte for byte the vector of docs/mcp.md §6
    assert await peer.recv() == Frame(FrameType.ACK, 3)
    tele = await mcp_gateway.sub.next_on("fieldgate/m1/pump-1/telemetry")
    assert tele.json() == {"ts": T0 + 5, "values": {"x": 1}}
    assert mcp_gateway.gw.mcp is not None and mcp_gateway.gw.mcp.totals.crc_errors == 1


async def test_oversize_length_is_nack_3_and_close(connect) -> None:  # type: ignore[no-untyped-def]
    peer = await connect()
    await peer.hello()
    header = bytes.fromhex("55aa55aa0102") + (9).to_bytes(4, "big") + (5000).to_bytes(4, "big")
    await peer.send(header)  # max_payload is 4 kB: refused as soon as the header is in
    reply = await peer.recv()
    assert reply.seq == 9 and nack(reply) == (3, "frame too large")
    assert await peer.closed()


async def test_unknown_type_and_malformed_payload_keep_the_session(connect) -> None:  # type: ignore[no-untyped-def]
    peer = await connect()
    await peer.hello()
    await peer.send(Frame(0x42, 5, b"{}"))
    assert nack(await peer.recv())[0] == 4
    await peer.send(Frame(FrameType.DATA, 6, b"{not json"))
    reply = await peer.recv()
    assert reply.seq == 6 and nack(reply)[0] == 5
    await peer.send(Frame.json(FrameType.DATA, 7, {"values": {"bad/name": 1}}))
    code, reason = nack(await peer.recv())
    assert code == 5 and "topic-safe" in reason
    await peer.send(Frame.json(FrameType.DATA, 8, {"values": {"ok": 1}}))
    assert await peer.recv() == Frame(FrameType.ACK, 8)


async def test_duplicate_seq_is_acked_and_published_once(mcp_gateway: McpGateway, connect) -> None:  # type: ignore[no-untyped-def]
    peer = await connect()
    await peer.hello()
    frame = Frame.json(FrameType.DATA, 2, {"ts": T0 + 77, "values": {"n": 1}})
    await peer.send(frame)
    await peer.send(frame)
    assert await peer.recv() == Frame(FrameType.ACK, 2)
    assert await peer.recv() == Frame(FrameType.ACK, 2)
    # After a reconnect within the same boot the window still knows seq 2.
    peer.close()
    peer2 = await connect()
    await peer2.hello(seq=3)
    await peer2.send(frame)
    assert await peer2.recv() == Frame(FrameType.ACK, 2)
    await peer2.send(Frame.json(FrameType.DATA, 4, {"ts": T0 + 78, "values": {"n": 2}}))
    assert await peer2.recv() == Frame(FrameType.ACK, 4)
    sub = mcp_gateway.sub
    await sub.wait_for(
        lambda ms: any(m.topic == "fieldgate/m1/pump-1/telemetry" and m.json()["ts"] == T0 + 78 for m in ms)
    )
    assert [m.json()["ts"] for m in sub.on("fieldgate/m1/pump-1/telemetry")] == [T0 + 77, T0 + 78]
    assert mcp_gateway.gw.mcp is not None and mcp_gateway.gw.mcp.stats_for("pump-1").duplicates == 2


async def test_new_boot_id_clears_the_window(mcp_gateway: McpGateway, connect) -> None:  # type: ignore[no-untyped-def]
    peer = await connect()
    await peer.hello()
    await peer.send(Frame.json(FrameType.DATA, 2, {"ts": T0 + 1, "values": {"n": 1}}))
    await peer.recv()
    peer.close()
    peer2 = await connect()
    await peer2.hello(boot_id="b2")
    await peer2.send(Frame.json(FrameType.DATA, 2, {"ts": T0 + 2, "values": {"n": 1}}))
    assert await peer2.recv() == Frame(FrameType.ACK, 2)
    sub = mcp_gateway.sub
    await sub.wait_for(lambda ms: len([m for m in ms if m.topic == "fieldgate/m1/pump-1/telemetry"]) == 2)


async def test_heartbeat_is_acked_and_silence_marks_offline(mcp_gateway: McpGateway, connect) -> None:  # type: ignore[no-untyped-def]
    peer = await connect()
    reply = await peer.hello(heartbeat_s=1)
    assert reply.body() == {"heartbeat_s": 1}
    await peer.send(Frame(FrameType.HEARTBEAT, 2))
    assert await peer.recv() == Frame(FrameType.ACK, 2)
    t0 = time.monotonic()
    assert await peer.closed(timeout=6)  # 3 x 1 s without a frame
    assert 2.5 < time.monotonic() - t0 < 5
    sub = mcp_gateway.sub
    await sub.wait_for(
        lambda ms: [m.payload for m in ms if m.topic == "fieldgate/m1/pump-1/status"][-1:] == [b"offline"]
    )


async def test_a_stalled_frame_closes_the_session(connect, monkeypatch: pytest.MonkeyPatch) -> None:  # type: ignore[no-untyped-def]
    monkeypatch.setattr(session_module, "STALL_TIMEOUT", 0.5)
    peer = await connect()
    await peer.hello()
    await peer.send(DATA[:20])
    assert await peer.closed(timeout=3)


async def test_no_hello_in_time_closes(mcp_gateway: McpGateway, connect) -> None:  # type: ignore[no-untyped-def]
    assert mcp_gateway.gw.mcp is not None
    mcp_gateway.gw.mcp.cfg = replace(mcp_gateway.gw.mcp.cfg, hello_timeout=0.5)
    peer = await connect()
    assert await peer.closed(timeout=3)


async def test_a_new_session_replaces_the_old_one(mcp_gateway: McpGateway, connect) -> None:  # type: ignore[no-untyped-def]
    first = await connect()
    await first.hello()
    second = await connect()
    await second.hello(seq=2)
    assert await first.closed()
    await second.send(Frame.json(FrameType.DATA, 3, {"ts": T0 + 9, "values": {"n": 1}}))
    assert await second.recv() == Frame(FrameType.ACK, 3)
    await asyncio.sleep(0.2)
    statuses = [m.payload for m in mcp_gateway.sub.on("fieldgate/m1/pump-1/status")]
    assert statuses == [b"online"]  # never went offline in between


async def test_command_round_trip(mcp_gateway: McpGateway, connect) -> None:  # type: ignore[no-untyped-def]
    peer = await connect()
    await peer.hello()
    sub = mcp_gateway.sub
    sub.publish("fieldgate/m1/pump-1/cmd", json.dumps({"name": "set_speed", "args": {"rpm": 1200}, "id": "c-7"}))
    cmd = await peer.recv()
    assert cmd.type == FrameType.COMMAND and cmd.body() == {"name": "set_speed", "args": {"rpm": 1200}}
    await peer.send(Frame.json(FrameType.RESPONSE, cmd.seq, {"ok": True, "result": {"rpm": 1190}}))
    result = await sub.next_on("fieldgate/m1/pump-1/cmd/result")
    assert result.json() == {"id": "c-7", "ok": True, "result": {"rpm": 1190}, "error": None}


async def test_command_timeout_after_retransmission(mcp_gateway: McpGateway, connect) -> None:  # type: ignore[no-untyped-def]
    peer = await connect()
    await peer.hello()
    sub = mcp_gateway.sub
    sub.publish("fieldgate/m1/pump-1/cmd", json.dumps({"name": "reset", "id": 5}))
    first = await peer.recv()
    again = await peer.recv()  # ack_timeout 300 ms, retries 1: the same bytes once more
    assert encode(again) == encode(first)
    result = await sub.next_on("fieldgate/m1/pump-1/cmd/result")
    assert result.json() == {"id": 5, "ok": False, "result": None, "error": "timeout"}


async def test_command_for_an_offline_device_fails_at_once(mcp_gateway: McpGateway) -> None:
    r = await mcp_gateway.sub.request("fieldgate/m1/pump-2/cmd", json.dumps({"name": "x", "id": "a"}))
    assert r.json() == {"id": "a", "ok": False, "result": None, "error": "pump-2 is offline"}


async def test_the_device_client_against_the_gateway(mcp_gateway: McpGateway) -> None:
    from drivers.mcp.client import McpClient

    calls: list[tuple[str, dict]] = []  # type: ignore[type-arg]

    async def handler(name: str, args: dict) -> object:  # type: ignore[type-arg]
        calls.append((name, args))
        return {"done": name}

    client = McpClient(
        "127.0.0.1", mcp_gateway.mcp_port, "pump-2", "other-token-00002", on_command=handler, ack_timeout=2
    )
    await client.start()
    try:
        assert await client.wait_connected(5)
        # A full window of DATA in flight at once: each send returns when its ACK came back.
        await asyncio.gather(*(client.send({"n": i}, ts=T0 + i) for i in range(100)))
        sub = mcp_gateway.sub
        await sub.wait_for(lambda ms: len([m for m in ms if m.topic == "fieldgate/m1/pump-2/telemetry"]) >= 100)
        tele = [m.json() for m in sub.on("fieldgate/m1/pump-2/telemetry")]
        assert [t["ts"] for t in tele] == [T0 + i for i in range(100)]  # each once, in order
        # A frame's retained value goes out just before its telemetry; one still queued when a newer one
        # comes is replaced by it (coalesced), so the retained topic only ever moves forward and ends at 99.
        await sub.wait_for(lambda ms: any(m.topic == "fieldgate/m1/pump-2/n" and m.json() == 99 for m in ms))
        stream = [m for m in sub.messages if m.topic in ("fieldgate/m1/pump-2/n", "fieldgate/m1/pump-2/telemetry")]
        values = []
        for here, after in itertools.pairwise(stream):
            if here.topic.endswith("/n"):
                values.append(here.json())
                assert after.topic.endswith("/telemetry") and after.json()["ts"] == T0 + here.json()
        assert values == sorted(set(values)) and values[-1] == 99
        server = mcp_gateway.gw.mcp
        assert server is not None
        r = await sub.request("fieldgate/m1/pump-2/cmd", json.dumps({"name": "flush", "args": {"all": True}, "id": 1}))
        assert r.json() == {"id": 1, "ok": True, "result": {"done": "flush"}, "error": None}
        assert calls == [("flush", {"all": True})]
    finally:
        await client.stop()
    # Every place in the server-wide limit of DATA in flight was given back.
    await asyncio.sleep(0.1)
    assert server.data_slots._value == server_module.MAX_INFLIGHT_DATA


async def test_after_hello_the_heartbeat_period_governs_not_the_hello_limit(mcp_gateway: McpGateway, connect) -> None:  # type: ignore[no-untyped-def]
    # Regression: the 10 s HELLO limit stayed in force until the frame after HELLO.
    assert mcp_gateway.gw.mcp is not None
    mcp_gateway.gw.mcp.cfg = replace(mcp_gateway.gw.mcp.cfg, hello_timeout=0.5)
    peer = await connect()
    assert (await peer.hello(heartbeat_s=30)).type == FrameType.ACK
    assert not await peer.closed(timeout=1.2)
