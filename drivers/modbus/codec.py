"""Pure Modbus register codec: register words and coil bits to typed engineering values and back."""

from __future__ import annotations

import math
import numbers
import struct
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal, TypeAlias

from gateway.errors import CodecError
from gateway.types import Value

__all__ = ["TYPES", "Decoded", "PointCodec"]

TYPES: tuple[str, ...] = (
    "bool",
    "int16",
    "uint16",
    "int32",
    "uint32",
    "int64",
    "uint64",
    "float32",
    "float64",
    "string",
    "bitfield",
)

#: What `decode` returns: a scalar, or for bitfield points a {name: bool} dict.
Decoded: TypeAlias = Value | dict[str, bool]

_ORDERS = ("big", "little")
# type -> (registers, signed, smallest, largest)
_INTS: dict[str, tuple[int, bool, int, int]] = {
    "int16": (1, True, -(2**15), 2**15 - 1),
    "uint16": (1, False, 0, 2**16 - 1),
    "int32": (2, True, -(2**31), 2**31 - 1),
    "uint32": (2, False, 0, 2**32 - 1),
    "int64": (4, True, -(2**63), 2**63 - 1),
    "uint64": (4, False, 0, 2**64 - 1),
}
# type -> (registers, big-endian struct format)
_FLOATS: dict[str, tuple[int, str]] = {"float32": (2, ">f"), "float64": (4, ">d")}
# Scaling a flag, a text or a bit map has no meaning, so these refuse scale/offset.
_UNSCALED = ("bool", "string", "bitfield")


def _endian(order: str) -> Literal["big", "little"]:
    """Narrow a validated order name to the literal int.to_bytes expects."""
    return "little" if order == "little" else "big"


def _round_half_away(x: float) -> int:
    """Round to the nearest integer, halves away from zero; exact for every finite float."""
    m = abs(x)
    whole = math.floor(m)
    # m - whole is exact for floats, unlike m + 0.5 which can round up 0.49999999999999994.
    n = whole + (1 if m - whole >= 0.5 else 0)
    return n if x >= 0 else -n


def _number(value: object) -> int | float:
    """Accept a real number (never a bool or a string) as int or float."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise CodecError(f"expected a number, got {value!r}")
    if isinstance(value, numbers.Integral):
        return int(value)
    try:
        return float(value)
    except OverflowError as exc:
        raise CodecError(f"value {value!r} is too large for a float") from exc


def _flag(value: object, what: str) -> bool:
    """Accept True/False or the ints 0/1 as a flag value."""
    if isinstance(value, bool):
        return value
    if isinstance(value, numbers.Integral) and int(value) in (0, 1):
        return bool(value)
    raise CodecError(f"{what} takes true/false or 0/1, got {value!r}")


def _sized(items: object, n: int) -> bool:
    """True when items is a list-like (not text) of exactly n entries."""
    return isinstance(items, Sequence) and not isinstance(items, (str, bytes)) and len(items) == n


def _to_words(data: bytes, byte_order: str, word_order: str) -> list[int]:
    """Split big-endian value bytes into registers laid out in the device's orders."""
    chunks = [data[i : i + 2] for i in range(0, len(data), 2)]
    if word_order == "little":
        chunks.reverse()
    endian = _endian(byte_order)
    return [int.from_bytes(chunk, endian) for chunk in chunks]


def _from_words(words: Sequence[int], byte_order: str, word_order: str) -> bytes:
    """Join registers in the device's orders back into big-endian value bytes."""
    ordered = list(words) if word_order == "big" else list(reversed(words))
    endian = _endian(byte_order)
    return b"".join(word.to_bytes(2, endian) for word in ordered)


@dataclass(frozen=True, slots=True)
class PointCodec:
    """How one point's value is laid out in Modbus registers or bits."""

    type: str
    length: int = 0
    byte_order: str = "big"
    word_order: str = "big"
    scale: float = 1.0
    offset: float = 0.0
    bits: tuple[tuple[int, str], ...] = ()

    def __post_init__(self) -> None:
        """Check the layout once, so encode/decode can trust it."""
        if self.type not in TYPES:
            hint = ""
            if isinstance(self.type, str) and ":" in self.type:
                hint = " (use PointCodec.parse for 'string:N')"
            raise CodecError(f"unknown type {self.type!r}; expected one of {', '.join(TYPES)}{hint}")
        problems: list[str] = []
        is_int = isinstance(self.length, int) and not isinstance(self.length, bool)
        if self.type == "string":
            if not is_int or self.length < 1:
                problems.append(f"string length must be an integer >= 1, got {self.length!r}")
        elif self.length != 0:
            problems.append(f"length applies only to string points, not {self.type}")
        for name in ("byte_order", "word_order"):
            if getattr(self, name) not in _ORDERS:
                problems.append(f"{name} must be 'big' or 'little', got {getattr(self, name)!r}")
        numeric = True
        for name in ("scale", "offset"):
            val = getattr(self, name)
            if isinstance(val, bool) or not isinstance(val, numbers.Real):
                problems.append(f"{name} must be a number, got {val!r}")
                numeric = False
            elif not math.isfinite(val):
                problems.append(f"{name} must be finite, got {val!r}")
        if numeric:
            if self.scale == 0:
                problems.append("scale must not be 0")
            if self.type in _UNSCALED and (self.scale != 1 or self.offset != 0):
                problems.append(f"scale/offset do not apply to {self.type} points")
        problems.extend(self._bit_problems())
        if problems:
            raise CodecError(f"bad {self.type} point: " + "; ".join(problems))
        # Normalise (config may hand over lists and ints) so the codec hashes and compares.
        object.__setattr__(self, "bits", tuple((int(b), str(n)) for b, n in self.bits))
        object.__setattr__(self, "scale", float(self.scale))
        object.__setattr__(self, "offset", float(self.offset))

    def _bit_problems(self) -> list[str]:
        """Everything wrong with the bits table, for __post_init__."""
        if self.type != "bitfield":
            return [] if not self.bits else [f"bits apply only to bitfield points, not {self.type}"]
        if not isinstance(self.bits, Sequence) or not self.bits:
            return ["a bitfield needs at least one (bit, name) pair"]
        problems: list[str] = []
        seen_bits: set[int] = set()
        seen_names: set[str] = set()
        for pair in self.bits:
            if not isinstance(pair, Sequence) or isinstance(pair, str) or len(pair) != 2:
                problems.append(f"{pair!r} is not a (bit, name) pair")
                continue
            bit, name = pair
            if isinstance(bit, bool) or not isinstance(bit, int) or not 0 <= bit <= 15:
                problems.append(f"bit {bit!r} is not a bit number 0..15")
            elif bit in seen_bits:
                problems.append(f"bit {bit} is named twice")
            else:
                seen_bits.add(bit)
            if not isinstance(name, str) or not name:
                problems.append(f"bit name {name!r} is not a non-empty string")
            elif name in seen_names:
                problems.append(f"bit name {name!r} is used twice")
            else:
                seen_names.add(name)
        return problems

    @classmethod
    def parse(cls, type_spec: str, **kw: object) -> PointCodec:
        """Build a codec from a config type such as 'float32' or 'string:12'."""
        if not isinstance(type_spec, str):
            raise CodecError(f"type must be a string, got {type_spec!r}")
        name, sep, arg = type_spec.partition(":")
        if sep:
            if name != "string":
                raise CodecError(f"type {type_spec!r}: only string takes a length (string:N)")
            if "length" in kw:
                raise CodecError(f"type {type_spec!r} already gives the length")
            if not arg.isdecimal() or int(arg) < 1:
                raise CodecError(f"type {type_spec!r}: N in string:N must be an integer >= 1")
            kw["length"] = int(arg)
        elif name == "string" and "length" not in kw:
            raise CodecError("type 'string' needs a length: string:N")
        try:
            return cls(name, **kw)  # type: ignore[arg-type]
        except TypeError as exc:
            raise CodecError(f"type {type_spec!r}: {exc}") from exc

    @property
    def spec(self) -> str:
        """The type as written in config ('string:12' for strings)."""
        return f"string:{self.length}" if self.type == "string" else self.type

    @property
    def count(self) -> int:
        """Registers (or, for bool on a bit table, bits) the point occupies."""
        if self.type == "string":
            return (self.length + 1) // 2
        if self.type in _INTS:
            return _INTS[self.type][0]
        if self.type in _FLOATS:
            return _FLOATS[self.type][0]
        return 1

    @property
    def _identity(self) -> bool:
        """True when scale/offset leave values untouched, so integers stay integers."""
        return self.scale == 1 and self.offset == 0

    def _check_words(self, words: Sequence[int]) -> None:
        """Refuse a register list of the wrong size or with non-16-bit words."""
        if not _sized(words, self.count):
            raise CodecError(f"{self.spec} needs {self.count} register(s), got {words!r}")
        for word in words:
            if not isinstance(word, int) or not 0 <= word <= 0xFFFF:
                raise CodecError(f"{self.spec}: register word {word!r} is not in 0..65535")

    def decode(self, words: Sequence[int]) -> Decoded:
        """Turn the point's registers (or a bool point's bits) into its engineering value."""
        self._check_words(words)
        if self.type == "bool":
            return words[0] != 0
        if self.type == "string":
            data = _from_words(words, self.byte_order, "big")[: self.length]
            return data.rstrip(b"\x00 ").decode("utf-8", errors="replace")
        data = _from_words(words, self.byte_order, self.word_order)
        if self.type == "bitfield":
            reg = int.from_bytes(data, "big")
            return {name: bool(reg >> bit & 1) for bit, name in self.bits}
        if self.type in _FLOATS:
            x: float = struct.unpack(_FLOATS[self.type][1], data)[0]
            return x if self._identity else x * self.scale + self.offset
        raw = int.from_bytes(data, "big", signed=_INTS[self.type][1])
        return raw if self._identity else raw * self.scale + self.offset

    def encode(self, value: object) -> list[int]:
        """Turn an engineering value into the registers to write; CodecError if it does not fit."""
        if self.type == "bool":
            return [1 if _flag(value, "a bool point") else 0]
        if self.type == "bitfield":
            raise CodecError("bitfield points are read-only")
        if self.type == "string":
            return self._encode_string(value)
        if self.type in _FLOATS:
            return self._encode_float(value)
        return self._encode_int(value)

    def _encode_string(self, value: object) -> list[int]:
        """UTF-8 text, NUL-padded to fill every register of the point."""
        if not isinstance(value, str):
            raise CodecError(f"{self.spec} takes text, got {value!r}")
        try:
            data = value.encode("utf-8")
        except UnicodeEncodeError as exc:
            raise CodecError(f"{self.spec}: {value!r} is not encodable as UTF-8") from exc
        if len(data) > self.length:
            raise CodecError(f"text of {len(data)} bytes does not fit {self.spec}")
        # Pad the whole point, not just the text, so a shorter write leaves no stale tail.
        data = data.ljust(self.count * 2, b"\x00")
        return _to_words(data, self.byte_order, "big")

    def _encode_float(self, value: object) -> list[int]:
        """IEEE 754 in the point's width; a finite value that would become inf is refused."""
        num = _number(value)
        fmt = _FLOATS[self.type][1]
        finite_in = not isinstance(num, float) or math.isfinite(num)
        try:
            x = float(num) if self._identity else (num - self.offset) / self.scale
            if finite_in and not math.isfinite(x):
                raise OverflowError
            data = struct.pack(fmt, x)
        except OverflowError as exc:
            raise CodecError(f"value {value!r} does not fit {self.type} (overflows to inf)") from exc
        return _to_words(data, self.byte_order, self.word_order)

    def _encode_int(self, value: object) -> list[int]:
        """Unscale, round half away from zero, range-check, two's complement."""
        num = _number(value)
        regs, signed, lo, hi = _INTS[self.type]
        if isinstance(num, float) and not math.isfinite(num):
            raise CodecError(f"value {num!r} is not finite; {self.type} needs a finite number")
        if isinstance(num, int) and self._identity:
            raw = num  # exact path: 64-bit integers must not pass through a float
        else:
            try:
                scaled = num if self._identity else (num - self.offset) / self.scale
            except OverflowError as exc:
                raise CodecError(f"value {value!r} does not fit {self.type} ({lo}..{hi})") from exc
            if not math.isfinite(scaled):
                raise CodecError(f"value {value!r} does not fit {self.type} ({lo}..{hi})")
            raw = _round_half_away(scaled)
        if not lo <= raw <= hi:
            detail = "" if self._identity else f" after scaling (raw {raw})"
            raise CodecError(f"value {value!r} does not fit {self.type} ({lo}..{hi}){detail}")
        return _to_words(raw.to_bytes(regs * 2, "big", signed=signed), self.byte_order, self.word_order)

    def decode_bits(self, bits: Sequence[bool]) -> bool:
        """Read a bool point from a coil or discrete-input table."""
        self._require_bool_table()
        if not _sized(bits, 1):
            raise CodecError(f"a bool point needs 1 bit, got {bits!r}")
        return _flag(bits[0], "a coil bit")

    def encode_bits(self, value: object) -> list[bool]:
        """Write a bool point to a coil table."""
        self._require_bool_table()
        return [_flag(value, "a bool point")]

    def _require_bool_table(self) -> None:
        """Only bool points live in coil/discrete-input tables."""
        if self.type != "bool":
            raise CodecError(f"{self.spec} points need registers, not coil/discrete bits")
