"""Sparkplug B metrics in and out of protobuf: datatypes, values, properties, and the payloads hosts send us.

The payload classes are protoc's (sparkplug_b_pb2, from sparkplug_b.proto); this module only fills and reads them.
"""

from __future__ import annotations

import math
import struct
from dataclasses import dataclass

from google.protobuf.message import DecodeError

from bridge.sparkplug import sparkplug_b_pb2 as pb
from gateway.types import Value

Payload = pb.Payload
Metric = pb.Payload.Metric

#: Datatype numbers by the specification's names (pb.DataType's), for the few this gateway publishes.
DATATYPES: dict[str, int] = {name: pb.DataType.Value(name) for name in pb.DataType.keys()}
NAMES: dict[int, str] = {number: name for name, number in DATATYPES.items()}

INT8, INT16, INT32, INT64 = (DATATYPES[n] for n in ("Int8", "Int16", "Int32", "Int64"))
UINT8, UINT16, UINT32, UINT64 = (DATATYPES[n] for n in ("UInt8", "UInt16", "UInt32", "UInt64"))
FLOAT, DOUBLE, BOOLEAN, STRING = (DATATYPES[n] for n in ("Float", "Double", "Boolean", "String"))

#: Integer datatypes: (bits, signed). Up to 32 bits they travel in `int_value`, 64-bit ones in `long_value`;
#: negative values as their two's complement in that many bits (the specification's rule for signed types).
_INTS: dict[int, tuple[int, bool]] = {
    INT8: (8, True),
    INT16: (16, True),
    INT32: (32, True),
    INT64: (64, True),
    UINT8: (8, False),
    UINT16: (16, False),
    UINT32: (32, False),
    UINT64: (64, False),
}

#: A host's command payload larger than this is refused unread (a DCMD writes a few metrics).
MAX_COMMAND_BYTES = 64 * 1024
#: Metrics one command may carry; the rest are refused (each is a write the device's rate limit pays for).
MAX_COMMAND_METRICS = 64


@dataclass(frozen=True, slots=True)
class MetricSpec:
    """One metric of a device's birth: its name, datatype (a pb.DataType number) and what a host shows of it."""

    name: str
    datatype: int
    unit: str | None = None
    min: float | None = None
    max: float | None = None
    writable: bool = False


def datatype_of(value: Value) -> int:
    """The datatype a value pushed without a declaration gets: numbers are Double (an int now may be 2.5 later)."""
    if isinstance(value, bool):
        return BOOLEAN
    if isinstance(value, int | float):
        return DOUBLE
    return STRING


def fits(datatype: int, value: Value) -> bool:
    """Whether `value` can be published as `datatype` (None always can: as a null)."""
    if value is None:
        return True
    if datatype == BOOLEAN:
        return isinstance(value, bool)
    if datatype == STRING:
        return isinstance(value, str)
    if isinstance(value, bool) or not isinstance(value, int | float):
        return False
    if datatype == DOUBLE:
        return True  # an int past a double's range goes out as a null: no datatype would hold it better
    if datatype == FLOAT:
        return _float32(value) is not None  # past float32's range: a new birth as Double holds it
    if datatype in _INTS:
        bits, signed = _INTS[datatype]
        if not isinstance(value, int):
            return False
        low, high = (-(2 ** (bits - 1)), 2 ** (bits - 1) - 1) if signed else (0, 2**bits - 1)
        return bool(low <= value <= high)
    return False


def _float32(value: int | float) -> float | None:
    """`value` as the nearest float32, or None when that is past float32's range (an infinity it was not)."""
    try:
        return float(struct.unpack("<f", struct.pack("<f", float(value)))[0])
    except (OverflowError, struct.error):
        return None


def set_value(metric: Metric, datatype: int, value: Value) -> None:
    """Put `value` into the metric's value field for `datatype`; a None (or a value that does not fit) is a null."""
    if value is None or not fits(datatype, value):
        metric.is_null = True
        return
    if datatype == BOOLEAN:
        metric.boolean_value = bool(value)
    elif datatype == STRING:
        metric.string_value = str(value)
    elif datatype == DOUBLE:
        assert isinstance(value, int | float)
        try:
            metric.double_value = float(value)
        except OverflowError:  # an int past a double's range
            metric.is_null = True
    elif datatype == FLOAT:
        assert isinstance(value, int | float)
        metric.float_value = float(value)  # fits(): within float32's range (protobuf would store an infinity)
    else:
        assert isinstance(value, int)
        bits, _ = _INTS[datatype]
        raw = value & ((1 << bits) - 1)
        if bits == 64:
            metric.long_value = raw
        else:
            metric.int_value = raw


def get_value(metric: Metric, datatype: int | None = None) -> Value:
    """A metric's value as the gateway's JSON value; `datatype`: the metric's own when the host left it out."""
    if metric.is_null:
        return None
    kind = metric.WhichOneof("value")
    dt = metric.datatype if metric.HasField("datatype") else datatype
    if kind == "boolean_value":
        return metric.boolean_value
    if kind == "string_value":
        text = metric.string_value
        return text if isinstance(text, str) else None  # protobuf hands a proto2 string that is not UTF-8 as bytes
    if kind in ("double_value", "float_value"):
        number = metric.double_value if kind == "double_value" else metric.float_value
        return number if math.isfinite(number) else None
    if kind in ("int_value", "long_value"):
        raw = metric.int_value if kind == "int_value" else metric.long_value
        field_bits = 32 if kind == "int_value" else 64
        bits, signed = _INTS.get(dt or 0, (field_bits, False))
        return _int_from(raw, min(bits, field_bits), signed, field_bits)
    return None


def _int_from(raw: int, bits: int, signed: bool, field_bits: int) -> int | None:
    """The integer an unsigned wire field holds for a `bits`-wide type; None when it holds no such integer.

    A negative value comes as its two's complement at the type's width (Int16 -1: 65535), or sign-extended to the
    field's width (0xFFFFFFFF) as some encoders send it; anything else past the type's range is no value of it
    (Int16 70000 is not 4464).
    """
    if raw < 1 << bits:
        return raw - (1 << bits) if signed and raw >= 1 << (bits - 1) else raw
    if signed and raw >= (1 << field_bits) - (1 << (bits - 1)):
        return raw - (1 << field_bits)
    return None


def add_property(properties: pb.Payload.PropertySet, key: str, value: bool | float | str) -> None:
    """One property of a birth metric (engUnit, min, max, writable)."""
    properties.keys.append(key)
    prop = properties.values.add()
    if isinstance(value, bool):
        prop.type = BOOLEAN
        prop.boolean_value = value
    elif isinstance(value, str):
        prop.type = STRING
        prop.string_value = value
    else:
        prop.type = DOUBLE
        prop.double_value = float(value)


def birth_metric(
    payload: Payload, spec: MetricSpec, alias: int | None, value: Value, ts: int, *, with_properties: bool = True
) -> None:
    """Add a birth's metric: name, alias, datatype, timestamp, value (null when not known yet), properties."""
    m = payload.metrics.add()
    m.name = spec.name
    if alias is not None:
        m.alias = alias
    m.timestamp = ts
    m.datatype = spec.datatype
    set_value(m, spec.datatype, value)
    if with_properties:
        if spec.unit:
            add_property(m.properties, "engUnit", spec.unit)
        if spec.min is not None:
            add_property(m.properties, "min", spec.min)
        if spec.max is not None:
            add_property(m.properties, "max", spec.max)
        if spec.writable:
            add_property(m.properties, "writable", True)


def data_metric(payload: Payload, alias: int, datatype: int, value: Value, ts: int, historical: bool) -> None:
    """Add a data message's metric: by alias only (the birth named it and its datatype), with its sample time."""
    m = payload.metrics.add()
    m.alias = alias
    m.timestamp = ts
    if historical:
        m.is_historical = True
    set_value(m, datatype, value)


class CommandRefused(ValueError):
    """A host's NCMD or DCMD payload that is not one: too large, not protobuf, too many metrics."""


def read_command(data: bytes) -> Payload:
    """A host's command payload, decoded; CommandRefused saying why it is not one."""
    if len(data) > MAX_COMMAND_BYTES:
        raise CommandRefused(f"{len(data)} bytes; a command takes at most {MAX_COMMAND_BYTES}")
    payload = Payload()
    try:
        payload.ParseFromString(data)
    except (DecodeError, RecursionError) as exc:
        raise CommandRefused(f"not a Sparkplug B payload: {exc}") from None
    if len(payload.metrics) > MAX_COMMAND_METRICS:
        raise CommandRefused(f"{len(payload.metrics)} metrics; a command takes at most {MAX_COMMAND_METRICS}")
    return payload
