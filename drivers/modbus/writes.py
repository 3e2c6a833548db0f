"""Writes to a Modbus device, checked and encoded before they wait for the line (no I/O here)."""

from __future__ import annotations

import asyncio
import math
from dataclasses import dataclass

from pymodbus.pdu import ModbusPDU

from drivers.modbus.device import Device
from drivers.modbus.planner import BIT_TABLES, ReadRequest, Span, plan
from drivers.modbus.settings import PointSettings
from gateway.errors import WriteRejected
from gateway.types import Write, WriteResult

#: What a write puts on the wire: register words, or bits for a coil.
Words = list[int] | list[bool]


@dataclass
class PendingWrite:
    """A checked, encoded write waiting for the line, and the future its caller awaits."""

    device: Device
    point: PointSettings
    words: Words
    future: asyncio.Future[WriteResult]
    deadline: float | None = None  # time.monotonic() after which it is refused, not written late


@dataclass
class PendingRawWrite:
    """A Modbus TCP server client's write request as it came, waiting for the line, and the future it awaits."""

    device: Device
    request: ModbusPDU
    origin: str  # who asked (`modbus-tcp <peer>`), for the log
    future: asyncio.Future[ModbusPDU]


#: The writes of single and multiple coils and registers (5, 6, 15, 16).
WRITE_FUNCTIONS = frozenset({5, 6, 15, 16})
#: Function codes that write, and the table they write: (function code) -> table.
_WRITE_TABLES = {5: "coil", 15: "coil", 6: "holding", 16: "holding", 0x16: "holding", 0x17: "holding"}


def written_range(request: ModbusPDU) -> tuple[str, int, int] | None:
    """The (table, address, count) a request writes, None for one that writes nothing (a read, a diagnostic)."""
    table = _WRITE_TABLES.get(request.function_code)
    if table is None:
        return None
    code = request.function_code
    if code == 0x17:  # read/write multiple registers: the write part
        return table, int(getattr(request, "write_address", 0)), len(getattr(request, "write_registers", ()))
    if code in (5, 6, 0x16):
        return table, request.address, 1
    if code == 15:
        return table, request.address, len(request.bits)
    return table, request.address, len(request.registers)


def readback_requests(device: Device, table: str, address: int, count: int) -> list[ReadRequest]:
    """The reads that fetch every configured point a write of `count` from `address` on `table` touched, planned."""
    end = address + count
    spans = [
        Span(p.name, p.table, p.address, p.codec.count)
        for p in device.points.values()
        if p.table == table and p.address < end and address < p.address + p.codec.count
    ]
    return plan(spans, max_gap=device.cfg.max_gap, max_registers=device.cfg.max_registers) if spans else []


def encode_write(device: Device, request: Write) -> tuple[PointSettings, Words]:
    """The point `request` writes and its value encoded; raises WriteRejected or CodecError to say why not."""
    point = device.points.get(request.point)
    if point is None:
        raise WriteRejected(f"{device.name} has no point {request.point!r}")
    if not point.writable:
        raise WriteRejected(f"{device.name}.{point.name} is read-only")
    value = request.value
    if point.min is not None or point.max is not None:
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise WriteRejected(f"{device.name}.{point.name} expects a number, got {value!r}")
        if not math.isfinite(value):
            # NaN compares false with both limits: without this it would slip past them.
            lo, hi = ("" if x is None else f"{x:g}" for x in (point.min, point.max))
            limits = f"{lo}..{hi}"
            raise WriteRejected(f"{value} is not a number within the limits {limits} of {device.name}.{point.name}")
        if point.min is not None and value < point.min:
            raise WriteRejected(f"{value} is below the minimum {point.min:g} of {device.name}.{point.name}")
        if point.max is not None and value > point.max:
            raise WriteRejected(f"{value} is above the maximum {point.max:g} of {device.name}.{point.name}")
    if point.table in BIT_TABLES:
        return point, point.codec.encode_bits(value)
    return point, point.codec.encode(value)


def readback_request(point: PointSettings) -> ReadRequest:
    """The read that fetches a written point back (the device may clamp or ignore a value without saying so)."""
    span = Span(point.name, point.table, point.address, point.codec.count)
    return ReadRequest(point.table, point.address, point.codec.count, (span,))
