"""The MCP server on its own (no gateway process): reconnects, long boot ids, stalls, bans, TLS sockets."""

from __future__ import annotations

import asyncio
import contextlib
import socket
import ssl
import subprocess
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest

from drivers.mcp.codec import Decoder, Frame, FrameType, encode
from drivers.mcp.server import McpServer
from gateway.config.schema import McpSection
from gateway.config.settings import mcp_server
from gateway.types import Sample

from helpers import until

TOKEN = "s3cret-token-0001"
OTHER_TOKEN = "s3cret-token-0002"


def hello(device_id: str = "good", seq: int = 1, token: str = TOKEN, boot_id: str = "b1") -> bytes:
    """A HELLO's bytes."""
    return encode(Frame.json(FrameType.HELLO, seq, {"device_id": device_id, "token": token, "boot_id": boot_id}))


def data(seq: int, values: dict[str, Any] | None = None) -> bytes:
    """A DATA frame's bytes, stamped now."""
    body = {"ts": time.time_ns() // 1_000_000, "values": values or {"x": seq}}
    return encode(Frame.json(FrameType.DATA, seq, body))


class Peer:
    """A raw TCP peer with its own decoder."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader, self.writer, self.decoder = reader, writer, Decoder()
        self.frames: list[Frame] = []

    async def frame(self, timeout: float = 5.0) -> Frame:
        """The next frame from the server; EOFError when it closed."""
        async with asyncio.timeout(timeout):
            while not self.frames:
                chunk = await self.reader.read(65536)
                if not chunk:
                    raise EOFError
                self.frames += self.decoder.feed(chunk)
        return self.frames.pop(0)

    async def closed(self, timeout: float = 3.0) -> bool:
        """True once the server closed the connection (frames before that are dropped)."""
        try:
            while True:
                await self.frame(timeout)
        except (EOFError, ConnectionError):
            return True
        except TimeoutError:
            return False


class Server:
    """An McpServer on a free port whose deliveries are recorded (and can be held)."""

    def __init__(self, srv: McpServer) -> None:
        self.srv = srv
        self.delivered: list[Sample] = []
        self.gate = asyncio.Event()
        self.gate.set()
        self.fail_next = False
        self.held = 0  # deliveries that reached the gate (while it is closed, they wait there)
        srv.deliver = self._deliver

    async def _deliver(self, sample: Sample) -> None:
        self.held += 1
        await self.gate.wait()
        if self.fail_next:
            self.fail_next = False
            raise RuntimeError("sink down")
        self.delivered.append(sample)

    async def connect(self, **kw: Any) -> Peer:
        """A new raw connection."""
        reader, writer = await asyncio.open_connection("127.0.0.1", self.srv.port, **kw)
        peer = Peer(reader, writer)
        self._peers.append(peer)
        return peer

    _peers: list[Peer] = []


StartServer = Callable[..., Awaitable[Server]]


@pytest.fixture
async def start_server() -> AsyncIterator[StartServer]:
    """Start McpServers with config overrides; all are stopped at the end."""
    started: list[Server] = []

    async def start(**overrides: Any) -> Server:
        devices = [{"id": "good", "token": TOKEN}, {"id": "other", "token": OTHER_TOKEN}]
        cfg = McpSection.model_validate({"listen": "127.0.0.1:0", "devices": devices, **overrides})
        srv = McpServer(mcp_server(cfg), lambda s: asyncio.sleep(0), lambda st: None)
        await srv.start()
        server = Server(srv)
        server._peers = []
        started.append(server)
        return server

    yield start
    for server in started:
        for peer in server._peers:
            peer.writer.transport.abort()
        server.gate.set()
        await server.srv.stop()


async def test_a_boot_id_of_any_length_logs_in_and_keys_the_duplicate_window(start_server: StartServer) -> None:
    server = await start_server()
    boot = "boot-" + "0123456789abcdef" * 200  # 3 KiB: the HELLO still fits max_hello_payload
    peer = await server.connect()
    peer.writer.write(hello(boot_id=boot))
    assert (await peer.frame()).type == FrameType.ACK
    peer.writer.write(data(5))
    assert await peer.frame() == Frame(FrameType.ACK, 5)
    peer.writer.close()
    # The same boot: seq 5 is a duplicate. A boot differing in its last character: a new window.
    again = await server.connect()
    again.writer.write(hello(boot_id=boot) + data(5))
    assert (await again.frame()).type == FrameType.ACK and await again.frame() == Frame(FrameType.ACK, 5)
    assert len(server.delivered) == 1
    again.writer.close()
    new_boot = await server.connect()
    new_boot.writer.write(hello(boot_id=boot[:-1] + "X") + data(5))
    assert (await new_boot.frame()).type == FrameType.ACK and await new_boot.frame() == Frame(FrameType.ACK, 5)
    assert len(server.delivered) == 2


async def logged_in_with_a_short_stall_timeout(start_server: StartServer, monkeypatch: pytest.MonkeyPatch):  # type: ignore[no-untyped-def]
    """A server whose stall timeout is 0.5 s and a peer past HELLO on it."""
    from drivers.mcp import session as session_module

    monkeypatch.setattr(session_module, "STALL_TIMEOUT", 0.5)
    server = await start_server()
    peer = await server.connect()
    peer.writer.write(hello())
    assert (await peer.frame()).type == FrameType.ACK
    return server, peer


async def test_a_peer_whose_reads_always_end_mid_frame_is_not_taken_for_a_stall(
    start_server: StartServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    server, peer = await logged_in_with_a_short_stall_timeout(start_server, monkeypatch)
    # One and a half frames every 50 ms: every read ends inside a frame, yet every frame completes in 100 ms.
    frames = [data(seq, {"v": "x" * 200}) for seq in range(2, 60)]
    stream = b"".join(frames)
    size = len(frames[0])
    pos = size // 2
    peer.writer.write(stream[:pos])
    # All of them, however long a busy machine takes (not as many as fit in 1.5 s): every one is answered.
    while pos < len(stream):
        await asyncio.sleep(0.05)
        peer.writer.write(stream[pos : pos + size])
        pos += size
    for seq in range(2, 60):
        assert await peer.frame(10) == Frame(FrameType.ACK, seq)
    assert "good" in server.srv.sessions


async def test_a_frame_that_stops_midway_still_stalls(
    start_server: StartServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    server, peer = await logged_in_with_a_short_stall_timeout(start_server, monkeypatch)
    frame = data(2, {"v": "x" * 200})  # 250 bytes: more than the 60 sent below
    peer.writer.write(frame[:10])
    # A byte every 0.1 s for 5 s: bytes keep arriving, but the frame never completes. The stall timeout (0.5 s)
    # runs from the frame's start, so the server closes while the bytes still come (a timeout that each byte
    # restarted would never fire here): closed before the last byte, not timed.
    for cut in range(10, 60):
        if await peer.closed(0.1):
            break
        with contextlib.suppress(ConnectionError):
            peer.writer.write(frame[cut : cut + 1])
    else:
        raise AssertionError("bytes that never complete a frame kept the session open")


def server_sockets(port: int) -> int:
    """Accepted sockets of the listener on `port` that a process still holds (not the listener itself).

    Read from /proc/net/tcp rather than by counting this process's descriptors, which other tests' leftovers
    (closed by the garbage collector at any moment) would blur.
    """
    held = 0
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        with open(table) as f:
            next(f)
            for line in f:
                fields = line.split()
                local, state, inode = fields[1], fields[3], fields[9]
                if int(local.rsplit(":", 1)[1], 16) == port and state != "0A" and inode != "0":
                    held += 1
    return held


async def test_tls_sessions_whose_peer_never_answers_close_notify_free_their_sockets_at_once(
    start_server: StartServer, tmp_path: Path
) -> None:
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", "key.pem", "-out", "cert.pem"]
        + ["-days", "2", "-subj", "/CN=127.0.0.1"],
        cwd=tmp_path,
        check=True,
        capture_output=True,
    )
    tls = {"cert": str(tmp_path / "cert.pem"), "key": str(tmp_path / "key.pem")}
    server = await start_server(tls=tls, hello_timeout=0.5)
    ctx = ssl.create_default_context()
    ctx.check_hostname, ctx.verify_mode = False, ssl.CERT_NONE
    clients: list[ssl.SSLSocket] = []
    for _ in range(10):
        # Handshakes, then never reads nor sends again: our close_notify is never answered.
        raw = socket.create_connection(("127.0.0.1", server.srv.port))
        raw.setblocking(False)
        client = ctx.wrap_socket(raw, do_handshake_on_connect=False)
        while True:
            try:
                client.do_handshake()
                break
            except (ssl.SSLWantReadError, ssl.SSLWantWriteError):
                await asyncio.sleep(0.01)
        clients.append(client)
    await asyncio.sleep(0.2)
    port = server.srv.port
    try:
        # Each session ends at its HELLO deadline (0.5 s), then has 1 s of grace: its socket is gone by 2.5 s.
        assert server_sockets(port) > 0
        for _ in range(40):
            if server.srv.pending == 0 and server_sockets(port) == 0:
                break
            await asyncio.sleep(0.1)
        assert server.srv.pending == 0
        assert server_sockets(port) == 0
    finally:
        for client in clients:
            client.close()


async def test_at_max_sessions_a_device_reconnecting_replaces_its_stale_session(start_server: StartServer) -> None:
    server = await start_server(max_sessions=1)
    stale = await server.connect()
    stale.writer.write(hello())
    assert (await stale.frame()).type == FrameType.ACK
    # The link dropped without a FIN (Wi-Fi): the old session is still there when the device comes back.
    again = await server.connect()
    again.writer.write(hello(seq=7))
    assert await again.frame() == Frame.json(FrameType.ACK, 7, {"heartbeat_s": 30})
    assert await stale.closed(2)
    assert server.srv.sessions["good"] is not None and server.srv.refused["max_sessions"] == 0
    # Another device takes no place while the limit is reached: NACK 8 at its HELLO.
    other = await server.connect()
    other.writer.write(hello("other", token=OTHER_TOKEN))
    reply = await other.frame()
    assert reply.type == FrameType.NACK and reply.body()["code"] == 8
    assert await other.closed(2)
    assert server.srv.refused["max_sessions"] == 1 and server.srv.rejected == 1


async def test_connections_opened_before_a_ban_get_no_token_check_after_it(start_server: StartServer) -> None:
    server = await start_server(auth_ban_failures=3, max_pending_per_ip=32)
    # An attacker opens its 32 pending places first, then guesses on all of them (the last with the right token).
    peers = [await server.connect() for _ in range(32)]
    for peer in peers[:-1]:
        peer.writer.write(hello(token="wrong-token-xxxxxxx"))
    codes = []
    for peer in peers[:-1]:
        codes.append((await peer.frame()).body()["code"])
        assert await peer.closed(2)
    peers[-1].writer.write(hello())
    codes.append((await peers[-1].frame()).body()["code"])
    assert await peers[-1].closed(2)
    assert codes == [7] * 32  # every answer looks the same...
    # ...but only 3 tokens were checked: the rest were refused as banned.
    assert sum(server.srv.auth_failures.values()) == 3
    assert server.srv.refused["banned"] == 29
    assert "good" not in server.srv.sessions


async def test_data_resent_after_the_link_dropped_before_its_ack_is_published_once(start_server: StartServer) -> None:
    server = await start_server()
    server.gate.clear()  # the sink is slow: the first delivery is still in flight when the link drops
    first = await server.connect()
    first.writer.write(hello())
    assert (await first.frame()).type == FrameType.ACK
    frame = data(5)
    first.writer.write(frame)
    await until(lambda: server.held == 1, 10, "the first delivery to be under way")
    first.writer.transport.abort()
    await asyncio.sleep(0.2)
    # docs/mcp.md §3.2: the device resends the same bytes on its new session, while the first delivery is still going.
    again = await server.connect()
    again.writer.write(hello())
    assert (await again.frame()).type == FrameType.ACK
    read = server.srv.totals.frames_in
    again.writer.write(frame)
    await until(lambda: server.srv.totals.frames_in > read, 10, "the resend to be read")
    server.gate.set()
    assert await again.frame() == Frame(FrameType.ACK, 5)
    await asyncio.sleep(0.1)
    assert len(server.delivered) == 1
    # Once more after the first delivery finished with no session left to ACK it: the window knows the seq.
    again.writer.transport.abort()
    third = await server.connect()
    third.writer.write(hello() + frame)
    assert (await third.frame()).type == FrameType.ACK and await third.frame() == Frame(FrameType.ACK, 5)
    assert len(server.delivered) == 1 and server.srv.stats_for("good").duplicates == 2


async def test_a_resend_joining_a_delivery_that_fails_is_nacked_and_the_next_resend_is_delivered(
    start_server: StartServer,
) -> None:
    server = await start_server()
    server.gate.clear()
    server.fail_next = True
    first = await server.connect()
    first.writer.write(hello())
    assert (await first.frame()).type == FrameType.ACK
    frame = data(9)
    first.writer.write(frame)
    await until(lambda: server.held == 1, 10, "the first delivery to be under way")
    first.writer.transport.abort()
    again = await server.connect()
    read = server.srv.totals.frames_in
    again.writer.write(hello() + frame)
    assert (await again.frame()).type == FrameType.ACK
    await until(lambda: server.srv.totals.frames_in >= read + 2, 10, "the HELLO and the resend to be read")
    server.gate.set()
    reply = await again.frame()
    assert reply.type == FrameType.NACK and reply.body()["code"] == 8
    assert server.delivered == []
    again.writer.write(frame)  # not accepted, so not a duplicate: delivered now
    assert await again.frame() == Frame(FrameType.ACK, 9)
    assert len(server.delivered) == 1
