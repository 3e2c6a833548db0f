"""One MCP/1 connection on the gateway side: the I/O around `protocol.SessionProtocol`.

The protocol decides (HELLO gate, duplicates, answer order, deadlines, command retransmissions); this
module reads and writes the socket, waits for deliveries and room, bounds what the peer leaves unread
and asks its host (the server, through `SessionHost`) about logins, devices and limits.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import ssl
import time
from typing import Any

from drivers.mcp.codec import OVERHEAD, DecodeError, Decoder, Frame, NackCode, encode
from drivers.mcp.events import Action, Close, DataIn, Join, Login, Owe, OwedAnswer, Reply, Send
from drivers.mcp.host import SessionHost
from drivers.mcp.output import PeerOutput
from drivers.mcp.protocol import MAX_OUTSTANDING, STALL_TIMEOUT, SessionProtocol, SessionStats, command_result
from gateway.errors import SinkError
from gateway.types import CommandResult, now_ms

log = logging.getLogger(__name__)

READ_SIZE = 65536
YIELD_EVERY = 256  # frames handled from one read before other sessions get the loop


class SessionClosed(Exception):
    """The session ends; `reason` says why (for the log)."""


class Session:
    """Serves one TCP connection until it closes.

    Before HELLO the connection is nobody's: it has `hello_timeout` from accept (a TLS handshake
    included) to log in, small frames only and `max_hello_errors` mistakes. At any time, what the
    peer leaves unread is bounded: above a quarter of `max_unread` the session stops reading until
    the peer catches up, and past `max_unread` it is closed.
    """

    def __init__(
        self,
        server: SessionHost[Session],
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        address: str,
        tls: ssl.SSLContext | None = None,
    ) -> None:
        self.server = server
        self.reader = reader
        self.writer = writer
        self.address = address  # the unit of the pending caps and login bans (see admission.address_key)
        self.peer = writer.get_extra_info("peername")
        self.pending = True  # not past HELLO yet (the server counts it under max_pending)
        cfg = server.cfg
        self._protocol = SessionProtocol(
            cfg, asyncio.get_running_loop().time(), server.stats_for(None), server.totals, STALL_TIMEOUT
        )
        self._tls = tls
        self._decoder = Decoder(min(cfg.max_payload, cfg.max_hello_payload))
        self._paused = False
        # Answers made while handling one read go out in one write (one syscall, not one per NACK).
        self._output = PeerOutput(writer)
        self._corked = False
        # Every DATA answer leaves from the ACK loop, as it always did: the owed answer, and its delivery if any.
        self._owed: asyncio.Queue[tuple[OwedAnswer, asyncio.Future[None] | None]] = asyncio.Queue()
        self._room = asyncio.Semaphore(MAX_OUTSTANDING)
        self._responses: dict[int, asyncio.Future[Frame]] = {}
        self._closed = False
        self._finishing = False
        self._close_reason = ""
        self._runner: asyncio.Task[Any] | None = None
        self._output.limit(server.cfg.max_unread)

    @property
    def device_id(self) -> str | None:
        """The device this session serves; None before HELLO."""
        return self._protocol.device_id

    @property
    def stats(self) -> SessionStats:
        """The counters of this session's device (a scratch set before HELLO)."""
        return self._protocol.stats

    @property
    def unread(self) -> int:
        """Bytes for the peer not yet taken by it (our transport's write buffer and answers not yet written)."""
        return self._output.unread

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
            for _ in range(self._protocol.forget_owed()):
                self.server.data_slots.release()
                self._room.release()
            for fut in self._responses.values():
                if not fut.done():
                    fut.set_exception(SessionClosed(reason))
            self._output.flush()
            await self._output.close(self.server.cfg.max_unread, tls=self._tls is not None)
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

    # --- reading ----------------------------------------------------------------------------------

    async def _handshake(self, ctx: ssl.SSLContext) -> None:
        """TLS inside the session, so that a handshake counts as pending and is bound by the HELLO deadline."""
        loop = asyncio.get_running_loop()
        deadline = self._protocol.hello_deadline
        try:
            async with asyncio.timeout_at(deadline):
                await self.writer.start_tls(ctx, ssl_handshake_timeout=max(deadline - loop.time(), 0.01))
        except TimeoutError:
            limit = self.server.cfg.hello_timeout
            raise SessionClosed(f"no TLS handshake within hello_timeout ({limit:g} s)") from None
        self._output.limit(self.server.cfg.max_unread)

    async def _read_loop(self) -> None:
        loop = asyncio.get_running_loop()
        while not self._closed:
            try:
                async with asyncio.timeout_at(self._protocol.deadline()):
                    if self.unread > self.server.cfg.max_unread // 4:
                        # Answers pile up unread: stop taking input (and making answers) until the peer reads.
                        self._paused = True
                        await self.writer.drain()
                        self._paused = False
                    data = await self.reader.read(READ_SIZE)
            except TimeoutError:
                closing = self._protocol.timed_out(loop.time(), self._paused, self.server.cfg)
                raise SessionClosed(closing.reason) from None
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
                        self._output.flush()
                        await asyncio.sleep(0)
            finally:
                self._corked = False
                self._output.flush()
            self._protocol.read(loop.time(), handled, self._decoder.has_partial)

    async def _event(self, event: Frame | DecodeError) -> None:
        if isinstance(event, DecodeError):
            await self._act(self._protocol.decode_error(event, self.server.cfg))
            return
        self.server.totals.frames_in += 1
        try:
            await self._act(self._protocol.receive(event))
        finally:
            self.stats.frames_in += 1  # after: a HELLO counts for the device it registered

    async def _act(self, actions: list[Action]) -> None:
        """Do what the protocol asked, in order; a Close ends the session (after the frames before it)."""
        for action in actions:
            if isinstance(action, Send):
                self._send(action.frame)
            elif isinstance(action, Close):
                raise SessionClosed(action.reason)
            elif isinstance(action, Login):
                await self._login(action.frame)
            elif isinstance(action, DataIn):
                await self._data(action.frame)
            elif isinstance(action, Reply):
                fut = self._responses.get(action.frame.seq)
                if fut is not None and not fut.done():
                    fut.set_result(action.frame)

    async def _login(self, frame: Frame) -> None:
        server = self.server
        verdict = self._protocol.login(
            frame, server.cfg, banned=server.banned_at_hello(self), token_of=server.tokens.get
        )
        if verdict.auth_failure is not None:
            server.auth_failed(self, verdict.device_id, verdict.auth_failure)
        hello = verdict.hello
        if hello is None:
            await self._act(verdict.refusal)
            return
        if not server.room_for(self, hello.device_id):
            await self._act(self._protocol.no_room(frame.seq).refusal)
            return
        ack = self._protocol.register(hello, frame.seq, server.stats_for(hello.device_id))
        # Past the gate: frames behind the HELLO (even in the same read) may be as large as the config allows.
        self._decoder.max_payload = server.cfg.max_payload
        server.session_started(self, hello.boot_id)
        self._send(ack)

    async def _data(self, frame: Frame) -> None:
        device_id = self.device_id
        assert device_id is not None
        server = self.server
        inflight = server.inflight(device_id)
        verdict = self._protocol.data(
            frame,
            server.cfg,
            now_ms=now_ms(),
            window=server.window(device_id),
            delivering=inflight,
            names=server.points_of(device_id),
        )
        if isinstance(verdict, Owe):
            await self._queue(verdict.seq, answer=verdict.answer)  # in order with the DATA before it
            return
        if isinstance(verdict, Join):
            await self._queue(verdict.seq, inflight[verdict.seq])
            return
        task = asyncio.ensure_future(server.deliver(verdict.sample))  # a plain future from the router: no task
        server.delivering(device_id, verdict.seq, task)
        await self._queue(verdict.seq, task)

    async def _queue(self, seq: int, pending: asyncio.Future[None] | None = None, answer: Frame | None = None) -> None:
        """Answer a DATA frame in order: ACK once `pending` is durable, or send `answer` (a NACK)."""
        # Slow ACKs are the back-pressure: with 32 answers outstanding (or the server's limit
        # across sessions reached), stop reading.
        if self._room.locked() or self.server.data_slots.locked():
            self._output.flush()  # about to wait: what is ready goes out first
        await self._room.acquire()
        try:
            await self.server.data_slots.acquire()
        except BaseException:
            self._room.release()
            raise
        self._owed.put_nowait((self._protocol.owe(seq, answer, decided=pending is None), pending))

    # --- answering --------------------------------------------------------------------------------

    async def _ack_in_order(self) -> None:
        while True:
            owed, pending = await self._owed.get()
            if pending is not None:
                self._protocol.delivered(owed, await self._outcome(owed.seq, pending))
            self._send_answers()

    def _send_answers(self) -> None:
        """Send the DATA answers the protocol lets go now, each giving back its places in the limits."""
        # No drain here: a peer that does not read is bounded by max_unread (and its reader paused),
        # so the places held in the server's limit are given back as the answers go out.
        for answer in self._protocol.answers():
            try:
                self._send(answer)
            finally:
                self.server.data_slots.release()
                self._room.release()

    async def _outcome(self, seq: int, pending: asyncio.Future[None]) -> Frame | None:
        """None once the data is durable (the server then remembers its seq as accepted), else the NACK to send."""
        try:
            await asyncio.shield(pending)
        except SinkError as exc:
            return self._protocol.nack(seq, NackCode.OVERLOADED, f"overloaded: {exc}")
        except Exception:
            log.exception("mcp %s: delivering DATA seq %d failed", self.device_id, seq)
            return self._protocol.nack(seq, NackCode.OVERLOADED, "overloaded: internal error")
        return None

    def _send(self, frame: Frame) -> None:
        if self._closed or self.writer.is_closing():
            return
        wire = encode(frame)
        self._output.add(wire)
        self.stats.frames_out += 1
        self.server.totals.frames_out += 1
        unread = self.unread
        if unread > self.server.cfg.max_unread:
            self._abort(f"its unread output passed max_unread ({unread} > {self.server.cfg.max_unread} bytes)")
        elif not self._corked or asyncio.current_task() is not self._runner:
            self._output.flush()

    # --- commands ---------------------------------------------------------------------------------

    async def command(
        self, name: str, args: dict[str, Any], ack_timeout: float, retries: int, *, deadline: float | None = None
    ) -> CommandResult:
        """Send a COMMAND and wait for its RESPONSE, retransmitting the same bytes on silence (not after `deadline`,
        time.monotonic(): the request's age limit; a late command is worse than none)."""
        loop = asyncio.get_running_loop()
        pending = self._protocol.command(name, args, retries)
        fut: asyncio.Future[Frame] = loop.create_future()
        self._responses[pending.seq] = fut
        timed_out = False
        try:
            sent = False
            while (frame := self._protocol.command_due(pending)) is not None:
                if self._closed:
                    raise SessionClosed(self._close_reason or "closed")
                if sent and deadline is not None and time.monotonic() > deadline:
                    return CommandResult(
                        ok=False, error="no response within the request's age limit; not sent again after it"
                    )
                sent = True
                if self.unread + len(frame.payload) + OVERHEAD > self.server.cfg.max_unread:
                    # Sent, it would close the session for the device's (or the command's) fault: refuse it instead.
                    return CommandResult(
                        ok=False, error="the device is not reading (its unread output is at max_unread)"
                    )
                self._send(frame)  # bounded by max_unread, like every answer
                try:
                    async with asyncio.timeout_at(self._protocol.command_sent(pending, loop.time(), ack_timeout)):
                        reply = await asyncio.shield(fut)
                except TimeoutError:
                    continue
                return command_result(reply)
            timed_out = True
        except SessionClosed as exc:
            return CommandResult(ok=False, error=f"session closed: {exc}")
        finally:
            self._responses.pop(pending.seq, None)
            self._protocol.command_done(pending, timed_out=timed_out)
        return CommandResult(ok=False, error="timeout")
