"""The MCP session's promises: the duplicate window of docs/mcp.md §3.2, reading a command's answer, and each
frame's answer and count on a real socket (the server in this process, so that mutation testing sees the session
it runs)."""

from __future__ import annotations

import asyncio
import fcntl
import logging
import math
import socket
import ssl
import struct
import subprocess
import termios
import threading
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import replace
from pathlib import Path
from typing import TypeVar

import pytest

from drivers.mcp.codec import OVERHEAD, DecodeError, Decoder, Frame, FrameType, NackCode, encode, nack
from drivers.mcp.protocol import SeqWindow, boot_digest, command_result
from drivers.mcp.server import MAX_INFLIGHT_DATA, McpServer
from drivers.mcp.session import Session
from gateway.config.schema import McpSection
from gateway.config.settings import mcp_server
from gateway.errors import SinkError
from gateway.types import Command, CommandResult, DeviceState, Sample

from helpers import until

T = TypeVar("T")


def test_the_window_holds_the_last_1024_accepted_seqs_and_forgets_the_oldest() -> None:
    window = SeqWindow("b1")
    for seq in range(1, 1025):
        window.add(seq)
    assert all(seq in window for seq in range(1, 1025))
    window.add(1025)
    assert 1 not in window  # docs/mcp.md §3.2: a window of the last 1024
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
    assert command_result(reply) == expected


# --- one session on a real socket, the server in this process ----------------------------------------------

TOKEN = "s3cret-token-0001"
TOKEN_2 = "other-token-00002"
NOW_MS = 1_767_225_600_000


async def in_real_time(awaitable: Awaitable[T], seconds: float = 10.0) -> T:
    """`awaitable`'s result, or TimeoutError after `seconds` of real time, whatever the loop's clock says."""
    loop = asyncio.get_running_loop()
    work = asyncio.ensure_future(awaitable)
    expired = asyncio.Event()
    timer = threading.Timer(seconds, loop.call_soon_threadsafe, (expired.set,))
    timer.daemon = True
    timer.start()
    waiter = asyncio.ensure_future(expired.wait())
    try:
        await asyncio.wait({work, waiter}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        timer.cancel()
        waiter.cancel()
    if not work.done():
        work.cancel()
        raise TimeoutError(f"nothing after {seconds:g} s")
    return work.result()


async def settle(condition: Callable[[], object], what: str, seconds: float = 10.0) -> None:
    """Let the loop run until `condition()` holds (its clock may stand still); fail naming `what` after `seconds`."""
    deadline = time.monotonic() + seconds
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {seconds:g} s waiting for {what}")
        await asyncio.sleep(0)


async def turns(count: int = 50) -> None:
    """Let the loop run `count` rounds: what needs neither time nor the network is done by then."""
    for _ in range(count):
        await asyncio.sleep(0)


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
        await in_real_time(self._more())  # generous: only a missing answer runs into it
        frame = self.frames.pop(0)
        assert isinstance(frame, Frame), frame
        return frame

    async def _more(self) -> None:
        while not self.frames:
            chunk = await self.reader.read(65536)
            if not chunk:
                raise EOFError
            self.frames += self.decoder.feed(chunk)

    async def closed(self) -> bool:
        """True once the gateway closed the connection with nothing more to say."""
        try:
            frame = await self.answer()
        except (EOFError, ConnectionError):
            return True
        raise AssertionError(f"expected the close, got {frame}")


class Served:
    """An McpServer in this process: what it delivers, the device states it reports, deliveries held on demand."""

    def __init__(self, srv: McpServer) -> None:
        self.srv = srv
        self.delivered: list[Sample] = []
        self.states: list[DeviceState] = []
        self.hold = False  # while True, each delivery waits on its own future in `waiting`
        self.waiting: list[tuple[Sample, asyncio.Future[None]]] = []
        srv.deliver = self._deliver
        srv._on_state = self.states.append

    async def _deliver(self, sample: Sample) -> None:
        if self.hold:
            done: asyncio.Future[None] = asyncio.get_running_loop().create_future()
            self.waiting.append((sample, done))
            await done
        self.delivered.append(sample)

    def release_all(self) -> None:
        """Deliver everything held and hold nothing more."""
        self.hold = False
        for _, done in self.waiting:
            if not done.done():
                done.set_result(None)

    def session(self) -> Session:
        """pump-1's live session."""
        return self.srv.sessions["pump-1"]


@pytest.fixture
async def served() -> AsyncIterator[Served]:
    """An McpServer on a free port for pump-1 and pump-2."""
    devices = [{"id": "pump-1", "token": TOKEN}, {"id": "pump-2", "token": TOKEN_2}]
    cfg = McpSection.model_validate({"listen": "127.0.0.1:0", "devices": devices})
    srv = McpServer(mcp_server(cfg), lambda sample: asyncio.sleep(0), lambda state: None)
    await srv.start()
    here = Served(srv)
    try:
        yield here
    finally:
        here.release_all()
        await srv.stop()


async def connect(srv: McpServer) -> Peer:
    """A new connection to the server."""
    return Peer(*await asyncio.open_connection("127.0.0.1", srv.port))


def hello(seq: int = 1, **fields: object) -> bytes:
    """pump-1's HELLO (`fields` added to its payload or replacing them)."""
    body = {"device_id": "pump-1", "token": TOKEN, "boot_id": "b1", **fields}
    return encode(Frame.json(FrameType.HELLO, seq, body))


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
    served: Served, caplog: pytest.LogCaptureFixture
) -> None:
    srv, delivered = served.srv, served.delivered
    peer = await connect(srv)
    await peer.send(hello())
    assert await peer.answer() == Frame.json(FrameType.ACK, 1, {"heartbeat_s": 30})
    await peer.send(data(2))
    assert await peer.answer() == Frame(FrameType.ACK, 2)
    for _ in range(2):
        await peer.send(data(2))  # a resend: ACKed again, published once
        assert await peer.answer() == Frame(FrameType.ACK, 2)
    await peer.send(encode(Frame(FrameType.HEARTBEAT, 3)))
    assert await peer.answer() == Frame(FrameType.ACK, 3)
    await peer.send(corrupted(data(4)) + corrupted(data(4)))
    assert [code_and_reason(await peer.answer()) for _ in range(2)] == [(4, 1, "crc mismatch")] * 2
    await peer.send(data(5, {"ts": 946_684_799_999, "values": {"flow": 5}}))  # a millisecond before 2000
    assert code_and_reason(await peer.answer())[:2] == (5, 5)
    await peer.send(data(6, {"values": {}}))
    assert code_and_reason(await peer.answer()) == (6, 5, "malformed payload: values must be a non-empty object")
    await peer.send(encode(Frame(9, 7)))
    assert code_and_reason(await peer.answer()) == (7, 4, "unknown frame type 9")
    await peer.send(encode(Frame.json(FrameType.RESPONSE, 99, {"ok": True})))  # answers no command: ignored
    await peer.send(encode(Frame(FrameType.HEARTBEAT, 8)))
    assert await peer.answer() == Frame(FrameType.ACK, 8)  # nothing came for the RESPONSE
    assert [(s.device, s.ts, s.values) for s in delivered] == [("pump-1", NOW_MS, {"flow": 2})]

    stats = srv.stats_for("pump-1")
    # Frames: HELLO, 3 x DATA 2, 2 HEARTBEATs, 2 refused DATA, type 9, the RESPONSE (a bad CRC is no frame).
    assert (stats.frames_in, stats.frames_out) == (10, 11)
    assert (stats.crc_errors, stats.nacks_sent, stats.duplicates) == (2, 5, 2)
    assert (stats.rejected_payloads, stats.bad_ts) == (2, 1)
    assert (stats.sessions_opened, stats.sessions_closed, stats.commands, stats.command_timeouts) == (1, 0, 0, 0)
    totals = srv.totals
    assert (totals.frames_in, totals.frames_out, totals.crc_errors, totals.nacks_sent) == (10, 11, 2, 5)

    peer.writer.close()
    async with asyncio.timeout(10):
        while stats.sessions_closed == 0:
            await asyncio.sleep(0.01)
    assert (stats.sessions_closed, totals.sessions_closed) == (1, 1)
    assert served.states == [DeviceState("pump-1", True), DeviceState("pump-1", False, "closed by peer")]
    assert not [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]  # an ordinary end


async def test_before_hello_the_third_framing_error_closes_and_the_second_does_not(
    served: Served, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG, logger="drivers.mcp.server")
    srv = served.srv
    patient = await connect(srv)
    await patient.send(corrupted(hello(1)) + corrupted(hello(2)))
    assert [code_and_reason(await patient.answer())[:2] for _ in range(2)] == [(1, 1), (2, 1)]
    await patient.send(hello(3))
    assert await patient.answer() == Frame.json(FrameType.ACK, 3, {"heartbeat_s": 30})

    careless = await connect(srv)
    await careless.send(b"".join(corrupted(hello(seq)) for seq in (1, 2, 3)))
    assert [code_and_reason(await careless.answer())[:2] for _ in range(3)] == [(1, 1), (2, 1), (3, 1)]
    assert await careless.closed()
    await until(lambda: srv.pending == 0, 10, "the careless connection to end")
    assert "closed before HELLO: 3 framing errors before HELLO" in caplog.text


async def test_only_a_hello_opens_a_session_and_only_once(served: Served, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG, logger="drivers.mcp.server")
    srv = served.srv
    early = await connect(srv)
    await early.send(data(1))
    assert code_and_reason(await early.answer()) == (1, 6, "not registered")
    assert await early.closed()
    await until(lambda: srv.pending == 0, 10, "the early connection to end")
    assert f"mcp connection from {early.writer.get_extra_info('sockname')} closed before HELLO: frame before HELLO" in [
        r.getMessage() for r in caplog.records
    ]

    twice = await connect(srv)
    await twice.send(hello(1))
    await twice.answer()
    await twice.send(hello(2))
    assert code_and_reason(await twice.answer()) == (2, 5, "HELLO on a session that already passed HELLO")
    assert await twice.closed()
    assert served.states[-1] == DeviceState("pump-1", False, "a second HELLO")


def taken(session: Session) -> bool:
    """True once every byte the peer sent has been read by `session` (none left in its socket nor its reader)."""
    sock = session.writer.get_extra_info("socket")
    queued = struct.unpack("i", fcntl.ioctl(sock.fileno(), termios.FIONREAD, b"\0" * 4))[0]
    return queued == 0 and not session.reader._buffer


async def logged_in(served: Served, **fields: object) -> Peer:
    """pump-1 past its HELLO."""
    peer = await connect(served.srv)
    await peer.send(hello(**fields))
    assert (await peer.answer()).type == FrameType.ACK
    return peer


async def test_data_without_ts_takes_the_gateways_clock_and_a_ts_too_far_ahead_is_refused(served: Served) -> None:
    peer = await logged_in(served)
    before = time.time_ns() // 1_000_000
    await peer.send(data(2, {"values": {"flow": 1}}))
    assert await peer.answer() == Frame(FrameType.ACK, 2)
    after = time.time_ns() // 1_000_000
    assert type(served.delivered[0].ts) is int and before <= served.delivered[0].ts <= after  # unix ms, whole
    day = 86_400_000  # max_future_ts by default
    await peer.send(data(3, {"ts": before + day, "values": {"flow": 3}}))
    assert await peer.answer() == Frame(FrameType.ACK, 3)
    # A minute past the limit: refused however slow this machine is (it would have to take a minute to read it).
    await peer.send(data(4, {"ts": time.time_ns() // 1_000_000 + day + 60_000, "values": {"flow": 4}}))
    assert code_and_reason(await peer.answer())[:2] == (4, 5)
    await peer.send(data(5, {"ts": 1, "values": {"flow": 5}}))
    assert code_and_reason(await peer.answer())[:2] == (5, 5)
    assert served.srv.stats_for("pump-1").bad_ts == 2
    assert served.srv.points_of("pump-1") == {"flow"}


async def test_32_data_frames_may_await_their_answers_which_leave_in_order_whatever_order_they_finish_in(
    served: Served, caplog: pytest.LogCaptureFixture
) -> None:
    srv = served.srv
    peer = await logged_in(served)
    served.hold = True
    # A HEARTBEAT, then 38 DATA in one write: 32 await their answers, the 33rd is taken and then waits for a place.
    await peer.send(encode(Frame(FrameType.HEARTBEAT, 2)) + b"".join(data(seq) for seq in range(3, 41)))
    await until(lambda: len(served.waiting) >= 33, 10, "33 deliveries to start")
    assert [sample.values["flow"] for sample, _ in served.waiting] == list(range(3, 36))
    # The heartbeat's answer did not wait for them (a device would take the link for broken), nor does a command.
    assert await peer.answer() == Frame(FrameType.ACK, 2)
    command = asyncio.create_task(srv.command(Command("pump-1", "stop", {})))
    assert await peer.answer() == Frame.json(FrameType.COMMAND, 1, {"name": "stop", "args": {}})
    # (Its RESPONSE is read once the session reads again: behind the DATA it holds back.)
    await peer.send(encode(Frame.json(FrameType.RESPONSE, 1, {"ok": True})))
    # They finish last first, two of them failing; the answers still go out in the order the frames came.
    for sample, done in reversed(served.waiting[:33]):
        flow = sample.values["flow"]
        if flow == 10:
            done.set_exception(SinkError("spool full"))
        elif flow == 11:
            done.set_exception(RuntimeError("a bug in a sink"))
        else:
            done.set_result(None)
    served.release_all()
    answers = [await peer.answer() for _ in range(3, 41)]
    assert answers[:7] == [Frame(FrameType.ACK, seq) for seq in range(3, 10)]
    assert [code_and_reason(answer) for answer in answers[7:9]] == [
        (10, 8, "overloaded: spool full"),
        (11, 8, "overloaded: internal error"),
    ]
    assert answers[9:] == [Frame(FrameType.ACK, seq) for seq in range(12, 41)]
    assert await in_real_time(command) == CommandResult(ok=True)
    assert sorted(s.values["flow"] for s in served.delivered) == [f for f in range(3, 41) if f not in (10, 11)]
    assert srv.stats_for("pump-1").nacks_sent == 2
    assert [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR] == [
        "mcp pump-1: delivering DATA seq 11 failed"
    ]
    await until(lambda: srv.data_slots._value == MAX_INFLIGHT_DATA, 10, "every DATA place to be given back")


async def test_a_session_replaced_with_answers_outstanding_gives_every_place_back(served: Served) -> None:
    srv = served.srv
    old = await logged_in(served)
    served.hold = True
    await old.send(b"".join(data(seq) for seq in range(2, 40)))
    await until(lambda: len(served.waiting) >= 33, 10, "33 deliveries to start")
    assert srv.data_slots._value == MAX_INFLIGHT_DATA - 32
    # The device comes back on a new link (the old one dropped without a FIN) while its answers are still owed.
    new = await logged_in(served)
    assert await old.closed()
    await until(lambda: srv.data_slots._value == MAX_INFLIGHT_DATA, 10, "the old session's places to be given back")
    # It resends what is still being delivered: each resend waits for that delivery instead of a second one.
    await new.send(data(2) + data(3))
    await until(lambda: srv.stats_for("pump-1").duplicates == 2, 10, "both resends to be taken")
    served.release_all()
    assert [await new.answer() for _ in range(2)] == [Frame(FrameType.ACK, 2), Frame(FrameType.ACK, 3)]
    assert len(served.waiting) == 33 and len(served.delivered) == 33


async def test_a_read_full_of_frames_is_answered_at_most_256_at_a_time(
    served: Served, monkeypatch: pytest.MonkeyPatch, clock: LoopClock
) -> None:
    # The loop's clock stands still: other sessions get the loop in between, but nothing waits for time.
    peer = await logged_in(served)
    session = served.session()
    writes: list[int] = []
    real_write = session.writer.write

    def write(data: bytes) -> None:
        writes.append(len(data))
        real_write(data)

    monkeypatch.setattr(session.writer, "write", write)
    await peer.send(b"".join(encode(Frame(FrameType.HEARTBEAT, seq)) for seq in range(2, 602)))
    assert [(await peer.answer()).seq for _ in range(600)] == list(range(2, 602))
    ack = len(encode(Frame(FrameType.ACK, 2)))
    # A read of 600 frames: their answers leave in writes of 256 (other sessions get the loop in between).
    assert sum(writes) == 600 * ack and max(writes) == 256 * ack, writes


async def test_the_answers_of_one_read_may_come_to_exactly_max_unread_and_one_byte_more_closes(
    served: Served,
) -> None:
    # The answers to one read leave together at its end, so they count together against max_unread.
    first = await connect(served.srv)
    await first.send(hello())
    hello_ack = len(encode(await first.answer()))
    beats = b"".join(encode(Frame(FrameType.HEARTBEAT, seq)) for seq in range(2, 256))  # 255 frames: one batch
    answers = hello_ack + 254 * len(encode(Frame(FrameType.ACK, 2)))
    for limit, closes in ((answers, False), (answers - 1, True)):
        served.srv.cfg = replace(served.srv.cfg, max_unread=limit)
        peer = await connect(served.srv)  # replaces the session before it
        await peer.send(hello() + beats)  # one write, read in one read
        if closes:
            assert await peer.closed()
            await settle(lambda: "pump-1" not in served.srv.sessions, "the session to end")
        else:
            assert [(await peer.answer()).seq for _ in range(255)] == [1, *range(2, 256)]
            await settle(lambda: taken(served.session()), "the session to read everything")
            assert not served.session()._closed


async def test_the_transport_pauses_the_session_above_a_quarter_of_max_unread(served: Served) -> None:
    served.srv.cfg = replace(served.srv.cfg, max_unread=65542)  # a quarter of it, 16385, is no multiple of 4
    await logged_in(served)
    transport = served.session().writer.transport
    assert transport.get_write_buffer_limits() == (16385 // 4, 16385)


async def test_a_command_goes_out_while_it_fits_max_unread_and_is_refused_past_it(served: Served) -> None:
    srv = served.srv
    srv.cfg = replace(srv.cfg, max_unread=4096)
    peer = await logged_in(served)
    empty = len(Frame.json(FrameType.COMMAND, 1, {"name": "load", "args": {"blob": ""}}).payload)
    fill = "x" * (4096 - OVERHEAD - empty)  # the command's frame is 4096 bytes: exactly max_unread
    refused = await srv.command(Command("pump-1", "load", {"blob": fill + "x"}))
    assert refused == CommandResult(ok=False, error="the device is not reading (its unread output is at max_unread)")
    task = asyncio.create_task(srv.command(Command("pump-1", "load", {"blob": fill})))
    sent = await peer.answer()
    assert sent.type == FrameType.COMMAND and sent.body() == {"name": "load", "args": {"blob": fill}}
    await peer.send(encode(Frame.json(FrameType.RESPONSE, sent.seq, {"ok": True, "result": "loaded"})))
    assert await task == CommandResult(ok=True, result="loaded")
    assert "pump-1" in srv.sessions


async def test_a_command_answered_twice_in_one_read_takes_the_first_answer_and_the_session_goes_on(
    served: Served,
) -> None:
    """A device that repeats its RESPONSE (both in one read) gets its first answer taken, the second ignored."""
    srv = served.srv
    peer = await logged_in(served)
    task = asyncio.create_task(srv.command(Command("pump-1", "reset", {})))
    sent = await peer.answer()
    assert sent.type == FrameType.COMMAND
    first = Frame.json(FrameType.RESPONSE, sent.seq, {"ok": True, "result": "first"})
    second = Frame.json(FrameType.RESPONSE, sent.seq, {"ok": True, "result": "second"})
    await peer.send(encode(first) + encode(second))
    assert await task == CommandResult(ok=True, result="first")
    await peer.send(encode(Frame(FrameType.HEARTBEAT, 9)))
    assert await peer.answer() == Frame(FrameType.ACK, 9)  # the session still answers
    assert "pump-1" in srv.sessions


async def test_a_command_pending_when_the_session_ends_fails_at_once_saying_why(served: Served) -> None:
    srv = served.srv
    peer = await logged_in(served)
    task = asyncio.create_task(srv.command(Command("pump-1", "reset", {})))
    assert (await peer.answer()).type == FrameType.COMMAND
    peer.writer.close()
    async with asyncio.timeout(10):  # far less than its 4 x 5 s of retransmissions
        assert await task == CommandResult(ok=False, error="session closed: closed by peer")


async def test_a_session_whose_ack_loop_ends_is_closed_and_says_why(
    served: Served, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    async def broken(self: Session, seq: int, pending: asyncio.Future[None]) -> Frame | None:
        raise RuntimeError("a bug in the ACK loop")

    monkeypatch.setattr(Session, "_outcome", broken)
    peer = await logged_in(served)
    await peer.send(data(2))
    assert await peer.closed()
    await until(lambda: "pump-1" not in served.srv.sessions, 10, "the session to end")
    [record] = [r for r in caplog.records if r.levelno >= logging.ERROR]
    assert record.getMessage() == (
        "mcp pump-1: the ACK loop ended (RuntimeError: a bug in the ACK loop): "
        "closing the session so that the device reconnects"
    )
    assert record.exc_info is not None and str(record.exc_info[1]) == "a bug in the ACK loop"
    assert served.states[-1] == DeviceState("pump-1", False, "the ACK loop ended")
    assert served.srv.data_slots._value == MAX_INFLIGHT_DATA


async def test_the_gateway_stopping_closes_its_sessions_saying_so(
    served: Served, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG, logger="drivers.mcp.session")
    peer = await logged_in(served)
    await served.srv.stop()
    assert await peer.closed()
    assert served.states == [DeviceState("pump-1", True), DeviceState("pump-1", False, "gateway stopping")]
    said = [(r.levelno, r.getMessage()) for r in caplog.records if r.name == "drivers.mcp.session"]
    assert said == [(logging.DEBUG, "mcp pump-1: closing: gateway stopping")]


# --- deadlines, on the loop's clock moved forward by the test -------------------------------------------------


class LoopClock:
    """The running loop's clock, standing still unless the test moves it: a deadline comes exactly when it says."""

    def __init__(self) -> None:
        loop = asyncio.get_running_loop()
        self._real = loop.time
        # A whole second (a little ahead: nothing is due yet), so that sums of halves and quarters stay exact.
        self._now = float(math.ceil(loop.time()))
        self._offset: float | None = None  # once released: the loop's time is real time plus this
        loop.time = self.time  # type: ignore[method-assign]

    def time(self) -> float:
        """The loop's time now."""
        return self._now if self._offset is None else self._real() + self._offset

    def advance(self, seconds: float) -> None:
        """Move the loop's time `seconds` forward."""
        self._now += seconds

    def release(self) -> None:
        """Let the clock run again from where it stands (forward only: timers already set keep their meaning)."""
        self._offset = self._now - self._real()


@pytest.fixture
async def clock(served: Served) -> AsyncIterator[LoopClock]:
    """The test's loop clock, standing still; it runs again before the server stops."""
    stopped = LoopClock()
    try:
        yield stopped
    finally:
        stopped.release()


async def test_silence_for_three_heartbeats_closes_the_session_and_says_so(served: Served, clock: LoopClock) -> None:
    peer = await connect(served.srv)
    await peer.send(hello(heartbeat_s=1))
    assert await peer.answer() == Frame.json(FrameType.ACK, 1, {"heartbeat_s": 1})
    for seq in (2, 3):
        clock.advance(2.9)  # just short of 3 x 1 s since the last frame: each frame starts the count again
        await peer.send(encode(Frame(FrameType.HEARTBEAT, seq)))
        assert await peer.answer() == Frame(FrameType.ACK, seq)
    # A frame begun is no frame: 3 s on (before its own 5 s run out) the silence ends the session.
    await peer.send(encode(Frame(FrameType.HEARTBEAT, 4)) + data(5)[:10])
    assert await peer.answer() == Frame(FrameType.ACK, 4)
    clock.advance(3.1)
    assert await peer.closed()
    assert served.states[-1] == DeviceState("pump-1", False, "no frame for 3 s")


async def test_the_hello_deadline_runs_from_accept_and_past_hello_no_longer_holds(
    served: Served, clock: LoopClock, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG, logger="drivers.mcp.server")
    srv = served.srv
    late = await connect(srv)
    await settle(lambda: srv.pending == 1, "the connection to be accepted")
    clock.advance(9.9)  # hello_timeout is 10 s
    await late.send(corrupted(hello()))
    assert code_and_reason(await late.answer())[:2] == (1, 1)  # still open; the error moves no deadline
    clock.advance(0.2)
    assert await late.closed()
    await settle(lambda: srv.pending == 0, "the connection to end")
    assert "closed before HELLO: no HELLO within 10 s of accept" in caplog.text

    peer = await logged_in(served)
    clock.advance(10.5)
    await peer.send(encode(Frame(FrameType.HEARTBEAT, 2)))
    assert await peer.answer() == Frame(FrameType.ACK, 2)


async def test_a_frame_has_5_s_from_its_first_byte_and_bytes_that_do_not_complete_it_buy_no_time(
    served: Served, clock: LoopClock
) -> None:
    peer = await logged_in(served)
    session = served.session()
    two, three, four = data(2), data(3), data(4)

    async def send(wire: bytes) -> None:
        await peer.send(wire)
        await settle(lambda: taken(session), "the session to read what was sent")

    await send(two[:10])
    clock.advance(4.0)
    # Frame 2 completes and frame 3 starts in the same read: frame 3's 5 s run from now, not from frame 2's start.
    await send(two[10:] + three[:10])
    assert await peer.answer() == Frame(FrameType.ACK, 2)
    clock.advance(4.0)
    await send(three[10:20])
    clock.advance(0.9)
    await send(three[20:])
    assert await peer.answer() == Frame(FrameType.ACK, 3)
    # Frame 4 keeps coming a few bytes at a time but never completes: 5 s after its first byte, the session ends.
    await send(four[:10])
    clock.advance(4.5)
    await send(four[10:20])
    clock.advance(0.5)  # to the very instant the 5 s are up
    assert await peer.closed()
    assert served.states[-1] == DeviceState("pump-1", False, "a frame stalled for more than 5 s")


async def test_a_command_is_not_sent_again_once_its_requests_age_limit_passed(served: Served, clock: LoopClock) -> None:
    """A command's deadline (its request's age limit): sent once, but on silence not again after it; answered so."""
    srv = served.srv
    srv.cfg = replace(srv.cfg, ack_timeout=2.0, retries=2)
    peer = await logged_in(served)
    task = asyncio.create_task(srv.command(Command("pump-1", "open_valve", {}, deadline=time.monotonic())))
    assert (await peer.answer()).seq == 1  # the first send is the request's own, however late its check came
    clock.advance(2.1)
    result = await in_real_time(task)
    assert not result.ok and result.error == "no response within the request's age limit; not sent again after it"
    assert srv.stats_for("pump-1").commands == 1


async def test_a_command_is_sent_again_unchanged_on_silence_then_times_out(served: Served, clock: LoopClock) -> None:
    srv = served.srv
    srv.cfg = replace(srv.cfg, ack_timeout=2.0, retries=2)
    peer = await logged_in(served)
    task = asyncio.create_task(srv.command(Command("pump-1", "set_speed", {"rpm": 1200})))
    first = await peer.answer()
    assert first == Frame.json(FrameType.COMMAND, 1, {"name": "set_speed", "args": {"rpm": 1200}})
    for _ in range(2):
        clock.advance(2.1)
        assert encode(await peer.answer()) == encode(first)  # retries: the same seq, the same bytes
    clock.advance(2.1)
    assert await in_real_time(task) == CommandResult(ok=False, error="timeout")
    # Its late answer changes nothing; the next command has the next seq and gets its own answer.
    await peer.send(encode(Frame.json(FrameType.RESPONSE, 1, {"ok": True})))
    task = asyncio.create_task(srv.command(Command("pump-1", "stop", {})))
    second = await peer.answer()
    assert second == Frame.json(FrameType.COMMAND, 2, {"name": "stop", "args": {}})
    await peer.send(encode(Frame.json(FrameType.RESPONSE, 2, {"ok": True, "result": "stopped"})))
    assert await task == CommandResult(ok=True, result="stopped")
    # Without retries, one silence is enough.
    srv.cfg = replace(srv.cfg, retries=0)
    task = asyncio.create_task(srv.command(Command("pump-1", "ping", {})))
    assert (await peer.answer()).seq == 3
    clock.advance(2.1)
    assert await in_real_time(task) == CommandResult(ok=False, error="timeout")
    stats = srv.stats_for("pump-1")
    assert (stats.commands, stats.command_timeouts) == (3, 2)
    assert served.session()._responses == {}  # a long session keeps nothing of the commands it answered


async def test_a_frame_too_large_or_a_malformed_hello_is_nacked_and_closes(
    served: Served, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG, logger="drivers.mcp.server")
    srv = served.srv
    # Before HELLO only max_hello_payload (4 KiB by default) is let in: refused from the header alone.
    early = await connect(srv)
    await early.send(encode(Frame(FrameType.HELLO, 3, b"{" + b" " * 4096 + b"}"))[:14])
    assert code_and_reason(await early.answer()) == (3, 3, "frame too large")
    assert await early.closed()
    # Past HELLO, max_payload (1 MiB) holds, even for a frame in the same write as the HELLO.
    peer = await connect(srv)
    big = data(
        2,
        {"ts": NOW_MS, "values": {"s": "x" * 1000, "t": "y" * 1000, "u": "z" * 1000, "v": "w" * 1000, "w": "v" * 200}},
    )
    assert len(big) > 4096 + OVERHEAD
    await peer.send(hello() + big)
    assert (await peer.answer()).type == FrameType.ACK
    assert await peer.answer() == Frame(FrameType.ACK, 2)
    await peer.send(bytes.fromhex("55aa55aa0102") + (9).to_bytes(4, "big") + (1024 * 1024 + 1).to_bytes(4, "big"))
    assert code_and_reason(await peer.answer()) == (9, 3, "frame too large")
    assert await peer.closed()
    assert served.states[-1] == DeviceState("pump-1", False, "frame too large")

    malformed = await connect(srv)
    await malformed.send(hello(heartbeat_s=0))
    assert code_and_reason(await malformed.answer()) == (
        1,
        5,
        "malformed payload: heartbeat_s must be an integer from 1 to 3600",
    )
    assert await malformed.closed()
    await until(lambda: srv.pending == 0, 10, "the refused connections to end")
    assert "closed before HELLO: malformed HELLO: heartbeat_s must be an integer from 1 to 3600" in caplog.text
    assert srv.auth_failures == {"unknown_device": 0, "bad_token": 0}


async def narrow_link(served: Served, **fields: object) -> tuple[Peer, Session]:
    """pump-1 logged in on a link whose socket buffers (and its own reader's) hold little: answers soon pile up."""
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.setblocking(False)
    await asyncio.get_running_loop().sock_connect(sock, ("127.0.0.1", served.srv.port))
    peer = Peer(*await asyncio.open_connection(sock=sock, limit=1024))
    await peer.send(hello(**fields))
    assert (await peer.answer()).type == FrameType.ACK
    session = served.session()
    session.writer.get_extra_info("socket").setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
    return peer, session


async def stuck_peer(served: Served) -> tuple[Peer, Session, list[int]]:
    """pump-1 logged in on a link with small buffers, its answers piling up unread in its session's transport.

    Returns the peer, its session and the seqs of the heartbeats it sent (each answered, not yet read).

    Below a quarter of max_unread (1 MiB here, far above what one batch of answers adds): the session still
    reads and answers everything.
    """
    served.srv.cfg = replace(served.srv.cfg, max_unread=1024 * 1024)
    peer, session = await narrow_link(served)
    transport = session.writer.transport
    sent: list[int] = []
    while not transport.get_write_buffer_size():
        assert len(sent) < 100_000, "the kernel took every answer"
        batch = range(len(sent) + 2, len(sent) + 66)
        await peer.send(b"".join(encode(Frame(FrameType.HEARTBEAT, seq)) for seq in batch))
        sent += batch
        await settle(lambda: taken(session), "the session to read the heartbeats")
    assert 0 < session.unread <= served.srv.cfg.max_unread // 4
    return peer, session, sent


TOO_LARGE = bytes.fromhex("55aa55aa0102") + (77).to_bytes(4, "big") + (1024 * 1024 + 1).to_bytes(4, "big")


async def test_answers_queued_when_a_session_closes_get_a_second_to_leave(served: Served, clock: LoopClock) -> None:
    srv = served.srv
    closing_nack = len(encode(nack(77, NackCode.FRAME_TOO_LARGE)))
    peer, session, sent = await stuck_peer(served)
    # The answers left unread, the NACK included, come to exactly a quarter of max_unread: the most that gets a grace.
    srv.cfg = replace(srv.cfg, max_unread=4 * (session.unread + closing_nack))
    await peer.send(TOO_LARGE)  # a fatal error: NACK 3 and close
    await settle(lambda: session._closed, "the session to close")
    await turns()  # its clean-up reaches the wait for its answers to leave (no clock needed to get there)
    clock.advance(0.9)
    # The peer reads within the second: every answer, the NACK last, then a clean end (no reset).
    assert [(await peer.answer()).seq for _ in sent] == sent
    assert code_and_reason(await peer.answer()) == (77, 3, "frame too large")
    assert await peer.closed()
    await settle(lambda: "pump-1" not in srv.sessions, "the session to end")

    # One that does not read in that second gets nothing more: its socket is dropped.
    peer, session, _ = await stuck_peer(served)
    await peer.send(TOO_LARGE)
    await settle(lambda: session._closed, "the session to close")
    await turns()
    clock.advance(0.9)
    await turns()
    assert "pump-1" in srv.sessions  # still waiting for the peer to read
    # Meanwhile a command for the device fails at once: nothing more goes to a closed session.
    assert await srv.command(Command("pump-1", "reset", {})) == CommandResult(ok=False, error="session closed: closed")
    clock.advance(0.2)
    await settle(lambda: "pump-1" not in srv.sessions, "the session to end")
    assert session.writer.transport.is_closing() and session.writer.transport.get_write_buffer_size() == 0

    # One byte more than a quarter of max_unread left unread: no grace at all, dropped without the clock moving.
    peer, session, _ = await stuck_peer(served)
    srv.cfg = replace(srv.cfg, max_unread=4 * (session.unread + closing_nack - 1))
    await peer.send(TOO_LARGE)
    await settle(lambda: "pump-1" not in srv.sessions, "the session to end")


async def test_a_peer_that_leaves_its_answers_unread_is_paused_then_closed_at_its_idle_deadline_saying_why(
    served: Served, clock: LoopClock
) -> None:
    srv = served.srv

    async def pause() -> tuple[Peer, Session, int]:
        peer, session = await narrow_link(served, heartbeat_s=1)
        batch = b"".join(encode(Frame(FrameType.HEARTBEAT, seq)) for seq in range(2, 66))
        batches = 0
        while not session._paused:
            assert session.unread <= srv.cfg.max_unread // 4, "answers above a quarter of max_unread, still reading"
            peer.writer.write(batch)  # no drain: once the session stops reading, the peer's writes pile up too
            batches += 1
            await settle(lambda: session._paused or taken(session), "the session to read the heartbeats or pause")
        assert srv.cfg.max_unread // 4 < session.unread <= srv.cfg.max_unread
        return peer, session, batches

    # A peer that catches up is read again, and is no longer taken for one that does not read.
    peer, session, batches = await pause()
    for _ in range(64 * batches):
        assert (await peer.answer()).type == FrameType.ACK
    assert not session._paused
    clock.advance(3.1)
    await settle(lambda: "pump-1" not in srv.sessions, "the session to end")
    assert served.states[-1] == DeviceState("pump-1", False, "no frame for 3 s")

    peer, session, _ = await pause()
    clock.advance(2.9)
    await turns()
    assert not session._closed
    clock.advance(0.2)  # 3 x heartbeat_s since its last frame
    await settle(lambda: "pump-1" not in srv.sessions, "the session to end")
    reason = "it did not read its answers (unread output above max_unread / 4) in time"
    assert served.states[-1] == DeviceState("pump-1", False, reason)


async def test_a_tls_handshake_not_done_by_the_hello_deadline_ends_the_connection_saying_so(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG, logger="drivers.mcp.server")
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes"]
        + ["-keyout", "key.pem", "-out", "cert.pem", "-days", "2", "-subj", "/CN=127.0.0.1"],
        cwd=tmp_path,
        check=True,
        capture_output=True,
    )
    tls = {"cert": str(tmp_path / "cert.pem"), "key": str(tmp_path / "key.pem")}
    devices = [{"id": "pump-1", "token": TOKEN}]
    srv = McpServer(
        # Longer than asyncio's own 60 s handshake timeout: the HELLO deadline must be the one that holds.
        mcp_server(
            McpSection.model_validate({"listen": "127.0.0.1:0", "tls": tls, "hello_timeout": 120, "devices": devices})
        ),
        lambda sample: asyncio.sleep(0),
        lambda state: None,
    )
    await srv.start()
    clock = LoopClock()
    try:
        _, silent = await asyncio.open_connection("127.0.0.1", srv.port)  # TCP only: no ClientHello ever
        await settle(lambda: srv.pending == 1, "the connection to be accepted")
        await turns()
        clock.advance(119.9)
        await turns()
        assert srv.pending == 1
        clock.advance(0.2)  # hello_timeout, the handshake included
        await settle(lambda: srv.pending == 0, "the connection to end")
        assert "closed before HELLO: no TLS handshake within hello_timeout (120 s)" in caplog.text
        silent.close()
        # A device that does its handshake logs in, and its TLS transport pauses the session as a plain one does.
        ctx = ssl.create_default_context()
        ctx.check_hostname, ctx.verify_mode = False, ssl.CERT_NONE
        peer = Peer(*await asyncio.open_connection("127.0.0.1", srv.port, ssl=ctx))
        await peer.send(hello())
        assert (await peer.answer()).type == FrameType.ACK
        assert srv.sessions["pump-1"].writer.transport.get_write_buffer_limits() == (65536 // 16, 65536 // 4)
        # Closed by the gateway (a fatal error here): the NACK, then TLS's own orderly end.
        await peer.send(TOO_LARGE)
        assert code_and_reason(await peer.answer()) == (77, 3, "frame too large")
        assert await peer.closed()
    finally:
        clock.release()
        await srv.stop()


async def test_a_login_refused_for_a_ban_or_for_max_sessions_says_why(
    served: Served, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG, logger="drivers.mcp.server")
    srv = served.srv
    stranger = await connect(srv)
    await stranger.send(encode(Frame.json(FrameType.HELLO, 1, {"device_id": "pump-9", "token": TOKEN, "boot_id": "x"})))
    assert code_and_reason(await stranger.answer()) == (1, 7, "authentication failed")
    assert await stranger.closed()
    srv.max_sessions = 1
    await logged_in(served)
    full = await connect(srv)
    await full.send(encode(Frame.json(FrameType.HELLO, 4, {"device_id": "pump-2", "token": TOKEN_2, "boot_id": "c"})))
    assert code_and_reason(await full.answer()) == (4, 8, "overloaded: max_sessions reached")
    assert await full.closed()
    await until(lambda: srv.pending == 0, 10, "the refused connection to end")
    assert "closed before HELLO: max_sessions reached" in caplog.text
    # Banned after it connected: NACK 7 without a token check.
    srv.bans.configure(failures=1, window=60.0, ban_time=60.0)
    guess, later = await connect(srv), await connect(srv)
    await guess.send(hello(token="wrong-token-000000"))
    assert code_and_reason(await guess.answer()) == (1, 7, "authentication failed")
    await later.send(hello(seq=2))
    assert code_and_reason(await later.answer()) == (2, 7, "authentication failed")
    assert await later.closed()
    await until(lambda: srv.pending == 0, 10, "the refused connections to end")
    assert "closed before HELLO: its address is banned (mcp.auth_ban_*)" in caplog.text
    assert "closed before HELLO: authentication failed for 'pump-1'" in caplog.text
    assert "mcp: login failed from 127.0.0.1: unknown_device for device 'pump-9'" in caplog.text
    assert (srv.auth_failures, srv.refused["banned"]) == ({"unknown_device": 1, "bad_token": 1}, 1)


async def test_a_command_refused_or_merely_acked_by_the_device_fails_and_draws_no_nack(served: Served) -> None:
    srv = served.srv
    peer = await logged_in(served)
    for heartbeat, reply, error in [
        (8, nack(0, NackCode.UNKNOWN_FRAME_TYPE, "no such command"), "device refused the command: no such command"),
        (9, Frame(FrameType.ACK, 0), "malformed response: ok must be a boolean"),
    ]:
        task = asyncio.create_task(srv.command(Command("pump-1", "spin", {})))
        sent = await peer.answer()
        await peer.send(
            encode(Frame(reply.type, sent.seq, reply.payload)) + encode(Frame(FrameType.HEARTBEAT, heartbeat))
        )
        assert await peer.answer() == Frame(FrameType.ACK, heartbeat)  # and nothing came before it
        assert await in_real_time(task) == CommandResult(ok=False, error=error)


async def test_a_link_reset_by_the_peer_ends_the_session_saying_so(served: Served) -> None:
    peer = await logged_in(served)
    sock = peer.writer.get_extra_info("socket")
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))  # close sends a reset
    peer.writer.transport.abort()
    await until(lambda: "pump-1" not in served.srv.sessions, 10, "the session to end")
    assert served.states[-1] == DeviceState("pump-1", False, "connection error: [Errno 104] Connection reset by peer")


async def test_answers_past_max_unread_close_the_session_at_once_saying_so(served: Served) -> None:
    srv = served.srv
    peer, session = await narrow_link(served)
    # One write of 16-byte bad frames whose 50-byte NACKs pass max_unread (64 KiB) within one read.
    peer.writer.write(b"".join(corrupted(encode(Frame(FrameType.HEARTBEAT, seq))) for seq in range(2, 5000)))
    await until(lambda: "pump-1" not in srv.sessions, 10, "the session to end")
    reason = served.states[-1].reason
    prefix, suffix = "its unread output passed max_unread (", " > 65536 bytes)"
    assert reason.startswith(prefix) and reason.endswith(suffix), reason
    # Closed by the answer that passed it: by at most that one NACK.
    assert (
        65536
        < int(reason[len(prefix) : -len(suffix)])
        <= 65536 + len(nack(2, NackCode.CRC_MISMATCH).payload) + OVERHEAD
    )
    assert session.writer.transport.is_closing()


async def test_an_ack_loop_cancelled_from_outside_closes_the_session_saying_so(
    served: Served, caplog: pytest.LogCaptureFixture
) -> None:
    await logged_in(served)
    [acker] = [task for task in asyncio.all_tasks() if task.get_name().startswith("mcp-acks:")]
    acker.cancel()
    await until(lambda: "pump-1" not in served.srv.sessions, 10, "the session to end")
    assert [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR] == [
        "mcp pump-1: the ACK loop ended (cancelled): closing the session so that the device reconnects"
    ]
    assert served.states[-1] == DeviceState("pump-1", False, "the ACK loop ended")
