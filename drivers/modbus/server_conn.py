"""One Modbus TCP client's connection: MBAP frames in (pymodbus' socket framer and server-side PDU decoder),
answers out in request order, a bounded number waiting for a line, and TCP back-pressure beyond that."""

from __future__ import annotations

import asyncio
import logging
import struct
import time
from collections.abc import Callable
from dataclasses import dataclass

from pymodbus.framer import FramerSocket
from pymodbus.pdu import DecodePDU, ExceptionResponse, ModbusPDU

from drivers.modbus.server_requests import (
    BUSY,
    DEVICE_FAILURE,
    ILLEGAL_DATA_VALUE,
    ILLEGAL_FUNCTION,
    PATH_UNAVAILABLE,
    READ_TABLES,
    Exposed,
    RequestHandler,
    exception,
    writes,
)

log = logging.getLogger(__name__)

#: MBAP header: transaction id, protocol id, length (2 bytes each), then the unit id the length counts.
MBAP_HEADER = 7
#: A read request's PDU: function code, address, count.
READ_PDU_BYTES = 5
#: The length field counts the unit id and the PDU: a PDU is 1 to 253 bytes.
MIN_LENGTH, MAX_LENGTH = 2, 254
#: A frame that has begun must be complete within this long: a header announcing more than ever comes
#: must not hold the connection (and its buffer) forever.
PARTIAL_FRAME_TIMEOUT = 10.0
#: Bytes read from the socket at a time: the connection buffers at most this and one frame.
READ_CHUNK = 4096
#: Answers a connection holds for its client before it stops reading the socket, on top of `max_queue`:
#: a client that sends faster than it reads (or than the lines serve) is back-pressured by TCP.
HARD_QUEUE_EXTRA = 32
#: Requests one connection may bring per second, and at once: a client flooding the server with cache hits
#: would otherwise take the event loop from the lines' own timing (10 clients at 25,000 cache hits/s halved
#: the polls' rate and timed a device out). Beyond it the socket is not read: TCP back-pressure, no answer lost.
REQUEST_RATE = 200.0
REQUEST_BURST = 50


class Malformed(Exception):
    """The client sent something that is no Modbus TCP frame: the connection is closed."""


@dataclass(frozen=True, slots=True)
class Frame:
    """One request as it came: its transaction id, unit id and PDU bytes."""

    tid: int
    unit: int
    pdu: bytes


class Connection:
    """Serves one client: a reader that frames and routes requests, a writer that answers them in order."""

    def __init__(
        self,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        handler: RequestHandler,
        *,
        peer: str,
        max_queue: int,
        on_malformed: Callable[[Connection, str], None],
        idle_timeout: float | None = None,
    ) -> None:
        self._reader, self._writer = reader, writer
        self._handler = handler
        self.peer = peer  # "host:port"
        self.origin = f"modbus-tcp {peer}"
        self._max_queue = max_queue
        # A client gone without a word (a SCADA host powered off, a cable pulled) would hold its slot of
        # max_connections for ever: one that sends nothing for this long, and waits for nothing, is closed.
        self._idle_timeout = idle_timeout
        self._on_malformed = on_malformed
        self._framer = FramerSocket(DecodePDU(is_server=True))
        self._decoder = self._framer.decoder
        #: Answers in request order, each with the request's transaction id and unit id.
        self._answers: asyncio.Queue[tuple[Frame, asyncio.Future[ModbusPDU]]] = asyncio.Queue(
            max_queue + HARD_QUEUE_EXTRA
        )
        #: Requests of this connection waiting for a line (or behind a write of this connection).
        self.waiting: set[asyncio.Task[ModbusPDU]] = set()
        self._last_write: asyncio.Task[ModbusPDU] | None = None
        self._sides: tuple[asyncio.Task[None], ...] = ()
        # A new connection starts with one token, not the burst: reconnecting must not be a way around the rate.
        self._tokens = 1.0
        self._tokens_at = time.monotonic()

    async def serve(self) -> None:
        """Read, answer and write until the client goes, sends a malformed frame, or the server stops."""
        reading = asyncio.create_task(self._read_requests(), name=f"modbus-server {self.peer} in")
        sending = asyncio.create_task(self._send_answers(), name=f"modbus-server {self.peer} out")
        self._sides = (reading, sending)
        try:
            # Either side ending ends the connection: a reader blocked on a full queue must not outlive the writer.
            await asyncio.wait({reading, sending}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            self.close()
            await asyncio.wait({reading, sending})
        for task in (reading, sending):
            if task.cancelled() or (exc := task.exception()) is None:
                continue
            if isinstance(exc, Malformed):
                self._on_malformed(self, str(exc))
            elif not isinstance(exc, ConnectionError | OSError):  # an OSError: the client went away
                log.error("modbus-server %s: %r", self.peer, exc, exc_info=exc)

    def close(self) -> None:
        """Drop what waits (the lines skip a request whose client is gone) and close the socket at once."""
        for task in (*self._sides, *self.waiting):
            task.cancel()
        # Not a graceful close: answers a client does not read would hold the socket open for ever.
        self._writer.transport.abort()

    # --- requests in -------------------------------------------------------------------------

    async def _read_requests(self) -> None:
        buffer = bytearray()
        while True:
            frame = self._next_frame(buffer)
            if frame is not None:
                await self._paced()
                await self._request(frame)
                continue
            try:
                async with asyncio.timeout(PARTIAL_FRAME_TIMEOUT if buffer else self._idle_timeout):
                    chunk = await self._reader.read(READ_CHUNK)
            except TimeoutError:
                if buffer:
                    raise Malformed(f"a frame stayed incomplete for {PARTIAL_FRAME_TIMEOUT:g} s") from None
                if self.waiting or not self._answers.empty():
                    continue  # it waits for its answers: not idle
                log.info(
                    "modbus-server %s: nothing sent for %g s (idle_timeout): closed", self.peer, self._idle_timeout
                )
                return
            if not chunk:
                return
            buffer += chunk

    async def _paced(self) -> None:
        """Spend one of the connection's request tokens, waiting (not reading) until there is one."""
        now = time.monotonic()
        self._tokens = min(float(REQUEST_BURST), self._tokens + (now - self._tokens_at) * REQUEST_RATE)
        self._tokens_at = now
        if self._tokens < 1.0:
            await asyncio.sleep((1.0 - self._tokens) / REQUEST_RATE)
            self._tokens, self._tokens_at = 1.0, time.monotonic()
        self._tokens -= 1.0

    def _next_frame(self, buffer: bytearray) -> Frame | None:
        if len(buffer) < MBAP_HEADER:
            return None
        # pymodbus' framer answers "wait for more" both to a short frame and to a wrong protocol id, and takes
        # any length: the header's protocol id and length are checked here, the frame is then its to decode.
        protocol, length = int.from_bytes(buffer[2:4], "big"), int.from_bytes(buffer[4:6], "big")
        if protocol != 0:
            raise Malformed(f"protocol id {protocol} (Modbus is 0)")
        if not MIN_LENGTH <= length <= MAX_LENGTH:
            raise Malformed(f"MBAP length {length} (a Modbus TCP frame has {MIN_LENGTH} to {MAX_LENGTH})")
        end = 6 + length
        if len(buffer) < end:
            return None
        # Exactly one frame: pymodbus then reads no byte of the next one.
        used, unit, tid, pdu = self._framer.decode(bytes(buffer[:end]))
        del buffer[:end]
        if used != end or not pdu:
            raise Malformed(f"frame of {end} bytes not taken by the MBAP framer")
        return Frame(tid, unit, pdu)

    async def _request(self, frame: Frame) -> None:
        fc = frame.pdu[0]
        if fc == 0 or fc & 0x80:
            raise Malformed(f"function code {fc} in a request")
        answer: asyncio.Future[ModbusPDU]
        if fc not in self._decoder.pdu_table:
            # A well-framed request for a function pymodbus does not know: refused as a Modbus server does.
            known = frame.unit in self._handler.units
            answer = self._now(ExceptionResponse(fc, ILLEGAL_FUNCTION if known else PATH_UNAVAILABLE))
        else:
            request = self._decoder.decode(frame.pdu)
            if request is None and fc in READ_TABLES and len(frame.pdu) == READ_PDU_BYTES:
                # A well-formed read whose count is out of range (0, or past 125 registers or 2,000 bits):
                # pymodbus refuses to decode it; a Modbus server answers 0x03, it is no reason to close.
                known = frame.unit in self._handler.units
                answer = self._now(ExceptionResponse(fc, ILLEGAL_DATA_VALUE if known else PATH_UNAVAILABLE))
            elif request is None:
                raise Malformed(f"function {fc}: pymodbus cannot decode the request ({len(frame.pdu)} bytes)")
            else:
                answer = self._answer(frame.unit, request)
        # Blocks while the client has this many answers outstanding: the socket is not read meanwhile.
        await self._answers.put((frame, answer))

    def _answer(self, unit: int, request: ModbusPDU) -> asyncio.Future[ModbusPDU]:
        handler = self._handler
        after = self._last_write if self._last_write is not None and not self._last_write.done() else None
        target: Exposed | None = None
        if after is None:
            routed = handler.route(unit, request, self.origin)
            if not isinstance(routed, Exposed):
                return self._now(routed)
            target = routed
        if len(self.waiting) >= self._max_queue:
            handler.stats.busy += 1
            return self._now(exception(request, BUSY))
        task = asyncio.create_task(self._on_line(unit, request, target, after))
        self.waiting.add(task)
        task.add_done_callback(self.waiting.discard)
        if writes(request):
            self._last_write = task
        return task

    async def _on_line(
        self, unit: int, request: ModbusPDU, target: Exposed | None, after: asyncio.Task[ModbusPDU] | None
    ) -> ModbusPDU:
        if after is not None:
            # A read behind a write of the same client sees the written values: it is routed once the write ended.
            await asyncio.wait({after})
            routed = self._handler.route(unit, request, self.origin)
            if not isinstance(routed, Exposed):
                return routed
            target = routed
        assert target is not None
        return await self._handler.on_line(target, request, self.origin)

    @staticmethod
    def _now(response: ModbusPDU) -> asyncio.Future[ModbusPDU]:
        done: asyncio.Future[ModbusPDU] = asyncio.get_running_loop().create_future()
        done.set_result(response)
        return done

    # --- answers out -------------------------------------------------------------------------

    async def _send_answers(self) -> None:
        stats = self._handler.stats
        while True:
            request, answer = await self._answers.get()
            fc = request.pdu[0]
            try:
                response = await answer
            except Exception:
                log.exception("modbus-server %s: answering a request failed", self.peer)
                response = ExceptionResponse(fc, DEVICE_FAILURE)
            # The client's own transaction id and unit id, whatever the line used.
            response.transaction_id, response.dev_id = request.tid, request.unit
            try:
                data = self._framer.buildFrame(response)
            except (ValueError, OverflowError, struct.error) as exc:
                log.warning("modbus-server %s: cannot frame the answer %s: %s", self.peer, response, exc)
                response = ExceptionResponse(fc, DEVICE_FAILURE, request.unit, request.tid)
                data = self._framer.buildFrame(response)
            if response.isError():
                code = response.exception_code
                stats.exceptions[code] = stats.exceptions.get(code, 0) + 1
            self._writer.write(data)
            await self._writer.drain()
