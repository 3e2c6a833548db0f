"""The Modbus point codec's promises at their edges: the 16-bit word limit, text endings, and what refusals say."""

from __future__ import annotations

import re
from fractions import Fraction
from typing import Any

import pytest

from drivers.modbus.codec import PointCodec
from gateway.errors import CodecError


def test_a_register_word_is_at_most_65535() -> None:
    assert PointCodec("uint16").decode([0xFFFF]) == 0xFFFF
    with pytest.raises(CodecError, match=r"^uint16: register word 65536 is not in 0\.\.65535$"):
        PointCodec("uint16").decode([0x10000])


def test_a_register_list_of_the_wrong_size_is_refused_saying_how_many_are_needed() -> None:
    with pytest.raises(CodecError, match=r"^float32 needs 2 register\(s\), got \[1\]$"):
        PointCodec("float32").decode([1])


def test_text_keeps_its_own_last_letters_and_drops_only_nul_and_space_padding() -> None:
    # A string register point read back: "MAX" must not lose a trailing letter, only the padding goes.
    codec = PointCodec.parse("string:6")
    assert codec.decode(codec.encode("MAX")) == "MAX"
    assert codec.decode([0x4D41, 0x5820, 0x0000]) == "MAX"  # "MAX " then NULs


def test_string_takes_its_length_as_a_keyword_as_well_as_in_the_type() -> None:
    assert PointCodec.parse("string", length=4) == PointCodec.parse("string:4")
    with pytest.raises(CodecError, match=r"^type 'string' needs a length: string:N$"):
        PointCodec.parse("string")


@pytest.mark.parametrize(
    ("call", "what"),
    [
        (lambda: PointCodec("bool").encode("on"), "a bool point"),
        (lambda: PointCodec("bool").encode_bits("on"), "a bool point"),
        (lambda: PointCodec("bool").decode_bits([2]), "a coil bit"),
    ],
    ids=["encode", "encode_bits", "decode_bits"],
)
def test_a_flag_refusal_names_what_was_given_and_where(call: object, what: str) -> None:
    with pytest.raises(CodecError, match=rf"^{what} takes true/false or 0/1, got "):
        call()  # type: ignore[operator]


def test_a_bitfield_write_is_refused_as_read_only() -> None:
    with pytest.raises(CodecError, match=r"^bitfield points are read-only$"):
        PointCodec("bitfield", bits=((0, "run"),)).encode({"run": True})


def test_a_number_too_large_for_a_float_is_refused_saying_so() -> None:
    with pytest.raises(CodecError, match=r"^value Fraction\(10{400}, 1\) is too large for a float$"):
        PointCodec("float32").encode(Fraction(10**400))


def test_an_unscaled_integer_out_of_range_says_the_range_and_nothing_about_scaling() -> None:
    with pytest.raises(CodecError, match=r"^value 40000 does not fit int16 \(-32768\.\.32767\)$"):
        PointCodec("int16").encode(40000)
    with pytest.raises(CodecError, match=r"^value 40000\.5 does not fit int16 \(-32768\.\.32767\)$"):
        PointCodec("int16").encode(40000.5)


def test_a_scaled_value_that_overflows_is_refused_with_the_range() -> None:
    # An integer too large for a float fails in the unscaling itself (OverflowError inside).
    with pytest.raises(CodecError, match=r"^value 1{400} does not fit int16 \(-32768\.\.32767\)$"):
        PointCodec("int16", scale=0.5).encode(int("1" * 400))
    # A float whose unscaled value is infinite.
    with pytest.raises(CodecError, match=r"^value 1e\+308 does not fit int16 \(-32768\.\.32767\)$"):
        PointCodec("int16", scale=1e-10).encode(1e308)


# --- configuration refusals: each problem named, all of them at once --------------------------------------------


@pytest.mark.parametrize(
    ("kw", "message"),
    [
        (
            {"type": "float16"},
            "unknown type 'float16'; expected one of bool, int16, uint16, int32, uint32, int64, uint64, float32, "
            "float64, string, bitfield",
        ),
        (
            {"type": "string:4"},
            "unknown type 'string:4'; expected one of bool, int16, uint16, int32, uint32, int64, uint64, float32, "
            "float64, string, bitfield (use PointCodec.parse for 'string:N')",
        ),
        ({"type": "string", "length": True}, "bad string point: string length must be an integer >= 1, got True"),
        ({"type": "string", "length": 1.5}, "bad string point: string length must be an integer >= 1, got 1.5"),
        ({"type": "bool", "scale": "x"}, "bad bool point: scale must be a number, got 'x'"),
        (
            {"type": "int16", "scale": 0, "length": 2},
            "bad int16 point: length applies only to string points, not int16; scale must not be 0",
        ),
        ({"type": "bitfield"}, "bad bitfield point: a bitfield needs at least one (bit, name) pair"),
        ({"type": "bitfield", "bits": ["ab"]}, "bad bitfield point: 'ab' is not a (bit, name) pair"),
        ({"type": "bitfield", "bits": [5]}, "bad bitfield point: 5 is not a (bit, name) pair"),
        (
            {"type": "bitfield", "bits": [(1,), (16, "b")]},
            "bad bitfield point: (1,) is not a (bit, name) pair; bit 16 is not a bit number 0..15",
        ),
        ({"type": "bitfield", "bits": [(True, "a")]}, "bad bitfield point: bit True is not a bit number 0..15"),
    ],
    ids=[
        "unknown type",
        "string:N to the constructor",
        "bool length",
        "float length",
        "scale not a number",
        "two problems",
        "no bits",
        "text as a pair",
        "number as a pair",
        "bad pair then bad bit",
        "bool bit",
    ],
)
def test_a_bad_point_config_is_refused_with_every_problem_and_only_those(kw: dict[str, Any], message: str) -> None:
    with pytest.raises(CodecError, match=f"^{re.escape(message)}$"):
        PointCodec(**kw)
