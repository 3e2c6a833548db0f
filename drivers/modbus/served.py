"""What the line carries out for others between its polls: MQTT writes, and a Modbus TCP server's writes and
pass-throughs; each answered through its future, a write's points read back and published."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass

from pymodbus.pdu import ModbusPDU

from drivers.modbus.device import Device
from drivers.modbus.planner import BIT_TABLES, MAX_BITS, MAX_REGISTERS, READ_TABLES
from drivers.modbus.transactions import LineTransactions
from drivers.modbus.writes import (
    WRITE_FUNCTIONS,
    PendingRawWrite,
    PendingWrite,
    readback_request,
    readback_requests,
    written_range,
)
from gateway.errors import DeviceError
from gateway.types import Sample, Value, WriteResult, now_ms

log = logging.getLogger("drivers.modbus.bus")  # these lines were the bus's: journal filters keep them


@dataclass
class PendingPassthrough:
    """A request of a Modbus TCP server client waiting for the line, and the future its handler awaits."""

    device: Device
    request: ModbusPDU
    timeout: float
    future: asyncio.Future[ModbusPDU]

    @property
    def expected(self) -> float:
        """How long it will likely hold the line: as long as its device's last answer took (the timeout before
        any came); the line's schedule fits it between polls by it."""
        return self.device.stats.last_response_s or self.timeout


class LineRequests:
    """Carries out the requests others queued for the line, on its transactions; publishes what writes read back."""

    def __init__(
        self,
        io: LineTransactions,
        on_sample: Callable[[Sample], None],
        log_once: Callable[[Device, str, Exception], None],
        heard: Callable[[Device, ModbusPDU, DeviceError | None], None],
    ) -> None:
        self._io = io
        self._on_sample = on_sample
        self._log_once = log_once
        self._heard = heard  # a pass-through's outcome: whether its device answered

    async def write(self, pending: PendingWrite) -> None:
        """An MQTT write of one point, then its read-back; the result goes to its future."""
        result = await self._write(pending)
        if not pending.future.done():
            pending.future.set_result(result)

    async def _write(self, pending: PendingWrite) -> WriteResult:
        device, point, words = pending.device, pending.point, pending.words
        if pending.deadline is not None and (late := time.monotonic() - pending.deadline) > 0:
            # The request's age limit passed while it waited for the line: a late write is worse than none.
            return WriteResult(ok=False, error=f"too old: its age limit passed {late:.1f} s ago waiting for the line")
        try:
            await self._io.write(device, point.table, point.address, words)
        except DeviceError as exc:
            return WriteResult(ok=False, error=str(exc))
        # Read the point back: the device may clamp or ignore a value without saying so.
        readback = readback_request(point)
        try:
            data = await self._io.read(device, readback, retries=device.retries)
        except DeviceError as exc:
            return WriteResult(ok=False, error=f"written, but the read-back failed: {exc}")
        values = device.decode(readback, data)
        self._on_sample(Sample(device=device.name, ts=now_ms(), values=values))
        return WriteResult(ok=True, value=values.get(point.name))

    async def raw_write(self, pending: PendingRawWrite) -> None:
        """A Modbus TCP client's write as it came; its response to the future, then the touched points read back."""
        device, request = pending.device, pending.request
        if pending.future.done():  # its client went away while it waited: nothing was written
            return
        written = written_range(request)
        try:
            response = await self._io.execute(device, request, raw_write_timeout(device, request), write=True)
        except DeviceError as exc:
            log.info("%s: write %s by %s failed: %s", device.name, _what(request), pending.origin, exc)
            if not pending.future.done():
                pending.future.set_exception(exc)
            return
        log.info("%s: write %s by %s: %s", device.name, _what(request), pending.origin, _outcome(response))
        # The client has its answer before the read-back: the read-back is the line's own business.
        if not pending.future.done():
            pending.future.set_result(response)
        if written is not None and not response.isError():
            await self._read_back(device, *written)

    async def _read_back(self, device: Device, table: str, address: int, count: int) -> None:
        """Read back and publish the configured points a Modbus TCP client's write touched."""
        values: dict[str, Value] = {}
        for request in readback_requests(device, table, address, count):
            try:
                data = await self._io.read(device, request, retries=device.retries)
            except DeviceError as exc:
                self._log_once(device, f"read-back {request.table}@{request.address}", exc)
                continue
            values.update(device.decode(request, data))
        if values:
            self._on_sample(Sample(device=device.name, ts=now_ms(), values=values))

    async def pass_through(self, pending: PendingPassthrough) -> None:
        """A Modbus TCP client's request as it came; the device's response (or the failure) to its future."""
        if pending.future.done():  # its client went away while it waited
            return
        if pending.device.online is False:
            # It went offline while this waited (maybe by the reads queued before it): 0x0B at once, not a timeout.
            pending.future.set_exception(DeviceError(f"{pending.device.name} is offline"))
            return
        try:
            response = await self._io.execute(pending.device, pending.request, pending.timeout, write=False)
        except DeviceError as exc:
            self._heard(pending.device, pending.request, exc)
            if not pending.future.done():
                pending.future.set_exception(exc)
            return
        self._heard(pending.device, pending.request, None)
        if not pending.future.done():
            pending.future.set_result(response)


def passthrough_timeout(device: Device, request: ModbusPDU) -> float:
    """How long a client's request may wait for its answer: a read's own (its table and count), else the longest."""
    table = READ_TABLES.get(request.function_code)
    count = getattr(request, "count", 0)
    if (
        table is not None
        and isinstance(count, int)
        and 0 < count <= (MAX_BITS if table in BIT_TABLES else MAX_REGISTERS)
    ):
        return device.timeout(table, count)
    return device.timeout("holding", MAX_REGISTERS)


def raw_write_timeout(device: Device, request: ModbusPDU) -> float:
    """How long a client's write may wait for its answer: a write's own for 5, 6, 15 and 16; the longest for the
    others (0x15-0x17, diagnostics: frames up to 256 bytes either way, 0x17's answer carries what it reads)."""
    written = written_range(request)
    if request.function_code in WRITE_FUNCTIONS and written is not None:
        return device.timeout(written[0], written[2], write=True)
    return passthrough_timeout(device, request)


def _what(request: ModbusPDU) -> str:
    """A write request in a log line: `function 6 at 40`."""
    return f"function {request.function_code} at {request.address}"


def _outcome(response: ModbusPDU) -> str:
    return f"exception {response.exception_code}" if response.isError() else "ok"
