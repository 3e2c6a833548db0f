"""How simulated values move over time (engineering units), shared by every simulated device."""

from __future__ import annotations

import math
import random
from dataclasses import dataclass

from gateway.types import Value


@dataclass(frozen=True, slots=True)
class Wave:
    """How a value moves over time."""

    kind: str = "constant"  # constant, sine, ramp, toggle, bits, random
    value: Value = 0
    min: float = 0.0
    max: float = 100.0
    period: float = 60.0
    step: float = 1.0

    def at(self, t: float, seed: int = 0) -> Value:
        """The value at unix time `t`."""
        period = self.period or 1.0
        if self.kind == "sine":
            mid, amp = (self.max + self.min) / 2, (self.max - self.min) / 2
            return mid + amp * math.sin(2 * math.pi * t / period)
        if self.kind == "ramp":
            span = self.max - self.min + self.step
            return self.min + (math.floor(t / period) * self.step) % span
        if self.kind == "toggle":
            return bool(math.floor(t / period) % 2)
        if self.kind == "bits":
            return 1 << int(math.floor(t / period) % 16)
        if self.kind == "random":
            return random.Random(math.floor(t / period) ^ seed).uniform(self.min, self.max)
        return self.value
