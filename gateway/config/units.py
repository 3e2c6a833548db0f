"""Parsing of the human units used in config files: durations and sizes."""

from __future__ import annotations

import re
from typing import Annotated

from pydantic import BeforeValidator

_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(ms|s|m|h|d)?\s*$")
_DURATION_FACTOR = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0, None: 1.0}
_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([KMGT]?i?B)?\s*$", re.IGNORECASE)
_SIZE_FACTOR = {"": 1, "k": 1024, "m": 1024**2, "g": 1024**3, "t": 1024**4}


def parse_duration(value: object) -> float:
    """Return seconds for `500ms`, `1s`, `5m`, `2h`, `7d` or a bare number of seconds."""
    if isinstance(value, bool):
        raise ValueError("expected a duration such as 500ms, 1s, 5m, 7d")
    if isinstance(value, int | float):
        if value < 0:
            raise ValueError("a duration cannot be negative")
        return float(value)
    if isinstance(value, str):
        m = _DURATION.match(value)
        if m:
            return float(m.group(1)) * _DURATION_FACTOR[m.group(2)]
    raise ValueError(f"{value!r} is not a duration (use e.g. 250ms, 1s, 5m, 7d)")


def parse_size(value: object) -> int:
    """Return bytes for `64MB`, `512kB`, `1GiB` or a bare number of bytes (units are powers of 1024)."""
    if isinstance(value, bool):
        raise ValueError("expected a size such as 64MB")
    if isinstance(value, int):
        if value < 0:
            raise ValueError("a size cannot be negative")
        return value
    if isinstance(value, str):
        m = _SIZE.match(value)
        if m:
            unit = (m.group(2) or "").lower().replace("ib", "").replace("b", "")
            return int(float(m.group(1)) * _SIZE_FACTOR[unit])
    raise ValueError(f"{value!r} is not a size (use e.g. 512kB, 64MB, 1GB)")


def format_duration(seconds: float) -> str:
    """Render seconds the way a config file would say them."""
    if seconds < 1:
        return f"{seconds * 1000:g}ms"
    return f"{seconds:g}s"


Duration = Annotated[float, BeforeValidator(parse_duration)]
Size = Annotated[int, BeforeValidator(parse_size)]
