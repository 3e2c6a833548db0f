"""MCP/1 device-side client: HELLO, DATA with ACK and retransmission, heartbeats, COMMANDs, reconnect with back-off."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import ssl as ssl_lib
import uuid
from collections.abc import Awaitable
from dataclasses import dataclass
from typing import Any, TypeVar

from drivers.mcp import codec
from drivers.mcp.client_state import CommandHandler, Connection, Outstanding, Pending
from drivers.mcp.codec import DecodeError, Decoder, Frame, FrameType, MalformedPayload, NackCode, encode, nack
from gateway.errors import FieldgateError

log = logging.getLogger(__name__)

T = TypeVar("T")

STALL_TIMEOUT = 5.0  # docs/mcp.md §4.2: a frame stalled for 5 s from its first byte closes the session
_READ_CHUNK = 65536
# After these NACKs the gateway closes the session (docs/mcp.md §5), so the client closes too.
_CLOSING_CODES = frozenset(
    {NackCode.UNSUPPORTED_VERSION, NackCode.FRAME_TOO_LARGE, NackCode.NOT_REGISTERED, NackCode.AUTHENTICATION_FAILED}
)
# A DATA NACKed with these was not judged on its content (a damaged header, a session the gateway does not know):
# it stays outstanding and is sent again on the next session instead of failing the caller.
_RESEND_CODES = frozenset({NackCode.UNSUPPORTED_VERSION, NackCode.NOT_REGISTERED})


class McpClientError(FieldgateError):
    """The MCP client could not deliver a frame (it was stopped, or the gateway refused the frame)."""


class McpNacked(McpClientError):
    """The gateway answered a frame with NACK `code`; after OVERLOADED (8) the caller may retry later."""

    def __init__(self, code: int, reason: str, seq: int = 0) -> None:
        super().__init__(f"NACK {code} ({reason or 'no reason'}) for seq {seq}")
        self.code, self.reason, self.seq = code, reason, seq


class McpLinkBroken(McpClientError):
    """The connection stopped being usable (no answer after retries, closed, undecodable); the client reconnects."""


@dataclass
class McpClientStats:
    """Counters of one client, over all its connections."""

    frames_in: int = 0
    frames_out: int = 0
    retransmits: int = 0  # frames sent again with the same seq: after ack_timeout, a NACK 1, or on a new connection
    reconnects: int = 0  # connection attempts after the first
    nacks: int = 0  # NACKs received
    acked: int = 0  # DATA frames ACKed


async def _timed(aw: Awaitable[T], timeout: float | None) -> T:
    """Await `aw` for at most `timeout` seconds (None: no limit); every timed await of the client goes through here."""
    async with asyncio.timeout(timeout):
        return await aw


def _body(frame: Frame) -> dict[str, Any]:
    # A malformed answer from the gateway is read as an empty one: each caller then falls back to its default.
    try:
        return frame.body()
    except MalformedPayload:
        return {}


class McpClient:
    """A device's MCP/1 link to Fieldgate: keeps a session up and delivers DATA at least once, ACK by ACK."""

    def __init__(
        self,
        host: str,
        port: int,
        device_id: str,
        token: str,
        *,
        boot_id: str | None = None,
        heartbeat_s: int = 30,
        ack_timeout: float = 5.0,
        retries: int = 3,
        window: int = 32,
        ssl: ssl_lib.SSLContext | None = None,
        server_hostname: str | None = None,
        on_command: CommandHandler | None = None,
        meta: dict[str, Any] | None = None,
        backoff_start: float = 1.0,
        backoff_max: float = 32.0,
        stable_after: float = 60.0,
        max_payload: int = codec.DEFAULT_MAX_PAYLOAD,
        connect_timeout: float = 10.0,
    ) -> None:
        if heartbeat_s < 1 or ack_timeout <= 0 or retries < 0 or window < 1:
            raise ValueError("heartbeat_s >= 1, ack_timeout > 0, retries >= 0 and window >= 1 are required")
        if not 0 < backoff_start <= backoff_max:
            raise ValueError("0 < backoff_start <= backoff_max is required")
        self.host, self.port = host, port
        self.device_id, self.token = device_id, token
        self.boot_id = boot_id or uuid.uuid4().hex  # one per client lifetime: the gateway keeps its dup window
        self.heartbeat_s = heartbeat_s
        self.heartbeat_s_effective = heartbeat_s  # replaced by the value in each HELLO ACK
        self.ack_timeout, self.retries = ack_timeout, retries
        self.backoff_start, self.backoff_max, self.stable_after = backoff_start, backoff_max, stable_after
        self.meta = meta
        self.stats = McpClientStats()
        self.last_error: Exception | None = None  # what ended the last connection attempt; None once a HELLO is ACKed
        self._ssl, self._server_hostname = ssl, server_hostname
        self._handler = on_command
        self._max_payload = max_payload
        self._connect_timeout = connect_timeout
        # A peer that reads nothing for as long as an unanswered frame may stay unanswered has broken the link.
        self._write_timeout = ack_timeout * (retries + 1)
        self._window = asyncio.Semaphore(window)
        self._outstanding = Outstanding()  # frames not yet answered, and the seq counter
        self._conn: Connection | None = None
        self._connected = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._commands: set[asyncio.Task[None]] = set()
        self._stopped = False
        self._last_failure = ""

    @property
    def connected(self) -> bool:
        """True when the HELLO was ACKed on the current connection and it is not broken."""
        c = self._conn
        return c is not None and c.ready_at is not None and c.error is None and not c.closed

    async def start(self) -> None:
        """Start the connect/reconnect loop in the background."""
        if self._stopped:
            raise McpClientError("the MCP client was stopped; make a new one")
        if self._task is None:
            self._task = asyncio.create_task(self._run(), name=f"mcp-client-{self.device_id}")

    async def stop(self) -> None:
        """Close the connection, cancel running command handlers and fail every pending send with McpClientError."""
        self._stopped = True
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            await asyncio.wait([task])
        for t in self._commands:
            t.cancel()
        if self._commands:
            await asyncio.wait(list(self._commands))
        for p in self._outstanding:
            if not p.future.done():
                p.future.set_exception(McpClientError("the MCP client was stopped"))

    async def wait_connected(self, timeout: float) -> bool:
        """Wait up to `timeout` seconds for a session (HELLO ACKed); True when there is one."""
        with contextlib.suppress(TimeoutError):
            await _timed(self._connected.wait(), timeout)
        return self.connected

    async def send(self, values: dict[str, Any], ts: int | None = None) -> None:
        """Send one DATA frame and return once the gateway ACKed it; McpNacked on a NACK (ValueError: not JSON)."""
        body: dict[str, Any] = {"values": values}
        if ts is not None:
            body["ts"] = ts
        async with self._window:
            if self._stopped:
                raise McpClientError("the MCP client was stopped")
            payload = Frame.json(FrameType.DATA, 1, body).payload  # ValueError/TypeError for values that are not JSON
            if len(payload) > self._max_payload:
                raise ValueError(f"DATA payload of {len(payload)} bytes exceeds max_payload {self._max_payload}")
            pending = Pending(FrameType.DATA, 0, payload, asyncio.get_running_loop().create_future())
            self._outstanding.add(pending)
            if self._conn is not None:
                self._conn.wake.set()  # the session loop does every DATA write, so re-sends keep their order
            try:
                await pending.future
            finally:
                # A caller that gave up frees its window slot; a late ACK for the seq is then ignored.
                self._outstanding.remove(pending)

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        failures = 0
        while True:
            conn: Connection | None = None
            try:
                conn = await self._connect()
                await self._session(conn)
            except Exception as exc:  # network errors, NACKs, and bugs too: none may end the device's only link
                self._note_failure(exc)
            finally:
                if conn is not None:
                    await self._close(conn)
            if conn is not None and conn.ready_at is not None and loop.time() - conn.ready_at >= self.stable_after:
                failures = 0
            base = min(self.backoff_max, self.backoff_start * 2 ** min(failures, 32))
            # Jitter spreads a fleet that lost the gateway at once; the cap stays a hard cap.
            await asyncio.sleep(min(self.backoff_max, base * random.uniform(0.8, 1.2)))
            failures += 1
            self.stats.reconnects += 1

    async def _connect(self) -> Connection:
        hostname = self._server_hostname if self._ssl is not None else None
        opening = asyncio.open_connection(self.host, self.port, ssl=self._ssl, server_hostname=hostname)
        reader, writer = await _timed(opening, self._connect_timeout)
        conn = Connection(writer, asyncio.get_running_loop().time())
        conn.reader_task = asyncio.create_task(self._read_loop(conn, reader), name=f"mcp-reader-{self.device_id}")
        self._conn = conn
        return conn

    async def _close(self, conn: Connection) -> None:
        conn.closed = True
        if self._conn is conn:
            self._conn = None
            self._connected.clear()
        if conn.reader_task is not None:
            conn.reader_task.cancel()
            await asyncio.wait([conn.reader_task])
        conn.writer.close()
        with contextlib.suppress(OSError, TimeoutError):
            await _timed(conn.writer.wait_closed(), self.ack_timeout)

    def _note_failure(self, exc: Exception) -> None:
        self.last_error = exc
        text = f"{type(exc).__name__}: {exc}"
        # WARNING when the failure changes, DEBUG on repeats: a gateway that stays down must not flood the log.
        level = logging.DEBUG if text == self._last_failure else logging.WARNING
        self._last_failure = text
        expected = isinstance(exc, OSError | TimeoutError | McpClientError)
        log.log(level, "MCP client %s: %s; reconnecting", self.device_id, text, exc_info=not expected)

    async def _session(self, conn: Connection) -> None:
        """HELLO, then retransmissions, DATA flushes and heartbeats until the connection fails (it always raises)."""
        loop = asyncio.get_running_loop()
        hello: dict[str, Any] = {"device_id": self.device_id, "token": self.token, "boot_id": self.boot_id}
        hello["heartbeat_s"] = self.heartbeat_s
        if self.meta is not None:
            hello["meta"] = self.meta
        await self._transmit(conn, self._outstanding.control(conn, FrameType.HELLO, hello))
        while True:
            conn.wake.clear()
            if conn.error is not None:
                raise conn.error
            now = loop.time()
            # Past their deadline, or not yet sent on this connection (DATA new, or un-ACKed when the last one broke).
            for p in self._outstanding.due(conn, now):
                if p.future.done():
                    continue
                if p.conn is conn and p.tries >= self.retries:
                    raise McpLinkBroken(f"no answer to {p.type.name} seq {p.seq} after {p.tries} retransmissions")
                await self._transmit(conn, p)
            due = min(now + self.heartbeat_s_effective, self._outstanding.next_deadline(conn))
            if conn.ready_at is not None and not any(p.type is FrameType.HEARTBEAT for p in conn.control.values()):
                idle_until = conn.last_sent + self.heartbeat_s_effective
                if loop.time() >= idle_until:
                    beat = self._outstanding.control(conn, FrameType.HEARTBEAT, None)
                    await self._transmit(conn, beat)
                    due = min(due, beat.deadline)
                else:
                    due = min(due, idle_until)
            with contextlib.suppress(TimeoutError):
                await _timed(conn.wake.wait(), max(0.0, due - loop.time()))

    async def _transmit(self, conn: Connection, p: Pending) -> None:
        if self._outstanding.sent(conn, p, asyncio.get_running_loop().time() + self.ack_timeout):
            self.stats.retransmits += 1
        await self._write(conn, p.data)

    async def _write(self, conn: Connection, data: bytes) -> None:
        """Write one frame and drain; a failure breaks the connection rather than raising to the caller."""
        if conn.closed or conn.error is not None:
            return
        try:
            conn.writer.write(data)
            conn.last_sent = asyncio.get_running_loop().time()
            self.stats.frames_out += 1
            await _timed(conn.writer.drain(), self._write_timeout)
        except (OSError, TimeoutError) as exc:
            conn.fail(exc)

    async def _read_loop(self, conn: Connection, reader: asyncio.StreamReader) -> None:
        loop = asyncio.get_running_loop()
        decoder = Decoder(self._max_payload)
        partial_since: float | None = None
        try:
            while True:
                limit = None if partial_since is None else max(0.0, partial_since + STALL_TIMEOUT - loop.time())
                try:
                    data = await _timed(reader.read(_READ_CHUNK), limit)
                except TimeoutError:
                    raise McpLinkBroken(f"a frame stalled for {STALL_TIMEOUT:g} s") from None
                if not data:
                    raise McpLinkBroken("the gateway closed the connection")
                events = decoder.feed(data)
                if not decoder.has_partial:
                    partial_since = None
                elif events or partial_since is None:
                    partial_since = loop.time()  # a new frame began in this chunk
                for event in events:
                    if isinstance(event, DecodeError):
                        await self._write(conn, encode(event.nack()))
                        if event.fatal:
                            raise McpLinkBroken(f"undecodable stream from the gateway: {event.reason}")
                    else:
                        self.stats.frames_in += 1
                        await self._on_frame(conn, event)
        except Exception as exc:  # whatever ends the reader ends the connection; the session loop reports it
            conn.fail(exc)

    async def _on_frame(self, conn: Connection, frame: Frame) -> None:
        try:
            kind = FrameType(frame.type)
        except ValueError:
            await self._write(conn, encode(nack(frame.seq, NackCode.UNKNOWN_FRAME_TYPE)))
            return
        if kind is FrameType.ACK:
            self._on_ack(conn, frame)
        elif kind is FrameType.NACK:
            self._on_nack(conn, frame)
        elif kind is FrameType.HEARTBEAT:
            await self._write(conn, encode(Frame(FrameType.ACK, frame.seq)))
        elif kind is FrameType.COMMAND:
            await self._on_command(conn, frame)
        else:
            # HELLO, DATA, RESPONSE are the device's own types: not unknown (no NACK 4), just nothing to act on.
            log.debug("MCP client %s: ignoring a %s frame from the gateway", self.device_id, kind.name)

    def _on_ack(self, conn: Connection, frame: Frame) -> None:
        p = conn.control.pop(frame.seq, None) or self._outstanding.get(frame.seq)
        if p is None or p.future.done():
            return  # a late ACK of a frame already answered or given up: nothing waits for it
        p.future.set_result(None)
        if p.type is FrameType.HELLO:
            self._session_up(conn, frame)
        elif p.type is FrameType.DATA:
            self.stats.acked += 1

    def _session_up(self, conn: Connection, ack: Frame) -> None:
        heartbeat = _body(ack).get("heartbeat_s")
        if isinstance(heartbeat, int) and not isinstance(heartbeat, bool) and heartbeat > 0:
            self.heartbeat_s_effective = heartbeat
        else:  # docs/mcp.md §2 says the ACK carries it; without a usable one our own request is the best guess
            self.heartbeat_s_effective = self.heartbeat_s
        conn.ready_at = asyncio.get_running_loop().time()
        self.last_error = None
        self._last_failure = ""
        self._connected.set()
        conn.wake.set()
        log.info("MCP client %s: session up, heartbeat %d s", self.device_id, self.heartbeat_s_effective)

    def _on_nack(self, conn: Connection, frame: Frame) -> None:
        self.stats.nacks += 1
        body = _body(frame)
        raw_code, raw_reason = body.get("code"), body.get("reason")
        code = raw_code if isinstance(raw_code, int) else 0
        reason = raw_reason if isinstance(raw_reason, str) else ""
        nacked = McpNacked(code, reason, frame.seq)
        target = conn.control.get(frame.seq) or self._outstanding.get(frame.seq)
        if target is not None and code == NackCode.CRC_MISMATCH:
            target.deadline = 0.0  # it arrived damaged, nothing was judged: retransmit now rather than after timeout
            self._outstanding.schedule(target)
            conn.wake.set()
            return
        log.debug("MCP client %s: %s", self.device_id, nacked)
        control = conn.control.pop(frame.seq, None)
        if control is not None:
            control.future.set_result(None)
            conn.fail(nacked)  # a NACKed HELLO or HEARTBEAT leaves no session worth keeping
            return
        if target is not None and code not in _RESEND_CODES and not target.future.done():
            target.future.set_exception(nacked)
        if code in _CLOSING_CODES:
            conn.fail(nacked)

    async def _on_command(self, conn: Connection, frame: Frame) -> None:
        seq = frame.seq
        if seq in conn.responses:
            cached = conn.responses.get(seq)
            if cached is not None:  # a retransmission: same answer, handler not run again
                await self._write(conn, cached)
            return  # None: the handler is still running, and its RESPONSE answers both copies
        body = _body(frame)
        name, args = body.get("name"), body.get("args", {})
        if not isinstance(name, str) or not isinstance(args, dict):
            await self._write(conn, encode(nack(seq, NackCode.MALFORMED_PAYLOAD)))
            return
        conn.responses.begin(seq)
        task = asyncio.create_task(self._run_command(conn, seq, name, args), name=f"mcp-command-{seq}")
        self._commands.add(task)
        task.add_done_callback(self._commands.discard)

    async def _run_command(self, conn: Connection, seq: int, name: str, args: dict[str, Any]) -> None:
        data = await conn.responses.answer(seq, self._handler, name, args)
        # On a connection that broke meanwhile this is a no-op: the gateway that asked has given up on it.
        await self._write(conn, data)
