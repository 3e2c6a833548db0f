"""The counters of a Modbus line and of its devices, and the one place that counts a transaction for both.

A line's `transactions` and failure counts are the sum of its devices' plus its writes' transactions:
a device's `transactions` are its reads (its write requests are `writes`), while the line counts every
transaction it carried. `reopen_attempts` and `wire_seconds` are the line's alone; poll cycles, response
times and writes are the devices' alone.
"""

from __future__ import annotations

import bisect
from dataclasses import dataclass, field

from gateway.errors import CrcError, DeviceError, DeviceException, DeviceTimeout

# Upper bounds (seconds) of the response-time buckets: from a short read at 115200 baud to a
# full 125-register read at 9600 baud behind a slow serial device server.
RESPONSE_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5)


@dataclass
class TransactionCounts:
    """How the transactions of a line, or of one device, ended."""

    transactions: int = 0
    timeouts: int = 0
    crc_errors: int = 0
    exceptions: int = 0
    errors: int = 0

    def count_failure(self, error: DeviceError) -> None:
        """Count one failed transaction under its kind (a garbled answer is a CRC error, not a timeout)."""
        if isinstance(error, DeviceException):
            self.exceptions += 1
        elif isinstance(error, CrcError):
            self.crc_errors += 1
        elif isinstance(error, DeviceTimeout):
            self.timeouts += 1
        else:
            self.errors += 1


@dataclass
class BusStats(TransactionCounts):
    """Counters of one line."""

    reopen_attempts: int = 0
    passthrough: int = 0  # transactions of the Modbus TCP server's clients carried out on the line
    passthrough_failed: int = 0  # of those, the ones that got no answer
    wire_seconds: float = 0.0  # frames of answered reads on the wire: utilisation = wire / wall time


@dataclass
class DeviceStats(TransactionCounts):
    """Counters of one device."""

    cycles: int = 0
    skipped_cycles: int = 0
    writes: int = 0
    last_response_s: float = 0.0
    # Answered reads per RESPONSE_BUCKETS bucket (not cumulative); the last counts those above them all.
    response_counts: list[int] = field(default_factory=lambda: [0] * (len(RESPONSE_BUCKETS) + 1))
    response_sum_s: float = 0.0

    def observe_response(self, seconds: float) -> None:
        """Count one answered read that took `seconds` from request to response."""
        self.last_response_s = seconds
        self.response_sum_s += seconds
        self.response_counts[bisect.bisect_left(RESPONSE_BUCKETS, seconds)] += 1


def count_transaction(
    line: BusStats, device: DeviceStats, error: DeviceError | None = None, *, write: bool = False
) -> None:
    """Count one ended transaction of `device` on `line`, answered or failed with `error`, on both at once."""
    line.transactions += 1
    if not write:
        device.transactions += 1
    if error is not None:
        line.count_failure(error)
        device.count_failure(error)


def count_answered_read(line: BusStats, device: DeviceStats, response_s: float, wire_s: float) -> None:
    """Count one answered read: a transaction of both, its response time on the device, its frames' time on the line."""
    count_transaction(line, device)
    device.observe_response(response_s)
    line.wire_seconds += wire_s
