"""One MCP/1 connection on the gateway side: the HELLO gate, DATA in order, commands, timeouts, output bounds."""

from __future__ import annotations

import asyncio
import collections
import contextlib
import functools
import hashlib
import hmac
import logging
import ssl
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from drivers.mcp.codec import (
    OVERHEAD,
    DecodeError,
    Decoder,
    Frame,
    FrameType,
    McpError,
    NackCode,
    encode,
    nack,
    seq_next,
)
from drivers.mcp.payload import BadTs, new_names, read_data, read_hello
from gateway.errors import SinkError
from gateway.types import CommandResult, Sample

if TYPE_CHECKING:
    from drivers.mcp.server import McpServer

log = logging.getLogger(__name__)

STALL_TIMEOUT = 5.0  # docs/mcp.md §4.2: a frame whose bytes stop arriving
MAX_OUTSTANDING = 32  # docs/mcp.md §3.4: DATA frames a device may have in flight
READ_SIZE = 65536
YIELD_EVERY = 256  # frames handled from one read before other sessions get the loop
CLOSE_GRACE = 1.0  # seconds answers still queued get to leave when a session closes


@functools.cache
def _default_nack_payload(code: NackCode) -> bytes:
    return nack(0, code).payload


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
    rejected_payloads: int = 0  # DATA answered NACK 5
    bad_ts: int = 0  # of those, for a ts out of range


def boot_digest(boot_id: str) -> bytes:
    """A fixed-size stand-in for a boot_id (any string, docs/mcp.md §3.1): only equality is ever asked of it."""
    return hashlib.sha256(boot_id.encode("utf-8", "surrogatepass")).digest()


class SeqWindow:
    """The last accepted DATA seqs of a device (docs/mcp.md §3.2: a window of 1024)."""

    def __init__(self, boot_id: str, size: int = 1024) -> None:
        self.boot = boot_digest(boot_id)  # not the string: a device's boot_id may be as long as its HELLO
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


class Session:
    """Serves one TCP connection until it closes.

    Before HELLO the connection is nobody's: it has `hello_timeout` from accept (a TLS handshake
    included) to log in, small frames only and `max_hello_errors` mistakes. At any time, what the
    peer leaves unread is bounded: above a quarter of `max_unread` the session stops reading until
    the peer catches up, and past `max_unread` it is closed.
    """

    def __init__(
        self,
        server: McpServer,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        address: str,
        tls: ssl.SSLContext | None = None,
    ) -> None:
        self.server = server
        self.reader = reader
        self.writer = writer
        self.address = address  # the unit of the pending caps and login bans (see admission.address_key)
        self.device_id: str | None = None
        self.peer = writer.get_extra_info("peername")
        self.pending = True  # not past HELLO yet (the server counts it under max_pending)
        self._stats = server.stats_for(None)  # the device's own once HELLO passed
        cfg = server.cfg
        loop = asyncio.get_running_loop()
        self._tls = tls
        # From accept, whatever comes after: nothing the peer sends moves it.
        self._hello_deadline = loop.time() + cfg.hello_timeout
        self._decoder = Decoder(min(cfg.max_payload, cfg.max_hello_payload))
        self._hello_errors = 0
        self._idle = cfg.hello_timeout
        self._last_event = loop.time()
        self._partial_since: float | None = None
        self._paused = False
        # Answers made while handling one read go out in one write (one syscall, not one per NACK).
        self._out: list[bytes] = []
        self._out_bytes = 0
        self._corked = False
        self._acks: asyncio.Queue[tuple[int, asyncio.Future[None] | None, Frame | None]] = asyncio.Queue()
        self._room = asyncio.Semaphore(MAX_OUTSTANDING)
        self._responses: dict[int, asyncio.Future[Frame]] = {}
        self._seq = 0
        self._closed = False
        self._finishing = False
        self._close_reason = ""
        self._runner: asyncio.Task[Any] | None = None
        self._limit_output()

    @property
    def stats(self) -> SessionStats:
        """The counters of this session's device (a scratch set before HELLO)."""
        return self._stats

    @property
    def unread(self) -> int:
        """Bytes for the peer not yet taken by it (our transport's write buffer and answers not yet written)."""
        return self.writer.transport.get_write_buffer_size() + self._out_bytes

    # --- life cycle -------------------------------------------------------------------------------

    async def run(self) -> None:
        """Read frames until the peer leaves, a timeout fires or a fatal error closes the session."""
        self._runner = asyncio.current_task()
        acker = asyncio.create_task(self._ack_in_order(), name=f"mcp-acks:{self.peer}")
        acker.add_done_callback(self._acker_ended)
        reason = "closed by peer"
        try:
            if self._tls is not None:
                await self._handshake(self._tls)
            await self._read_loop()
            if self._closed:
                reason = self._close_reason or reason
        except SessionClosed as exc:
            reason = str(exc)
        except (ConnectionError, OSError) as exc:
            reason = self._close_reason or f"connection error: {exc}"
        except asyncio.CancelledError:
            if not self._close_reason:
                raise  # not ours (the loop is going away): let it through, after the clean-up below
            reason = self._close_reason
            task = asyncio.current_task()
            if task is not None:
                task.uncancel()
        finally:
            self._finishing = True
            self._closed = True
            acker.cancel()
            # Its failure, if any, was logged by _acker_ended: here it must not cut the clean-up short.
            with contextlib.suppress(Exception, asyncio.CancelledError):
                await acker
            # Answers never sent still hold their places in the session's and the server's limits.
            while not self._acks.empty():
                self._acks.get_nowait()
                self.server.data_slots.release()
                self._room.release()
            for fut in self._responses.values():
                if not fut.done():
                    fut.set_exception(SessionClosed(reason))
            self._flush()
            await self._close_transport()
            self.server.session_ended(self, reason)

    async def close(self, reason: str) -> None:
        """Close from the gateway's side (replacement, shutdown)."""
        self._stop(reason)
        log.debug("mcp %s: closing: %s", self.device_id, reason)

    def _stop(self, reason: str) -> None:
        """Mark the session closed and wake its reader, which may be waiting for bytes, room or a drain."""
        if self._closed:
            return
        self._closed = True
        self._close_reason = reason
        if self._runner is not None and self._runner is not asyncio.current_task() and not self._finishing:
            self._runner.cancel()

    def _abort(self, reason: str) -> None:
        """Close at once, dropping what the peer left unread."""
        self._stop(reason)
        self.writer.transport.abort()

    def _acker_ended(self, task: asyncio.Task[None]) -> None:
        exc = None if task.cancelled() else task.exception()
        if self._closed and exc is None:
            return  # cancelled by the session's own close
        # The loop never returns: it ended by a bug. A session without ACKs would only stall its device.
        log.error(
            "mcp %s: the ACK loop ended (%s): closing the session so that the device reconnects",
            self.device_id or self.peer,
            "cancelled" if exc is None else f"{type(exc).__name__}: {exc}",
            exc_info=exc,
        )
        self._stop("the ACK loop ended")

    async def _close_transport(self) -> None:
        transport = self.writer.transport
        unread = transport.get_write_buffer_size()
        if not transport.is_closing() and 0 < unread <= self.server.cfg.max_unread // 4:
            # Answers already queued get a moment to leave; a peer that left more unread gets nothing more.
            with contextlib.suppress(Exception):
                # drain() waits only while the buffer is above its high mark: at 0, until every byte left.
                transport.set_write_buffer_limits(high=0)
                await asyncio.wait_for(self.writer.drain(), CLOSE_GRACE)
        if transport.get_write_buffer_size():
            transport.abort()  # close() would hold the socket until a peer that never reads took it all
        else:
            self.writer.close()
        if self._tls is None or self.writer.get_extra_info("ssl_object") is not None:
            # (A handshake that did not finish has no TLS transport left that would ever report closing.)
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self.writer.wait_closed(), CLOSE_GRACE)
        # TLS close() waits for the peer's close_notify, up to asyncio's 30 s ssl shutdown timeout: a peer
        # that never sends it would hold the socket that long after the session left every count.
        self.writer.transport.abort()

    def _limit_output(self) -> None:
        # Above a quarter of max_unread the transport asks us to pause: drain() then waits in the read loop.
        high = max(1, self.server.cfg.max_unread // 4)
        with contextlib.suppress(Exception):
            self.writer.transport.set_write_buffer_limits(high=high, low=high // 4)

    # --- reading ----------------------------------------------------------------------------------

    async def _handshake(self, ctx: ssl.SSLContext) -> None:
        """TLS inside the session, so that a handshake counts as pending and is bound by the HELLO deadline."""
        loop = asyncio.get_running_loop()
        remaining = self._hello_deadline - loop.time()
        try:
            async with asyncio.timeout_at(self._hello_deadline):
                await self.writer.start_tls(ctx, ssl_handshake_timeout=max(remaining, 0.01))
        except TimeoutError:
            limit = self.server.cfg.hello_timeout
            raise SessionClosed(f"no TLS handshake within hello_timeout ({limit:g} s)") from None
        self._limit_output()

    def _deadline(self) -> float:
        deadline = self._hello_deadline if self.device_id is None else self._last_event + self._idle
        if self._partial_since is not None:
            deadline = min(deadline, self._partial_since + STALL_TIMEOUT)
        return deadline

    def _timed_out(self, now: float) -> SessionClosed:
        if self._paused:
            # Whatever else ran out meanwhile, it ran out because the peer left its answers unread.
            return SessionClosed("it did not read its answers (unread output above max_unread / 4) in time")
        if self._partial_since is not None and now >= self._partial_since + STALL_TIMEOUT:
            return SessionClosed("a frame stalled for more than 5 s")
        if self.device_id is None:
            return SessionClosed(f"no HELLO within {self.server.cfg.hello_timeout:g} s of accept")
        return SessionClosed(f"no frame for {self._idle:g} s")

    async def _read_loop(self) -> None:
        loop = asyncio.get_running_loop()
        while not self._closed:
            try:
                async with asyncio.timeout_at(self._deadline()):
                    if self.unread > self.server.cfg.max_unread // 4:
                        # Answers pile up unread: stop taking input (and making answers) until the peer reads.
                        self._paused = True
                        await self.writer.drain()
                        self._paused = False
                    data = await self.reader.read(READ_SIZE)
            except TimeoutError:
                raise self._timed_out(loop.time()) from None
            if not data:
                return
            handled = 0
            self._corked = True
            try:
                for event in self._decoder.events(data):
                    handled += 1
                    await self._event(event)
                    if self._closed:
                        raise SessionClosed(self._close_reason)
                    if handled % YIELD_EVERY == 0:
                        # A read full of tiny frames must not hold every other device up.
                        self._flush()
                        await asyncio.sleep(0)
            finally:
                self._corked = False
                self._flush()
            now = loop.time()
            if not self._decoder.has_partial:
                self._partial_since = None
            elif handled or self._partial_since is None:
                # docs/mcp.md §4.2 counts from a frame's first byte: frames completed in this read, so the partial
                # left over started in it. Only a read that completed nothing keeps the older start.
                self._partial_since = now
            if handled:
                self._last_event = now

    async def _event(self, event: Frame | DecodeError) -> None:
        if isinstance(event, DecodeError):
            await self._decode_error(event)
            return
        self.server.totals.frames_in += 1
        try:
            await self._frame(event)
        finally:
            self._stats.frames_in += 1  # after: a HELLO counts for the device it registered

    async def _decode_error(self, error: DecodeError) -> None:
        if error.code == NackCode.CRC_MISMATCH:
            self._stats.crc_errors += 1
            self.server.totals.crc_errors += 1
        self._send_nack(error.seq, error.code)
        if error.fatal:
            raise SessionClosed(error.reason)
        if self.device_id is None:
            self._hello_errors += 1
            if self._hello_errors >= self.server.cfg.max_hello_errors:
                raise SessionClosed(f"{self._hello_errors} framing errors before HELLO")

    async def _frame(self, frame: Frame) -> None:
        if frame.type == FrameType.HELLO:
            await self._hello(frame)
            return
        if self.device_id is None:
            self._send_nack(frame.seq, NackCode.NOT_REGISTERED)
            raise SessionClosed("frame before HELLO")
        try:
            if frame.type == FrameType.DATA:
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
            answer = self._nack(frame.seq, NackCode.MALFORMED_PAYLOAD, f"malformed payload: {exc}")
            if frame.type == FrameType.DATA:
                self._stats.rejected_payloads += 1
                if isinstance(exc, BadTs):
                    self._stats.bad_ts += 1
                await self._queue(frame.seq, answer=answer)  # in order with the DATA before it
            else:
                self._send(answer)

    async def _hello(self, frame: Frame) -> None:
        if self.device_id is not None:
            # A live session cannot become another device (nor log in twice): HELLO is the first frame only.
            self._send_nack(frame.seq, NackCode.MALFORMED_PAYLOAD, "HELLO on a session that already passed HELLO")
            raise SessionClosed("a second HELLO")
        server = self.server
        if server.banned_at_hello(self):
            self._send_nack(frame.seq, NackCode.AUTHENTICATION_FAILED)
            raise SessionClosed("its address is banned (mcp.auth_ban_*)")
        try:
            hello = read_hello(frame, server.cfg.heartbeat_s)
        except McpError as exc:
            # docs/mcp.md §2: a HELLO is answered by ACK, or by NACK and close.
            self._send_nack(frame.seq, NackCode.MALFORMED_PAYLOAD, f"malformed payload: {exc}")
            raise SessionClosed(f"malformed HELLO: {exc}") from None
        expected = server.tokens.get(hello.device_id)
        given = hello.token.encode("utf-8", "surrogatepass")
        # Compare even for an unknown id, so that timing does not tell which ids exist.
        good = hmac.compare_digest(given, (expected or "\0" + hello.token).encode("utf-8", "surrogatepass"))
        if expected is None or not good:
            self._send_nack(frame.seq, NackCode.AUTHENTICATION_FAILED)
            server.auth_failed(self, hello.device_id, "unknown_device" if expected is None else "bad_token")
            raise SessionClosed(f"authentication failed for {hello.device_id!r}")
        if not server.room_for(self, hello.device_id):
            self._send_nack(frame.seq, NackCode.OVERLOADED, "overloaded: max_sessions reached")
            raise SessionClosed("max_sessions reached")
        self.device_id = hello.device_id
        self._stats = server.stats_for(hello.device_id)
        self._idle = 3 * hello.heartbeat_s
        # Past the gate: frames behind the HELLO (even in the same read) may be as large as the config allows.
        self._decoder.max_payload = server.cfg.max_payload
        server.session_started(self, hello.boot_id)
        self._send(Frame.json(FrameType.ACK, frame.seq, {"heartbeat_s": hello.heartbeat_s}))

    async def _data(self, frame: Frame) -> None:
        assert self.device_id is not None
        server = self.server
        window = server.window(self.device_id)
        if frame.seq in window:
            # A retransmission of something already ACKed: ACK again, publish nothing.
            self._stats.duplicates += 1
            await self._queue(frame.seq)
            return
        # Also one sent on an earlier session of this boot whose link dropped before the ACK: it waits for
        # that delivery (ACK when it is durable, NACK if it failed) instead of being published again.
        pending = server.inflight(self.device_id).get(frame.seq)
        if pending is not None:
            self._stats.duplicates += 1
            await self._queue(frame.seq, pending)
            return
        cfg = server.cfg
        now = time.time_ns() // 1_000_000
        ts, values = read_data(
            frame,
            now_ms=now,
            max_future_ms=int(cfg.max_future_ts * 1000),
            max_string=cfg.max_string,
            max_points=cfg.max_points,
        )
        known = server.points_of(self.device_id)
        # Taken only once the whole frame passed: a refused frame leaves no name behind.
        known.update(new_names(values, known, cfg.max_points, frame.seq))
        sample = Sample(self.device_id, ts if ts is not None else now, values)
        task = asyncio.ensure_future(server.deliver(sample))  # a plain future from the router: no task
        server.delivering(self.device_id, frame.seq, task)
        await self._queue(frame.seq, task)

    async def _queue(self, seq: int, pending: asyncio.Future[None] | None = None, answer: Frame | None = None) -> None:
        """Answer a DATA frame in order: ACK once `pending` is durable, or send `answer` (a NACK)."""
        # Slow ACKs are the back-pressure: with 32 answers outstanding (or the server's limit
        # across sessions reached), stop reading.
        if self._room.locked() or self.server.data_slots.locked():
            self._flush()  # about to wait: what is ready goes out first
        await self._room.acquire()
        try:
            await self.server.data_slots.acquire()
        except BaseException:
            self._room.release()
            raise
        self._acks.put_nowait((seq, pending, answer))

    # --- answering --------------------------------------------------------------------------------

    async def _ack_in_order(self) -> None:
        while True:
            seq, pending, answer = await self._acks.get()
            try:
                if answer is None and pending is not None:
                    answer = await self._outcome(seq, pending)
                # No drain here: a peer that does not read is bounded by max_unread (and its reader paused),
                # so the places this loop holds in the server's limit are given back as the answers go out.
                self._send(answer or Frame(FrameType.ACK, seq))
            finally:
                self.server.data_slots.release()
                self._room.release()

    async def _outcome(self, seq: int, pending: asyncio.Future[None]) -> Frame | None:
        """None once the data is durable (the server then remembers its seq as accepted), else the NACK to send."""
        try:
            await asyncio.shield(pending)
        except SinkError as exc:
            return self._nack(seq, NackCode.OVERLOADED, f"overloaded: {exc}")
        except Exception:
            log.exception("mcp %s: delivering DATA seq %d failed", self.device_id, seq)
            return self._nack(seq, NackCode.OVERLOADED, "overloaded: internal error")
        return None

    def _send(self, frame: Frame) -> None:
        if self._closed or self.writer.is_closing():
            return
        wire = encode(frame)
        self._out.append(wire)
        self._out_bytes += len(wire)
        self._stats.frames_out += 1
        self.server.totals.frames_out += 1
        unread = self.unread
        if unread > self.server.cfg.max_unread:
            self._abort(f"its unread output passed max_unread ({unread} > {self.server.cfg.max_unread} bytes)")
        elif not self._corked or asyncio.current_task() is not self._runner:
            self._flush()

    def _flush(self) -> None:
        if not self._out:
            return
        data = b"".join(self._out)
        self._out.clear()
        self._out_bytes = 0
        if not self.writer.is_closing():
            self.writer.write(data)

    def _nack(self, seq: int, code: NackCode, reason: str | None = None) -> Frame:
        self._stats.nacks_sent += 1
        self.server.totals.nacks_sent += 1
        if reason is None:
            # The default reason (docs/mcp.md §5): one payload every time (a flood of bad frames is answered by many).
            return Frame(FrameType.NACK, seq, _default_nack_payload(code))
        return nack(seq, code, reason)

    def _send_nack(self, seq: int, code: NackCode, reason: str | None = None) -> None:
        self._send(self._nack(seq, code, reason))

    # --- commands ---------------------------------------------------------------------------------

    async def command(self, name: str, args: dict[str, Any], ack_timeout: float, retries: int) -> CommandResult:
        """Send a COMMAND and wait for its RESPONSE, retransmitting the same bytes on silence."""
        self._seq = seq_next(self._seq)
        frame = Frame.json(FrameType.COMMAND, self._seq, {"name": name, "args": args})
        fut: asyncio.Future[Frame] = asyncio.get_running_loop().create_future()
        self._responses[frame.seq] = fut
        self._stats.commands += 1
        try:
            for _ in range(retries + 1):
                if self._closed:
                    raise SessionClosed(self._close_reason or "closed")
                if self.unread + len(frame.payload) + OVERHEAD > self.server.cfg.max_unread:
                    # Sent, it would close the session for the device's (or the command's) fault: refuse it instead.
                    return CommandResult(
                        ok=False, error="the device is not reading (its unread output is at max_unread)"
                    )
                self._send(frame)  # bounded by max_unread, like every answer
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
        self._stats.command_timeouts += 1
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
