"""Clocks a test moves by hand: a wall clock and a monotonic clock, for the spool and the process clock."""

from __future__ import annotations


class Clocks:
    """A wall clock and a monotonic clock the test moves: `step` moves the wall one alone, `run` both, `boot` starts
    the monotonic one again (a new boot) at a wall time."""

    def __init__(self, wall: float = 1000.0, mono: float = 50.0) -> None:
        self.now, self.mono = wall, mono

    def wall(self) -> float:
        """The wall clock (unix s)."""
        return self.now

    def monotonic(self) -> float:
        """The monotonic clock (s)."""
        return self.mono

    def step(self, seconds: float) -> None:
        """The wall clock alone moves (NTP sets it)."""
        self.now += seconds

    def run(self, seconds: float) -> None:
        """Time passes."""
        self.now += seconds
        self.mono += seconds

    def boot(self, wall: float) -> None:
        """A reboot: the monotonic clock starts again; the wall clock reads `wall`."""
        self.now, self.mono = wall, 5.0
