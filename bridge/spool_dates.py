"""How a spool file dates its rows on the monotonic clock: `segments`, and the rows an earlier boot left unchecked.

A segment is a run of ids queued in one boot, with one wall - monotonic offset (a new one starts at a new boot or
a step of the wall clock). A row's monotonic queue time is its queued_at less its segment's offset; within its
boot, max_age counts from there.

The monotonic clock starts again at each boot, so rows of another boot age by the wall clock: their monotonic time
plus the segment's `wall_s`, the offset that dates them on the wall clock. A segment gets it once the spool sees
the clock synchronised in the segment's boot (it is settled: synced=1, wall_s the offset then, for the segments of
this boot queued before as well, since a synchronised clock tells when they really were); a segment queued while
synchronised has it from the start. A segment still without one at the next boot (the clock never known
synchronised: a Pi that spooled at 1970 and was set to today only after a reboot would otherwise drop the lot) is
adopted at open, once: it is taken into this boot as if its first row had been queued now (the rows keep their
spacing), gets this boot's offset as its wall_s (and is settled like the others if this boot's clock is then
known synchronised), and its rows' anchors, of the other boot's monotonic clock, are dropped. Rows of the schema
before segments are in none: they age by their wall queued_at, as they did.
"""

from __future__ import annotations

import sqlite3

CREATE_SEGMENTS = """CREATE TABLE IF NOT EXISTS segments (first_id INTEGER PRIMARY KEY, boot INTEGER NOT NULL,
    offset_s REAL NOT NULL, synced INTEGER NOT NULL DEFAULT 0, wall_s REAL)"""
INSERT_SEGMENT = "INSERT OR REPLACE INTO segments (first_id, boot, offset_s, synced, wall_s) VALUES (?, ?, ?, ?, ?)"
SETTLE = "UPDATE segments SET synced = 1, wall_s = ? WHERE boot = ? AND synced = 0"
#: Segments that end before the one holding the oldest row date nothing any more.
PRUNE_SEGMENTS = """DELETE FROM segments WHERE first_id < COALESCE((SELECT MAX(first_id) FROM segments
    WHERE first_id <= (SELECT MIN(id) FROM messages)), 0)"""
#: What a salvage carries over from a damaged file (whose table may predate the sync state or wall_s).
COPY_SEGMENTS = """INSERT OR IGNORE INTO main.segments (first_id, boot, offset_s, synced, wall_s)
    SELECT first_id, boot, offset_s, {synced}, {wall} FROM damaged.segments"""

#: (first id, boot key, wall - monotonic offset in s, synced: 1 once settled, wall_s: the offset that dates the
#: rows on the wall clock in another boot, None while unknown).
Segment = tuple[int, int, float, int, float | None]


def upgrade_segments(db: sqlite3.Connection) -> None:
    """Give a segments table of a file written before wall_s the column (its synced segments dated by their own
    offset); in the caller's transaction."""
    if "wall_s" not in {row[1] for row in db.execute("PRAGMA table_info(segments)")}:
        db.execute("ALTER TABLE segments ADD COLUMN wall_s REAL")
        db.execute("UPDATE segments SET wall_s = offset_s WHERE synced = 1")


def read_segments(db: sqlite3.Connection) -> list[Segment]:
    """The file's segments, by first id."""
    rows = db.execute("SELECT first_id, boot, offset_s, synced, wall_s FROM segments ORDER BY first_id")
    return [(int(a), int(b), float(c), int(d), None if e is None else float(e)) for a, b, c, d, e in rows]


def copy_segments(db: sqlite3.Connection) -> None:
    """Carry the segments of the attached `damaged` file into the main one (raises sqlite3.Error if it has none)."""
    columns = {row[1] for row in db.execute("PRAGMA damaged.table_info(segments)")}
    synced = "synced" if "synced" in columns else "0"
    wall = "wall_s" if "wall_s" in columns else "CASE WHEN synced = 1 THEN offset_s END" if synced != "0" else "NULL"
    db.execute(COPY_SEGMENTS.format(synced=synced, wall=wall))


def date_salvaged(db: sqlite3.Connection, boot: int, mono: float, offset: float) -> None:
    """Rows carried over from a file whose segments could not be read: one segment adopted into this `boot` from
    the first of them (as `adopt` would; a row in none would age by its wall queued_at, at 1970 perhaps)."""
    row = db.execute("SELECT id, queued_at FROM messages ORDER BY id LIMIT 1").fetchone()
    start = db.execute("SELECT MIN(first_id) FROM segments").fetchone()[0]
    if row is not None and (start is None or start > row[0]):
        db.execute(INSERT_SEGMENT, (row[0], boot, row[1] - mono, 0, offset))


def adopt(db: sqlite3.Connection, boot: int, mono: float, offset: float) -> int:
    """Take the segments another boot left without a wall_s into this `boot`, as if their first row was queued at
    `mono` (this boot's monotonic time now), with this boot's `offset` (wall - monotonic now) as their wall_s, and
    drop their rows' anchors; in one transaction. How many segments were adopted."""
    segments = read_segments(db)
    foreign = [(i, seg) for i, seg in enumerate(segments) if seg[1] != boot and seg[4] is None]
    if not foreign:
        return 0
    db.execute("BEGIN IMMEDIATE")
    try:
        for i, (first, *_) in foreign:
            end = segments[i + 1][0] if i + 1 < len(segments) else None
            bound, args = ("id >= ? AND id < ?", (first, end)) if end is not None else ("id >= ?", (first,))
            row = db.execute(f"SELECT queued_at FROM messages WHERE {bound} ORDER BY id LIMIT 1", args).fetchone()
            if row is None:
                db.execute("DELETE FROM segments WHERE first_id = ?", (first,))
                continue
            update = "UPDATE segments SET boot = ?, offset_s = ?, synced = 0, wall_s = ? WHERE first_id = ?"
            db.execute(update, (boot, row[0] - mono, offset, first))
            db.execute(f"DELETE FROM anchors WHERE {bound}", args)
        db.execute("COMMIT")
    except BaseException:
        db.execute("ROLLBACK")
        raise
    return len(foreign)


def open_dates(
    db: sqlite3.Connection, boot: int, mono: float, offset: float, synced: bool
) -> tuple[list[Segment], bool, int]:
    """At open: adopt what another boot left undated, settle this boot's segments if the clock is `synced`; the
    segments then, whether one of this boot is left unsettled, and how many were adopted."""
    adopted = adopt(db, boot, mono, offset)
    segments = read_segments(db)
    if not unsettled(segments, boot):
        return segments, False, adopted
    return (settle(db, segments, boot, offset), False, adopted) if synced else (segments, True, adopted)


def settle(db: sqlite3.Connection, segments: list[Segment], boot: int, offset: float) -> list[Segment]:
    """Settle the segments of `boot` not settled yet (the clock is synchronised now): `offset` is their wall_s;
    `segments` as the table then is."""
    db.execute(SETTLE, (offset, boot))
    return [(a, b, c, 1, offset) if b == boot and not d else (a, b, c, d, e) for a, b, c, d, e in segments]


def unsettled(segments: list[Segment], boot: int) -> bool:
    """Whether a segment of `boot` is not settled yet."""
    return any(seg[1] == boot and not seg[3] for seg in segments)


def pruned(segments: list[Segment], oldest: int | None) -> list[Segment]:
    """`segments` as PRUNE_SEGMENTS leaves them, `oldest` the lowest id the file holds (None: no row)."""
    if oldest is None:
        return segments
    keep = max((seg[0] for seg in segments if seg[0] <= oldest), default=0)
    return [seg for seg in segments if seg[0] >= keep]


def wall_dated(queued_at: float, segment: Segment | None, boot: int) -> float:
    """A row's queue time on the wall clock as stored for another boot: moved to its segment's wall_s (a row of
    this `boot`, or in no segment, or of one without a wall_s, keeps its queued_at)."""
    if segment is None or segment[1] == boot or segment[4] is None:
        return queued_at
    return queued_at - segment[2] + segment[4]


def oldest_dated(db: sqlite3.Connection, entry_id: int, queued_at: float) -> float:
    """When row `entry_id` was queued, on the wall clock as its segment's wall_s dates it, for a reader without the
    spool's clocks (`fieldgate spool`): a backlog stamped at 1970 and settled since is not 56 years old. A row of a
    segment without one (or in none) keeps its queued_at."""
    if db.execute("SELECT 1 FROM sqlite_master WHERE name = 'segments'").fetchone() is None:
        return queued_at
    sql = "SELECT offset_s, wall_s FROM segments WHERE first_id <= ? ORDER BY first_id DESC LIMIT 1"
    row = db.execute(sql, (entry_id,)).fetchone()
    return queued_at if row is None or row[1] is None else queued_at - row[0] + row[1]
