"""What a config problem is, and the small helpers every message is written with."""

from __future__ import annotations

import difflib
import re
from dataclasses import dataclass
from typing import Any

Key = Any  # a mapping key (str, int, ...) or a sequence index
Path = tuple[Key, ...]


@dataclass
class Problem:
    """An error or warning at a path of the data as written (before any pruning)."""

    path: Path
    message: str
    line: int | None = None  # when known better than from the path (YAML errors)


def format_path(path: Path) -> str:
    """`modbus.buses[0]['a b']`, or `(top level)`."""
    out = ""
    for key in path:
        if isinstance(key, int) and not isinstance(key, bool):
            out += f"[{key}]"
        elif isinstance(key, str) and re.fullmatch(r"[A-Za-z0-9_-]+", key):
            out += f".{key}" if out else key
        else:
            out += f"[{str(key)!r}]"
    return out or "(top level)"


def show(value: Any) -> str:
    """A short rendering of a config value for messages."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, dict):
        return "a mapping"
    if isinstance(value, list):
        return "a list"
    text = repr(value)
    return text if len(text) <= 40 else text[:36] + "...'"


def hint(word: str, choices: list[str]) -> str:
    """A ' (did you mean ...?)' suffix, or ''."""
    close = difflib.get_close_matches(word, choices, n=1, cutoff=0.7)
    return f" (did you mean {close[0]!r}?)" if close else ""
