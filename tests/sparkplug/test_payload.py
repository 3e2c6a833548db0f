"""Sparkplug B metric values in and out of protobuf (bridge/sparkplug/payload.py): every datatype round trips, a value
a datatype cannot hold goes out as a null (never as another number), births carry their properties, data messages
carry the alias only, and a host's command payload is bounded."""

from __future__ import annotations

import math
import struct

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from bridge.sparkplug import payload as p
from bridge.sparkplug.payload import Metric, MetricSpec, Payload

FAST = settings(max_examples=200, deadline=None)

#: datatype -> (bits, signed), written out here rather than read from the module under test.
INTS = {
    p.INT8: (8, True),
    p.INT16: (16, True),
    p.INT32: (32, True),
    p.INT64: (64, True),
    p.UINT8: (8, False),
    p.UINT16: (16, False),
    p.UINT32: (32, False),
    p.UINT64: (64, False),
}


def wire(metric: Metric) -> Metric:
    """The metric as a host receives it: serialized and parsed again."""
    return Metric.FromString(metric.SerializeToString())


def round_trip(datatype: int, value: object) -> tuple[Metric, object]:
    """`value` put into a metric of `datatype`, over the wire, and read back as a value."""
    m = Metric(datatype=datatype)
    p.set_value(m, datatype, value)  # type: ignore[arg-type]
    back = wire(m)
    return back, p.get_value(back)


def int_range(datatype: int) -> tuple[int, int]:
    bits, signed = INTS[datatype]
    return (-(2 ** (bits - 1)), 2 ** (bits - 1) - 1) if signed else (0, 2**bits - 1)


@FAST
@given(st.sampled_from(sorted(INTS)), st.data())
def test_every_integer_datatype_round_trips_every_value_of_its_range(datatype: int, data: st.DataObject) -> None:
    """An integer of the declared type's range, negative ones included, reads back as itself."""
    low, high = int_range(datatype)
    value = data.draw(st.one_of(st.integers(low, high), st.sampled_from([low, high, 0, -1 if low else 1])))
    back, got = round_trip(datatype, value)
    assert not back.is_null
    assert got == value and type(got) is int


@pytest.mark.parametrize(
    ("datatype", "value", "field", "raw"),
    [
        (p.INT8, -1, "int_value", 0xFF),
        (p.INT16, -1, "int_value", 0xFFFF),
        (p.INT16, -42, "int_value", 65494),
        (p.INT32, -1, "int_value", 0xFFFFFFFF),
        (p.INT64, -1, "long_value", 2**64 - 1),
        (p.INT64, -(2**63), "long_value", 2**63),
        (p.UINT32, 2**32 - 1, "int_value", 2**32 - 1),
        (p.UINT64, 2**64 - 1, "long_value", 2**64 - 1),
    ],
)
def test_a_negative_integer_is_its_twos_complement_at_the_declared_width(
    datatype: int, value: int, field: str, raw: int
) -> None:
    """Int16 -1 travels as int_value 65535 (the spec's rule; pysparkplug refuses the sign-extended form)."""
    back, _ = round_trip(datatype, value)
    assert back.WhichOneof("value") == field
    assert getattr(back, field) == raw


@FAST
@given(st.sampled_from(sorted(INTS)), st.data())
def test_an_integer_outside_the_declared_range_is_a_null_never_another_number(
    datatype: int, data: st.DataObject
) -> None:
    """A value the type cannot hold goes out as is_null (a wrapped number would be a wrong reading)."""
    low, high = int_range(datatype)
    value = data.draw(st.one_of(st.integers(max_value=low - 1), st.integers(min_value=high + 1)))
    back, got = round_trip(datatype, value)
    assert back.is_null and back.WhichOneof("value") is None and got is None
    assert not p.fits(datatype, value)


@pytest.mark.parametrize("datatype", sorted(INTS))
@pytest.mark.parametrize("value", [1.5, 2.0, True, "7", None])
def test_an_integer_datatype_takes_no_float_bool_or_string(datatype: int, value: object) -> None:
    """1.5, 2.0, True and "7" are not integers of the birth's type: null, and `fits` says a birth is needed."""
    back, got = round_trip(datatype, value)
    assert back.is_null and got is None
    assert p.fits(datatype, value) is (value is None)  # type: ignore[arg-type]


@FAST
@given(st.floats(allow_nan=False, allow_infinity=False) | st.integers(-(2**1023), 2**1023))
def test_a_double_round_trips_every_finite_number(value: float) -> None:
    """Double carries any finite float (and an int as its nearest double)."""
    back, got = round_trip(p.DOUBLE, value)
    assert back.WhichOneof("value") == "double_value"
    assert got == float(value)


@pytest.mark.parametrize("value", [10**400, -(10**309), 2**1024])
def test_an_int_past_a_doubles_range_is_a_null(value: int) -> None:
    """A Python int no double holds is published as a null, not as an infinity or an error."""
    back, got = round_trip(p.DOUBLE, value)
    assert back.is_null and got is None


@FAST
@given(st.floats(width=32, allow_nan=False, allow_infinity=False))
def test_a_float_round_trips_every_float32(value: float) -> None:
    """Float carries every float32 exactly."""
    back, got = round_trip(p.FLOAT, value)
    assert back.WhichOneof("value") == "float_value" and got == value


@FAST
@given(st.floats(allow_nan=False, allow_infinity=False))
def test_a_float_is_the_nearest_float32_or_a_null_never_an_infinity(value: float) -> None:
    """A finite double past float32's range is a null (protobuf would have stored an infinity)."""
    back, got = round_trip(p.FLOAT, value)
    try:
        expected = struct.unpack("<f", struct.pack("<f", value))[0]
    except OverflowError:
        assert back.is_null and got is None
        return
    assert back.float_value == expected and math.isfinite(back.float_value)


@pytest.mark.parametrize(
    ("value", "holds"),
    [(3.4028234663852886e38, True), (-3.4e38, True), (3.5e38, False), (1e300, False), (2**128, False), (1e-50, True)],
)
def test_a_float_past_float32s_range_does_not_fit_so_the_metric_is_born_again_as_double(
    value: float, holds: bool
) -> None:
    """Float fits up to float32's largest value; past it `fits` says no, and a new birth as Double carries it."""
    assert p.fits(p.FLOAT, value) is holds
    assert p.fits(p.DOUBLE, value)


@pytest.mark.parametrize("datatype", [p.FLOAT, p.DOUBLE])
@pytest.mark.parametrize("value", [math.nan, math.inf, -math.inf])
def test_nan_and_infinities_go_out_as_themselves_and_read_back_as_no_value(datatype: int, value: float) -> None:
    """NaN and +-inf are IEEE values a host can show: published as such, never as a finite number; read as None."""
    back, got = round_trip(datatype, value)
    number = back.float_value if datatype == p.FLOAT else back.double_value
    assert not back.is_null
    assert (math.isnan(number) and math.isnan(value)) or number == value
    assert got is None  # the gateway's JSON values have no NaN: a host's NaN is no value


@FAST
@given(st.booleans())
def test_a_boolean_round_trips(value: bool) -> None:
    """Boolean true and false read back as themselves."""
    back, got = round_trip(p.BOOLEAN, value)
    assert back.WhichOneof("value") == "boolean_value" and got is value


@FAST
@given(st.text())
def test_a_string_round_trips_any_text(value: str) -> None:
    """String carries any text (NULs, emoji, the empty string)."""
    back, got = round_trip(p.STRING, value)
    assert back.WhichOneof("value") == "string_value" and got == value


@pytest.mark.parametrize(("datatype", "value"), [(p.BOOLEAN, 1), (p.BOOLEAN, "true"), (p.STRING, 5), (p.DOUBLE, "1")])
def test_a_value_of_another_kind_is_a_null(datatype: int, value: object) -> None:
    """Boolean takes only a bool, String only a str, Double only a number: anything else is a null."""
    back, got = round_trip(datatype, value)
    assert back.is_null and got is None


def test_a_string_value_that_is_not_utf8_reads_as_no_value() -> None:
    """A host's string_value that is not UTF-8 (protobuf hands it over as bytes) is no value, not "b'...'"."""
    m = Metric.FromString(b"\x7a\x02\xff\xfe")  # field 15 (string_value), 2 bytes of invalid UTF-8
    assert p.get_value(m) is None


@pytest.mark.parametrize(
    ("datatype", "field", "raw", "value"),
    [
        (p.INT16, "int_value", 0xFFFFFFD6, -42),  # sign-extended to 32 bits, as some encoders send it
        (p.INT8, "int_value", 0xFFFFFF80, -128),
        (p.INT8, "long_value", 2**64 - 1, -1),
        (p.INT16, "int_value", 70000, None),  # no Int16: not 70000 - 65536
        (p.INT16, "int_value", 0xFFFF0000, None),
        (p.UINT8, "int_value", 300, None),
        (p.UINT16, "int_value", 2**32 - 1, None),
        (None, "int_value", 2**32 - 1, 2**32 - 1),  # no datatype: the field's own unsigned width
    ],
)
def test_a_hosts_integer_outside_its_declared_width_is_no_value(
    datatype: int | None, field: str, raw: int, value: int | None
) -> None:
    """Reading a host's integer never makes up a number: two's complement or sign-extended, else None."""
    m = Metric()
    if datatype is not None:
        m.datatype = datatype
    setattr(m, field, raw)
    assert p.get_value(wire(m)) == value


def test_get_value_takes_the_births_datatype_when_the_host_leaves_it_out() -> None:
    """A command metric without datatype is read with the one its birth gave (Int16 65535 -> -1)."""
    m = Metric(int_value=65535)
    assert p.get_value(m, p.INT16) == -1
    assert p.get_value(m, p.UINT16) == 65535


def props(metric: Metric) -> dict[str, tuple[str, object]]:
    """A metric's properties as {key: (datatype name, value)}."""
    out = {}
    for key, v in zip(metric.properties.keys, metric.properties.values, strict=True):
        out[key] = (p.NAMES[v.type], getattr(v, v.WhichOneof("value")))
    return out


def test_a_birth_metric_carries_name_alias_datatype_timestamp_value_and_properties() -> None:
    """engUnit is a String, min/max Doubles, writable a Boolean true; the metric names its datatype."""
    payload = Payload(timestamp=5, seq=1)
    spec = MetricSpec("temp", p.INT16, unit="°C", min=-40, max=125, writable=True)
    p.birth_metric(payload, spec, 7, -3, 1000)
    m = Payload.FromString(payload.SerializeToString()).metrics[0]
    assert (m.name, m.alias, m.datatype, m.timestamp) == ("temp", 7, p.INT16, 1000)
    assert p.get_value(m) == -3
    assert props(m) == {
        "engUnit": ("String", "°C"),
        "min": ("Double", -40.0),
        "max": ("Double", 125.0),
        "writable": ("Boolean", True),
    }


def test_a_birth_metric_without_unit_range_or_write_has_no_properties_and_a_null_unknown_value() -> None:
    """No properties are made up; a value not known yet is a null of the declared datatype."""
    payload = Payload(timestamp=5, seq=1)
    p.birth_metric(payload, MetricSpec("n", p.DOUBLE), 3, None, 1000)
    m = Payload.FromString(payload.SerializeToString()).metrics[0]
    assert not m.HasField("properties") and m.is_null and m.datatype == p.DOUBLE


def test_a_data_metric_has_alias_and_timestamp_but_no_name_and_no_datatype() -> None:
    """DATA metrics go by alias only (spec: name and datatype SHOULD NOT be sent); historical only when asked."""
    payload = Payload(timestamp=5, seq=2)
    p.data_metric(payload, 9, p.INT32, -7, 1234, historical=False)
    p.data_metric(payload, 10, p.DOUBLE, 2.5, 1000, historical=True)
    live, old = Payload.FromString(payload.SerializeToString()).metrics
    for m in (live, old):
        assert not m.HasField("name") and not m.HasField("datatype") and not m.HasField("properties")
    assert (live.alias, live.timestamp, live.is_historical) == (9, 1234, False)
    assert p.get_value(live, p.INT32) == -7
    assert (old.alias, old.timestamp, old.is_historical) == (10, 1000, True)


def test_datatype_of_a_value_without_declaration() -> None:
    """Numbers are Double (an int now may be 2.5 later), bools Boolean, text String."""
    assert [p.datatype_of(v) for v in (1, 2.5, True, "x", None)] == [p.DOUBLE, p.DOUBLE, p.BOOLEAN, p.STRING, p.STRING]


def test_read_command_bounds_size_metrics_and_garbage() -> None:
    """A command past 64 KiB, with more than 64 metrics, or not protobuf is refused saying why."""
    ok = Payload(timestamp=1)
    for i in range(p.MAX_COMMAND_METRICS):
        ok.metrics.add(name=f"m{i}", boolean_value=True)
    assert len(p.read_command(ok.SerializeToString()).metrics) == 64
    ok.metrics.add(name="one more", boolean_value=True)
    with pytest.raises(p.CommandRefused, match="65 metrics"):
        p.read_command(ok.SerializeToString())
    with pytest.raises(p.CommandRefused, match="at most 65536"):
        p.read_command(b"\x00" * (64 * 1024 + 1))
    with pytest.raises(p.CommandRefused, match="not a Sparkplug B payload"):
        p.read_command(b"\xff\xff\xff")


any_value = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(),
    st.integers(-(2**1100), 2**1100),
    st.floats(),
    st.text(max_size=8),
)


@settings(max_examples=500, deadline=None)
@given(st.sampled_from(sorted(p.NAMES)), any_value)
def test_any_value_as_any_datatype_reads_back_as_itself_or_as_no_value(datatype: int, value: object) -> None:
    """Whatever the gateway hands over and whatever the birth declared, a host reads the value (Float: its nearest
    float32) or a null, never another value; and a value that fits is never a null."""
    back, got = round_trip(datatype, value)
    if got is None:
        fits = p.fits(datatype, value)  # type: ignore[arg-type]
        non_finite = isinstance(value, float) and not math.isfinite(value)
        assert value is None or not fits or non_finite or (datatype == p.DOUBLE and isinstance(value, int))
        return
    assert p.fits(datatype, value)  # type: ignore[arg-type]
    if datatype == p.FLOAT:
        assert isinstance(value, int | float) and got == struct.unpack("<f", struct.pack("<f", float(value)))[0]
    elif datatype == p.DOUBLE:
        assert got == float(value)  # type: ignore[arg-type]
    else:
        assert got == value and type(got) is type(value)
