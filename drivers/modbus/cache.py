"""The raw registers and bits of a device's polled reads, kept as read, for the Modbus TCP server's cache hits.

Pure: the caller passes the clock. Only the line's own reads are stored (each planned block and each
write's read-back, keyed by table, address and count), so the cache holds at most a few blocks per
device whatever its clients ask.
"""

from __future__ import annotations

from collections.abc import Sequence

Raw = list[int] | list[bool]


class RawCache:
    """One device's last raw reads per table: (table, address, count) -> (when read, words or bits)."""

    def __init__(self) -> None:
        self._blocks: dict[str, dict[tuple[int, int], tuple[float, Sequence[int] | Sequence[bool]]]] = {}

    def store(self, table: str, address: int, data: Sequence[int] | Sequence[bool], now: float) -> None:
        """A read of `table` at `address` answered `data` at `now`."""
        self._blocks.setdefault(table, {})[(address, len(data))] = (now, data)

    def invalidate(self, table: str, address: int, count: int) -> None:
        """Forget every block that holds any of `count` registers or bits from `address` (they were written)."""
        blocks = self._blocks.get(table)
        if not blocks:
            return
        end = address + count
        for key in [k for k in blocks if k[0] < end and address < k[0] + k[1]]:
            del blocks[key]

    def clear(self) -> None:
        """Forget everything (the device went offline, or the line was reset)."""
        self._blocks.clear()

    def lookup(self, table: str, address: int, count: int, fresh_since: float) -> Raw | None:
        """The `count` values from `address`, when blocks read at or after `fresh_since` cover all of them, else None.

        Each value comes from the freshest block that holds it.
        """
        blocks = self._blocks.get(table)
        if not blocks or count <= 0:
            return None
        fresh = [(start, n, t, data) for (start, n), (t, data) in blocks.items() if t >= fresh_since]
        out: list[int | bool] = []
        at, end = address, address + count
        while at < end:
            best: tuple[int, int, float, Sequence[int] | Sequence[bool]] | None = None
            for block in fresh:
                start, n, t, _ = block
                if start <= at < start + n and (best is None or t > best[2]):
                    best = block
            if best is None:
                return None
            start, n, t_best, data = best
            stop = min(end, start + n)
            # A fresher block that begins inside this one holds its values from there on (a write's read-back
            # within a planned block, say).
            for s, _, t, _ in fresh:
                if at < s < stop and t > t_best:
                    stop = s
            out.extend(data[at - start : stop - start])
            at = stop
        return out
