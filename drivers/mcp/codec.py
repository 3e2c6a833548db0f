"""MCP/1 frame codec: pure `encode(frame) -> bytes` and incremental `decode(buffer) -> (consumed, event)`."""

from __future__ import annotations

import json
import struct
from dataclasses import dataclass
from enum import IntEnum
from typing import Any, ClassVar

import crcmod.predefined

from gateway.errors import FieldgateError

MAGIC = b"\x55\xaa\x55\xaa"
VERSION = 1
HEADER_SIZE = 14  # magic, version, type, seq, length
CRC_SIZE = 2
OVERHEAD = HEADER_SIZE + CRC_SIZE
DEFAULT_MAX_PAYLOAD = 1_048_576
MAX_SEQ = 0xFFFF_FFFF
MAX_LENGTH = 0xFFFF_FFFF

_HEADER = struct.Struct(">4sBBII")
_TYPE_SEQ_LENGTH = struct.Struct(">BII")
# Proper prefixes of the magic, longest first: a buffer ending in one of them may be a frame's first bytes.
_MAGIC_PREFIXES = tuple(MAGIC[:n] for n in range(len(MAGIC) - 1, 0, -1))

_crc16 = crcmod.predefined.mkCrcFun("crc-ccitt-false")


class FrameType(IntEnum):
    """Frame types of MCP/1 (spec section 2)."""

    HEARTBEAT = 1
    DATA = 2
    HELLO = 3
    COMMAND = 4
    RESPONSE = 5
    ACK = 6
    NACK = 7


class NackCode(IntEnum):
    """Error codes carried in a NACK (spec section 5)."""

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
        """The spec's reason text, e.g. "crc mismatch"."""
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


def _reject_constant(name: str) -> Any:
    # NaN and Infinity are Python extensions, not JSON; other parsers on the way would choke on them.
    raise ValueError(f"{name} is not JSON")


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
        """A frame whose payload is `obj` as compact JSON with sorted keys (the spec's canonical form)."""
        text = json.dumps(obj, separators=(",", ":"), sort_keys=True, ensure_ascii=False, allow_nan=False)
        return cls(type, seq, text.encode("utf-8"))

    def body(self) -> dict[str, Any]:
        """The payload as a JSON object; an empty payload gives {} (whether that is allowed is the caller's call)."""
        if not self.payload:
            return {}
        try:
            obj = json.loads(self.payload.decode("utf-8"), parse_constant=_reject_constant)
        except (ValueError, RecursionError) as exc:
            # ValueError covers bad UTF-8 and bad JSON; RecursionError is a hostile "[[[[…" payload.
            raise MalformedPayload(f"payload is not UTF-8 JSON: {exc}", seq=self.seq) from exc
        if not isinstance(obj, dict):
            raise MalformedPayload(f"payload is a JSON {type(obj).__name__}, not an object", seq=self.seq)
        return obj


@dataclass(frozen=True, slots=True)
class DecodeError:
    """A decode event (returned, not raised): the stream held a bad frame; NACK it, and close when `fatal`."""

    code: NackCode
    seq: int  # from the bad frame's header; 0 when the header was not complete
    fatal: bool

    @property
    def reason(self) -> str:
        """The spec's reason text for `code`."""
        return self.code.reason

    def nack(self) -> Frame:
        """The NACK frame that answers this error."""
        return Frame.json(FrameType.NACK, self.seq, {"code": int(self.code), "reason": self.reason})


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
    return _decode_at(data, 0, _check_max_payload(max_payload))


def _check_max_payload(max_payload: int) -> int:
    if not 0 <= max_payload <= MAX_LENGTH:
        raise ValueError(f"max_payload must be 0..{MAX_LENGTH}, got {max_payload}")
    return max_payload


def _decode_at(buf: bytes | bytearray, start: int, max_payload: int) -> tuple[int, Frame | DecodeError | None]:
    """`decode` of buf[start:] without copying it; the consumed count is relative to `start`."""
    end = len(buf)
    i = buf.find(MAGIC, start)
    if i < 0:
        # Keep only a tail that could still grow into the magic, so that garbage never looks like a frame start.
        for prefix in _MAGIC_PREFIXES:
            if buf.endswith(prefix, start):
                return end - start - len(prefix), None
        return end - start, None

    # In a run like 55 AA 55 AA 55 AA 01 the frame starts at the last magic: the extra 55 AA pairs are noise
    # (e.g. garbage ending in 55 AA) and must not be read as "version 0x55", which would close the session.
    while True:
        if end < i + 5:
            return i - start, None
        if buf[i + 4] != MAGIC[0]:
            break
        if end < i + 6:
            return i - start, None
        if buf[i + 5] != MAGIC[1]:
            break
        i += 2

    header_complete = end >= i + HEADER_SIZE
    if buf[i + 4] != VERSION:
        # Nothing after the version byte is trustworthy, but the seq is reported when it is already at hand.
        seq = _TYPE_SEQ_LENGTH.unpack_from(buf, i + 5)[1] if header_complete else 0
        # Fatal errors consume one byte, like a CRC mismatch, so a caller that goes on anyway still resyncs.
        return i + 1 - start, DecodeError(NackCode.UNSUPPORTED_VERSION, seq, fatal=True)
    if not header_complete:
        return i - start, None

    frame_type, seq, length = _TYPE_SEQ_LENGTH.unpack_from(buf, i + 5)
    if length > max_payload:
        # Said as soon as the header is in: waiting for a huge payload is exactly what the limit prevents.
        return i + 1 - start, DecodeError(NackCode.FRAME_TOO_LARGE, seq, fatal=True)
    total = OVERHEAD + length
    if end < i + total:
        return i - start, None

    payload_end = i + HEADER_SIZE + length
    with memoryview(buf) as view:
        computed = crc16(view[i + len(MAGIC) : payload_end])
        payload = bytes(view[i + HEADER_SIZE : payload_end])
    received = int.from_bytes(buf[payload_end : payload_end + CRC_SIZE], "big")
    if computed != received:
        # Skip one byte only: the length may be the corrupted field, and it must not swallow the frames after it.
        return i + 1 - start, DecodeError(NackCode.CRC_MISMATCH, seq, fatal=False)
    return i + total - start, Frame(frame_type, seq, payload)


class Decoder:
    """Stateful wrapper around `decode` for a byte stream: feed it what the socket gives, get frames and errors."""

    def __init__(self, max_payload: int = DEFAULT_MAX_PAYLOAD) -> None:
        self._max_payload = _check_max_payload(max_payload)
        self._buf = bytearray()
        self._offset = 0  # consumed bytes at the front of _buf, dropped in bulk rather than per frame
        self._stopped = False

    @property
    def pending(self) -> int:
        """Bytes buffered and not yet decoded."""
        return len(self._buf) - self._offset

    @property
    def has_partial(self) -> bool:
        """True when buffered bytes may be the start of a frame that is not complete yet."""
        # The decoder keeps nothing but a started frame or a tail that may begin a magic, and the spec's
        # 5 s stall rule counts from a frame's first byte.
        return self.pending > 0

    def feed(self, data: bytes | bytearray | memoryview) -> list[Frame | DecodeError]:
        """Add received bytes; return the frames and errors now complete, stopping after a fatal error."""
        if self._stopped:
            raise RuntimeError("the MCP decoder stopped at a fatal error; the session must be closed")
        self._buf += data
        events: list[Frame | DecodeError] = []
        while True:
            consumed, event = _decode_at(self._buf, self._offset, self._max_payload)
            self._offset += consumed
            if event is None:
                break
            events.append(event)
            if isinstance(event, DecodeError) and event.fatal:
                # The spec closes the session here; decoding further would only invent events from its remains.
                self._stopped = True
                break
        # Compacting only once at least half the buffer is dead keeps the copying linear in the stream length.
        if self._offset and 2 * self._offset >= len(self._buf):
            del self._buf[: self._offset]
            self._offset = 0
        return events
