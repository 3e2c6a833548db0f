"""Hostile MCP peers against a real gateway's McpServer over real sockets: before HELLO, bans, unread output, payloads.

Limits are set on the running server's settings (`server.cfg = replace(server.cfg, X=...)`): sessions read
them when they need them, so one gateway per test serves every variant.
"""

from __future__ import annotations

import asyncio
import fcntl
import logging
import socket
import struct
import termios
import time
from collections.abc import Awaitable, Callable
from dataclasses import replace

import pytest

from drivers.mcp import server as server_module
from drivers.mcp import session as session_module
from drivers.mcp.codec import Frame, FrameType, encode
from drivers.mcp.server import McpServer

from helpers import until
from mcp_peer import McpGateway, RawPeer

T0 = 1_767_225_600_000  # 2026-01-01T00:00Z
TOKEN_1, TOKEN_2 = "s3cret-token-0001", "other-token-00002"
Connect = Callable[..., Awaitable[RawPeer]]


def mcp_of(gw: McpGateway) -> McpServer:
    assert gw.gw.mcp is not None
    return gw.gw.mcp


def bad_crc(seq: int, payload: bytes = b"") -> bytes:
    wire = bytearray(encode(Frame(FrameType.DATA, seq, payload)))
    wire[-1] ^= 0xFF
    return bytes(wire)


def nack_of(frame: Frame) -> tuple[int, str]:
    assert frame.type == FrameType.NACK, frame
    body = frame.body()
    return body["code"], body["reason"]


async def small_buffer_peer(port: int, source: str = "127.0.0.1") -> RawPeer:
    """A peer whose socket takes little before TCP pushes back, so unread output stays in the gateway's buffer."""
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.bind((source, 0))
    sock.setblocking(False)
    await asyncio.get_running_loop().sock_connect(sock, ("127.0.0.1", port))
    reader, writer = await asyncio.open_connection(sock=sock)
    return RawPeer(reader, writer)


def in_flight(peer: RawPeer, session: session_module.Session) -> int:
    """Bytes `peer` wrote that the gateway's process has not received yet (in either socket or the peer's buffer)."""
    sent = peer.writer.get_extra_info("socket").fileno()
    received = session.writer.get_extra_info("socket").fileno()
    queued = struct.unpack("i", fcntl.ioctl(sent, termios.TIOCOUTQ, b"\0" * 4))[0]
    arrived = struct.unpack("i", fcntl.ioctl(received, termios.FIONREAD, b"\0" * 4))[0]
    return int(peer.writer.transport.get_write_buffer_size()) + queued + arrived


def shrink_send_buffer(server: McpServer, peer: RawPeer) -> session_module.Session:
    """The gateway-side session of `peer`, its socket's send buffer made small."""
    local = peer.writer.get_extra_info("sockname")
    for session in server._connections:
        if session.peer == local:
            sock = session.writer.get_extra_info("socket")
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
            return session
    raise AssertionError(f"no session for {local}")


# --- before HELLO ------------------------------------------------------------------------------


async def test_the_hello_deadline_runs_from_accept_and_nacks_do_not_restart_it(
    mcp_gateway: McpGateway, connect: Connect
) -> None:
    server = mcp_of(mcp_gateway)
    server.cfg = replace(server.cfg, hello_timeout=1.0)
    server.cfg = replace(server.cfg, max_hello_errors=1000)
    peer = await connect()
    opened = time.monotonic()
    for seq in range(1, 100):
        try:
            await peer.send(bad_crc(seq))
        except ConnectionError:
            break
        if await peer.closed(0.25):
            break
    lived = time.monotonic() - opened
    # The deadline is 1.0 s from accept; a deadline each NACK moved would keep it open through all 99 bad frames
    # (~25 s at one per 0.25 s). 5 s is generous on a busy machine and still far from that.
    assert lived < 5.0, f"a connection that never said HELLO lived {lived:.1f} s"
    assert all(nack_of(f)[0] == 1 for f in peer.frames)  # type: ignore[arg-type]
    assert len(peer.frames) >= 3  # it was answered all along: the NACKs did not move the deadline


async def test_a_hello_after_the_deadline_is_not_answered(mcp_gateway: McpGateway, connect: Connect) -> None:
    mcp_of(mcp_gateway).cfg = replace(mcp_of(mcp_gateway).cfg, hello_timeout=0.5)
    peer = await connect()
    await asyncio.sleep(0.8)
    with pytest.raises((ConnectionError, OSError)):
        await peer.hello()


async def test_before_hello_a_long_frame_is_nack_3_and_close_after_hello_it_is_welcome(
    mcp_gateway: McpGateway, connect: Connect
) -> None:
    server = mcp_of(mcp_gateway)
    server.cfg = replace(server.cfg, max_hello_payload=1024)  # max_payload is 4 kB in the test config
    header = bytes.fromhex("55aa55aa0103") + (7).to_bytes(4, "big") + (2000).to_bytes(4, "big")
    peer = await connect()
    await peer.send(header)  # refused from the header alone, nothing more read
    reply = await peer.recv()
    assert reply.seq == 7 and nack_of(reply) == (3, "frame too large")
    assert await peer.closed(2)
    # Past HELLO the config's max_payload holds, even for a frame in the same write as the HELLO.
    peer = await connect()
    hello = Frame.json(FrameType.HELLO, 1, {"boot_id": "b", "device_id": "pump-1", "token": TOKEN_1})
    big = Frame.json(FrameType.DATA, 2, {"ts": T0, "values": {"s": "x" * 1000, "t": "y" * 1000}})
    assert 2000 < len(big.payload) < 4096
    await peer.send(encode(hello) + encode(big))
    assert (await peer.recv()).type == FrameType.ACK
    assert await peer.recv() == Frame(FrameType.ACK, 2)


async def test_the_third_framing_error_before_hello_closes(mcp_gateway: McpGateway, connect: Connect) -> None:
    peer = await connect()
    await peer.send(bad_crc(1) + bad_crc(2))
    assert [nack_of(await peer.recv()) for _ in range(2)] == [(1, "crc mismatch")] * 2
    assert not await peer.closed(0.3)
    await peer.send(bad_crc(3))
    assert nack_of(await peer.recv()) == (1, "crc mismatch")  # still answered
    assert await peer.closed(2)
    # After HELLO, CRC errors are the line's problem, not an attack: the session stays.
    peer = await connect()
    assert (await peer.hello()).type == FrameType.ACK
    await peer.send(b"".join(bad_crc(10 + i) for i in range(5)))
    assert [nack_of(await peer.recv())[0] for _ in range(5)] == [1] * 5
    assert not await peer.closed(0.3)


@pytest.mark.parametrize("second_id", ["pump-1", "pump-2"])
async def test_a_second_hello_on_a_live_session_is_nack_5_and_close(
    mcp_gateway: McpGateway, connect: Connect, second_id: str
) -> None:
    server = mcp_of(mcp_gateway)
    other = await connect()
    assert (await other.hello("pump-2", TOKEN_2)).type == FrameType.ACK
    pump2 = server.sessions["pump-2"]
    peer = await connect()
    assert (await peer.hello()).type == FrameType.ACK
    answer = await peer.hello(second_id, TOKEN_1 if second_id == "pump-1" else TOKEN_2, seq=2)
    code, reason = nack_of(answer)
    assert code == 5 and "HELLO" in reason
    assert await peer.closed(2)
    await until(lambda: "pump-1" not in server.sessions, 10, "the refused connection's session to be gone")
    # pump-2's place still belongs to its own connection, which still works.
    assert server.sessions.get("pump-2") is pump2 and "pump-1" not in server.sessions
    await other.send(Frame.json(FrameType.DATA, 5, {"ts": T0, "values": {"v": 1}}))
    assert await other.recv() == Frame(FrameType.ACK, 5)


async def test_a_malformed_hello_is_nack_5_and_close(mcp_gateway: McpGateway, connect: Connect) -> None:
    peer = await connect()
    code, reason = nack_of(await peer.hello("pump-1\n", TOKEN_1))
    assert code == 5 and "device_id" in reason
    assert await peer.closed(2)
    assert mcp_of(mcp_gateway).auth_failures == {"unknown_device": 0, "bad_token": 0}


# --- pending caps and bans ---------------------------------------------------------------------


async def test_max_pending_and_max_pending_per_ip_close_at_accept(
    mcp_gateway: McpGateway, connect: Connect, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger="drivers.mcp")
    server = mcp_of(mcp_gateway)
    server.cfg = replace(server.cfg, max_pending_per_ip=3)
    server.max_pending = 5
    local = [await connect(local_addr=("127.0.0.1", 0)) for _ in range(3)]
    await until(lambda: server.pending == 3, 10, "three pending connections")
    for _ in range(3):
        over_ip = await connect(local_addr=("127.0.0.1", 0))
        assert await over_ip.closed(1) and not over_ip.frames
    others = [await connect(local_addr=("127.0.0.3", 0)) for _ in range(2)]
    await until(lambda: server.pending == 5, 10, "five pending connections")
    over_all = await connect(local_addr=("127.0.0.4", 0))
    assert await over_all.closed(1) and not over_all.frames
    assert server.refused == {"max_sessions": 0, "max_pending": 1, "max_pending_per_ip": 3, "banned": 0}
    assert server.rejected == 0
    # Said in the log, but once a minute per reason, not once per connection.
    said = [r.getMessage() for r in caplog.records if "closed at accept" in r.getMessage()]
    assert len(said) == 2 and "max_pending_per_ip" in said[0] and said[1].endswith("max_pending"), said
    # A login frees its place at once.
    assert (await local[0].hello()).type == FrameType.ACK
    assert server.pending == 4
    again = await connect(local_addr=("127.0.0.1", 0))
    assert not await again.closed(0.3)
    for peer in [*local, *others, again]:
        peer.close()
    await until(lambda: server.pending == 0, 10, "every pending place to be given back")


async def test_a_pending_connection_that_logs_in_past_max_sessions_is_nack_8_unless_it_replaces(
    mcp_gateway: McpGateway, connect: Connect
) -> None:
    server = mcp_of(mcp_gateway)
    server.max_sessions = 1
    first, second, third = await connect(), await connect(), await connect()  # all pending: none refused yet
    assert (await first.hello()).type == FrameType.ACK
    code, reason = nack_of(await second.hello("pump-2", TOKEN_2))
    assert code == 8 and "max_sessions" in reason
    assert await second.closed(2)
    assert server.refused["max_sessions"] == 1 and server.rejected == 1
    # A device's new session replaces its old one: that takes no new place.
    assert (await third.hello(seq=5)).type == FrameType.ACK
    assert await first.closed(2)


async def test_failed_logins_are_counted_logged_once_a_minute_and_banned(
    mcp_gateway: McpGateway, connect: Connect, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger="drivers.mcp")
    server = mcp_of(mcp_gateway)
    server.bans.configure(failures=4, window=60.0, ban_time=1.0)
    wrong = "wrong-token-" + "z" * 20
    for device_id in ("pump-1", "pump-1", "pump-1", "nobody"):
        peer = await connect(local_addr=("127.0.0.5", 0))
        assert nack_of(await peer.hello(device_id, wrong)) == (7, "authentication failed")
        assert await peer.closed(2)
    assert server.auth_failures == {"unknown_device": 1, "bad_token": 3}
    # Banned: closed at accept, even with the right token; nothing read, nothing answered.
    peer = await connect(local_addr=("127.0.0.5", 0))
    with pytest.raises(ConnectionError):
        await peer.hello()
    assert server.refused["banned"] == 1
    # Another address is not touched.
    other = await connect(local_addr=("127.0.0.6", 0))
    assert (await other.hello("pump-2", TOKEN_2)).type == FrameType.ACK
    lines = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING and "127.0.0.5" in r.getMessage()]
    assert len([x for x in lines if "login failed" in x]) == 1, lines
    assert [x for x in lines if "banned for" in x] == [
        "mcp: 127.0.0.5 banned for 1 s: 4 failed logins within 60 s (mcp.auth_ban_*)"
    ]
    assert not any(wrong in r.getMessage() for r in caplog.records)
    # The ban ends after auth_ban_time.
    await asyncio.sleep(1.1)
    peer = await connect(local_addr=("127.0.0.5", 0))
    assert (await peer.hello()).type == FrameType.ACK


# --- unread output -----------------------------------------------------------------------------


async def test_a_peer_that_does_not_read_is_paused_then_closed_past_max_unread(mcp_gateway: McpGateway) -> None:
    server = mcp_of(mcp_gateway)
    peer = await small_buffer_peer(mcp_gateway.mcp_port)
    assert (await peer.hello()).type == FrameType.ACK
    session = shrink_send_buffer(server, peer)
    limit = server.cfg.max_unread
    # 150 NACKs (~50 bytes each) per write: the gateway's unread output grows past a quarter of max_unread.
    chunk = b"".join(bad_crc(i + 1) for i in range(150))
    for _ in range(40):
        peer.writer.write(chunk)
        await asyncio.sleep(0.02)
        if session._paused:
            break
    assert session._paused, f"still reading with {session.unread} bytes unread"
    assert limit // 4 < session.unread <= limit
    in_before = server.totals.crc_errors
    peer.writer.write(chunk * 4)
    # Every byte handed to the gateway's process (none left in the peer's buffers nor in the gateway's socket),
    # then a few turns of the loop: a read loop that was not paused would have taken them by then.
    await until(lambda: in_flight(peer, session) == 0, 10, "the peer's bytes to reach the gateway's process")
    for _ in range(10):
        await asyncio.sleep(0)
    assert server.totals.crc_errors == in_before  # paused: nothing more read
    assert not session._closed
    # Once the peer reads, the session catches up and answers everything.
    peer.writer.write(encode(Frame(FrameType.HEARTBEAT, 99_999)))
    while True:
        frame = await peer.recv(5)
        if frame.type == FrameType.ACK:
            break
    assert frame.seq == 99_999 and not session._paused
    # A peer that writes a lot at once and never reads is closed as soon as its answers pass max_unread.
    peer.writer.write(b"".join(bad_crc(i + 1) for i in range(4000)))
    await asyncio.sleep(1.0)
    assert session._closed and "max_unread" in session._close_reason
    assert "pump-1" not in server.sessions


async def test_a_paused_peer_that_never_reads_again_is_closed_at_its_idle_deadline(mcp_gateway: McpGateway) -> None:
    server = mcp_of(mcp_gateway)
    peer = await small_buffer_peer(mcp_gateway.mcp_port)
    assert (await peer.hello(heartbeat_s=1)).type == FrameType.ACK  # silent after 3 s
    session = shrink_send_buffer(server, peer)
    chunk = b"".join(bad_crc(i + 1) for i in range(150))
    for _ in range(40):
        peer.writer.write(chunk + encode(Frame(FrameType.HEARTBEAT, 1)))  # it keeps "talking"
        await asyncio.sleep(0.05)
        if session._paused:
            break
    assert session._paused
    paused_at = time.monotonic()
    # Closed about 3 s after the pause on an idle machine; one that keeps the session stays open all 20 s.
    while not session._closed and time.monotonic() - paused_at < 20:
        peer.writer.write(encode(Frame(FrameType.HEARTBEAT, 2)))
        await asyncio.sleep(0.2)
    assert session._closed, "a peer that never reads held its session"
    await until(lambda: "pump-1" not in server.sessions, 10, "the closed session to leave server.sessions")


async def test_a_peer_that_does_not_read_its_acks_holds_no_places_of_other_devices(
    mcp_gateway: McpGateway, connect: Connect, monkeypatch: pytest.MonkeyPatch
) -> None:
    server = mcp_of(mcp_gateway)
    server.data_slots = asyncio.Semaphore(8)  # the server-wide limit of DATA awaiting its answer, made small
    stuck = await small_buffer_peer(mcp_gateway.mcp_port)
    assert (await stuck.hello()).type == FrameType.ACK
    session = shrink_send_buffer(server, stuck)
    frame = encode(Frame.json(FrameType.DATA, 5, {"ts": T0, "values": {"v": 1}}))
    await stuck.send(frame)
    assert await stuck.recv() == Frame(FrameType.ACK, 5)
    # The same DATA again and again: each one answered (ACK again, published once), none of the answers read.
    stuck.writer.write(frame * 20000)
    # Until its unread answers made the server stop reading it (about a second on an idle machine).
    await until(lambda: session._paused, 30, "the server to stop reading a peer that does not read")
    good = await connect()
    assert (await good.hello("pump-2", TOKEN_2)).type == FrameType.ACK
    for seq in range(2, 12):
        await good.send(Frame.json(FrameType.DATA, seq, {"ts": T0 + seq, "values": {"n": seq}}))
        assert await good.recv(5) == Frame(FrameType.ACK, seq)
    # Paused, the stuck peer holds no DATA slot (the one in hand when it paused is given back).
    await until(lambda: server.data_slots._value == 8, 10, "every DATA slot to be free")
    assert session.unread <= server.cfg.max_unread


# --- DATA rules ----------------------------------------------------------------------------------


async def test_data_rules_nack_5_publish_nothing_and_are_counted(mcp_gateway: McpGateway, connect: Connect) -> None:
    server = mcp_of(mcp_gateway)
    server.cfg = replace(server.cfg, max_points=4)
    sub = mcp_gateway.sub
    peer = await connect()
    assert (await peer.hello()).type == FrameType.ACK
    now = int(time.time() * 1000)
    cases = [
        ({"ts": 10**30, "values": {"v": 1}}, "ts"),
        ({"ts": 5, "values": {"v": 1}}, "ts"),
        ({"ts": now, "values": {"temp\n": 1}}, "topic-safe"),
        ({"ts": now, "values": {"s": "x" * 1025}}, "max_string"),
        ({"ts": now, "values": {f"p{i}": i for i in range(5)}}, "max_points"),
    ]
    for seq, (body, word) in enumerate(cases, start=2):
        await peer.send(Frame.json(FrameType.DATA, seq, body))
        code, reason = nack_of(await peer.recv())
        assert code == 5 and word in reason, (body, reason)
    await peer.send(Frame(FrameType.DATA, 20, b'{"values":{"v":"\\ud800"}}'))
    assert nack_of(await peer.recv())[0] == 5
    await peer.send(Frame(FrameType.DATA, 21, b'{"values":{"v":NaN}}'))
    assert nack_of(await peer.recv())[0] == 5
    # Up to max_points names are taken; one more new name refuses the whole frame.
    await peer.send(Frame.json(FrameType.DATA, 30, {"ts": now, "values": {"a": 1, "b": 2, "c": 3}}))
    assert await peer.recv() == Frame(FrameType.ACK, 30)
    await peer.send(Frame.json(FrameType.DATA, 31, {"ts": now, "values": {"a": 9, "d": 4, "e": 5}}))
    code, reason = nack_of(await peer.recv())
    assert code == 5 and "max_points" in reason
    await peer.send(Frame.json(FrameType.DATA, 32, {"ts": now, "values": {"a": 10, "d": 4}}))
    assert await peer.recv() == Frame(FrameType.ACK, 32)
    await sub.wait_for(lambda ms: any(m.topic == "fieldgate/m1/pump-1/d" for m in ms))
    await sub.wait_for(lambda ms: len([m for m in ms if m.topic == "fieldgate/m1/pump-1/telemetry"]) >= 2)
    await asyncio.sleep(0.2)  # time for anything refused to show up, were it published after all
    tele = [m.json() for m in sub.on("fieldgate/m1/pump-1/telemetry")]
    assert [t["values"] for t in tele] == [{"a": 1, "b": 2, "c": 3}, {"a": 10, "d": 4}]  # type: ignore[index]
    assert not [m.topic for m in sub.messages if m.topic.endswith(("/e", "/p0", "/s"))]
    stats = server.stats_for("pump-1")
    assert (stats.rejected_payloads, stats.bad_ts) == (8, 2)
    assert server.points_of("pump-1") == {"a", "b", "c", "d"}


# --- the ACK loop --------------------------------------------------------------------------------


async def test_a_session_whose_ack_loop_dies_is_closed_and_logged(
    mcp_gateway: McpGateway, connect: Connect, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    server = mcp_of(mcp_gateway)
    peer = await connect()
    assert (await peer.hello()).type == FrameType.ACK
    original = session_module.Session._outcome

    async def broken(self: session_module.Session, seq: int, pending: asyncio.Future[None]) -> Frame | None:
        raise RuntimeError("a bug in the ACK loop")

    monkeypatch.setattr(session_module.Session, "_outcome", broken)
    for seq in range(2, 6):
        await peer.send(Frame.json(FrameType.DATA, seq, {"ts": T0 + seq, "values": {"n": seq}}))
    assert await peer.closed(3), "the session stayed open without ACKs"
    assert any("ACK loop ended" in r.getMessage() and r.levelno == logging.ERROR for r in caplog.records)
    await until(lambda: "pump-1" not in server.sessions, 10, "the session to be gone")
    assert server.data_slots._value == server_module.MAX_INFLIGHT_DATA
    # The device reconnects and is served.
    monkeypatch.setattr(session_module.Session, "_outcome", original)
    again = await connect()
    assert (await again.hello(seq=7)).type == FrameType.ACK
    await again.send(Frame.json(FrameType.DATA, 8, {"ts": T0 + 8, "values": {"n": 8}}))
    assert await again.recv() == Frame(FrameType.ACK, 8)


async def test_a_thousand_connections_that_never_log_in_hold_at_most_max_pending_and_no_device_waits(
    mcp_gateway: McpGateway, connect: Connect
) -> None:
    server = mcp_of(mcp_gateway)
    server.max_pending = 50
    server.cfg = replace(server.cfg, max_pending_per_ip=20)
    good = await connect()
    assert (await good.hello("pump-2", TOKEN_2)).type == FrameType.ACK
    crowd: list[RawPeer] = []
    seq = 1
    for i in range(1000):
        crowd.append(await connect(local_addr=(f"127.0.3.{1 + i % 40}", 0)))
        if i % 100 == 99:
            assert server.pending <= 50
            seq += 1
            started = time.monotonic()
            await good.send(Frame.json(FrameType.DATA, seq, {"ts": T0 + seq, "values": {"n": seq}}))
            assert await good.recv(5) == Frame(FrameType.ACK, seq)
            # Served while the crowd is refused (~10 ms on an idle machine); 1.5 s leaves room for a busy one.
            assert time.monotonic() - started < 1.5
    await until(lambda: sum(server.refused.values()) == 950, 10, "the crowd's last connections to be refused")
    assert server.pending == 50
    assert server.refused["max_pending"] == 950
    assert len(server._connections) == 51  # the crowd's 50 and the good device: nothing kept for the rest
    for peer in crowd:
        peer.close()
    await until(lambda: server.pending == 0, 10, "the crowd's places to be given back")
    assert len(server._connections) == 1


async def test_a_command_that_would_pass_max_unread_is_refused_and_the_session_stays(
    mcp_gateway: McpGateway, connect: Connect
) -> None:
    from gateway.types import Command

    server = mcp_of(mcp_gateway)
    server.cfg = replace(server.cfg, max_unread=4096)
    peer = await connect()
    assert (await peer.hello()).type == FrameType.ACK
    result = await server.command(Command("pump-1", "load", {"blob": "x" * 5000}))
    assert not result.ok and "max_unread" in (result.error or "")
    assert not await peer.closed(0.2) and "pump-1" in server.sessions
    # A command that fits goes out as ever.
    task = asyncio.create_task(server.command(Command("pump-1", "ping", {})))
    sent = await peer.recv()
    assert sent.type == FrameType.COMMAND and sent.body()["name"] == "ping"
    await peer.send(Frame.json(FrameType.RESPONSE, sent.seq, {"ok": True, "result": "pong"}))
    assert (await task).ok
