"""JSON from peers, read strictly; JSON for peers, written so that it cannot fail.

Everything a device or an MQTT client sends passes `loads_strict` (RFC 8259 JSON that every parser
downstream agrees on: UTF-8, no NaN/Infinity, no lone surrogates, bounded nesting). Everything the
gateway encodes from peer-supplied values passes `dumps_safe`, which never raises: a value that
still slipped through (a lone surrogate from an older spool, a non-finite float from a register)
is written as the nearest valid JSON instead of ending the task that encodes it.
"""

from __future__ import annotations

import json
import math
from typing import Any

#: Nesting deeper than this is refused: nobody's telemetry is 32 levels deep, and a deep "[[[[…" costs
#: recursion in every parser on the way.
MAX_DEPTH = 32


class JsonRejected(ValueError):
    """A peer's JSON is not acceptable; the message says why in one line."""


def _no_constant(name: str) -> Any:
    raise JsonRejected(f"{name} is not JSON")


def _finite_float(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise JsonRejected(f"number {text[:20]} is out of range for a double")
    return value


def loads_strict(data: bytes | bytearray | memoryview | str, *, max_depth: int = MAX_DEPTH) -> Any:
    """The JSON value in `data`; JsonRejected for bad UTF-8, bad JSON, NaN/Infinity, lone surrogates, deep nesting."""
    if isinstance(data, str):
        text = data
    else:
        try:
            text = bytes(data).decode("utf-8")
        except UnicodeDecodeError as exc:
            raise JsonRejected(f"not UTF-8: {exc.reason} at byte {exc.start}") from None
    try:
        value = json.loads(text, parse_constant=_no_constant, parse_float=_finite_float)
    except RecursionError:
        raise JsonRejected(f"nested deeper than {max_depth} levels") from None
    except JsonRejected:
        raise
    except ValueError as exc:
        raise JsonRejected(f"not JSON: {exc}") from None
    problem = _check(value, max_depth)
    if problem:
        raise JsonRejected(problem)
    return value


def _check(value: Any, max_depth: int) -> str | None:
    """Why a parsed value is not acceptable (lone surrogates, depth), or None; iterative, linear in its size."""
    stack: list[tuple[Any, int]] = [(value, 1)]
    while stack:
        item, depth = stack.pop()
        if isinstance(item, str):
            if not is_utf8(item):
                return "a string holds a lone surrogate (\\ud800-\\udfff), which is not Unicode text"
        elif isinstance(item, dict | list):
            if depth > max_depth:
                return f"nested deeper than {max_depth} levels"
            if isinstance(item, dict):
                for key, child in item.items():
                    if not is_utf8(key):
                        return "a name holds a lone surrogate (\\ud800-\\udfff), which is not Unicode text"
                    stack.append((child, depth + 1))
            else:
                stack.extend((child, depth + 1) for child in item)
    return None


def is_utf8(text: str) -> bool:
    """True when `text` is Unicode text UTF-8 can carry (no lone surrogates)."""
    if text.isascii():
        return True
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def utf8_text(text: str) -> str:
    """`text` itself when UTF-8 can carry it, else with each lone surrogate replaced by "?"."""
    return text if is_utf8(text) else text.encode("utf-8", "replace").decode("utf-8")


def dumps_safe(value: object) -> bytes:
    """Compact UTF-8 JSON of `value`; never raises for JSON-shaped values.

    Non-finite floats become null, lone surrogates "?", non-string keys their str(), anything that is not a
    JSON type (or an int too long for Python to print) its str(): encoding what a peer sent must not end the
    task that publishes it.
    """
    try:
        text = json.dumps(_clean(value), separators=(",", ":"), ensure_ascii=False, allow_nan=False)
    except (ValueError, TypeError, RecursionError):
        text = json.dumps(_clean(_printable(value)), ensure_ascii=False)
    return text.encode("utf-8", "replace")


def _printable(value: object) -> str:
    try:
        return str(value)
    except ValueError:  # an int past sys.get_int_max_str_digits()
        return f"<{type(value).__name__} too large to print>"
    except RecursionError:  # a container nested past the interpreter's recursion limit
        return f"<{type(value).__name__} nested too deep to print>"


def _clean(value: object) -> object:
    if value is None or isinstance(value, bool):
        return value
    if isinstance(value, int):
        # Python prints at most 4,300 digits by default (about 14,000 bits); past that, say what it was.
        return value if value.bit_length() < 14_000 else f"<int of {value.bit_length()} bits>"
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, str):
        return utf8_text(value)
    if isinstance(value, dict):
        return {(_clean(k) if isinstance(k, str) else str(k)): _clean(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_clean(v) for v in value]
    return _clean(str(value))
