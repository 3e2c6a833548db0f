"""Each Modbus line's utilisation: wire time over wall time across about the last minute, from snapshots."""

from __future__ import annotations

from collections import deque
from collections.abc import Iterable

from gateway.types import ModbusLineSnapshot

UTILISATION_WINDOW = 60.0  # seconds of wire time the utilisation gauge averages over


class Utilisation:
    """Each line's wire time / wall time over about the last `window` seconds, from samples of its counters."""

    def __init__(self, window: float = UTILISATION_WINDOW) -> None:
        self._samples: deque[tuple[float, dict[str, float]]] = deque()
        self._window = window

    def sample(self, lines: Iterable[ModbusLineSnapshot], now: float) -> None:
        """Remember every line's wire time at `now`; drop samples older than the window."""
        self._samples.append((now, {line.name: line.counters.wire_seconds for line in lines}))
        # Keep one sample at least a window old, so that the ratio covers the whole window.
        while len(self._samples) > 1 and now - self._samples[1][0] >= self._window:
            self._samples.popleft()

    def ratio(self, line: ModbusLineSnapshot, now: float) -> float:
        """Share of the window the line's frames were on the wire (0 before any sample)."""
        if not self._samples:
            return 0.0
        since, wire = self._samples[0]
        elapsed = now - since
        if elapsed <= 0:
            return 0.0
        return max(0.0, line.counters.wire_seconds - wire.get(line.name, 0.0)) / elapsed
