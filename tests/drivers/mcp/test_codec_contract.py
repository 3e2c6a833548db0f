"""The MCP/1 codec's promises at their edges: limits of the header fields, what its errors say, and resync."""

from __future__ import annotations

import pytest

from drivers.mcp.codec import (
    MAGIC,
    MAX_LENGTH,
    MAX_SEQ,
    DecodeError,
    Decoder,
    Frame,
    FrameType,
    MalformedPayload,
    NackCode,
    decode,
    encode,
    seq_next,
)


class _Sized(bytes):
    """A payload that reports `size` bytes: the 32-bit length edge without allocating 4 GiB."""

    size = 0

    def __len__(self) -> int:
        return self.size


def _payload_of(size: int) -> bytes:
    payload = _Sized(b"")
    payload.size = size
    return payload


# --- the header's fields ----------------------------------------------------------------------------


def test_a_payload_of_exactly_the_length_fields_maximum_fits_and_one_more_byte_does_not() -> None:
    assert len(Frame(FrameType.DATA, 1, _payload_of(MAX_LENGTH)).payload) == MAX_LENGTH
    with pytest.raises(ValueError, match=rf"payload of {MAX_LENGTH + 1} bytes does not fit the 32-bit length field"):
        Frame(FrameType.DATA, 1, _payload_of(MAX_LENGTH + 1))


@pytest.mark.parametrize("ftype", [-1, 256])
def test_a_frame_type_outside_a_byte_is_refused_saying_so(ftype: int) -> None:
    with pytest.raises(ValueError, match=rf"^frame type must be 0\.\.255, got {ftype}$"):
        Frame(ftype, 1)


@pytest.mark.parametrize("seq", [-1, MAX_SEQ + 1])
def test_a_seq_outside_32_bits_is_refused_saying_so(seq: int) -> None:
    with pytest.raises(ValueError, match=rf"^seq must be 0\.\.{MAX_SEQ}, got {seq}$"):
        Frame(FrameType.DATA, seq)
    with pytest.raises(ValueError, match=rf"^seq must be 0\.\.{MAX_SEQ}, got {seq}$"):
        seq_next(seq)


def test_an_error_about_a_frame_whose_seq_is_unknown_carries_seq_0() -> None:
    # docs/mcp.md §3.1: seq 0 means "unknown"; a NACK for such an error must not name frame 1.
    assert MalformedPayload("payload: not JSON").seq == 0
    assert MalformedPayload("payload: not JSON", seq=9).seq == 9


# --- resynchronisation --------------------------------------------------------------------------------


def test_after_a_crc_error_the_search_resumes_at_the_first_magic_in_the_header_not_a_later_one() -> None:
    """docs/mcp.md §5.1: skip one byte past the bad frame's start and search: the first magic found is the next
    candidate, even when the header holds a second one further on."""
    # A header whose seq holds a magic at offset 5 and whose length is a magic at offset 10; the candidate at 5
    # has version 01 (offset 9), the one at 10 has version 02 (offset 14). The length is under max_payload and
    # the payload received so far holds the next frame's magic: a corrupted frame, answered NACK 1.
    bad = MAGIC + bytes([1, 0x55, 0xAA, 0x55, 0xAA, 0x01]) + MAGIC + bytes([0x02, 0, 0, 0, 0, 0])
    stream = bad + encode(Frame(FrameType.HEARTBEAT, 7))
    assert Decoder(MAX_LENGTH).feed(stream) == [
        DecodeError(NackCode.CRC_MISMATCH, 0xAA55AA01, fatal=False),  # the frame at 0, its payload holds a magic
        DecodeError(NackCode.CRC_MISMATCH, 0xAA55AA02, fatal=False),  # the candidate at 5: its CRC is wrong
        DecodeError(NackCode.UNSUPPORTED_VERSION, 0, fatal=True),  # the candidate at 10: version 2
    ]


def test_the_last_bytes_of_a_decoded_frame_never_join_new_bytes_into_a_frame() -> None:
    """A frame's CRC may be 55 AA; once the frame is decoded those bytes are spent, and only what follows them
    (a lone 55, then AA 01 ...: no magic in the stream) may start the next frame."""
    ack = encode(Frame(FrameType.ACK, 10313))
    assert ack[-2:] == b"\x55\xaa"  # its CRC
    decoder = Decoder()
    assert decoder.feed(ack + b"\x55") == [Frame(FrameType.ACK, 10313)]
    assert decoder.feed(encode(Frame(FrameType.HEARTBEAT, 7))[3:]) == []


def test_feeding_a_decoder_that_stopped_at_a_fatal_error_says_the_session_must_close() -> None:
    decoder = Decoder()
    bad_version = bytearray(encode(Frame(FrameType.HEARTBEAT, 7)))
    bad_version[4] = 2
    assert decoder.feed(bad_version) == [DecodeError(NackCode.UNSUPPORTED_VERSION, 7, fatal=True)]
    with pytest.raises(RuntimeError, match=r"^the MCP decoder stopped at a fatal error; the session must be closed$"):
        decoder.feed(encode(Frame(FrameType.HEARTBEAT, 8)))


def test_a_caller_that_stops_after_a_crc_error_loses_none_of_the_bytes_that_follow() -> None:
    """`Decoder.events` may be left early; the next call goes on exactly where the last event ended."""
    bad = bytearray(encode(Frame(FrameType.HEARTBEAT, 8)))
    bad[-1] ^= 1  # its CRC: no magic after its first byte, so the resync drops all of it
    decoder = Decoder()
    events = decoder.events(encode(Frame(FrameType.HEARTBEAT, 7)) + bad)
    assert next(events) == Frame(FrameType.HEARTBEAT, 7)
    assert next(events) == DecodeError(NackCode.CRC_MISMATCH, 8, fatal=False)
    # The caller stops here (it would close, or answer first) and comes back with the next bytes.
    assert list(decoder.events(encode(Frame(FrameType.HEARTBEAT, 9)))) == [Frame(FrameType.HEARTBEAT, 9)]
    assert decoder.pending == 0


@pytest.mark.parametrize("fault", ["version", "length"])
def test_after_a_fatal_error_the_bytes_past_its_first_byte_stay_counted_as_undecoded(fault: str) -> None:
    heartbeat = encode(Frame(FrameType.HEARTBEAT, 7))
    bad = bytearray(encode(Frame(FrameType.DATA, 8, b'{"values":{"x":1}}')))
    if fault == "version":
        bad[4], code = 2, NackCode.UNSUPPORTED_VERSION
    else:
        bad[13], code = 0xFF, NackCode.FRAME_TOO_LARGE  # a length past max_payload
    decoder = Decoder(max_payload=64)
    assert decoder.feed(heartbeat + bad) == [Frame(FrameType.HEARTBEAT, 7), DecodeError(code, 8, fatal=True)]
    # Fatal errors consume one byte, like the one-byte skip (docs/mcp.md §5.1): the rest of the frame is not decoded.
    assert decoder.pending == len(bad) - 1
    assert decoder.has_partial


def test_a_magic_made_of_the_length_and_the_payload_is_no_reason_to_reject_a_frame() -> None:
    """Only the payload is searched for the magic: a length ending in 55 (85 bytes) before a payload starting
    AA 55 AA makes a 55 AA 55 AA across the two, and the frame is still good, however its bytes arrive."""
    wire = encode(Frame(FrameType.DATA, 1, b"\xaa\x55\xaa" + b"x" * 82))
    assert wire[13:17] == MAGIC
    for cut in range(len(wire)):
        decoder = Decoder()
        assert decoder.feed(wire[:cut]) + decoder.feed(wire[cut:]) == [decode(wire)[1]], cut


def test_a_frame_whose_magic_starts_in_the_last_three_bytes_of_a_bad_payload_is_found() -> None:
    """A corrupted length may end the bad frame's payload 3 bytes into the next frame: the resync after its CRC
    mismatch still finds that frame (the last magic that can start inside the payload starts 3 bytes from its end)."""
    good = encode(Frame(FrameType.HEARTBEAT, 7))
    bad = MAGIC + bytes([1, 2]) + (5).to_bytes(4, "big") + (20).to_bytes(4, "big") + b"x" * 17
    assert Decoder().feed(bad + good) == [
        DecodeError(NackCode.CRC_MISMATCH, 5, fatal=False),
        Frame(FrameType.HEARTBEAT, 7),
    ]


@pytest.mark.parametrize("limit", [-1, MAX_LENGTH + 1, True, 1.5])
def test_a_max_payload_the_length_field_cannot_hold_is_refused_saying_so(limit: object) -> None:
    with pytest.raises(ValueError, match=rf"^max_payload must be an integer 0\.\.{MAX_LENGTH}, got {limit!r}$"):
        Decoder(limit)  # type: ignore[arg-type]
