"""The MCP session's promises: the duplicate window of spec 3, reading a command's answer, and each frame's answer
and count on a real socket (the server in this process, so that mutation testing sees the session it runs)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import pytest

from drivers.mcp.codec import DecodeError, Decoder, Frame, FrameType, NackCode, encode, nack
from drivers.mcp.server import McpServer
from drivers.mcp.session import SeqWindow, _command_result, boot_digest
from gateway.config.schema import McpSection
from gateway.types import CommandResult, Sample


def test_the_window_holds_the_last_1024_accepted_seqs_and_forgets_the_oldest() -> None:
    window = SeqWindow("b1")
    for seq in range(1, 1025):
        window.add(seq)
    assert all(seq in window for seq in range(1, 1025))
    window.add(1025)
    assert 1 not in window  # spec 3: a window of the last 1024
    assert 2 in window and 1025 in window


def test_a_seq_added_again_takes_no_second_place_in_the_window() -> None:
    window = SeqWindow("b1", size=3)
    for seq in (1, 2, 3, 3, 2):
        window.add(seq)
    assert all(seq in window for seq in (1, 2, 3))  # re-adding 3 and 2 evicted nothing
    window.add(4)
    assert 1 not in window and all(seq in window for seq in (2, 3, 4))


def test_a_boot_id_is_kept_as_a_digest_that_tells_boots_apart() -> None:
    assert SeqWindow("boot-7").boot == boot_digest("boot-7") != boot_digest("boot-8")
    # Any string is a boot_id, a lone surrogate from a peer's JSON included.
    assert boot_digest("\ud800") != boot_digest("\ud801")


NOT_BOOL = CommandResult(ok=False, error="malformed response: ok must be a boolean")


def refused(reason: str) -> CommandResult:
    """What a NACK of the command gives."""
    return CommandResult(ok=False, error=f"device refused the command: {reason}")


def response(body: dict[str, object]) -> Frame:
    """The device's RESPONSE to command seq 5."""
    return Frame.json(FrameType.RESPONSE, 5, body)


@pytest.mark.parametrize(
    ("reply", "expected"),
    [
        (response({"ok": True, "result": {"rpm": 1200}}), CommandResult(ok=True, result={"rpm": 1200}, error=None)),
        (response({"ok": True, "error": "ignored"}), CommandResult(ok=True, result=None, error=None)),
        (response({"ok": False, "error": "jammed"}), CommandResult(ok=False, result=None, error="jammed")),
        (response({"ok": False, "error": 7}), CommandResult(ok=False, error="7")),
        (response({"ok": False}), CommandResult(ok=False, error="failed")),
        (response({"ok": False, "error": ""}), CommandResult(ok=False, error="failed")),
        (response({"ok": 1}), NOT_BOOL),
        (response({}), NOT_BOOL),
        (
            Frame(FrameType.RESPONSE, 5, b"[1]"),
            CommandResult(ok=False, error="malformed response: payload is a JSON list, not an object"),
        ),
        (Frame.json(FrameType.ACK, 5, {"ok": True}), NOT_BOOL),
        (nack(5, NackCode.UNKNOWN_FRAME_TYPE, "no such command"), refused("no such command")),
        (Frame.json(FrameType.NACK, 5, {"code": 4}), refused("nack")),
    ],
    ids=[
        "ok with result",
        "ok ignores an error",
        "failed with its error",
        "error made text",
        "failed without error",
        "failed with empty error",
        "ok not a bool",
        "no ok",
        "not an object",
        "an ACK is no response",
        "nack with reason",
        "nack without reason",
    ],
)
def test_a_commands_answer_is_read_as_the_spec_says(reply: Frame, expected: CommandResult) -> None:
    assert _command_result(reply) == expected


# --- one session on a real socket, the server in this process ----------------------------------------------

TOKEN = "s3cret-token-0001"
NOW_MS = 1_767_225_600_000


class Peer:
    """A raw MCP connection with its own decoder."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader, self.writer, self.decoder = reader, writer, Decoder()
        self.frames: list[Frame | DecodeError] = []

    async def send(self, wire: bytes) -> None:
        """Write bytes to the gateway."""
        self.writer.write(wire)
        await self.writer.drain()

    async def answer(self) -> Frame:
        """The next frame the gateway sends; EOFError once it closed."""
        async with asyncio.timeout(10):  # generous: only a missing answer runs into it
            while not self.frames:
                chunk = await self.reader.read(65536)
                if not chunk:
                    raise EOFError
                self.frames += self.decoder.feed(chunk)
        frame = self.frames.pop(0)
        assert isinstance(frame, Frame), frame
        return frame

    async def closed(self) -> bool:
        """True once the gateway closed the connection with nothing more to say."""
        try:
            frame = await self.answer()
        except (EOFError, ConnectionError):
            return True
        raise AssertionError(f"expected the close, got {frame}")


@pytest.fixture
async def server() -> AsyncIterator[tuple[McpServer, list[Sample]]]:
    """An McpServer on a free port whose deliveries are recorded."""
    cfg = McpSection.model_validate({"listen": "127.0.0.1:0", "devices": [{"id": "pump-1", "token": TOKEN}]})
    delivered: list[Sample] = []

    async def deliver(sample: Sample) -> None:
        delivered.append(sample)

    srv = McpServer(cfg, deliver, lambda state: None)
    await srv.start()
    try:
        yield srv, delivered
    finally:
        await srv.stop()


async def connect(srv: McpServer) -> Peer:
    """A new connection to the server."""
    return Peer(*await asyncio.open_connection("127.0.0.1", srv.port))


def hello(seq: int = 1) -> bytes:
    """pump-1's HELLO."""
    return encode(Frame.json(FrameType.HELLO, seq, {"device_id": "pump-1", "token": TOKEN, "boot_id": "b1"}))


def data(seq: int, body: dict[str, object] | None = None) -> bytes:
    """A DATA frame's bytes."""
    return encode(Frame.json(FrameType.DATA, seq, body or {"ts": NOW_MS, "values": {"flow": seq}}))


def corrupted(wire: bytes) -> bytes:
    """`wire` with its CRC's last bit flipped."""
    return wire[:-1] + bytes([wire[-1] ^ 1])


def code_and_reason(frame: Frame) -> tuple[int, int, str]:
    """(seq, code, reason) of a NACK."""
    assert frame.type == FrameType.NACK, frame
    body = frame.body()
    return frame.seq, body["code"], body["reason"]


async def test_each_frame_of_a_session_is_answered_and_counted_for_its_device(
    server: tuple[McpServer, list[Sample]],
) -> None:
    srv, delivered = server
    peer = await connect(srv)
    await peer.send(hello())
    assert await peer.answer() == Frame.json(FrameType.ACK, 1, {"heartbeat_s": 30})
    await peer.send(data(2))
    assert await peer.answer() == Frame(FrameType.ACK, 2)
    await peer.send(data(2))  # a resend: ACKed again, published once
    assert await peer.answer() == Frame(FrameType.ACK, 2)
    await peer.send(encode(Frame(FrameType.HEARTBEAT, 3)))
    assert await peer.answer() == Frame(FrameType.ACK, 3)
    await peer.send(corrupted(data(4)))
    assert code_and_reason(await peer.answer()) == (4, 1, "crc mismatch")
    await peer.send(data(5, {"ts": 946_684_799_999, "values": {"flow": 5}}))  # a millisecond before 2000
    assert code_and_reason(await peer.answer())[:2] == (5, 5)
    await peer.send(data(6, {"values": {}}))
    assert code_and_reason(await peer.answer()) == (6, 5, "malformed payload: values must be a non-empty object")
    await peer.send(encode(Frame(9, 7)))
    assert code_and_reason(await peer.answer()) == (7, 4, "unknown frame type 9")
    await peer.send(encode(Frame.json(FrameType.RESPONSE, 99, {"ok": True})))  # answers no command: ignored
    await peer.send(encode(Frame(FrameType.HEARTBEAT, 8)))
    assert await peer.answer() == Frame(FrameType.ACK, 8)  # nothing came for the RESPONSE
    assert [s.values for s in delivered] == [{"flow": 2}]

    stats = srv.stats_for("pump-1")
    # Frames: HELLO, 2 x DATA 2, 2 HEARTBEATs, 2 refused DATA, type 9, the RESPONSE (a bad CRC is no frame).
    assert (stats.frames_in, stats.frames_out) == (9, 9)
    assert (stats.crc_errors, stats.nacks_sent, stats.duplicates) == (1, 4, 1)
    assert (stats.rejected_payloads, stats.bad_ts) == (2, 1)
    assert (stats.sessions_opened, stats.sessions_closed) == (1, 0)
    totals = srv.totals
    assert (totals.frames_in, totals.frames_out, totals.crc_errors, totals.nacks_sent) == (9, 9, 1, 4)

    peer.writer.close()
    async with asyncio.timeout(10):
        while stats.sessions_closed == 0:
            await asyncio.sleep(0.01)
    assert (stats.sessions_closed, totals.sessions_closed) == (1, 1)


async def test_before_hello_the_third_framing_error_closes_and_the_second_does_not(
    server: tuple[McpServer, list[Sample]],
) -> None:
    srv, _ = server
    patient = await connect(srv)
    await patient.send(corrupted(hello(1)) + corrupted(hello(2)))
    assert [code_and_reason(await patient.answer())[:2] for _ in range(2)] == [(1, 1), (2, 1)]
    await patient.send(hello(3))
    assert await patient.answer() == Frame.json(FrameType.ACK, 3, {"heartbeat_s": 30})

    careless = await connect(srv)
    await careless.send(b"".join(corrupted(hello(seq)) for seq in (1, 2, 3)))
    assert [code_and_reason(await careless.answer())[:2] for _ in range(3)] == [(1, 1), (2, 1), (3, 1)]
    assert await careless.closed()


async def test_only_a_hello_opens_a_session_and_only_once(server: tuple[McpServer, list[Sample]]) -> None:
    srv, _ = server
    early = await connect(srv)
    await early.send(data(1))
    assert code_and_reason(await early.answer()) == (1, 6, "not registered")
    assert await early.closed()

    twice = await connect(srv)
    await twice.send(hello(1))
    await twice.answer()
    await twice.send(hello(2))
    assert code_and_reason(await twice.answer()) == (2, 5, "HELLO on a session that already passed HELLO")
    assert await twice.closed()
