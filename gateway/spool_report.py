"""`fieldgate spool`: what each northbound sink's spool holds, as a table or as JSON."""

from __future__ import annotations

import json
import sqlite3
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from bridge.spool import SpoolCorrupt, SpoolError, read_stats

if TYPE_CHECKING:
    from rich.console import Console

    from gateway.config import Config

_SIZE_UNITS = ("kB", "MB", "GB", "TB")  # powers of 1024, as the config's sizes
_COLUMNS = ("SINK", "URL", "MESSAGES", "BYTES", "OLDEST", "DROPPED", "FILE")
_RIGHT = {"MESSAGES", "BYTES", "OLDEST", "DROPPED"}


@dataclass(frozen=True, slots=True)
class SpoolRow:
    """One sink's spool as `fieldgate spool` shows it."""

    sink: str
    url: str  # "embedded" for the embedded broker
    path: Path
    messages: int
    bytes: int
    max_size: int
    oldest_age_s: float | None  # None: the spool is empty
    dropped: int

    def cells(self) -> tuple[str, ...]:
        """The row's text cells, in _COLUMNS order."""
        return (
            self.sink,
            self.url,
            str(self.messages),
            f"{human_size(self.bytes)} / {human_size(self.max_size)}",
            human_age(self.oldest_age_s),
            str(self.dropped),
            str(self.path),
        )


def collect(cfg: Config, now: float) -> tuple[list[SpoolRow], list[str]]:
    """A row per sink whose spool can be read, and an error line per spool file that cannot."""
    rows: list[SpoolRow] = []
    errors: list[str] = []
    for sink in cfg.northbound:
        path = cfg.spool_path(sink)
        count = held = dropped = 0
        oldest: float | None = None
        # No file yet: the sink has never spooled anything, which is not an error.
        if path.exists():
            try:
                stats = read_stats(path)
            # read_stats opens the file outside its own error handling, so SQLite's errors may come raw.
            except (SpoolError, sqlite3.Error, OSError) as exc:
                text = str(exc) if str(path) in str(exc) else f"cannot read spool {path}: {exc}"
                if isinstance(exc, SpoolCorrupt):
                    text += " (corrupt: the gateway moves it aside when it next opens it)"
                errors.append(f"sink {sink.name}: {text}")
                continue
            count, held, dropped = stats.count, stats.bytes, stats.dropped
            if stats.oldest_queued_at is not None:
                # Clamped: a clock stepped back must not show a negative age.
                oldest = max(0.0, now - stats.oldest_queued_at)
        url = " ".join(sink.urls) if sink.urls else sink.url or "embedded"
        rows.append(SpoolRow(sink.name, url, path, count, held, sink.spool.max_size, oldest, dropped))
    return rows, errors


def human_size(n: int) -> str:
    """Bytes for people: `512 B`, `1.2 MB`, `256 MB` (powers of 1024, as config sizes)."""
    if n < 1024:
        return f"{n} B"
    value, unit = n / 1024, 0
    while round(value, 1) >= 1024 and unit < len(_SIZE_UNITS) - 1:
        value, unit = value / 1024, unit + 1
    return f"{value:.1f}".removesuffix(".0") + f" {_SIZE_UNITS[unit]}"


def human_age(seconds: float | None) -> str:
    """An age for people: `42s`, `3m 12s`, `2h 5m`, `3d 4h`; `-` for none."""
    if seconds is None:
        return "-"
    s = int(seconds)
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m {s % 60}s"
    if s < 86400:
        return f"{s // 3600}h {s % 3600 // 60}m"
    return f"{s // 86400}d {s % 86400 // 3600}h"


def to_json(rows: list[SpoolRow]) -> str:
    """The rows as one JSON object keyed by sink name, numbers raw (bytes, seconds)."""
    doc = {
        row.sink: {
            "url": row.url,
            "messages": row.messages,
            "bytes": row.bytes,
            "max_size": row.max_size,
            "oldest_age_s": None if row.oldest_age_s is None else round(row.oldest_age_s, 3),
            "dropped": row.dropped,
            "path": str(row.path),
        }
        for row in rows
    }
    return json.dumps(doc, indent=2)


def to_text(rows: list[SpoolRow]) -> str:
    """The rows as plain aligned columns under a header, for pipes and logs."""
    table = [_COLUMNS, *(row.cells() for row in rows)]
    widths = [max(len(line[i]) for line in table) for i in range(len(_COLUMNS))]
    lines = []
    for line in table:
        cells = [
            cell.rjust(width) if name in _RIGHT else cell.ljust(width)
            for name, cell, width in zip(_COLUMNS, line, widths, strict=True)
        ]
        lines.append("  ".join(cells).rstrip())
    return "\n".join(lines)


def print_table(rows: list[SpoolRow], console: Console | None = None) -> None:
    """The rows as a rich table, for a terminal."""
    from rich import box
    from rich.console import Console
    from rich.table import Table

    table = Table(box=box.SIMPLE_HEAD, show_edge=False, pad_edge=False, padding=(0, 1, 0, 0))
    for name in _COLUMNS:
        # Long URLs and paths fold onto more lines; the figures never do.
        wraps = name in ("URL", "FILE")
        table.add_column(
            name.lower(),
            justify="right" if name in _RIGHT else "left",
            no_wrap=not wraps,
            overflow="fold" if wraps else "ellipsis",
        )
    for row in rows:
        table.add_row(*row.cells())
    (console or Console()).print(table)
