"""Writes to a Modbus device, checked and encoded before they wait for the line (no I/O here)."""

from __future__ import annotations

import asyncio
import math
from dataclasses import dataclass

from drivers.modbus.device import Device
from drivers.modbus.planner import BIT_TABLES, ReadRequest, Span
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
