"""A Modbus point's register codec from its config fields: one function for the schema's check and the settings."""

from __future__ import annotations

import functools

from drivers.modbus.codec import PointCodec
from drivers.modbus.planner import BIT_TABLES

#: Codecs are frozen values: points with the same layout share one (a reload builds no new ones).
CODEC_CACHE_SIZE = 4096


def point_type(table: str, type_spec: str | None) -> str:
    """The point's type as configured, or its default: bool on bit tables, uint16 on register tables."""
    return type_spec or ("bool" if table in BIT_TABLES else "uint16")


def named_bits(bits: dict[int, str] | list[str | None] | None) -> tuple[tuple[int, str], ...]:
    """A bitfield's `bits` (a map of bit -> name, or a list of names by bit with gaps as None) as sorted pairs."""
    if isinstance(bits, list):
        return tuple((i, n) for i, n in enumerate(bits) if n)
    return tuple(sorted((bits or {}).items()))


@functools.lru_cache(maxsize=CODEC_CACHE_SIZE)
def layout_codec(
    type_spec: str,
    byte_order: str,
    word_order: str,
    scale: float,
    offset: float,
    bits: tuple[tuple[int, str], ...],
) -> PointCodec:
    """The codec of a layout; CodecError says what is wrong with it."""
    return PointCodec.parse(
        type_spec, byte_order=byte_order, word_order=word_order, scale=scale, offset=offset, bits=bits
    )
