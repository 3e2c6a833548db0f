"""The Modbus point codec's promises at their edges: the 16-bit word limit, text endings, and what refusals say."""

from __future__ import annotations

from fractions import Fraction

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
    with pytest.raises(CodecError, match=r"needs a length: string:N"):
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
