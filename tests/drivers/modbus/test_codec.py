"""Byte-vector and round-trip property tests for the pure Modbus register codec."""

from __future__ import annotations

import math
import struct
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from drivers.modbus.codec import TYPES, PointCodec
from gateway.errors import CodecError

ORDERS = [(b, w) for b in ("big", "little") for w in ("big", "little")]
INT_RANGES = {
    "int16": (-(2**15), 2**15 - 1),
    "uint16": (0, 2**16 - 1),
    "int32": (-(2**31), 2**31 - 1),
    "uint32": (0, 2**32 - 1),
    "int64": (-(2**63), 2**63 - 1),
    "uint64": (0, 2**64 - 1),
}
REGS = {"int16": 1, "uint16": 1, "int32": 2, "uint32": 2, "int64": 4, "uint64": 4, "float32": 2, "float64": 4}
FLOAT_FMT = {"float32": ">f", "float64": ">d"}
NUMERIC = [*INT_RANGES, *FLOAT_FMT]
FAST = settings(max_examples=60, deadline=None)


def codec(type_spec: str, byte_order: str = "big", word_order: str = "big", **kw: Any) -> PointCodec:
    """Shorthand for building a codec in tests."""
    return PointCodec.parse(type_spec, byte_order=byte_order, word_order=word_order, **kw)


# --- byte vectors -------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("byte_order", "word_order", "words"),
    [
        ("big", "big", [0x42F6, 0xE979]),
        ("big", "little", [0xE979, 0x42F6]),
        ("little", "big", [0xF642, 0x79E9]),
        ("little", "little", [0x79E9, 0xF642]),
    ],
)
def test_float32_vectors(byte_order: str, word_order: str, words: list[int]) -> None:
    """123.456 as float32 in all four layouts."""
    c = codec("float32", byte_order, word_order)
    assert c.encode(123.456) == words
    assert c.decode(words) == struct.unpack(">f", struct.pack(">f", 123.456))[0]


@pytest.mark.parametrize(
    ("type_spec", "byte_order", "word_order", "value", "words"),
    [
        ("int16", "big", "big", -2, [0xFFFE]),
        ("int16", "little", "big", 1, [0x0100]),
        ("uint16", "big", "big", 0xABCD, [0xABCD]),
        ("int32", "big", "big", -2, [0xFFFF, 0xFFFE]),
        ("int32", "big", "little", -2, [0xFFFE, 0xFFFF]),
        ("uint32", "big", "big", 0x01020304, [0x0102, 0x0304]),
        ("uint32", "little", "little", 0x01020304, [0x0403, 0x0201]),
        ("uint64", "big", "big", 0x0102030405060708, [0x0102, 0x0304, 0x0506, 0x0708]),
        ("uint64", "big", "little", 0x0102030405060708, [0x0708, 0x0506, 0x0304, 0x0102]),
        ("uint64", "little", "big", 0x0102030405060708, [0x0201, 0x0403, 0x0605, 0x0807]),
        ("int64", "big", "big", -1, [0xFFFF] * 4),
        ("int64", "big", "big", -(2**63), [0x8000, 0, 0, 0]),
        ("float64", "big", "big", 1.0, [0x3FF0, 0, 0, 0]),
        ("float64", "big", "little", -2.5, [0, 0, 0, 0xC004]),
        ("float32", "big", "big", -0.0, [0x8000, 0x0000]),
        ("float32", "big", "big", math.inf, [0x7F80, 0x0000]),
        ("bool", "big", "big", True, [1]),
        ("bool", "big", "big", False, [0]),
        ("string:5", "big", "big", "ABCDE", [0x4142, 0x4344, 0x4500]),
        ("string:5", "little", "big", "ABCDE", [0x4241, 0x4443, 0x0045]),
        ("string:4", "big", "little", "ABCD", [0x4142, 0x4344]),  # word order ignored
        ("string:6", "big", "big", "AB", [0x4142, 0, 0]),
        ("string:4", "big", "big", "é", [0xC3A9, 0]),
    ],
)
def test_vectors(type_spec: str, byte_order: str, word_order: str, value: object, words: list[int]) -> None:
    """Known values encode to known registers and decode back."""
    c = codec(type_spec, byte_order, word_order)
    assert c.encode(value) == words
    decoded = c.decode(words)
    assert decoded == value and type(decoded) is type(value)
    if isinstance(value, float):
        assert math.copysign(1.0, decoded) == math.copysign(1.0, value)  # type: ignore[arg-type]


def test_scaled_int16_decodes_to_float() -> None:
    """raw 215 with scale 0.1 is 21.5, and 21.5 writes raw 215."""
    c = codec("int16", scale=0.1)
    assert c.decode([215]) == pytest.approx(21.5)
    assert isinstance(c.decode([215]), float)
    assert c.encode(21.5) == [215]
    assert c.encode(-21.5) == [0x10000 - 215]


def test_offset_applies_after_scale() -> None:
    """decoded = raw * scale + offset; encode inverts it."""
    c = codec("uint16", scale=0.5, offset=-40)
    assert c.decode([100]) == 10.0
    assert c.encode(10) == [100]


def test_unscaled_integers_decode_to_int() -> None:
    """Without scale/offset an integer type gives a Python int, not a float."""
    assert type(codec("int32").decode([0, 7])) is int


@pytest.mark.parametrize(
    ("value", "raw"),
    [(2.5, 3), (-2.5, -3), (2.4999, 2), (-2.5001, -3), (0.49999999999999994, 0), (1.5, 2)],
)
def test_round_half_away_from_zero(value: float, raw: int) -> None:
    """Fractional writes round to the nearest integer, halves away from zero."""
    assert codec("int16").decode(codec("int16").encode(value)) == raw


def test_bitfield_decodes_named_bits() -> None:
    """Only the named bits appear, bit 0 being the least significant."""
    c = PointCodec("bitfield", bits=((0, "run"), (3, "alarm")))
    assert c.decode([0x0009]) == {"run": True, "alarm": True}
    assert c.decode([0x0008]) == {"run": False, "alarm": True}
    assert c.decode([0xFFF6]) == {"run": False, "alarm": False}
    assert c.count == 1


def test_bitfield_respects_byte_order() -> None:
    """A byte-swapped device's bit 0 sits in the register's high byte."""
    c = PointCodec(
        "bitfield",
        byte_order="little",
        bits=[[0, "run"], [15, "fault"]],  # type: ignore[arg-type]
    )
    assert c.decode([0x0100]) == {"run": True, "fault": False}
    assert c.bits == ((0, "run"), (15, "fault"))


def test_bitfield_is_read_only() -> None:
    """Writing a bitfield is refused."""
    with pytest.raises(CodecError, match="bitfield points are read-only"):
        PointCodec("bitfield", bits=((0, "run"),)).encode({"run": True})


def test_bool_register_is_any_nonzero() -> None:
    """A bool held in a register is true for any non-zero word."""
    c = PointCodec("bool")
    assert c.decode([0x8000]) is True
    assert c.decode([0]) is False
    assert c.encode(1) == [1] and c.encode(0) == [0]


def test_bool_on_bit_tables() -> None:
    """Coils and discrete inputs carry one bit per bool point."""
    c = PointCodec("bool")
    assert c.count == 1
    assert c.decode_bits([True]) is True
    assert c.decode_bits([False]) is False
    assert c.decode([True]) is True
    assert c.encode_bits(True) == [True]
    assert c.encode_bits(0) == [False]


def test_string_decode_strips_nul_and_spaces() -> None:
    """Trailing NULs and spaces are padding; inner ones are kept."""
    c = codec("string:8")
    assert c.decode([0x4142, 0x2043, 0x2000, 0x2020]) == "AB C"
    assert c.decode([0x4100, 0x4200, 0, 0]) == "A\x00B"
    assert c.decode([0, 0, 0, 0]) == ""


def test_string_ignores_byte_beyond_length() -> None:
    """An odd-length string does not read the spare low byte of its last register."""
    assert codec("string:3").decode([0x4142, 0x4358]) == "ABC"


def test_string_decode_replaces_invalid_utf8() -> None:
    """Bytes that are not UTF-8 decode to replacement characters rather than failing."""
    assert codec("string:2").decode([0x41FF]) == "A\ufffd"


@pytest.mark.parametrize(
    ("type_spec", "count"),
    [
        ("bool", 1),
        ("int16", 1),
        ("uint16", 1),
        ("int32", 2),
        ("uint32", 2),
        ("int64", 4),
        ("uint64", 4),
        ("float32", 2),
        ("float64", 4),
        ("string:1", 1),
        ("string:2", 1),
        ("string:5", 3),
        ("string:12", 6),
    ],
)
def test_count(type_spec: str, count: int) -> None:
    """Register counts per type."""
    assert codec(type_spec).count == count


def test_parse_and_spec() -> None:
    """parse() reads 'string:N' and passes options through."""
    c = PointCodec.parse("string:12", byte_order="little")
    assert (c.type, c.length, c.byte_order, c.spec) == ("string", 12, "little", "string:12")
    assert PointCodec.parse("float32", scale=2) == PointCodec("float32", scale=2.0)
    assert set(TYPES) == {*NUMERIC, "bool", "string", "bitfield"}


# --- boundaries and round-trip properties -------------------------------------------------


@pytest.mark.parametrize(("byte_order", "word_order"), ORDERS)
@pytest.mark.parametrize("type_", list(INT_RANGES))
def test_integer_bounds_round_trip(type_: str, byte_order: str, word_order: str) -> None:
    """The extremes of every integer type survive, one past them is refused."""
    c = codec(type_, byte_order, word_order)
    lo, hi = INT_RANGES[type_]
    for v in (lo, hi, 0, 1, lo + 1, hi - 1):
        assert c.decode(c.encode(v)) == v
    for v in (lo - 1, hi + 1):
        with pytest.raises(CodecError, match=rf"does not fit {type_} \({lo}\.\.{hi}\)"):
            c.encode(v)


@pytest.mark.parametrize(("byte_order", "word_order"), ORDERS)
@pytest.mark.parametrize("type_", list(INT_RANGES))
@FAST
@given(data=st.data())
def test_integer_round_trip(type_: str, byte_order: str, word_order: str, data: st.DataObject) -> None:
    """decode(encode(v)) == v over an integer type's whole range."""
    lo, hi = INT_RANGES[type_]
    v = data.draw(st.integers(lo, hi))
    c = codec(type_, byte_order, word_order)
    words = c.encode(v)
    assert len(words) == c.count and all(0 <= w <= 0xFFFF for w in words)
    assert c.decode(words) == v


@pytest.mark.parametrize(("byte_order", "word_order"), ORDERS)
@pytest.mark.parametrize("type_", list(FLOAT_FMT))
@FAST
@given(data=st.data())
def test_float_round_trip_bits(type_: str, byte_order: str, word_order: str, data: st.DataObject) -> None:
    """Every finite float (incl. -0.0 and subnormals) round-trips bit for bit."""
    width32 = type_ == "float32"
    v = data.draw(st.floats(width=32 if width32 else 64, allow_nan=False, allow_infinity=False))
    c = codec(type_, byte_order, word_order)
    out = c.decode(c.encode(v))
    fmt = FLOAT_FMT[type_]
    assert isinstance(out, float)
    assert struct.pack(fmt, out) == struct.pack(fmt, v)


@pytest.mark.parametrize(("byte_order", "word_order"), ORDERS)
@pytest.mark.parametrize("type_", list(FLOAT_FMT))
def test_float_special_values(type_: str, byte_order: str, word_order: str) -> None:
    """NaN stays NaN, infinities and float32 extremes survive."""
    c = codec(type_, byte_order, word_order)
    out = c.decode(c.encode(math.nan))
    assert isinstance(out, float) and math.isnan(out)
    for v in (
        math.inf,
        -math.inf,
        -0.0,
        5e-324 if type_ == "float64" else 1.401298464324817e-45,
        3.4028234663852886e38,
    ):
        back = c.decode(c.encode(v))
        assert isinstance(back, float) and struct.pack(">d", back) == struct.pack(">d", v)


@pytest.mark.parametrize(("byte_order", "word_order"), ORDERS)
@pytest.mark.parametrize("type_", NUMERIC)
@FAST
@given(data=st.data())
def test_words_round_trip(type_: str, byte_order: str, word_order: str, data: st.DataObject) -> None:
    """encode(decode(words)) == words for any registers (floats: any non-NaN pattern)."""
    n = REGS[type_]
    words = data.draw(st.lists(st.integers(0, 0xFFFF), min_size=n, max_size=n))
    c = codec(type_, byte_order, word_order)
    value = c.decode(words)
    if isinstance(value, float) and math.isnan(value):
        return
    assert c.encode(value) == words


def _fit(text: str, n: int) -> str:
    """Shorten text until its UTF-8 form fits n bytes and it has no trailing padding."""
    while len(text.encode()) > n:
        text = text[:-1]
    return text.rstrip("\x00 ")


@pytest.mark.parametrize("byte_order", ["big", "little"])
@FAST
@given(n=st.integers(1, 40), data=st.data())
def test_string_round_trip(byte_order: str, n: int, data: st.DataObject) -> None:
    """Text that fits N bytes and has no trailing NUL/space round-trips."""
    ascii_text = data.draw(st.text(st.characters(min_codepoint=0, max_codepoint=127), max_size=n))
    for text in (ascii_text.rstrip("\x00 "), _fit(data.draw(st.text(max_size=n)), n)):
        c = PointCodec.parse(f"string:{n}", byte_order=byte_order)
        words = c.encode(text)
        assert len(words) == c.count
        assert c.decode(words) == text


SCALES = [(0.1, 0.0), (0.01, -40.0), (2.0, 0.5), (0.25, 1000.0), (1.0, 273.15), (3.7, -1.2)]


@pytest.mark.parametrize(("scale", "offset"), SCALES)
@pytest.mark.parametrize("type_", ["int16", "uint16", "int32", "uint32"])
@FAST
@given(data=st.data())
def test_scaled_round_trip(type_: str, scale: float, offset: float, data: st.DataObject) -> None:
    """With scale/offset, decode(encode(v)) is within scale/2 of v inside the range."""
    lo, hi = INT_RANGES[type_]
    v = data.draw(st.floats(lo * scale + offset, hi * scale + offset))
    c = codec(type_, scale=scale, offset=offset)
    back = c.decode(c.encode(v))
    assert isinstance(back, float)
    assert abs(back - v) <= scale / 2 + 1e-9 * max(1.0, abs(v))


@pytest.mark.parametrize("type_", list(FLOAT_FMT))
def test_scaled_float(type_: str) -> None:
    """Float types apply scale/offset too."""
    c = codec(type_, scale=0.5, offset=10)
    assert c.encode(11.0) == codec(type_).encode(2.0)
    assert c.decode(codec(type_).encode(2.0)) == 11.0


# --- refusals -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("type_spec", "kw", "value", "match"),
    [
        ("uint16", {}, 70000, r"value 70000 does not fit uint16 \(0\.\.65535\)"),
        ("uint16", {}, -1, "does not fit uint16"),
        ("int16", {}, 32767.5, "does not fit int16"),
        ("int16", {"scale": 0.1}, 3276.8, r"does not fit int16 .*raw 32768"),
        ("uint64", {}, 2**64, "does not fit uint64"),
        ("int32", {}, 1e300, "does not fit int32"),
        ("int16", {}, "abc", "expected a number, got 'abc'"),
        ("int16", {}, True, "expected a number, got True"),
        ("float32", {}, False, "expected a number"),
        ("float32", {}, "1.5", "expected a number"),
        ("float64", {}, None, "expected a number"),
        ("int16", {}, math.nan, "not finite"),
        ("int64", {}, math.inf, "not finite"),
        ("uint16", {"scale": 0.5}, -math.inf, "not finite"),
        ("float32", {}, 1e39, r"does not fit float32 \(overflows to inf\)"),
        ("float32", {}, 10**40, "does not fit float32"),
        ("float64", {}, 10**400, "float64"),
        ("float64", {"scale": 1e-300}, 1e300, "does not fit float64"),
        ("bool", {}, "on", "true/false or 0/1"),
        ("bool", {}, 2, "true/false or 0/1"),
        ("bool", {}, 1.0, "true/false or 0/1"),
        ("bool", {}, None, "true/false or 0/1"),
        ("string:4", {}, "ABCDE", "text of 5 bytes does not fit string:4"),
        ("string:2", {}, "éé", "does not fit string:2"),
        ("string:4", {}, 12, "takes text"),
        ("string:4", {}, "\ud800", "UTF-8"),
    ],
)
def test_encode_refuses(type_spec: str, kw: dict[str, Any], value: object, match: str) -> None:
    """Values that do not fit, or are not of the right kind, raise CodecError."""
    with pytest.raises(CodecError, match=match):
        codec(type_spec, **kw).encode(value)


@pytest.mark.parametrize("value", ["on", 2, -1, None])
def test_encode_bits_refuses(value: object) -> None:
    """Coil writes take only true/false or 0/1."""
    with pytest.raises(CodecError):
        PointCodec("bool").encode_bits(value)


@pytest.mark.parametrize(
    ("type_spec", "words"),
    [
        ("int32", [1]),
        ("int32", [1, 2, 3]),
        ("int16", [70000]),
        ("int16", [-1]),
        ("float32", [0, 1.5]),
        ("string:3", "AB"),
        ("int16", None),
        ("bool", []),
    ],
)
def test_decode_refuses_bad_words(type_spec: str, words: Any) -> None:
    """Register lists of the wrong size or with non-16-bit words raise CodecError."""
    with pytest.raises(CodecError):
        codec(type_spec).decode(words)


def test_bit_table_refusals() -> None:
    """Only bool points read/write bits, and exactly one bit."""
    with pytest.raises(CodecError, match="need registers"):
        PointCodec("int16").decode_bits([True])
    with pytest.raises(CodecError, match="need registers"):
        PointCodec("float32").encode_bits(1.0)
    with pytest.raises(CodecError, match="needs 1 bit"):
        PointCodec("bool").decode_bits([True, False])
    with pytest.raises(CodecError):
        PointCodec("bool").decode_bits([2])  # type: ignore[list-item]


@pytest.mark.parametrize(
    ("args", "kw", "match"),
    [
        (("float16",), {}, "unknown type 'float16'"),
        (("string:4",), {}, "use PointCodec.parse"),
        (("string",), {}, "string length must be an integer >= 1"),
        (("string",), {"length": 0}, "string length must be an integer >= 1"),
        (("int16",), {"length": 2}, "length applies only to string"),
        (("int16",), {"byte_order": "BIG"}, "byte_order must be 'big' or 'little'"),
        (("int32",), {"word_order": "middle"}, "word_order must be 'big' or 'little'"),
        (("int16",), {"scale": 0}, "scale must not be 0"),
        (("int16",), {"scale": math.nan}, "scale must be finite"),
        (("int16",), {"offset": "1"}, "offset must be a number"),
        (("string",), {"length": 4, "scale": 2.0}, "scale/offset do not apply to string"),
        (("bool",), {"offset": 1.0}, "scale/offset do not apply to bool"),
        (("bitfield",), {}, "at least one"),
        (("bitfield",), {"bits": ((16, "x"),)}, "bit 16 is not a bit number 0..15"),
        (("bitfield",), {"bits": ((-1, "x"),)}, "bit -1 is not a bit number"),
        (("bitfield",), {"bits": ((0, "x"), (1, "x"))}, "bit name 'x' is used twice"),
        (("bitfield",), {"bits": ((0, "x"), (0, "y"))}, "bit 0 is named twice"),
        (("bitfield",), {"bits": ((0, ""),)}, "not a non-empty string"),
        (("bitfield",), {"bits": ((0, "x", 1),)}, "not a .bit, name. pair"),
        (("bitfield",), {"bits": ((0, "x"),), "scale": 2.0}, "scale/offset do not apply"),
        (("uint16",), {"bits": ((0, "x"),)}, "bits apply only to bitfield"),
    ],
)
def test_bad_config(args: tuple[Any, ...], kw: dict[str, Any], match: str) -> None:
    """Each configuration mistake is reported precisely."""
    with pytest.raises(CodecError, match=match):
        PointCodec(*args, **kw)


def test_bad_config_collects_every_problem() -> None:
    """All problems of one point are reported together."""
    with pytest.raises(CodecError, match="byte_order.*word_order.*scale must not be 0"):
        PointCodec("int16", byte_order="x", word_order="y", scale=0)


@pytest.mark.parametrize(
    ("spec", "kw", "match"),
    [
        ("double", {}, "unknown type 'double'"),
        ("string", {}, "needs a length"),
        ("string:0", {}, "N in string:N"),
        ("string:-3", {}, "N in string:N"),
        ("string:abc", {}, "N in string:N"),
        ("string:", {}, "N in string:N"),
        ("int16:4", {}, "only string takes a length"),
        ("string:4", {"length": 4}, "already gives the length"),
        ("int16", {"colour": "red"}, "colour"),
        (16, {}, "type must be a string"),
    ],
)
def test_parse_refuses(spec: Any, kw: dict[str, Any], match: str) -> None:
    """parse() turns every malformed type into a CodecError."""
    with pytest.raises(CodecError, match=match):
        PointCodec.parse(spec, **kw)


def test_codec_is_hashable_and_frozen() -> None:
    """Codecs are values: equal configs compare and hash equal, and cannot be changed."""
    a = PointCodec("bitfield", bits=[(0, "run")])  # type: ignore[arg-type]
    b = PointCodec("bitfield", bits=((0, "run"),))
    assert a == b and hash(a) == hash(b)
    with pytest.raises(AttributeError):
        a.scale = 2.0  # type: ignore[misc]
