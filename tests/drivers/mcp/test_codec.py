"""Byte-vector, round-trip and resynchronisation tests for the pure MCP/1 frame codec."""

from __future__ import annotations

import json

import pytest
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from drivers.mcp.codec import (
    DEFAULT_MAX_PAYLOAD,
    MAGIC,
    DecodeError,
    Decoder,
    Frame,
    FrameType,
    MalformedPayload,
    NackCode,
    crc16,
    decode,
    encode,
    seq_next,
)
from gateway.errors import FieldgateError

FAST = settings(max_examples=150, deadline=None)

# MCP.md section 6, copied verbatim: (type, seq, payload JSON text or None, frame hex).
VECTORS: list[tuple[FrameType, int, str | None, str]] = [
    (FrameType.HEARTBEAT, 7, None, "55aa55aa01010000000700000000028b"),
    (FrameType.ACK, 7, None, "55aa55aa01060000000700000000b320"),
    (
        FrameType.HELLO,
        1,
        '{"boot_id":"b1","device_id":"pump-1","heartbeat_s":30,"token":"s3cret"}',
        "55aa55aa010300000001000000477b22626f6f745f6964223a226231222c226465766963655f6964223a2270756d702d31222c"
        "226865617274626561745f73223a33302c22746f6b656e223a22733363726574227d6337",
    ),
    (
        FrameType.DATA,
        2,
        '{"ts":1767225600000,"values":{"flow_lpm":12.5,"running":true}}',
        "55aa55aa0102000000020000003e7b227473223a313736373232353630303030302c2276616c756573223a7b22666c6f775f6c70"
        "6d223a31322e352c2272756e6e696e67223a747275657d7dcb01",
    ),
    (
        FrameType.NACK,
        2,
        '{"code":1,"reason":"crc mismatch"}',
        "55aa55aa010700000002000000227b22636f6465223a312c22726561736f6e223a22637263206d69736d61746368227d9e35",
    ),
    (
        FrameType.COMMAND,
        4294967295,
        '{"args":{"rpm":1200},"name":"set_speed"}',
        "55aa55aa0104ffffffff000000287b2261726773223a7b2272706d223a313230307d2c226e616d65223a227365745f7370656564"
        "227df45a",
    ),
]
VECTOR_IDS = [f"{t.name}-{seq}" for t, seq, _, _ in VECTORS]

frames = st.builds(
    Frame,
    type=st.integers(0, 255),
    seq=st.integers(0, 2**32 - 1),
    payload=st.binary(max_size=2048),
)
# Small frames keep the multi-frame properties fast; JSON-ish payloads can never contain the magic.
small_frames = st.builds(
    Frame,
    type=st.integers(0, 255),
    seq=st.integers(0, 2**32 - 1),
    payload=st.one_of(st.binary(max_size=64), st.just(b""), st.text(max_size=40).map(str.encode)),
)
# Garbage without the magic; the second branch is dense in sync-pattern bytes to provoke false starts.
garbage = st.one_of(
    st.binary(max_size=40),
    st.lists(st.sampled_from(b"\x55\xaa\x01\x00"), max_size=12).map(bytes),
).filter(lambda g: MAGIC not in g)


def header(version: int = 1, type: int = 2, seq: int = 9, length: int = 0) -> bytes:
    """A raw 14-byte header, for frames encode() refuses to build."""
    return MAGIC + bytes([version, type]) + seq.to_bytes(4, "big") + length.to_bytes(4, "big")


def feed_in_chunks(decoder: Decoder, stream: bytes, cuts: list[int]) -> list[Frame | DecodeError]:
    """Feed `stream` split at the sorted positions `cuts`; collect every event."""
    events: list[Frame | DecodeError] = []
    bounds = [0, *sorted(cuts), len(stream)]
    for lo, hi in zip(bounds, bounds[1:], strict=False):
        events += decoder.feed(stream[lo:hi])
    return events


# --- CRC and test vectors -------------------------------------------------------------------


def test_crc_check_value() -> None:
    """The catalogue check value of CRC-16/CCITT-FALSE, also when continued across two calls."""
    assert crc16(b"123456789") == 0x29B1
    assert crc16(b"6789", crc16(b"12345")) == 0x29B1


@pytest.mark.parametrize(("ftype", "seq", "text", "wire"), VECTORS, ids=VECTOR_IDS)
def test_vector_encodes(ftype: FrameType, seq: int, text: str | None, wire: str) -> None:
    """encode() of the vector's fields gives the vector's bytes; so does Frame.json() of its object."""
    payload = b"" if text is None else text.encode("utf-8")
    assert encode(Frame(ftype, seq, payload)).hex() == wire
    if text is not None:
        assert encode(Frame.json(ftype, seq, json.loads(text))).hex() == wire


@pytest.mark.parametrize(("ftype", "seq", "text", "wire"), VECTORS, ids=VECTOR_IDS)
def test_vector_decodes(ftype: FrameType, seq: int, text: str | None, wire: str) -> None:
    """decode() of the vector's bytes gives its fields, consuming exactly the frame."""
    data = bytes.fromhex(wire)
    consumed, frame = decode(data + b"\x00trailing")
    assert consumed == len(data)
    assert isinstance(frame, Frame)
    assert (frame.type, frame.seq) == (ftype, seq)
    assert frame.payload == (b"" if text is None else text.encode("utf-8"))
    assert frame.body() == ({} if text is None else json.loads(text))
    assert crc16(data[4:-2]) == int.from_bytes(data[-2:], "big")


def test_nack_of_crc_error_is_the_vector() -> None:
    """A CRC error event answers with exactly the spec's NACK vector."""
    nack = DecodeError(NackCode.CRC_MISMATCH, 2, fatal=False).nack()
    assert encode(nack).hex() == VECTORS[4][3]


def test_nack_code_reasons_follow_the_spec_table() -> None:
    """Names and reason texts of section 5, in order."""
    assert [(c.value, c.reason) for c in NackCode] == [
        (1, "crc mismatch"),
        (2, "unsupported version"),
        (3, "frame too large"),
        (4, "unknown frame type"),
        (5, "malformed payload"),
        (6, "not registered"),
        (7, "authentication failed"),
        (8, "overloaded"),
    ]
    assert [(t.name, t.value) for t in FrameType] == [
        ("HEARTBEAT", 1),
        ("DATA", 2),
        ("HELLO", 3),
        ("COMMAND", 4),
        ("RESPONSE", 5),
        ("ACK", 6),
        ("NACK", 7),
    ]


# --- Frame, JSON payloads, seq ----------------------------------------------------------------


def test_json_payload_is_compact_sorted_utf8() -> None:
    """Sorted keys, no spaces, non-ASCII as UTF-8 rather than \\u escapes."""
    frame = Frame.json(FrameType.DATA, 1, {"values": {"t": 1.5}, "name": "Förderpumpe"})
    assert frame.payload == '{"name":"Förderpumpe","values":{"t":1.5}}'.encode()


def test_json_payload_refuses_nan() -> None:
    """NaN is not JSON; a device's parser would reject the frame."""
    with pytest.raises(ValueError):
        Frame.json(FrameType.DATA, 1, {"values": {"t": float("nan")}})


@pytest.mark.parametrize(
    "payload",
    [b"\xff\xfe", b"[1,2]", b'"text"', b"null", b"{", b'{"t":NaN}', b"\xef\xbb\xbf{}", b"[" * 100_000],
    ids=["not-utf8", "array", "string", "null", "truncated", "nan", "bom", "deep-nesting"],
)
def test_body_rejects_what_is_not_a_json_object(payload: bytes) -> None:
    """body() raises MalformedPayload (NACK code 5, the frame's seq) for anything but a UTF-8 JSON object."""
    with pytest.raises(MalformedPayload) as info:
        Frame(FrameType.DATA, 42, payload).body()
    assert info.value.code == NackCode.MALFORMED_PAYLOAD == 5
    assert info.value.seq == 42
    assert isinstance(info.value, FieldgateError)


def test_body_of_empty_payload_is_empty_object() -> None:
    """Whether an empty payload is acceptable is the caller's policy."""
    assert Frame(FrameType.HEARTBEAT, 1).body() == {}


@pytest.mark.parametrize(("ftype", "seq"), [(-1, 1), (256, 1), (1, -1), (1, 2**32)])
def test_frame_refuses_fields_that_do_not_fit_the_header(ftype: int, seq: int) -> None:
    """Type is one byte and seq four; out-of-range values never reach the wire."""
    with pytest.raises(ValueError):
        encode(Frame(ftype, seq))


def test_frame_copies_a_bytearray_payload() -> None:
    """A frozen frame stays immutable even when built from a bytearray."""
    buf = bytearray(b"{}")
    frame = Frame(FrameType.DATA, 1, buf)  # type: ignore[arg-type]
    buf[0] = 0
    assert frame.payload == b"{}"
    assert isinstance(frame.payload, bytes)


def test_seq_next_wraps_to_one() -> None:
    """1, 2, … 0xFFFFFFFF, 1: zero is never produced."""
    assert seq_next(0) == 1
    assert seq_next(1) == 2
    assert seq_next(0xFFFFFFFE) == 0xFFFFFFFF
    assert seq_next(0xFFFFFFFF) == 1
    for bad in (-1, 2**32):
        with pytest.raises(ValueError):
            seq_next(bad)


@FAST
@given(st.integers(0, 2**32 - 1))
def test_seq_next_is_never_zero_and_counts_up(seq: int) -> None:
    """Property: the next seq is seq+1, or 1 after the top."""
    nxt = seq_next(seq)
    assert nxt != 0
    assert nxt == (seq + 1 if seq < 0xFFFFFFFF else 1)


# --- round trip and splitting -----------------------------------------------------------------


@FAST
@given(frames, st.binary(max_size=20))
def test_round_trip(frame: Frame, tail: bytes) -> None:
    """decode(encode(f) + anything) gives f back, consuming exactly the frame."""
    wire = encode(frame)
    assert len(wire) == 16 + len(frame.payload)
    assert decode(wire + tail) == (len(wire), frame)
    assert decode(bytearray(wire)) == (len(wire), frame)
    assert decode(memoryview(wire)) == (len(wire), frame)


@FAST
@given(st.lists(small_frames, min_size=1, max_size=8), st.data())
def test_any_split_of_a_stream_gives_the_same_frames(batch: list[Frame], data: st.DataObject) -> None:
    """Property: however TCP splits the stream, the decoder yields exactly the frames sent."""
    stream = b"".join(encode(f) for f in batch)
    cuts = data.draw(st.lists(st.integers(0, len(stream)), max_size=len(stream)))
    decoder = Decoder()
    assert feed_in_chunks(decoder, stream, cuts) == batch
    assert decoder.pending == 0
    assert not decoder.has_partial


def test_one_byte_at_a_time() -> None:
    """Every test vector, fed byte by byte: a frame appears exactly when its last byte arrives."""
    stream = b"".join(bytes.fromhex(v[3]) for v in VECTORS)
    decoder = Decoder()
    seen: list[Frame | DecodeError] = []
    for i in range(len(stream)):
        events = decoder.feed(stream[i : i + 1])
        seen += events
        assert decoder.has_partial == (not events)
    assert [(f.type, f.seq) for f in seen if isinstance(f, Frame)] == [(v[0], v[1]) for v in VECTORS]
    assert len(seen) == len(VECTORS)


def test_many_small_frames_keep_the_buffer_small() -> None:
    """Consumed bytes are dropped as the stream goes on, not kept until one big compaction."""
    wire = encode(Frame(FrameType.HEARTBEAT, 1))
    stream = wire * 2000
    decoder = Decoder()
    count = 0
    for i in range(0, len(stream), 7):
        count += len(decoder.feed(stream[i : i + 7]))
        assert len(decoder._buf) <= 2 * (len(wire) + 7)
    assert count == 2000
    assert decoder.pending == 0


# --- garbage and resynchronisation ------------------------------------------------------------


@FAST
@given(st.lists(st.tuples(garbage, small_frames), min_size=1, max_size=6), garbage, st.data())
def test_garbage_between_frames_never_invents_or_loses_a_frame(
    pairs: list[tuple[bytes, Frame]], tail: bytes, data: st.DataObject
) -> None:
    """Property: garbage free of the magic is skipped silently; every frame comes out, in order, nothing else."""
    sent = [f for _, f in pairs]
    stream = b"".join(g + encode(f) for g, f in pairs) + tail
    cuts = data.draw(st.lists(st.integers(0, len(stream)), max_size=20))
    decoder = Decoder()
    assert feed_in_chunks(decoder, stream, cuts) == sent
    assert decoder.pending <= 3  # at most a tail that may still become a magic


@pytest.mark.parametrize("noise", [b"\x55", b"\x55\xaa", b"\x55\xaa\x55", b"\xaa\x55\xaa", b"\x55\xaa" * 5])
def test_noise_ending_in_sync_bytes_does_not_hide_the_frame(noise: bytes) -> None:
    """55 AA before a frame forms a magic one pair early; the frame behind it must still decode."""
    wire = bytes.fromhex(VECTORS[0][3])
    consumed, event = decode(noise + wire)
    assert (consumed, event) == (len(noise) + len(wire), Frame(FrameType.HEARTBEAT, 7))
    decoder = Decoder()  # and when the noise arrives in a segment of its own
    assert decoder.feed(noise) == []
    assert decoder.feed(wire) == [Frame(FrameType.HEARTBEAT, 7)]


def test_bytes_without_magic_are_consumed_but_a_possible_magic_start_is_kept() -> None:
    """Pure garbage is dropped, except a tail that can still grow into 55 AA 55 AA."""
    assert decode(b"") == (0, None)
    assert decode(b"\x00" * 10) == (10, None)
    assert decode(b"\x00" * 10 + b"\x55\xaa") == (10, None)
    assert decode(b"\x00" * 10 + b"\x55\xaa\x55") == (10, None)
    assert decode(b"\x00\x55\x00") == (3, None)
    decoder = Decoder()
    assert decoder.feed(b"GET / HTTP/1.1\r\n\r\n") == []
    assert decoder.pending == 0
    assert not decoder.has_partial


@settings(max_examples=300, deadline=None)
@given(small_frames, st.lists(small_frames, min_size=1, max_size=4), st.data())
def test_a_corrupted_frame_is_reported_and_the_following_frames_survive(
    frame: Frame, following: list[Frame], data: st.DataObject
) -> None:
    """Property: one flipped bit gives the error the field implies (section 5), then every later frame."""
    good = encode(frame)
    bit = data.draw(st.integers(0, 8 * len(good) - 1))
    flipped = bytearray(good)
    flipped[bit // 8] ^= 1 << (bit % 8)
    bad = bytes(flipped)
    # A magic born from the flip (or already inside seq/length/crc) would be a second frame start of its own.
    assume(bad.find(MAGIC, 1) == -1)
    rest = b"".join(encode(f) for f in following)
    max_payload = 1024
    decoder = Decoder(max_payload)
    events = decoder.feed(bad + rest)
    seq = int.from_bytes(bad[6:10], "big")
    length = int.from_bytes(bad[10:14], "big")
    pos = bit // 8

    if pos < 4:  # magic: the bad frame is plain garbage now
        assert events == following
    elif pos == 4:  # version
        assert events == [DecodeError(NackCode.UNSUPPORTED_VERSION, seq, fatal=True)]
    elif 10 <= pos < 14 and length > max_payload:
        assert events == [DecodeError(NackCode.FRAME_TOO_LARGE, seq, fatal=True)]
    elif 10 <= pos < 14 and 16 + length > len(bad + rest):
        assert events == []  # waits for bytes that never come: the session's 5 s stall rule ends this
        assert decoder.has_partial
    else:
        if 10 <= pos < 14:
            # A wrong length makes the CRC check other bytes; a chance match (2**-16) is not a flip to find.
            stream = bad + rest
            assume(crc16(stream[4 : 14 + length]) != int.from_bytes(stream[14 + length : 16 + length], "big"))
        assert events == [DecodeError(NackCode.CRC_MISMATCH, seq, fatal=False), *following]
        assert decoder.pending == 0


def test_crc_error_skips_one_byte_only() -> None:
    """A bad CRC consumes start+1, so a following frame is found by the next search."""
    good = bytes.fromhex(VECTORS[3][3])
    bad = good[:-1] + bytes([good[-1] ^ 0x01])
    consumed, event = decode(b"xy" + bad + good)
    assert (consumed, event) == (3, DecodeError(NackCode.CRC_MISMATCH, 2, fatal=False))
    assert decode((b"xy" + bad + good)[consumed:]) == (len(bad) - 1 + len(good), decode(good)[1])


def test_corrupted_length_does_not_swallow_the_next_frame() -> None:
    """A length grown by the corruption eats the next frame's bytes, fails its CRC, and gives them back."""
    first = bytearray(bytes.fromhex(VECTORS[0][3]))
    first[13] = 20  # announces 20 payload bytes; the heartbeat has none
    second = bytes.fromhex(VECTORS[2][3])
    decoder = Decoder()
    assert decoder.feed(bytes(first) + second) == [
        DecodeError(NackCode.CRC_MISMATCH, 7, fatal=False),
        decode(second)[1],
    ]


# --- fatal errors, partial frames, unknown types ----------------------------------------------


def test_oversize_length_is_fatal_as_soon_as_the_header_is_in() -> None:
    """Code 3 with the header's seq, without waiting for a single payload byte."""
    hdr = header(seq=1234, length=DEFAULT_MAX_PAYLOAD + 1)
    assert decode(hdr[:-1]) == (0, None)
    assert decode(hdr) == (1, DecodeError(NackCode.FRAME_TOO_LARGE, 1234, fatal=True))
    assert decode(header(seq=5, length=101), max_payload=100) == (
        1,
        DecodeError(NackCode.FRAME_TOO_LARGE, 5, fatal=True),
    )
    # Exactly max_payload is allowed: the decoder waits for the payload instead.
    assert decode(header(seq=5, length=100), max_payload=100) == (0, None)
    decoder = Decoder()
    assert decoder.feed(b"\x00" + hdr) == [DecodeError(NackCode.FRAME_TOO_LARGE, 1234, fatal=True)]


def test_bad_version_is_fatal() -> None:
    """Code 2; the seq is reported when the header is complete, 0 when it is not."""
    frame = header(version=2, seq=77, length=2) + b"{}" + b"\x00\x00"
    assert decode(frame) == (1, DecodeError(NackCode.UNSUPPORTED_VERSION, 77, fatal=True))
    assert decode(frame[:5]) == (1, DecodeError(NackCode.UNSUPPORTED_VERSION, 0, fatal=True))
    assert decode(b"junk" + frame[:4]) == (4, None)


def test_decoder_stops_at_a_fatal_error() -> None:
    """Frames before a fatal error are delivered, nothing after it; feeding on is a bug."""
    good = bytes.fromhex(VECTORS[0][3])
    decoder = Decoder()
    events = decoder.feed(good + header(version=0, seq=3) + b"\x00\x00" + good)
    assert events == [Frame(FrameType.HEARTBEAT, 7), DecodeError(NackCode.UNSUPPORTED_VERSION, 3, fatal=True)]
    with pytest.raises(RuntimeError):
        decoder.feed(good)


@FAST
@given(small_frames, st.data())
def test_truncated_frame_waits(frame: Frame, data: st.DataObject) -> None:
    """Property: any proper prefix of a frame decodes to "need more" and leaves a partial frame buffered."""
    wire = encode(frame)
    cut = data.draw(st.integers(1, len(wire) - 1))
    assert decode(wire[:cut]) == (0, None)
    decoder = Decoder()
    assert decoder.feed(wire[:cut]) == []
    assert decoder.pending == cut
    assert decoder.has_partial
    assert decoder.feed(wire[cut:]) == [frame]
    assert not decoder.has_partial


def test_unknown_type_is_returned_for_the_caller_to_nack() -> None:
    """The codec does not judge types: 0x99 with a good CRC is a frame."""
    wire = encode(Frame(0x99, 3, b"{}"))
    consumed, frame = decode(wire)
    assert consumed == len(wire)
    assert frame == Frame(0x99, 3, b"{}")


def test_max_payload_must_fit_the_length_field() -> None:
    """A negative or >32-bit limit is a configuration bug."""
    for bad in (-1, 2**32):
        with pytest.raises(ValueError):
            decode(b"", max_payload=bad)
        with pytest.raises(ValueError):
            Decoder(max_payload=bad)
