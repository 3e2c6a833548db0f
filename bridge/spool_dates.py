"""How a spool file dates its rows on the monotonic clock: `segments`, and the rows an earlier boot left unchecked.

A segment is a run of ids queued in one boot, with one wall - monotonic offset and one sync state (a new one
starts at a new boot, a step of the wall clock, or a change of the sync state). A row's monotonic queue time is
its queued_at less its segment's offset; within its boot, max_age counts from there.

The monotonic clock starts again at each boot, so rows of another boot age by their wall queued_at: right when
that boot's clock was synchronised, and anything at all when it was not (a Pi that spooled at 1970, rebooted,
and was then set to today would drop the lot). Those rows are adopted at open instead: their segment is taken
into this boot as if its first row had been queued now (the rows keep their spacing), so they get max_age from
here on, and their anchors, of the other boot's monotonic clock, are dropped. Rows of the schema before segments
are in none: they age by the wall clock, as they did.
"""

from __future__ import annotations

import sqlite3

CREATE_SEGMENTS = """CREATE TABLE IF NOT EXISTS segments (first_id INTEGER PRIMARY KEY, boot INTEGER NOT NULL,
    offset_s REAL NOT NULL, synced INTEGER NOT NULL DEFAULT 0)"""
INSERT_SEGMENT = "INSERT OR REPLACE INTO segments (first_id, boot, offset_s, synced) VALUES (?, ?, ?, ?)"
#: Segments that end before the one holding the oldest row date nothing any more.
PRUNE_SEGMENTS = """DELETE FROM segments WHERE first_id < COALESCE((SELECT MAX(first_id) FROM segments
    WHERE first_id <= (SELECT MIN(id) FROM messages)), 0)"""
#: What a salvage carries over from a damaged file (whose table may predate the sync state: then unknown).
COPY_SEGMENTS = "INSERT OR IGNORE INTO main.segments SELECT first_id, boot, offset_s, {synced} FROM damaged.segments"

#: (first id, boot key, wall - monotonic offset in s, synced: 1 when the clock was known synchronised, else 0).
Segment = tuple[int, int, float, int]


def read_segments(db: sqlite3.Connection) -> list[Segment]:
    """The file's segments, by first id."""
    rows = db.execute("SELECT first_id, boot, offset_s, synced FROM segments ORDER BY first_id")
    return [(int(a), int(b), float(c), int(d)) for a, b, c, d in rows]


def copy_segments(db: sqlite3.Connection) -> None:
    """Carry the segments of the attached `damaged` file into the main one (raises sqlite3.Error if it has none)."""
    columns = {row[1] for row in db.execute("PRAGMA damaged.table_info(segments)")}
    db.execute(COPY_SEGMENTS.format(synced="synced" if "synced" in columns else "0"))


def adopt(db: sqlite3.Connection, boot: int, mono: float) -> int:
    """Take the segments another boot queued while its clock was not known synchronised into this `boot`, as if
    their first row was queued at `mono` (this boot's monotonic time now), and drop their rows' anchors; in one
    transaction. How many segments were adopted."""
    segments = read_segments(db)
    foreign = [(i, seg) for i, seg in enumerate(segments) if seg[1] != boot and not seg[3]]
    if not foreign:
        return 0
    db.execute("BEGIN IMMEDIATE")
    try:
        for i, (first, _, _, _) in foreign:
            end = segments[i + 1][0] if i + 1 < len(segments) else None
            bound, args = ("id >= ? AND id < ?", (first, end)) if end is not None else ("id >= ?", (first,))
            row = db.execute(f"SELECT queued_at FROM messages WHERE {bound} ORDER BY id LIMIT 1", args).fetchone()
            if row is None:
                db.execute("DELETE FROM segments WHERE first_id = ?", (first,))
                continue
            db.execute("UPDATE segments SET boot = ?, offset_s = ? WHERE first_id = ?", (boot, row[0] - mono, first))
            db.execute(f"DELETE FROM anchors WHERE {bound}", args)
        db.execute("COMMIT")
    except BaseException:
        db.execute("ROLLBACK")
        raise
    return len(foreign)
