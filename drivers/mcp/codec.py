"""MCP/1 frame codec: pure `encode(frame) -> bytes` and incremental `decode(buffer) -> (consumed, event)`.

Decoding costs time linear in the bytes received, whatever they are. MCP/1 resynchronises after a
bad frame by skipping one byte and searching for the next magic (docs/mcp.md §5.1); done literally (check the CRC of
every candidate header), a buffer of headers that each announce a payload reaching the end of the
buffer makes every header cost a CRC over the rest of it: quadratic, and the event loop stalls for
every device. The rules that keep it linear, with the same outcome for every well-formed stream:

- A payload is UTF-8 JSON, and UTF-8 never holds the bytes 55 AA (AA is a continuation byte, and 55
  is ASCII), so no valid payload holds the magic. A candidate frame whose payload span holds the
  magic is corrupt: it is answered like a CRC mismatch (NACK 1 with the header's seq) without
  computing its CRC, and decoding resumes at the first magic after the candidate's first byte (in
  its header, or that magic). This is also checked on the part of a payload received so far, so a
  corrupted `length` no longer waits for a huge payload once the next frame's magic has arrived.
- A candidate whose payload holds no magic has its CRC checked once. On a mismatch the search for
  the next magic starts in the header (one byte past the frame's start, as docs/mcp.md §5.1 says) and then
  jumps to the last three bytes of the payload: no magic can start in between. The next frame found
  is the one the byte-by-byte search of docs/mcp.md §5.1 finds, but the payload is neither searched nor CRC-checked
  again.
- `Decoder` remembers how far a partial frame's payload has been searched, so bytes arriving one at
  a time are each searched a constant number of times.

Every candidate that has its CRC checked has a payload free of the magic, and a later candidate
starts at a magic: inside the 14-byte header of an earlier one (a handful at most) or past its
payload. So each byte received is CRC-checked and searched a bounded number of times
(tests/drivers/mcp/test_codec.py counts both). The price: a frame whose payload holds the magic
(never valid JSON) cannot be received; `encode` still writes it, for tests of exactly that.
"""

from __future__ import annotations

import json
import re
import struct
from collections.abc import Iterator
from dataclasses import dataclass
from enum import IntEnum
from typing import Any, ClassVar

import crcmod.predefined

from gateway.errors import FieldgateError
from gateway.jsonsafe import JsonRejected, loads_strict

MAGIC = b"\x55\xaa\x55\xaa"
VERSION = 1
HEADER_SIZE = 14  # magic, version, type, seq, length
CRC_SIZE = 2
OVERHEAD = HEADER_SIZE + CRC_SIZE
DEFAULT_MAX_PAYLOAD = 1_048_576
MAX_SEQ = 0xFFFF_FFFF
MAX_LENGTH = 0xFFFF_FFFF
MAX_REASON = 200  # characters of a NACK's reason; longer ones are cut (a peer can put its own text in one)

_HEADER = struct.Struct(">4sBBII")
_TYPE_SEQ_LENGTH = struct.Struct(">BII")
# Proper prefixes of the magic, longest first: a buffer ending in one of them may be a frame's first bytes.
_MAGIC_PREFIXES = tuple(MAGIC[:n] for n in range(len(MAGIC) - 1, 0, -1))
# 55 AA pairs from a magic on: the frame starts at the run's last magic (see _decode_at).
_SYNC_RUN = re.compile(rb"(?:\x55\xaa)+")
# A magic that starts in a header (offsets 1..13) ends before this offset.
_HEADER_MAGIC_END = HEADER_SIZE + len(MAGIC) - 1

_crc16 = crcmod.predefined.mkCrcFun("crc-ccitt-false")


class FrameType(IntEnum):
    """Frame types of MCP/1 (docs/mcp.md §2)."""

    HEARTBEAT = 1
    DATA = 2
    HELLO = 3
    COMMAND = 4
    RESPONSE = 5
    ACK = 6
    NACK = 7


class NackCode(IntEnum):
    """Error codes carried in a NACK (docs/mcp.md §5)."""

    CRC_MISMATCH = 1
    UNSUPPORTED_VERSION = 2
    FRAME_TOO_LARGE = 3
    UNKNOWN_FRAME_TYPE = 4
    MALFORMED_PAYLOAD = 5
    NOT_REGISTERED = 6
    AUTHENTICATION_FAILED = 7
    OVERLOADED = 8

    @property
    def reason(self) -> str:
        """The default reason text (docs/mcp.md §5), e.g. "crc mismatch"."""
        return self.name.lower().replace("_", " ")


class McpError(FieldgateError):
    """An MCP/1 protocol error that the receiver answers with a NACK of `code` for frame `seq`."""

    code: ClassVar[NackCode]  # set by each subclass

    def __init__(self, message: str, seq: int = 0) -> None:
        super().__init__(message)
        self.seq = seq


class MalformedPayload(McpError, ValueError):
    """A payload is not a UTF-8 JSON object, or its fields have the wrong type (NACK code 5)."""

    code = NackCode.MALFORMED_PAYLOAD


def crc16(data: bytes | bytearray | memoryview, crc: int | None = None) -> int:
    """CRC-16/CCITT-FALSE of `data`, continuing from `crc` when given."""
    return int(_crc16(data) if crc is None else _crc16(data, crc))


def seq_next(seq: int) -> int:
    """The sequence number after `seq`: 1, 2, … 0xFFFFFFFF, 1 (0 means "unknown" and is never sent)."""
    if not 0 <= seq <= MAX_SEQ:
        raise ValueError(f"seq must be 0..{MAX_SEQ}, got {seq}")
    return 1 if seq == MAX_SEQ else seq + 1


@dataclass(frozen=True, slots=True)
class Frame:
    """One MCP/1 frame; `type` stays a plain int so that unknown types reach the caller for NACK 4."""

    type: int
    seq: int
    payload: bytes = b""

    def __post_init__(self) -> None:
        # Checked here rather than in encode() so that an invalid frame cannot exist at all.
        if not 0 <= self.type <= 0xFF:
            raise ValueError(f"frame type must be 0..255, got {self.type}")
        if not 0 <= self.seq <= MAX_SEQ:
            raise ValueError(f"seq must be 0..{MAX_SEQ}, got {self.seq}")
        if not isinstance(self.payload, bytes):
            # A bytearray would make a frozen frame mutable and unhashable.
            object.__setattr__(self, "payload", bytes(self.payload))
        if len(self.payload) > MAX_LENGTH:
            raise ValueError(f"payload of {len(self.payload)} bytes does not fit the 32-bit length field")

    @classmethod
    def json(cls, type: int, seq: int, obj: dict[str, Any]) -> Frame:
        """A frame whose payload is `obj` as compact JSON with sorted keys (the canonical form of docs/mcp.md §1).

        Any string is encodable: a lone surrogate (which a peer can slip into an error text) is written
        as "?", the rule of `gateway.jsonsafe.dumps_safe`. NaN, Infinity and values that are not JSON
        types are still the caller's error (ValueError, TypeError): they never come from a peer's JSON.
        """
        text = json.dumps(obj, separators=(",", ":"), sort_keys=True, ensure_ascii=False, allow_nan=False)
        return cls(type, seq, text.encode("utf-8", "replace"))

    def body(self) -> dict[str, Any]:
        """The payload as a JSON object; an empty payload gives {} (whether that is allowed is the caller's call)."""
        if not self.payload:
            return {}
        try:
            obj = loads_strict(self.payload)
        except JsonRejected as exc:
            # JsonRejected says why in one line: bad UTF-8, bad JSON, NaN, a lone surrogate, too deep.
            raise MalformedPayload(f"payload: {exc}", seq=self.seq) from None
        if not isinstance(obj, dict):
            raise MalformedPayload(f"payload is a JSON {type(obj).__name__}, not an object", seq=self.seq)
        return obj


def nack(seq: int, code: NackCode, reason: str | None = None) -> Frame:
    """The NACK of frame `seq`: `reason` (default: the text of docs/mcp.md §5 for `code`) cut to MAX_REASON characters.

    It never raises, whatever the reason holds (a peer's own text, lone surrogates, megabytes): answer
    every NACK through here.
    """
    text = code.reason if reason is None else reason
    if len(text) > MAX_REASON:
        text = text[: MAX_REASON - 1] + "…"
    return Frame.json(FrameType.NACK, seq, {"code": int(code), "reason": text})


@dataclass(frozen=True, slots=True)
class DecodeError:
    """A decode event (returned, not raised): the stream held a bad frame; NACK it, and close when `fatal`."""

    code: NackCode
    seq: int  # from the bad frame's header; 0 when the header was not complete
    fatal: bool

    @property
    def reason(self) -> str:
        """The default reason text for `code` (docs/mcp.md §5)."""
        return self.code.reason

    def nack(self) -> Frame:
        """The NACK frame that answers this error."""
        return nack(self.seq, self.code)


def encode(frame: Frame) -> bytes:
    """The wire bytes of `frame`: magic, version, type, seq, length, payload, CRC."""
    header = _HEADER.pack(MAGIC, VERSION, frame.type, frame.seq, len(frame.payload))
    # The CRC runs on from the header into the payload, so a large payload is not copied to compute it.
    crc = crc16(frame.payload, crc16(header[len(MAGIC) :]))
    return b"".join((header, frame.payload, crc.to_bytes(CRC_SIZE, "big")))


def decode(
    buffer: bytes | bytearray | memoryview, max_payload: int = DEFAULT_MAX_PAYLOAD
) -> tuple[int, Frame | DecodeError | None]:
    """Decode the first frame in `buffer`: (bytes consumed, a Frame, a DecodeError, or None for "need more")."""
    data = bytes(buffer) if isinstance(buffer, memoryview) else buffer
    consumed, event, _ = _decode_at(data, 0, _check_max_payload(max_payload))
    return consumed, event


def _check_max_payload(max_payload: int) -> int:
    if isinstance(max_payload, bool) or not isinstance(max_payload, int) or not 0 <= max_payload <= MAX_LENGTH:
        raise ValueError(f"max_payload must be an integer 0..{MAX_LENGTH}, got {max_payload!r}")
    return max_payload


def _skip_garbage(buf: bytes | bytearray, start: int, end: int) -> int:
    """Bytes to drop from `start` when no magic starts in buf[start:]: all but a tail that may still grow into one."""
    # Only such a tail is kept, so that garbage never looks like a frame start.
    for prefix in _MAGIC_PREFIXES:
        if buf.endswith(prefix, start):
            return end - start - len(prefix)
    return end - start


def _resync(buf: bytes | bytearray, start: int, frame: int, clean_from: int) -> int:
    """Bytes to drop from `start` after rejecting the frame at `frame`: up to the first magic after its first byte.

    The caller knows that no magic starts between the end of the header and `clean_from`, so only the header's
    last 13 bytes and what follows `clean_from` are searched: the result is docs/mcp.md §5.1's one-byte skip and search.
    """
    found = buf.find(MAGIC, frame + 1, frame + _HEADER_MAGIC_END)
    if found < 0:
        found = buf.find(MAGIC, clean_from)
    if found < 0:
        return _skip_garbage(buf, start, len(buf))
    return found - start


def _decode_at(
    buf: bytes | bytearray, start: int, max_payload: int, clean: int = 0
) -> tuple[int, Frame | DecodeError | None, int]:
    """`decode` of buf[start:] without copying it; the consumed count is relative to `start`.

    The third value is for `Decoder`: when the answer is "need more" for a frame whose header is in, the index
    up to which its payload is known to hold no magic. Passed back as `clean` for the same frame start, the
    search goes on from there instead of from the payload's first byte.
    """
    end = len(buf)
    i = buf.find(MAGIC, start)
    if i < 0:
        return _skip_garbage(buf, start, end), None, 0

    if end < i + 5:
        return i - start, None, 0
    if buf[i + 4] == MAGIC[0]:
        # In a run like 55 AA 55 AA 55 AA 01 the frame starts at the last magic: the extra 55 AA pairs are noise
        # (e.g. garbage ending in 55 AA) and must not be read as "version 0x55", which would close the session.
        run_end = _SYNC_RUN.match(buf, i).end()  # type: ignore[union-attr]  # the magic itself matches
        i = run_end - len(MAGIC)
        if run_end == end or (run_end == end - 1 and buf[run_end] == MAGIC[0]):
            return i - start, None, 0  # the run may go on

    header_complete = end >= i + HEADER_SIZE
    if buf[i + 4] != VERSION:
        # Nothing after the version byte is trustworthy, but the seq is reported when it is already at hand.
        seq = _TYPE_SEQ_LENGTH.unpack_from(buf, i + 5)[1] if header_complete else 0
        # Fatal errors consume one byte, like the one-byte skip (docs/mcp.md §5.1): a caller that goes on still resyncs.
        return i + 1 - start, DecodeError(NackCode.UNSUPPORTED_VERSION, seq, fatal=True), 0
    if not header_complete:
        return i - start, None, 0

    frame_type, seq, length = _TYPE_SEQ_LENGTH.unpack_from(buf, i + 5)
    if length > max_payload:
        # Said as soon as the header is in: waiting for a huge payload is exactly what the limit prevents.
        return i + 1 - start, DecodeError(NackCode.FRAME_TOO_LARGE, seq, fatal=True), 0

    payload_start = i + HEADER_SIZE
    payload_end = payload_start + length
    # Search the payload received so far (from where an earlier call stopped, less a magic's width) for the magic.
    search_from = clean - len(MAGIC) + 1 if clean - len(MAGIC) + 1 > payload_start else payload_start
    search_end = payload_end if payload_end < end else end
    if search_end - search_from >= len(MAGIC):
        found = buf.find(MAGIC, search_from, search_end)
        if found >= 0:
            # Not UTF-8, so not a payload: a corrupted frame (most likely its length), answered like one.
            return _resync(buf, start, i, found), DecodeError(NackCode.CRC_MISMATCH, seq, fatal=False), 0
    if end < payload_end + CRC_SIZE:
        return i - start, None, search_end

    with memoryview(buf) as view:
        computed = _crc16(view[i + len(MAGIC) : payload_end])
        payload = bytes(view[payload_start:payload_end])
    received = int.from_bytes(buf[payload_end : payload_end + CRC_SIZE], "big")
    if computed != received:
        # The length may be the corrupted field, and it must not swallow the frames after it: resync from the
        # header on; the payload holds no magic, so no frame can start before its last three bytes.
        clean_from = max(payload_start, payload_end - len(MAGIC) + 1)
        return _resync(buf, start, i, clean_from), DecodeError(NackCode.CRC_MISMATCH, seq, fatal=False), 0
    return i + OVERHEAD + length - start, Frame(frame_type, seq, payload), 0


class Decoder:
    """Stateful wrapper around `decode` for a byte stream: feed it what the socket gives, get frames and errors."""

    def __init__(self, max_payload: int = DEFAULT_MAX_PAYLOAD) -> None:
        self._max_payload = _check_max_payload(max_payload)
        self._buf = bytearray()
        self._offset = 0  # consumed bytes at the front of _buf, dropped in bulk rather than per frame
        self._clean = 0  # bytes past _offset known to hold no magic in the partial frame's payload
        self._stopped = False

    @property
    def max_payload(self) -> int:
        """The longest payload a header may announce; more is the fatal FRAME_TOO_LARGE."""
        return self._max_payload

    @max_payload.setter
    def max_payload(self, value: int) -> None:
        # A session raises it after HELLO; it applies from the next frame decoded (see `events`).
        self._max_payload = _check_max_payload(value)

    @property
    def pending(self) -> int:
        """Bytes buffered and not yet decoded."""
        return len(self._buf) - self._offset

    @property
    def has_partial(self) -> bool:
        """True when buffered bytes may be the start of a frame that is not complete yet."""
        # The decoder keeps nothing but a started frame or a tail that may begin a magic, and the
        # 5 s stall rule (docs/mcp.md §4.2) counts from a frame's first byte.
        return self.pending > 0

    def feed(self, data: bytes | bytearray | memoryview) -> list[Frame | DecodeError]:
        """Add received bytes; return the frames and errors now complete, stopping after a fatal error."""
        self._append(data)
        return list(self._iterate())

    def events(self, data: bytes | bytearray | memoryview) -> Iterator[Frame | DecodeError]:
        """Add received bytes; yield the frames and errors now complete one by one, stopping after a fatal error.

        Each is decoded when asked for, under the `max_payload` set at that moment: a session that raises the
        limit on HELLO applies it to the frames behind the HELLO in the same read. A caller may stop early
        (e.g. to close the connection); what it did not take stays buffered for the next call. One iterator at
        a time: the next call's bytes go behind this one's.
        """
        self._append(data)  # now, not on the first next(): bytes handed over are never lost
        return self._iterate()

    def _iterate(self) -> Iterator[Frame | DecodeError]:
        while (event := self._next()) is not None:
            yield event
        self._compact()

    def _append(self, data: bytes | bytearray | memoryview) -> None:
        if self._stopped:
            raise RuntimeError("the MCP decoder stopped at a fatal error; the session must be closed")
        self._buf += data

    def _next(self) -> Frame | DecodeError | None:
        """The next event in the buffer, or None when more bytes are needed (or after a fatal error)."""
        if self._stopped:
            # A fatal error closes the session (docs/mcp.md §5); decoding further would only invent events.
            return None
        consumed, event, clean = _decode_at(self._buf, self._offset, self._max_payload, self._offset + self._clean)
        self._offset += consumed
        self._clean = clean - self._offset if clean else 0
        if isinstance(event, DecodeError) and event.fatal:
            self._stopped = True
        return event

    def _compact(self) -> None:
        # Compacting only once at least half the buffer is dead keeps the copying linear in the stream length.
        if self._offset and 2 * self._offset >= len(self._buf):
            del self._buf[: self._offset]
            self._offset = 0
