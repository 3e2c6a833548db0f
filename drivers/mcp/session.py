"""One MCP/1 connection on the gateway side: the HELLO gate, DATA in order, commands, timeouts."""

from __future__ import annotations

import asyncio
import collections
import contextlib
import hmac
import logging
import re
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from drivers.mcp.codec import DecodeError, Decoder, Frame, FrameType, McpError, NackCode, encode, seq_next
from gateway.errors import SinkError
from gateway.types import CommandResult, Sample

if TYPE_CHECKING:
    from drivers.mcp.server import McpServer

log = logging.getLogger(__name__)

HELLO_TIMEOUT = 10.0  # spec 4.2
STALL_TIMEOUT = 5.0  # spec 5: a frame whose bytes stop arriving
MAX_OUTSTANDING = 32  # spec 3: DATA frames a device may have in flight
_DEVICE_ID = re.compile(r"^[A-Za-z0-9_.-]{1,64}$")
_VALUE_NAME = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.-]{0,63}$")


class SessionClosed(Exception):
    """The session ends; `reason` says why (for the log)."""


@dataclass
class SessionStats:
    """Counters of one device across its sessions."""

    frames_in: int = 0
    frames_out: int = 0
    crc_errors: int = 0
    nacks_sent: int = 0
    duplicates: int = 0
    sessions_opened: int = 0
    sessions_closed: int = 0
    commands: int = 0
    command_timeouts: int = 0


class SeqWindow:
    """The last accepted DATA seqs of a device (spec 3: a window of 1024)."""

    def __init__(self, boot_id: str, size: int = 1024) -> None:
        self.boot_id = boot_id
        self._order: collections.deque[int] = collections.deque(maxlen=size)
        self._seen: set[int] = set()

    def __contains__(self, seq: int) -> bool:
        return seq in self._seen

    def add(self, seq: int) -> None:
        """Remember an accepted seq, forgetting the oldest beyond the window."""
        if seq in self._seen:
            return
        if len(self._order) == self._order.maxlen:
            self._seen.discard(self._order[0])
        self._order.append(seq)
        self._seen.add(seq)


def _check_data(frame: Frame) -> tuple[int | None, dict[str, Any]]:
    """The `ts` and `values` of a DATA payload; MalformedPayload-style McpError when they do not fit."""
    body = frame.body()
    ts, values = body.get("ts"), body.get("values")
    if ts is not None and (isinstance(ts, bool) or not isinstance(ts, int) or ts < 0):
        raise McpError("ts must be unix milliseconds (a non-negative integer)", frame.seq)
    if not isinstance(values, dict) or not values:
        raise McpError("values must be a non-empty object", frame.seq)
    for name, value in values.items():
        if not _VALUE_NAME.match(name):
            raise McpError(f"value name {name!r} is not topic-safe", frame.seq)
        if value is not None and not isinstance(value, bool | int | float | str):
            raise McpError(f"value {name!r} must be a number, string, bool or null", frame.seq)
    return ts, values


class Session:
    """Serves one TCP connection until it closes."""

    def __init__(self, server: McpServer, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.server = server
        self.reader = reader
        self.writer = writer
        self.device_id: str | None = None
        self.peer = writer.get_extra_info("peername")
        self._decoder = Decoder(server.cfg.max_payload)
        self._idle = HELLO_TIMEOUT
        self._partial_since: float | None = None
        self._acks: asyncio.Queue[tuple[int, asyncio.Future[None] | None, Frame | None]] = asyncio.Queue()
        self._inflight: dict[int, asyncio.Future[None]] = {}
        self._room = asyncio.Semaphore(MAX_OUTSTANDING)
        self._responses: dict[int, asyncio.Future[Frame]] = {}
        self._seq = 0
        self._closed = False
        self._close_reason = ""
        self._runner: asyncio.Task[Any] | None = None

    @property
    def stats(self) -> SessionStats:
        """The counters of this session's device (a scratch set before HELLO)."""
        return self.server.stats_for(self.device_id)

    # --- life cycle -------------------------------------------------------------------------------

    async def run(self) -> None:
        """Read frames until the peer leaves, a timeout fires or a fatal error closes the session."""
        self._runner = asyncio.current_task()
        acker = asyncio.create_task(self._ack_in_order(), name="mcp-acks")
        reason = "closed by peer"
        try:
            await self._read_loop()
        except SessionClosed as exc:
            reason = str(exc)
        except (ConnectionError, OSError) as exc:
            reason = f"connection error: {exc}"
        except asyncio.CancelledError:
            reason = self._close_reason or "cancelled"
        finally:
            self._closed = True
            acker.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await acker
            # Answers never sent still hold their places in the session's and the server's limits.
            while not self._acks.empty():
                self._acks.get_nowait()
                self.server.data_slots.release()
                self._room.release()
            for fut in self._responses.values():
                if not fut.done():
                    fut.set_exception(SessionClosed(reason))
            await self._close_transport()
            self.server.session_ended(self, reason)

    async def close(self, reason: str) -> None:
        """Close from the gateway's side (replacement, shutdown)."""
        self._closed = True
        self._close_reason = reason
        with contextlib.suppress(Exception):
            self.writer.close()
        # The reader may be waiting for room in the limits rather than for bytes: wake it.
        if self._runner is not None and self._runner is not asyncio.current_task():
            self._runner.cancel()
        log.debug("mcp %s: closing: %s", self.device_id, reason)

    async def _close_transport(self) -> None:
        with contextlib.suppress(Exception):
            await self._drain()
        self.writer.close()
        with contextlib.suppress(Exception):
            await asyncio.wait_for(self.writer.wait_closed(), 1.0)

    # --- reading ----------------------------------------------------------------------------------

    async def _read_loop(self) -> None:
        deadline = time.monotonic() + self._idle
        while not self._closed:
            now = time.monotonic()
            timeout = deadline - now
            if self._partial_since is not None:
                timeout = min(timeout, self._partial_since + STALL_TIMEOUT - now)
            try:
                async with asyncio.timeout(max(timeout, 0)):
                    data = await self.reader.read(65536)
            except TimeoutError:
                if self._partial_since is not None and time.monotonic() >= self._partial_since + STALL_TIMEOUT:
                    raise SessionClosed("a frame stalled for more than 5 s") from None
                raise SessionClosed(
                    "no HELLO within 10 s" if self.device_id is None else f"no frame for {self._idle:g} s"
                ) from None
            if not data:
                return
            events = self._decoder.feed(data)
            if self._decoder.has_partial:
                self._partial_since = self._partial_since or time.monotonic()
            else:
                self._partial_since = None
            for event in events:
                if isinstance(event, DecodeError):
                    await self._decode_error(event)
                else:
                    self.server.totals.frames_in += 1
                    try:
                        await self._frame(event)
                    finally:
                        self.stats.frames_in += 1  # after: a HELLO counts for the device it registered
            if events:
                # After handling them: a HELLO has just replaced the 10 s HELLO limit by 3 x heartbeat.
                deadline = time.monotonic() + self._idle

    async def _decode_error(self, error: DecodeError) -> None:
        if error.code == NackCode.CRC_MISMATCH:
            self.stats.crc_errors += 1
            self.server.totals.crc_errors += 1
        self._send_nack(error.seq, error.code)
        if error.fatal:
            raise SessionClosed(error.reason)

    async def _frame(self, frame: Frame) -> None:
        if self.device_id is None and frame.type != FrameType.HELLO:
            self._send_nack(frame.seq, NackCode.NOT_REGISTERED)
            raise SessionClosed("frame before HELLO")
        try:
            if frame.type == FrameType.HELLO:
                await self._hello(frame)
            elif frame.type == FrameType.DATA:
                await self._data(frame)
            elif frame.type == FrameType.HEARTBEAT:
                self._send(Frame(FrameType.ACK, frame.seq))
            elif frame.type in (FrameType.RESPONSE, FrameType.ACK, FrameType.NACK):
                fut = self._responses.get(frame.seq)
                if fut is not None and not fut.done():
                    fut.set_result(frame)
            else:
                self._send_nack(frame.seq, NackCode.UNKNOWN_FRAME_TYPE, f"unknown frame type {frame.type}")
        except McpError as exc:
            nack = self._nack(frame.seq, NackCode.MALFORMED_PAYLOAD, f"malformed payload: {exc}")
            if frame.type == FrameType.DATA:
                await self._queue(frame.seq, answer=nack)  # in order with the DATA before it
            else:
                self._send(nack)

    async def _hello(self, frame: Frame) -> None:
        body = frame.body()
        device_id, token, boot_id = body.get("device_id"), body.get("token"), body.get("boot_id")
        hb = body.get("heartbeat_s", self.server.cfg.heartbeat_s)
        if not isinstance(device_id, str) or not _DEVICE_ID.match(device_id):
            raise McpError("device_id must be 1-64 of A-Z a-z 0-9 _ . -", frame.seq)
        if not isinstance(token, str) or not isinstance(boot_id, str):
            raise McpError("token and boot_id must be strings", frame.seq)
        if isinstance(hb, bool) or not isinstance(hb, int) or not 1 <= hb <= 3600:
            raise McpError("heartbeat_s must be an integer from 1 to 3600", frame.seq)
        expected = self.server.tokens.get(device_id)
        # Compare even for an unknown id, so that timing does not tell which ids exist.
        good = hmac.compare_digest(token.encode(), (expected or "\0" + token).encode())
        if expected is None or not good:
            self._send_nack(frame.seq, NackCode.AUTHENTICATION_FAILED)
            raise SessionClosed(f"authentication failed for {device_id!r}")
        self.device_id = device_id
        self._idle = 3 * hb
        self.server.session_started(self, boot_id)
        self._send(Frame.json(FrameType.ACK, frame.seq, {"heartbeat_s": hb}))

    async def _data(self, frame: Frame) -> None:
        assert self.device_id is not None
        window = self.server.window(self.device_id)
        if frame.seq in window:
            # A retransmission of something already ACKed: ACK again, publish nothing.
            self.stats.duplicates += 1
            await self._queue(frame.seq)
            return
        pending = self._inflight.get(frame.seq)
        if pending is not None:
            self.stats.duplicates += 1
            await self._queue(frame.seq, pending)
            return
        ts, values = _check_data(frame)
        sample = Sample(self.device_id, ts if ts is not None else time.time_ns() // 1_000_000, values)
        task = asyncio.ensure_future(self.server.deliver(sample))  # a plain future from the router: no task
        self._inflight[frame.seq] = task
        await self._queue(frame.seq, task)

    async def _queue(self, seq: int, pending: asyncio.Future[None] | None = None, answer: Frame | None = None) -> None:
        """Answer a DATA frame in order: ACK once `pending` is durable, or send `answer` (a NACK)."""
        # Slow ACKs are the back-pressure: with 32 answers outstanding (or the server's limit
        # across sessions reached), stop reading.
        await self._room.acquire()
        await self.server.data_slots.acquire()
        await self._acks.put((seq, pending, answer))

    # --- answering --------------------------------------------------------------------------------

    async def _ack_in_order(self) -> None:
        while True:
            seq, pending, answer = await self._acks.get()
            try:
                if answer is None and pending is not None:
                    answer = await self._outcome(seq, pending)
                self._send(answer or Frame(FrameType.ACK, seq))
                await self._drain()
            finally:
                if pending is not None and self._inflight.get(seq) is pending:
                    self._inflight.pop(seq, None)
                self.server.data_slots.release()
                self._room.release()

    async def _outcome(self, seq: int, pending: asyncio.Future[None]) -> Frame | None:
        """None once the data is durable (and remembered as accepted), else the NACK to send."""
        try:
            await asyncio.shield(pending)
        except SinkError as exc:
            return self._nack(seq, NackCode.OVERLOADED, f"overloaded: {exc}")
        except Exception:
            log.exception("mcp %s: delivering DATA seq %d failed", self.device_id, seq)
            return self._nack(seq, NackCode.OVERLOADED, "overloaded: internal error")
        assert self.device_id is not None
        self.server.window(self.device_id).add(seq)
        return None

    def _send(self, frame: Frame) -> None:
        if self.writer.is_closing():
            return
        self.writer.write(encode(frame))
        self.stats.frames_out += 1
        self.server.totals.frames_out += 1

    def _nack(self, seq: int, code: NackCode, reason: str | None = None) -> Frame:
        self.stats.nacks_sent += 1
        self.server.totals.nacks_sent += 1
        return Frame.json(FrameType.NACK, seq, {"code": int(code), "reason": reason or code.reason})

    def _send_nack(self, seq: int, code: NackCode, reason: str | None = None) -> None:
        self._send(self._nack(seq, code, reason))

    async def _drain(self) -> None:
        if not self.writer.is_closing():
            await self.writer.drain()

    # --- commands ---------------------------------------------------------------------------------

    async def command(self, name: str, args: dict[str, Any], ack_timeout: float, retries: int) -> CommandResult:
        """Send a COMMAND and wait for its RESPONSE, retransmitting the same bytes on silence."""
        self._seq = seq_next(self._seq)
        frame = Frame.json(FrameType.COMMAND, self._seq, {"name": name, "args": args})
        fut: asyncio.Future[Frame] = asyncio.get_running_loop().create_future()
        self._responses[frame.seq] = fut
        self.stats.commands += 1
        try:
            for _ in range(retries + 1):
                self._send(frame)
                await self._drain()
                try:
                    async with asyncio.timeout(ack_timeout):
                        reply = await asyncio.shield(fut)
                except TimeoutError:
                    continue
                return _command_result(reply)
        except SessionClosed as exc:
            return CommandResult(ok=False, error=f"session closed: {exc}")
        finally:
            self._responses.pop(frame.seq, None)
        self.stats.command_timeouts += 1
        return CommandResult(ok=False, error="timeout")


def _command_result(reply: Frame) -> CommandResult:
    try:
        body = reply.body()
    except McpError as exc:
        return CommandResult(ok=False, error=f"malformed response: {exc}")
    if reply.type == FrameType.NACK:
        return CommandResult(ok=False, error=f"device refused the command: {body.get('reason', 'nack')}")
    if reply.type != FrameType.RESPONSE or not isinstance(body.get("ok"), bool):
        return CommandResult(ok=False, error="malformed response: ok must be a boolean")
    error = body.get("error")
    return CommandResult(ok=body["ok"], result=body.get("result"), error=None if body["ok"] else str(error or "failed"))
