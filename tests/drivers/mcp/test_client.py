"""The MCP/1 device client against a scripted MCP peer on a real loopback TCP socket."""

from __future__ import annotations

import asyncio
import itertools
import json
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import pytest

from drivers.mcp.client import McpClient, McpClientError, McpNacked
from drivers.mcp.codec import MAGIC, DecodeError, Decoder, Frame, FrameType, NackCode, encode

OnFrame = Callable[["PeerConn", Frame], Awaitable[None]]


class PeerConn:
    """One accepted connection of the scripted peer: everything received, and ways to answer."""

    def __init__(self, index: int, writer: asyncio.StreamWriter) -> None:
        self.index = index
        self.writer = writer
        self.raw = bytearray()  # every byte the client sent on this connection
        self.frames: list[Frame] = []
        self.opened_at = asyncio.get_running_loop().time()
        self.closed = asyncio.Event()  # set when the client closed its side (EOF) or we closed

    async def send(self, frame: Frame | bytes) -> None:
        """Send a frame (or raw bytes) to the client."""
        self.writer.write(encode(frame) if isinstance(frame, Frame) else frame)
        await self.writer.drain()

    async def ack(self, seq: int, body: dict[str, Any] | None = None) -> None:
        """ACK `seq`, with a payload for the HELLO ACK."""
        await self.send(Frame(FrameType.ACK, seq) if body is None else Frame.json(FrameType.ACK, seq, body))

    async def nack(self, seq: int, code: NackCode) -> None:
        """NACK `seq` with `code` and the default reason of docs/mcp.md §5."""
        await self.send(Frame.json(FrameType.NACK, seq, {"code": int(code), "reason": code.reason}))

    def of(self, kind: FrameType) -> list[Frame]:
        """The frames of one type received on this connection."""
        return [f for f in self.frames if f.type == kind]


class Peer:
    """A scripted MCP gateway on 127.0.0.1: records frames; `on_frame` answers them (default: ACK everything)."""

    def __init__(self, heartbeat_s: int = 30) -> None:
        self.heartbeat_s = heartbeat_s
        self.on_frame: OnFrame = self.ack_all
        self.conns: list[PeerConn] = []
        self.received: asyncio.Queue[tuple[PeerConn, Frame]] = asyncio.Queue()
        self.port = 0
        self._server: asyncio.Server | None = None
        self._tasks: set[asyncio.Task[Any]] = set()

    async def start(self) -> None:
        """Listen on a free loopback port."""
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]

    async def close(self) -> None:
        """Stop listening and end every connection handler."""
        if self._server is not None:
            self._server.close()
        for t in list(self._tasks):
            t.cancel()
        if self._tasks:
            await asyncio.wait(list(self._tasks))
        if self._server is not None:
            await self._server.wait_closed()

    async def ack_all(self, conn: PeerConn, frame: Frame) -> None:
        """The well-behaved gateway: ACK HELLO (with heartbeat_s), DATA and HEARTBEAT."""
        if frame.type == FrameType.HELLO:
            await conn.ack(frame.seq, {"heartbeat_s": self.heartbeat_s})
        elif frame.type in (FrameType.DATA, FrameType.HEARTBEAT):
            await conn.ack(frame.seq)

    async def next(self, kind: FrameType, timeout: float = 5.0) -> tuple[PeerConn, Frame]:
        """The next received frame of type `kind` (others are skipped)."""
        async with asyncio.timeout(timeout):
            while True:
                conn, frame = await self.received.get()
                if frame.type == kind:
                    return conn, frame

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._tasks.add(task)
        conn = PeerConn(len(self.conns), writer)
        self.conns.append(conn)
        decoder = Decoder()
        try:
            while data := await reader.read(65536):
                conn.raw += data
                for event in decoder.feed(data):
                    assert not isinstance(event, DecodeError), event  # the client only sends valid frames
                    conn.frames.append(event)
                    self.received.put_nowait((conn, event))
                    await self.on_frame(conn, event)
        except (ConnectionError, asyncio.CancelledError):
            pass
        finally:
            conn.closed.set()
            writer.close()
            self._tasks.discard(task)


MakeClient = Callable[..., Awaitable[McpClient]]


@pytest.fixture
async def peer() -> AsyncIterator[Peer]:
    """A started scripted peer."""
    p = Peer()
    await p.start()
    try:
        yield p
    finally:
        await p.close()


@pytest.fixture
async def make_client(peer: Peer) -> AsyncIterator[MakeClient]:
    """Start McpClients against the peer with test-sized timings; stops them all afterwards."""
    made: list[McpClient] = []

    async def make(**kw: Any) -> McpClient:
        opts: dict[str, Any] = {"boot_id": "b1", "ack_timeout": 5.0, "backoff_start": 0.05, "backoff_max": 0.4}
        client = McpClient("127.0.0.1", peer.port, "pump-1", "s3cret-token-0001", **(opts | kw))
        made.append(client)
        await client.start()
        return client

    yield make
    for c in made:
        await c.stop()


def body(frame: Frame) -> dict[str, Any]:
    """The frame's JSON payload."""
    return json.loads(frame.payload)


async def test_hello_first_with_exact_bytes_then_data_acked(peer: Peer, make_client: MakeClient) -> None:
    peer.heartbeat_s = 7
    client = await make_client(meta={"fw": "1.2"})
    assert await client.wait_connected(2)
    assert client.heartbeat_s_effective == 7
    await client.send({"flow_lpm": 12.5, "running": True}, ts=1767225600000)
    conn = peer.conns[0]
    hello = {
        "boot_id": "b1",
        "device_id": "pump-1",
        "heartbeat_s": 30,
        "meta": {"fw": "1.2"},
        "token": "s3cret-token-0001",
    }
    first = encode(Frame.json(FrameType.HELLO, 1, hello))
    data = {"ts": 1767225600000, "values": {"flow_lpm": 12.5, "running": True}}
    assert bytes(conn.raw) == first + encode(Frame.json(FrameType.DATA, 2, data))
    assert (client.stats.acked, client.stats.frames_out, client.stats.frames_in) == (1, 2, 2)
    assert client.last_error is None


async def test_window_of_32_outstanding(peer: Peer, make_client: MakeClient) -> None:
    async def hold_data(conn: PeerConn, frame: Frame) -> None:
        if frame.type != FrameType.DATA:
            await peer.ack_all(conn, frame)

    peer.on_frame = hold_data
    client = await make_client()
    assert await client.wait_connected(2)
    sends = [asyncio.create_task(client.send({"i": i})) for i in range(33)]
    seqs = [(await peer.next(FrameType.DATA))[1].seq for _ in range(32)]
    conn = peer.conns[0]
    # A heartbeat round trip on the same connection: a 33rd DATA, sent at once by all the sends started
    # above, would be on the wire before the client's ACK of a heartbeat that reaches it only now.
    await conn.send(Frame(FrameType.HEARTBEAT, 77))
    _, ack = await peer.next(FrameType.ACK, timeout=5)
    assert ack.seq == 77
    assert len(conn.of(FrameType.DATA)) == 32 and not any(t.done() for t in sends)
    await conn.ack(seqs[0])
    _, last = await peer.next(FrameType.DATA, timeout=1)  # the 33rd goes out once a slot is free
    assert last.seq == 34 and sum(t.done() for t in sends) == 1
    for seq in [*seqs[1:], last.seq]:
        await conn.ack(seq)
    await asyncio.wait_for(asyncio.gather(*sends), 2)
    assert client.stats.acked == 33 and client.stats.retransmits == 0


async def test_retransmits_identical_bytes_after_ack_timeout(peer: Peer, make_client: MakeClient) -> None:
    dropped: list[float] = []

    async def drop_first_data(conn: PeerConn, frame: Frame) -> None:
        if frame.type == FrameType.DATA and not dropped:
            dropped.append(asyncio.get_running_loop().time())
            return
        await peer.ack_all(conn, frame)

    peer.on_frame = drop_first_data
    client = await make_client(ack_timeout=0.2)
    await asyncio.wait_for(client.send({"level": 3}), 2)
    gap = asyncio.get_running_loop().time() - dropped[0]
    copies = peer.conns[0].of(FrameType.DATA)
    assert len(copies) == 2 and peer.conns[0].raw.count(encode(copies[0])) == 2
    assert 0.15 <= gap < 1.0
    assert client.stats.retransmits == 1 and client.stats.acked == 1


async def test_broken_link_reconnects_and_resends_unacked_data_with_same_seq(
    peer: Peer, make_client: MakeClient
) -> None:
    async def mute_first_connection(conn: PeerConn, frame: Frame) -> None:
        if conn.index > 0 or frame.type == FrameType.HELLO:
            await peer.ack_all(conn, frame)

    peer.on_frame = mute_first_connection
    client = await make_client(ack_timeout=0.1, retries=2, backoff_start=0.2)
    await asyncio.wait_for(client.send({"v": 1}), 3)
    first, second = peer.conns
    assert first.closed.is_set()
    # 1 send + 2 retransmissions on the first connection, then the same bytes again after the new HELLO.
    assert [f.seq for f in first.frames] == [1, 2, 2, 2]
    assert [(f.type, f.seq) for f in second.frames] == [(FrameType.HELLO, 3), (FrameType.DATA, 2)]
    assert encode(second.frames[1]) == encode(first.frames[1])
    assert second.opened_at - first.opened_at >= 0.3 + 0.8 * 0.2  # 3 ack_timeouts, then back-off with jitter
    await client.send({"v": 2})
    assert second.frames[-1].seq == 4  # the counter continued
    assert client.stats.reconnects == 1 and client.stats.retransmits == 3


async def test_hello_nack_7_backs_off_and_exposes_last_error(peer: Peer, make_client: MakeClient) -> None:
    async def refuse(conn: PeerConn, frame: Frame) -> None:
        await conn.nack(frame.seq, NackCode.AUTHENTICATION_FAILED)
        conn.writer.close()

    peer.on_frame = refuse
    client = await make_client(backoff_start=0.05, backoff_max=0.2)
    async with asyncio.timeout(5):
        while len(peer.conns) < 5:
            await asyncio.sleep(0.01)
    assert not await client.wait_connected(0.05)
    error = client.last_error
    assert isinstance(error, McpNacked) and error.code == NackCode.AUTHENTICATION_FAILED
    assert error.reason == "authentication failed"
    opened = [c.opened_at for c in peer.conns[:5]]
    gaps = [b - a for a, b in itertools.pairwise(opened)]
    for gap, expected in zip(gaps, [0.05, 0.1, 0.2, 0.2], strict=True):
        assert 0.8 * expected <= gap <= 1.2 * expected + 0.1
    assert [f.seq for c in peer.conns[:5] for f in c.frames] == [1, 2, 3, 4, 5]  # one boot, one counter
    assert client.stats.nacks >= 5


async def test_backoff_resets_after_a_stable_session(peer: Peer, make_client: MakeClient) -> None:
    async def refuse_twice_then_hold(conn: PeerConn, frame: Frame) -> None:
        if conn.index < 2:
            await conn.nack(frame.seq, NackCode.AUTHENTICATION_FAILED)
            conn.writer.close()
        elif conn.index == 2:
            await peer.ack_all(conn, frame)
            await asyncio.sleep(0.35)  # longer than stable_after
            conn.writer.close()
            closed_at.append(asyncio.get_running_loop().time())
        else:
            await peer.ack_all(conn, frame)

    closed_at: list[float] = []
    peer.on_frame = refuse_twice_then_hold
    client = await make_client(backoff_start=0.1, backoff_max=1.0, stable_after=0.3)
    async with asyncio.timeout(5):
        while len(peer.conns) < 4:
            await asyncio.sleep(0.01)
    # Without the reset the fourth attempt would wait 0.4 s (± 20 %); after a stable session it starts at 0.1 s again.
    assert peer.conns[3].opened_at - closed_at[0] <= 0.12 + 0.1
    assert await client.wait_connected(2)


async def test_heartbeat_when_idle_and_gateway_heartbeat_acked(peer: Peer, make_client: MakeClient) -> None:
    peer.heartbeat_s = 1
    client = await make_client(ack_timeout=0.3)
    assert await client.wait_connected(2)
    up = asyncio.get_running_loop().time()
    conn, beat = await peer.next(FrameType.HEARTBEAT, timeout=3)
    assert asyncio.get_running_loop().time() - up >= 0.8  # not before heartbeat_s of silence
    assert beat.seq == 2 and beat.payload == b"" and client.heartbeat_s_effective == 1
    await conn.send(Frame(FrameType.HEARTBEAT, 77))
    _, ack = await peer.next(FrameType.ACK, timeout=1)
    assert ack.seq == 77
    # The next heartbeat comes a heartbeat_s of silence later; a retransmission of the first (its ACK
    # ignored) would come ack_timeout after it, so before that one, whatever the machine's speed.
    _, second = await peer.next(FrameType.HEARTBEAT, timeout=5)
    assert second.seq == 3, f"heartbeat seq {second.seq} again: its ACK was not taken"
    assert client.stats.retransmits == 0 and client.connected


async def test_commands_answered_failed_and_deduplicated(peer: Peer, make_client: MakeClient) -> None:
    calls: list[tuple[str, dict[str, Any]]] = []

    async def handler(name: str, args: dict[str, Any]) -> Any:
        calls.append((name, args))
        if name == "explode":
            raise ValueError("rpm out of range")
        return {"rpm": args["rpm"]}

    client = await make_client(on_command=handler)
    assert await client.wait_connected(2)
    conn = peer.conns[0]
    command = Frame.json(FrameType.COMMAND, 0xFFFF_FFFF, {"name": "set_speed", "args": {"rpm": 1200}})
    await conn.send(command)
    _, ok = await peer.next(FrameType.RESPONSE)
    assert ok.seq == 0xFFFF_FFFF and body(ok) == {"ok": True, "result": {"rpm": 1200}}
    await conn.send(Frame.json(FrameType.COMMAND, 1, {"name": "explode", "args": {"rpm": 9}}))
    _, failed = await peer.next(FrameType.RESPONSE)
    assert failed.seq == 1 and body(failed) == {"ok": False, "error": "rpm out of range"}
    await conn.send(command)  # the gateway's retransmission: answered from the cache
    _, again = await peer.next(FrameType.RESPONSE)
    assert encode(again) == encode(ok) and len(calls) == 2
    await conn.send(Frame.json(FrameType.COMMAND, 2, {"name": 5}))
    _, nack = await peer.next(FrameType.NACK)
    assert nack.seq == 2 and body(nack)["code"] == NackCode.MALFORMED_PAYLOAD


async def test_command_without_handler(peer: Peer, make_client: MakeClient) -> None:
    client = await make_client()
    assert await client.wait_connected(2)
    await peer.conns[0].send(Frame.json(FrameType.COMMAND, 9, {"name": "reboot", "args": {}}))
    _, response = await peer.next(FrameType.RESPONSE)
    assert response.seq == 9 and body(response) == {"ok": False, "error": "no command handler"}


async def test_nack_8_raises_and_keeps_the_session(peer: Peer, make_client: MakeClient) -> None:
    async def overloaded_once(conn: PeerConn, frame: Frame) -> None:
        if frame.type == FrameType.DATA and len(conn.of(FrameType.DATA)) == 1:
            await conn.nack(frame.seq, NackCode.OVERLOADED)
        else:
            await peer.ack_all(conn, frame)

    peer.on_frame = overloaded_once
    client = await make_client()
    with pytest.raises(McpNacked) as nacked:
        await asyncio.wait_for(client.send({"v": 1}), 2)
    assert nacked.value.code == NackCode.OVERLOADED and nacked.value.seq == 2
    await asyncio.wait_for(client.send({"v": 1}), 2)  # retry later: a new frame, a new seq
    assert [f.seq for f in peer.conns[0].of(FrameType.DATA)] == [2, 3]
    assert len(peer.conns) == 1 and client.stats.nacks == 1 and client.stats.acked == 1


async def test_nack_1_retransmits_at_once(peer: Peer, make_client: MakeClient) -> None:
    async def crc_once(conn: PeerConn, frame: Frame) -> None:
        if frame.type == FrameType.DATA and len(conn.of(FrameType.DATA)) == 1:
            await conn.nack(frame.seq, NackCode.CRC_MISMATCH)
        else:
            await peer.ack_all(conn, frame)

    peer.on_frame = crc_once
    client = await make_client(ack_timeout=5.0)
    await asyncio.wait_for(client.send({"v": 1}), 1)  # far sooner than ack_timeout
    assert [f.seq for f in peer.conns[0].of(FrameType.DATA)] == [2, 2]
    assert client.stats.retransmits == 1


async def test_bad_crc_is_nacked_and_bad_version_closes(peer: Peer, make_client: MakeClient) -> None:
    client = await make_client()
    assert await client.wait_connected(2)
    conn = peer.conns[0]
    good = encode(Frame.json(FrameType.COMMAND, 5, {"name": "x", "args": {}}))
    await conn.send(good[:-1] + bytes([good[-1] ^ 0xFF]))
    _, crc = await peer.next(FrameType.NACK)
    assert crc.seq == 5 and body(crc)["code"] == NackCode.CRC_MISMATCH and not conn.closed.is_set()
    await conn.send(MAGIC + bytes([2]) + bytes(11))
    _, version = await peer.next(FrameType.NACK)
    assert body(version)["code"] == NackCode.UNSUPPORTED_VERSION
    await asyncio.wait_for(conn.closed.wait(), 2)
    await peer.next(FrameType.HELLO)  # and it comes back
    assert len(peer.conns) == 2


async def test_stop_fails_pending_sends_and_leaves_no_tasks(peer: Peer, make_client: MakeClient) -> None:
    started, cancelled = asyncio.Event(), asyncio.Event()

    async def stuck(name: str, args: dict[str, Any]) -> Any:
        started.set()
        try:
            await asyncio.Event().wait()
        finally:
            cancelled.set()

    async def hold_data(conn: PeerConn, frame: Frame) -> None:
        if frame.type != FrameType.DATA:
            await peer.ack_all(conn, frame)

    peer.on_frame = hold_data
    client = await make_client(on_command=stuck)
    assert await client.wait_connected(2)
    sending = asyncio.create_task(client.send({"v": 1}))
    await peer.next(FrameType.DATA)
    await peer.conns[0].send(Frame.json(FrameType.COMMAND, 1, {"name": "spin", "args": {}}))
    await asyncio.wait_for(started.wait(), 2)
    await client.stop()
    assert cancelled.is_set() and not client.connected
    with pytest.raises(McpClientError):
        await sending
    with pytest.raises(McpClientError):
        await client.send({"v": 2})
    await asyncio.wait_for(peer.conns[0].closed.wait(), 2)
    await peer.close()
    assert asyncio.all_tasks() == {asyncio.current_task()}
